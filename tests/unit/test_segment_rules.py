"""The segment rule language (agents/segments/rules.py): parsing and validation,
condition ids, event matching, evaluation, the index, change ids. Pure: no I/O
beyond reading the example files in config/segments/."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import orjson
import pytest
import yaml

from agents.profiles.computed import ComputedTraits, resolve
from agents.segments.rules import (
    MAX_DEPTH,
    MAX_NODES,
    InvalidSegment,
    ProfileView,
    SegmentIndex,
    _event_leaves,
    change_id,
    parse_segment,
)
from schemas.errors import ConfigError
from schemas.events import parse_event

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "config" / "segments").glob("*.yaml"))
COMPUTED = ComputedTraits.load()
DAY = 86_400_000

SPEC = {
    "id": "stroller-prospects",
    "version": 3,
    "destinations": ["email"],
    "rule": {
        "all": [
            {
                "event": "Order Completed",
                "where": {"properties.products.category": {"eq": "baby"}},
                "within": "90d",
                "count": {"gte": 1},
            },
            {"trait": "total_spend", "gte": 100},
            {"not": {"event": "Support Ticket Opened", "within": "3d"}},
        ]
    },
}


def ev(**fields):
    payload = {"type": "track", "userId": "u1", "messageId": "m1", "timestamp": "2026-11-20T10:00:00Z", **fields}
    return parse_event(orjson.dumps(payload), channel="web", fallback_timestamp_ms=0, default_region="US")


def order(total=10, categories=("baby",), names=None, **extra):
    names = names or [f"Product {i}" for i in range(len(categories))]
    products = [{"sku": f"s{i}", "category": c, "name": n, "price": 2.5} for i, (c, n) in enumerate(zip(categories, names))]
    return ev(event="Order Completed", properties={"total": total, "currency": "EUR", "products": products}, **extra)


def seg(rule, **top):
    return parse_segment({"id": top.pop("id", "s1"), "version": 1, "rule": rule, **top})


def trait_rule(path, **ops):
    return seg({"trait": path, **ops})


def view(traits=None, computed=None, counters=None):
    return ProfileView(traits or {}, computed or {}, counters or {})


def error_of(document, **kwargs) -> InvalidSegment:
    with pytest.raises(InvalidSegment) as caught:
        parse_segment(document, **kwargs)
    return caught.value


def with_rule(rule):
    document = copy.deepcopy(SPEC)
    document["rule"] = rule
    return document


# --- documents -------------------------------------------------------------------


def test_spec_example_parses():
    segment = parse_segment(SPEC)
    assert (segment.id, segment.version, segment.destinations) == ("stroller-prospects", 3, ("email",))
    assert segment.document == SPEC and segment.document is not SPEC
    bought, ticket = segment.event_conditions()
    assert bought.events == frozenset({"Order Completed"}) and bought.within_ms == 90 * DAY
    assert bought.measure == "count" and bought.property is None
    assert bought.where.source == {"properties.products.category": {"eq": "baby"}}
    assert ticket.within_ms == 3 * DAY
    assert segment.windowed_conditions() == [bought, ticket]
    assert segment.trait_names() == {"total_spend"} and segment.computed_names() == frozenset()
    assert segment.event_names() == {"Order Completed", "Support Ticket Opened"}
    assert not segment.holds_for_empty_profile


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_files_parse(path):
    segment = parse_segment(yaml.safe_load(path.read_text()), str(path), computed=COMPUTED)
    assert segment.id == path.stem
    assert not segment.holds_for_empty_profile  # no example takes in every new profile


def test_examples_cover_the_documented_use_cases():
    assert {p.stem for p in EXAMPLES} >= {
        "stroller-prospects", "high-spenders", "cart-abandoners", "lapsed-customers",
        "baby-buyers-without-stroller", "open-support-ticket", "upsell-candidates",
    }


def test_json_and_yaml_give_the_same_segment():
    text = (ROOT / "config" / "segments" / "stroller-prospects.yaml").read_text()
    from_yaml = parse_segment(yaml.safe_load(text))
    from_json = parse_segment(orjson.loads(orjson.dumps(yaml.safe_load(text))))
    assert from_yaml.fingerprint == from_json.fingerprint
    assert [c.id for c in from_yaml.event_conditions()] == [c.id for c in from_json.event_conditions()]


def test_fingerprint_follows_the_document():
    changed = copy.deepcopy(SPEC)
    changed["rule"]["all"][1]["gte"] = 101
    assert parse_segment(changed).fingerprint != parse_segment(SPEC).fingerprint
    assert parse_segment(copy.deepcopy(SPEC)).fingerprint == parse_segment(SPEC).fingerprint


def test_optional_fields():
    segment = parse_segment({
        "id": "a.b_c-1", "version": 7, "name": "Name", "description": "Why", "destinations": ["email", "ads"],
        "traits": ["email", "address.city", "computed.total_spend"], "rule": {"trait": "plan", "exists": True},
    }, computed=COMPUTED)
    assert segment.name == "Name" and segment.description == "Why"
    assert segment.chosen_traits == ("email", "address.city", "computed.total_spend")
    assert segment.destinations == ("email", "ads")


ERRORS = [
    # (document or rule mutation, path, fragment of the problem)
    ([1, 2], "", "expected a mapping"),
    ({"version": 1, "rule": {"trait": "a", "exists": True}}, "id", "missing"),
    ({"id": "Bad Id", "version": 1, "rule": {}}, "id", "'Bad Id' is not a segment id"),
    ({"id": "-x", "version": 1, "rule": {}}, "id", "is not a segment id"),
    ({"id": "x" * 65, "version": 1, "rule": {}}, "id", "is not a segment id"),
    ({"id": 17, "version": 1, "rule": {}}, "id", "17 is not a segment id"),
    ({**SPEC, "rules": {}}, "", "unknown key 'rules' (did you mean rule?)"),
    ({**SPEC, "version": 0}, "version", "0 is not a positive whole number"),
    ({**SPEC, "version": "3"}, "version", "'3' is not a positive whole number"),
    ({**SPEC, "version": True}, "version", "True is not a positive whole number"),
    ({**SPEC, "version": 1.5}, "version", "is not a positive whole number"),
    ({k: v for k, v in SPEC.items() if k != "version"}, "version", "missing"),
    ({k: v for k, v in SPEC.items() if k != "rule"}, "rule", "missing"),
    ({**SPEC, "name": 5}, "name", "expected a text"),
    ({**SPEC, "destinations": {"a": 1}}, "destinations", "expected a list"),
    ({**SPEC, "destinations": ["email", "email"]}, "destinations[1]", "listed twice"),
    ({**SPEC, "destinations": ["e mail"]}, "destinations[0]", "is not a destination name"),
    ({**SPEC, "traits": "email"}, "traits", "expected a list"),
    ({**SPEC, "traits": ["email", "email"]}, "traits[1]", "listed twice"),
    ({**SPEC, "traits": ["a..b"]}, "traits[0]", "empty part"),
    ({**SPEC, "traits": ["computed"]}, "traits[0]", "computed.<name>"),
    (with_rule([]), "rule", "expected a rule node"),
    (with_rule({}), "rule", "got nothing"),
    (with_rule({"all": []}), "rule.all", "non-empty list"),
    (with_rule({"any": {"trait": "a"}}), "rule.any", "non-empty list"),
    (with_rule({"all": [{"trait": "a", "exists": True}], "any": []}), "rule", "not all and any"),
    (with_rule({"all": [{"trait": "a", "exists": True}], "x": 1}), "rule", "unknown key 'x'"),
    (with_rule({"not": [{"trait": "a", "exists": True}]}), "rule.not", "expected a rule node"),
    (with_rule({"al": []}), "rule", "one of all, any, not, trait or event; got 'al'"),
    (with_rule({"all": [{"trait": "a", "exists": True}, {"trait": "x", "gtee": 3}]}), "rule.all[1]", "unknown key 'gtee' (did you mean gte?)"),
    (with_rule({"trait": "x"}), "rule", "needs an operator"),
    (with_rule({"trait": "", "eq": 1}), "rule.trait", "expected a trait name"),
    (with_rule({"trait": 5, "eq": 1}), "rule.trait", "expected a trait name"),
    (with_rule({"trait": "computed", "eq": 1}), "rule.trait", "computed.<name>"),
    (with_rule({"trait": "x", "gt": "100"}), "rule.gt", "expected a number, got '100'"),
    (with_rule({"trait": "x", "gt": True}), "rule.gt", "expected a number"),
    (with_rule({"trait": "x", "lte": float("nan")}), "rule.lte", "is not a number from"),
    (with_rule({"trait": "x", "lt": 10**20}), "rule.lt", "is not a number from"),
    (with_rule({"trait": "x", "eq": None}), "rule.eq", "use exists: false"),
    (with_rule({"trait": "x", "eq": [1]}), "rule.eq", "expected a text, number or true/false, got a list"),
    (with_rule({"trait": "x", "ne": {"a": 1}}), "rule.ne", "got a mapping"),
    (with_rule({"trait": "x", "in": []}), "rule.in", "non-empty list"),
    (with_rule({"trait": "x", "in": "a"}), "rule.in", "non-empty list"),
    (with_rule({"trait": "x", "in": ["a", None]}), "rule.in[1]", "use exists: false"),
    (with_rule({"trait": "x", "in": list(range(1001))}), "rule.in", "at most 1000"),
    (with_rule({"trait": "x", "exists": "yes"}), "rule.exists", "expected true or false"),
    (with_rule({"trait": "x", "contains": ["a"]}), "rule.contains", "got a list"),
    (with_rule({"event": "x", "within": "90 days"}), "rule.within", "'90 days' is not a window (use a whole number with s, m, h or d, e.g. 90d)"),
    (with_rule({"event": "x", "within": "0d"}), "rule.within", "is not a window"),
    (with_rule({"event": "x", "within": 90}), "rule.within", "90 is not a window"),
    (with_rule({"event": "x", "within": "2w"}), "rule.within", "is not a window"),
    (with_rule({"event": "x", "within": None}), "rule.within", "None is not a window"),
    (with_rule({"event": "x", "within": "3651d"}), "rule.within", "longer than 3650d"),
    (with_rule({"event": "", "within": "1d"}), "rule.event", "expected an event name"),
    (with_rule({"event": []}), "rule.event", "non-empty list"),
    (with_rule({"event": ["a", 3]}), "rule.event[1]", "expected an event name"),
    (with_rule({"event": ["a", "*"]}), "rule.event[1]", "stands alone"),
    (with_rule({"where": {"a": 1}}), "rule", "missing event"),
    (with_rule({"gte": 1}), "rule", "missing trait"),
    (with_rule({"event": "x", "count": {"gte": 1}, "sum": {"property": "p", "gte": 1}}), "rule", "not both"),
    (with_rule({"event": "x", "count": 1}), "rule.count", "expected {<op>: number}"),
    (with_rule({"event": "x", "count": {}}), "rule.count", "needs an operator"),
    (with_rule({"event": "x", "count": {"in": [1]}}), "rule.count", "unknown key 'in'"),
    (with_rule({"event": "x", "count": {"gte": -1}}), "rule.count.gte", "never negative"),
    (with_rule({"event": "x", "count": {"gte": "1"}}), "rule.count.gte", "expected a number"),
    (with_rule({"event": "x", "sum": {"gte": 1}}), "rule.sum", "missing property"),
    (with_rule({"event": "x", "sum": {"property": "properties.total"}}), "rule.sum", "needs an operator"),
    (with_rule({"event": "x", "sum": {"property": "", "gte": 1}}), "rule.sum.property", "expected a dotted path"),
    (with_rule({"event": "x", "count": {"gt": {"event": "y", "count": {}}}}), "rule.count.gt", "unknown key 'count'"),
    (with_rule({"event": "x", "count": {"gt": {"event": "y", "within": "1 day"}}}), "rule.count.gt.within", "is not a window"),
    (with_rule({"event": "x", "where": {}}), "rule.where", "expected a mapping"),
    (with_rule({"event": "x", "where": ["a"]}), "rule.where", "expected a mapping"),
    (with_rule({"event": "x", "where": {"properties.a": {}}}), "rule.where[properties.a]", "expected a value"),
    (with_rule({"event": "x", "where": {"properties.a": {"equals": 1}}}), "rule.where[properties.a]", "unknown key 'equals'"),
    (with_rule({"event": "x", "where": {"properties.a": {"gt": "z"}}}), "rule.where[properties.a].gt", "expected a number"),
    (with_rule({"event": "x", "where": {"properties.a": None}}), "rule.where[properties.a]", "use exists: false"),
    (with_rule({"event": "x", "where": {"properties.a": []}}), "rule.where[properties.a]", "non-empty list"),
    (with_rule({"event": "x", "where": {"a.": 1}}), "rule.where[a.]", "empty part"),
    (with_rule({"event": "x", "where": {"a": 1, " a ": 2}}), "rule.where[a]", "given twice"),
    (with_rule({"event": "x", "where": {f"p{i}": 1 for i in range(17)}}), "rule.where", "at most 16"),
    (with_rule({"event": "x", "unknown": 1}), "rule", "unknown key 'unknown'"),
]


@pytest.mark.parametrize(("document", "path", "problem"), ERRORS, ids=[f"{e[1] or '-'}:{e[2][:30]}" for e in ERRORS])
def test_bad_documents_name_path_and_problem(document, path, problem):
    error = error_of(document)
    assert isinstance(error, ConfigError)
    assert error.path == path
    assert problem in error.problem, error.problem
    head = "segment" if error.segment_id is None else f"segment {error.segment_id}"
    assert str(error) == (f"{head}: {path}: {error.problem}" if path else f"{head}: {error.problem}")


def test_error_message_reads_well():
    error = error_of({**SPEC, "rule": {"all": [{"event": "Order Completed", "within": "90 days"}]}})
    assert str(error) == (
        "segment stroller-prospects: rule.all[0].within: '90 days' is not a window "
        "(use a whole number with s, m, h or d, e.g. 90d)"
    )


def test_error_message_with_source():
    error = error_of({"id": "x", "version": 1, "rule": {"trait": "a"}}, source="config/segments/x.yaml")
    assert str(error) == "config/segments/x.yaml x: rule: a trait condition needs an operator: one or more of " \
        "eq, ne, gt, gte, lt, lte, in, contains, exists"
    assert pickle.loads(pickle.dumps(error)).path == "rule"


def test_depth_limit():
    rule = {"trait": "a", "exists": True}
    for _ in range(MAX_DEPTH - 1):
        rule = {"not": rule}
    seg(rule)  # exactly the limit
    error = error_of(with_rule({"not": rule}))
    assert "nested deeper than 16" in error.problem
    assert error.path == "rule" + ".not" * MAX_DEPTH


def test_node_limit():
    leaves = [{"trait": f"t{i}", "exists": True} for i in range(MAX_NODES - 1)]
    seg({"any": leaves})  # 1 + 255 nodes
    error = error_of(with_rule({"any": [*leaves, {"trait": "x", "exists": True}]}))
    assert f"more than {MAX_NODES} nodes" in error.problem and error.path == f"rule.any[{MAX_NODES - 1}]"


def test_computed_traits_checked_against_the_configuration():
    seg({"trait": "computed.nope", "gte": 1})  # without the configuration: accepted
    error = error_of(with_rule({"trait": "computed.nope", "gte": 1}), computed=COMPUTED)
    assert error.path == "rule.trait" and "'nope' is not a computed trait (defined: " in error.problem
    error = error_of(with_rule({"trait": "computed.orders_30d", "gte": 1}), computed=COMPUTED)
    assert "windowed" in error.problem and "use an event condition with within" in error.problem
    error = error_of(with_rule({"trait": "computed.rfm.recency", "gte": 4}), computed=COMPUTED)
    assert "changes with the clock" in error.problem
    parse_segment(with_rule({"trait": "computed.rfm.monetary", "gte": 4}), computed=COMPUTED)
    error = error_of({**SPEC, "traits": ["computed.nope"]}, computed=COMPUTED)
    assert error.path == "traits[0]"


def test_five_second_window():
    segment = seg({"event": "Ping", "within": "5s"})
    (condition,) = segment.event_conditions()
    assert condition.within_ms == 5000 and condition.bucket_ms == 1000
    assert condition.expires_at(12_345) == 13_000 + 5000
    assert seg({"event": "x", "within": " 10 m "}).event_conditions()[0].within_ms == 600_000


# --- condition ids -----------------------------------------------------------------


def condition(**raw):
    return seg({"event": raw.pop("event", "Order Completed"), **raw}).event_conditions()[0]


def test_condition_ids_are_stable_and_content_derived():
    # Pinned: a change here orphans every counter kept in Redis under the old ids.
    assert condition().id == "c" + __import__("hashlib").blake2b(
        orjson.dumps({"events": ["Order Completed"], "sum": None, "v": 1, "where": None, "within_ms": None},
                     option=orjson.OPT_SORT_KEYS), digest_size=6).hexdigest()
    assert re.fullmatch(r"c[0-9a-f]{12}", condition().id)
    assert condition(within="1d").id == condition(within="24h").id == condition(within="1440m").id
    assert condition(event=["B", "A"]).id == condition(event=["A", "B", "A"]).id
    assert condition(where={"properties.x": "a"}).id == condition(where={"properties.x": {"eq": "a"}}).id
    assert condition(where={"properties.x": 1}).id == condition(where={"properties.x": 1.0}).id
    assert condition(where={"properties.x": [2, 1]}).id == condition(where={"properties.x": {"in": [1, 2, 1]}}).id
    assert condition(where={"a": 1, "b": 2}).id == condition(where={"b": 2, "a": 1}).id
    distinct = {
        condition().id, condition(within="1d").id, condition(event="Other").id,
        condition(where={"properties.x": "1"}).id, condition(where={"properties.x": 1}).id,
        seg({"event": "Order Completed", "sum": {"property": "properties.total", "gte": 1}}).event_conditions()[0].id,
        condition(event="*").id,
    }
    assert len(distinct) == 7
    # the threshold is not part of the id: one counter serves every threshold
    assert condition(count={"gte": 3}).id == condition(count={"lt": 1}).id == condition().id


def test_identical_conditions_share_ids_across_segments():
    a = parse_segment(SPEC)
    b = seg({"all": [{"trait": "x", "exists": True}, {"not": {"event": "Support Ticket Opened", "within": "72h"}}]}, id="other")
    assert a.event_conditions()[1].id == b.event_conditions()[0].id
    index = SegmentIndex([a, b])
    assert len(index.conditions()) == 2
    assert a.event_conditions()[1] == b.event_conditions()[0]
    assert len({*a.event_conditions(), *b.event_conditions()}) == 2


def test_compared_measures_are_conditions_too():
    segment = parse_segment(yaml.safe_load((ROOT / "config/segments/open-support-ticket.yaml").read_text()))
    opened, closed = segment.event_conditions()
    assert opened.events == {"Support Ticket Opened"} and closed.events == {"Support Ticket Closed"}
    assert not segment.evaluate(view())
    assert segment.evaluate(view(counters={opened.id: 2, closed.id: 1}))
    assert not segment.evaluate(view(counters={opened.id: 2, closed.id: 2}))
    refunds = seg({"event": "Order Completed", "sum": {"property": "properties.total",
                   "gt": {"event": "Order Refunded", "property": "properties.amount"}}})
    spent, refunded = refunds.event_conditions()
    assert refunded.measure == "sum" and refunded.property == ("properties", "amount")
    assert refunds.evaluate(view(counters={spent.id: 100, refunded.id: 20}))


# --- matching events -----------------------------------------------------------------


def test_amount():
    count = condition(where={"properties.products.category": "baby"})
    assert count.amount(order(categories=("toys", "baby"))) == 1.0
    assert count.amount(order(categories=("toys",))) is None
    assert count.amount(ev(event="Product Added", properties={"products": [{"category": "baby"}]})) is None
    total = seg({"event": "Order Completed", "sum": {"property": "properties.total", "gte": 1}}).event_conditions()[0]
    assert total.measure == "sum"
    assert total.amount(order(total=19.9)) == 19.9
    assert total.amount(order(total="19.90")) == 19.9
    assert total.amount(order(total="n/a")) is None  # nothing to add
    prices = seg({"event": "Order Completed", "sum": {"property": "properties.products.price", "gte": 1}}).event_conditions()[0]
    assert prices.amount(order(categories=("a", "b", "c"))) == 7.5
    every = condition(event="*")
    assert every.events is None and every.amount(ev(type="page", name="Home")) == 1.0


def match(where, event) -> bool:
    return condition(event="*", where=where).matches(event)


def test_where_through_arrays_is_any_element():
    mixed = order(categories=("baby", "toys"))
    assert match({"properties.products.category": "baby"}, mixed)
    assert match({"properties.products.category": ["home", "toys"]}, mixed)
    assert not match({"properties.products.category": "home"}, mixed)
    # ne is the negation of eq: no element equals
    assert not match({"properties.products.category": {"ne": "baby"}}, mixed)
    assert match({"properties.products.category": {"ne": "home"}}, mixed)
    assert match({"properties.products.price": {"gt": 2}}, mixed)
    assert not match({"properties.products.price": {"gt": 3}}, mixed)
    # several ops on one path must all hold, each for some element
    assert match({"properties.products.price": {"gte": 2, "lte": 3}}, mixed)


def test_where_contains_exists_and_heads():
    event = ev(event="Product Added", properties={"tags": ["sale", "new"], "name": "Travel Stroller", "n": "12"},
               context={"channel": "pos", "page": {"path": "/p/1"}})
    assert match({"properties.tags": {"contains": "sale"}}, event)
    assert not match({"properties.tags": {"contains": "sal"}}, event)  # elements compare whole
    assert match({"properties.name": {"contains": "Stroller"}}, event)
    assert not match({"properties.name": {"contains": "stroller"}}, event)  # case-sensitive
    assert match({"properties.n": {"gte": 12, "lt": 13}}, event)  # a text holding a number
    assert match({"properties.n": 12}, event)
    assert match({"properties.missing": {"exists": False}, "properties.name": {"exists": True}}, event)
    assert not match({"properties.missing": "x"}, event)
    assert match({"properties.missing": {"ne": "x"}}, event)
    assert match({"event": "Product Added", "channel": "web", "context.channel": "pos"}, event)
    assert match({"context.page.path": "/p/1", "type": "track", "userId": "u1"}, event)
    assert match({"properties.products.category": {"exists": False}}, event)


@pytest.mark.parametrize("path", [
    "properties.products.category", "properties.products", "properties.total", "properties", "event", "channel",
    "context.traits.email", "traits.email", "userId", "properties.products.tags", "nope.nope",
])
def test_leaves_agree_with_computed_resolve(path):
    event = ev(event="Order Completed", properties={
        "total": 5, "products": [{"category": "a", "tags": ["x", None, "y"]}, {"category": None}, {"category": "b", "tags": []}]},
        context={"traits": {"email": "a@example.com"}})
    parts = tuple(path.split("."))
    flat = []
    for leaf in _event_leaves(event, parts):
        if isinstance(leaf, list):
            flat.extend(v for v in leaf if v is not None)
        else:
            flat.append(leaf)
    assert flat == resolve(event, parts)


# --- evaluation ------------------------------------------------------------------------


MISSING = [
    ({"eq": "x"}, False), ({"ne": "x"}, True), ({"gt": 1}, False), ({"gte": 1}, False), ({"lt": 1}, False),
    ({"lte": 1}, False), ({"in": ["x"]}, False), ({"contains": "x"}, False), ({"exists": True}, False),
    ({"exists": False}, True),
]


@pytest.mark.parametrize(("ops", "expected"), MISSING, ids=[next(iter(m[0])) + str(m[0].get("exists", "")) for m in MISSING])
def test_missing_and_null_traits(ops, expected):
    segment = trait_rule("plan", **ops)
    assert segment.evaluate(view()) is expected
    assert segment.evaluate(view({"plan": None})) is expected  # null is absent
    assert segment.evaluate(view({"plan": []})) is expected  # so is an empty list
    assert segment.holds_for_empty_profile is expected


WEIRD = [{"a": 1}, [{"a": 1}], True, False, 0, -1.5, "", "text", "12", [1, "x", None], {"sensitive": True, "hash": "h"}]


@pytest.mark.parametrize("ops", [m[0] for m in MISSING] + [{"eq": 1}, {"eq": True}, {"in": [1, "a", False]}, {"contains": 1}, {"gt": 0, "lt": 100}])
def test_any_value_never_raises(ops):
    segment = trait_rule("x", **ops)
    for value in WEIRD:
        assert segment.evaluate(view({"x": value})) in (True, False)
        assert segment.evaluate(view({"x": {"y": value}})) in (True, False)


def test_comparisons_and_types():
    def holds(value, **ops):
        return trait_rule("x", **ops).evaluate(view({"x": value}))

    assert holds(100, gte=100) and not holds(99.5, gte=100) and holds("150", gt=100) and not holds("abc", gt=1)
    assert holds(1, eq=1.0) and holds("1", eq=1) and holds(1, eq="1") and not holds("01", eq="1")
    assert not holds(True, eq=1) and not holds(1, eq=True) and holds(True, eq=True) and not holds("true", eq=True)
    assert holds("Gold", eq="Gold") and not holds("gold", eq="Gold")
    assert holds("b", **{"in": ["a", "b"]}) and holds(2, **{"in": [1, 2]}) and holds("2", **{"in": [1, 2]})
    assert holds(2, **{"in": ["2"]}) and not holds(True, **{"in": [1]}) and not holds(1, **{"in": [True]})
    assert holds("gold member", contains="gold") and not holds("silver", contains="gold")
    assert holds(["a", "b"], contains="a") and not holds(["ab"], contains="a") and holds([1, 2], contains=2)
    assert not holds(12, contains="1")  # contains looks into texts and lists only
    assert holds(["a", "b"], eq="b") and holds([5, 500], gte=100) and not holds(["a", "b"], ne="a")
    assert holds({"a": 1}, exists=True) and not holds({"a": 1}, eq=1)
    assert holds(150, gte=100, lt=200) and not holds(250, gte=100, lt=200)  # several ops: all must hold
    assert holds(float("nan"), ne=1) and not holds(float("inf"), gt=1) and not holds("nan", gt=1)


def test_nested_flat_and_computed_traits():
    city = trait_rule("address.city", eq="Oslo")
    assert city.evaluate(view({"address": {"city": "Oslo", "zip": "0150"}}))
    assert city.evaluate(view({"address.city": "Oslo"}))
    assert not city.evaluate(view({"address": "Oslo"}))
    assert city.trait_names() == {"address"}
    spend = trait_rule("computed.total_spend.EUR", gte=500)
    assert spend.computed_names() == {"total_spend"} and spend.trait_names() == frozenset()
    assert spend.evaluate(view(computed={"total_spend": {"EUR": 620.5, "USD": 3}}))
    assert not spend.evaluate(view(traits={"total_spend": {"EUR": 620.5}}))  # traits are not computed traits
    assert not spend.evaluate(view(computed={"total_spend": {"USD": 900}}))
    categories = trait_rule("computed.product_categories", contains="baby")
    assert categories.evaluate(view(computed={"product_categories": ["toys", "baby"]}))
    last = trait_rule("computed.last_order.value.currency", eq="EUR")
    assert last.evaluate(view(computed={"last_order": {"value": {"currency": "EUR"}, "at": "…"}}))


def test_spec_segment_evaluation():
    segment = parse_segment(SPEC)
    bought, ticket = segment.event_conditions()
    member = view({"total_spend": 150}, counters={bought.id: 1})
    assert segment.evaluate(member)
    assert not segment.evaluate(view({"total_spend": 150}, counters={bought.id: 1, ticket.id: 1}))
    assert not segment.evaluate(view({"total_spend": 99}, counters={bought.id: 3}))
    assert not segment.evaluate(view({"total_spend": 150}, counters={bought.id: 0}))
    assert not segment.evaluate(view({"total_spend": 150}))


def test_thresholds():
    def holds(count, **spec):
        segment = seg({"event": "x", "count": spec})
        return segment.evaluate(view(counters={segment.event_conditions()[0].id: count}))

    assert holds(3, gte=3) and not holds(2, gte=3) and holds(2, lt=3) and holds(0, lt=1) and holds(0, eq=0)
    assert holds(2, gt=1, lte=2) and not holds(3, gt=1, lte=2) and holds(1, ne=0)
    zero = seg({"event": "x", "count": {"eq": 0}})
    assert zero.holds_for_empty_profile


def test_any_all_not():
    rule = {"any": [{"trait": "plan", "eq": "gold"}, {"all": [{"trait": "a", "gt": 1}, {"not": {"trait": "b", "exists": True}}]}]}
    segment = seg(rule)
    assert segment.evaluate(view({"plan": "gold"}))
    assert segment.evaluate(view({"a": 2}))
    assert not segment.evaluate(view({"a": 2, "b": 0}))
    assert not segment.evaluate(view({"plan": "silver", "a": 1}))
    assert seg({"all": [{"trait": "plan", "eq": "gold"}]}).evaluate(view({"plan": "gold"}))


def test_examples_behave():
    def load(name):
        return parse_segment(yaml.safe_load((ROOT / "config" / "segments" / f"{name}.yaml").read_text()))

    cart = load("cart-abandoners")
    added, ordered = cart.event_conditions()
    assert cart.evaluate(view(counters={added.id: 1})) and not cart.evaluate(view(counters={added.id: 1, ordered.id: 1}))
    lapsed = load("lapsed-customers")
    ever, recent = lapsed.event_conditions()
    assert lapsed.evaluate(view(counters={ever.id: 4})) and not lapsed.evaluate(view(counters={ever.id: 4, recent.id: 1}))
    assert not lapsed.evaluate(view())
    baby = load("baby-buyers-without-stroller")
    bought, stroller = baby.event_conditions()
    assert bought.amount(order(categories=("baby",))) == 1.0
    assert stroller.amount(order(categories=("baby", "toys"), names=("Travel Stroller", "Blocks"))) == 1.0
    assert stroller.amount(order(categories=("baby",), names=("Baby Monitor",))) is None
    assert baby.evaluate(view(counters={bought.id: 1})) and not baby.evaluate(view(counters={bought.id: 2, stroller.id: 1}))
    upsell = load("upsell-candidates")
    recent_ticket, opened, closed = upsell.event_conditions()
    customer = {"email": "a@example.com"}
    assert upsell.evaluate(view(customer, {"order_count": 2}))
    # Held out from opening a ticket until it is closed or 3 days pass.
    assert not upsell.evaluate(view(customer, {"order_count": 2}, {recent_ticket.id: 1, opened.id: 1}))
    assert upsell.evaluate(view(customer, {"order_count": 2}, {recent_ticket.id: 1, opened.id: 1, closed.id: 1}))
    assert upsell.evaluate(view(customer, {"order_count": 2}, {recent_ticket.id: 0, opened.id: 1}))
    high = load("high-spenders")
    assert high.evaluate(view(computed={"total_spend": {"EUR": 500}}))


# --- time ---------------------------------------------------------------------------------


def test_window_buckets():
    day = condition(within="30d")
    assert day.bucket_ms == DAY  # 30 buckets of a day
    assert condition(within="1m").bucket_ms == 2000
    assert condition(within="10s").bucket_ms == 1000  # at least a second
    t = 100 * DAY + 5
    bucket = day.bucket(t)
    assert day.expires_at(t) == 101 * DAY + 30 * DAY
    assert day.total({bucket: 2.0}, t) == 2.0
    assert day.total({bucket: 2.0}, day.expires_at(t) - 1) == 2.0
    assert day.total({bucket: 2.0}, day.expires_at(t)) == 0.0
    assert day.next_expiry([bucket, bucket - 40], t) == day.expires_at(t)
    assert day.next_expiry([bucket], day.expires_at(t)) is None
    always = condition()
    assert always.bucket_ms is None and always.expires_at(t) is None and always.bucket(t) == 0
    assert always.total({0: 3.0}, 10**15) == 3.0 and always.next_expiry([0], t) is None


# --- the index ------------------------------------------------------------------------------


def index_of(*segments, computed=COMPUTED):
    return SegmentIndex(segments, computed)


def ids(found):
    return [s.id for s in found]


def test_affected_by_event_names_and_traits():
    spend = seg({"trait": "total_spend", "gte": 100}, id="spend")
    plan = seg({"trait": "plan", "eq": "gold"}, id="plan")
    city = seg({"trait": "address.city", "eq": "Oslo"}, id="city")
    orders = seg({"event": "Order Completed"}, id="orders")
    index = index_of(spend, plan, city, orders)
    assert ids(index.affected_by(ev(type="identify", traits={"plan": "gold"}))) == ["plan"]
    assert ids(index.affected_by(ev(type="identify", traits={"address": {"city": "Oslo"}, "total_spend": 3}))) == ["city", "spend"]
    assert ids(index.affected_by(ev(event="Product Viewed", context={"traits": {"plan": "x"}}))) == ["plan"]
    assert ids(index.affected_by(order())) == ["orders"]
    assert ids(index.affected_by(ev(event="Product Viewed"))) == []
    assert index.affected_by(order()) is index.affected_by(order())  # cached


def test_affected_by_computed_traits_follows_their_events():
    count = seg({"trait": "computed.order_count", "gte": 2}, id="count")
    channels = seg({"trait": "computed.event_counts.Order Completed", "gte": 2}, id="every")  # fed by every event
    unknown = seg({"trait": "computed.nope", "gte": 2}, id="unknown")
    index = index_of(count, channels, unknown)
    assert ids(index.affected_by(order())) == ["count", "every"]
    assert ids(index.affected_by(ev(event="Product Viewed"))) == ["every"]
    blind = index_of(count, channels, unknown, computed=None)  # no configuration: every event
    assert ids(blind.affected_by(ev(event="Product Viewed"))) == ["count", "every", "unknown"]


def test_affected_by_new_profile_and_every_event():
    empty_true = seg({"trait": "plan", "exists": False}, id="no-plan")
    every = seg({"event": "*", "within": "1h", "count": {"gte": 10}}, id="busy")
    index = index_of(empty_true, every)
    assert ids(index.affected_by(ev(event="Product Viewed"))) == ["busy"]
    assert ids(index.affected_by(ev(event="Product Viewed"), new_profile=True)) == ["busy", "no-plan"]
    assert every.reads_every_event and [c.id for c in index.conditions_for("Anything")] == [every.event_conditions()[0].id]


def test_index_is_immutable_and_rebuilt():
    a = seg({"event": "A"}, id="a")
    b = seg({"event": "B"}, id="b")
    index = SegmentIndex([b, a])
    assert ids(index) == ["a", "b"] and len(index) == 2 and "a" in index and index.get("b") is b
    a2 = parse_segment({"id": "a", "version": 2, "rule": {"event": "C"}})
    changed = index.with_segment(a2)
    assert changed.get("a") is a2 and index.get("a") is a
    assert ids(changed.affected_by(ev(event="A"))) == [] and ids(index.affected_by(ev(event="A"))) == ["a"]
    assert ids(changed.affected_by(ev(event="C"))) == ["a"]
    smaller = changed.without("b")
    assert ids(smaller) == ["a"] and ids(changed) == ["a", "b"]
    assert smaller.without("nope") is smaller
    assert SegmentIndex([a, a2]).get("a") is a2  # the later definition wins


def test_updates_and_conditions():
    a = parse_segment(SPEC)
    b = seg({"event": "Order Completed", "sum": {"property": "properties.total", "gte": 100}, "within": "30d"}, id="b")
    index = index_of(a, b)
    assert len(index.conditions()) == 3
    found = {c.id: amount for c, amount in index.updates(order(total=40, categories=("baby",)))}
    assert found == {a.event_conditions()[0].id: 1.0, b.event_conditions()[0].id: 40.0}
    found = {c.id: amount for c, amount in index.updates(order(total=40, categories=("toys",)))}
    assert found == {b.event_conditions()[0].id: 40.0}
    assert index.updates(ev(event="Product Viewed")) == []


def test_index_of_a_hundred_segments_is_fast_enough():
    segments = many_segments(100)
    index = SegmentIndex(segments, COMPUTED)
    assert len(index) == 100
    event = order()
    assert all(s.event_names() & {"Order Completed"} or s.computed_names() or s.trait_names() for s in index.affected_by(event))


def many_segments(n):
    shapes = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    out = []
    for i in range(n):
        document = copy.deepcopy(shapes[i % len(shapes)])
        document["id"] = f"{document['id']}-{i}"
        text = orjson.dumps(document).decode().replace('"gte":500', f'"gte":{500 + i}').replace('"30d"', f'"{20 + i}d"')
        out.append(parse_segment(orjson.loads(text)))
    return out


# --- change ids ------------------------------------------------------------------------------


def test_change_id():
    one = change_id("p_1", "s", 3, "entered", "m-1")
    assert re.fullmatch(r"[0-9a-f]{32}", one)
    assert one == change_id("p_1", "s", 3, "entered", "m-1")
    others = {
        change_id("p_2", "s", 3, "entered", "m-1"), change_id("p_1", "t", 3, "entered", "m-1"),
        change_id("p_1", "s", 4, "entered", "m-1"), change_id("p_1", "s", 3, "exited", "m-1"),
        change_id("p_1", "s", 3, "entered", "m-2"), one,
    }
    assert len(others) == 6
    with pytest.raises(ValueError):
        change_id("p_1", "s", 3, "left", "m-1")


def test_computed_traits_read_from_a_lazy_mapping():
    from agents.profiles.computed import ComputedTraits
    from agents.segments.rules import ProfileView, parse_segment

    computed = ComputedTraits.parse({"computed_traits": [
        {"name": "total_spend", "aggregate": "sum", "events": ["Order Completed"], "property": "properties.total",
         "per": "properties.currency"},
        {"name": "order_count", "aggregate": "count", "events": ["Order Completed"]},
    ]})
    lazy = computed.lazy({"add:total_spend|EUR": "150", "add:order_count": "2"}, 0)
    rich = parse_segment({"id": "rich", "version": 1, "rule": {"all": [
        {"trait": "computed.total_spend.EUR", "gte": 100}, {"trait": "computed.order_count", "eq": 2}]}}, computed=computed)
    assert rich.evaluate(ProfileView(computed=lazy))
    assert not rich.evaluate(ProfileView(computed=computed.lazy({"add:total_spend|EUR": "50"}, 0)))
