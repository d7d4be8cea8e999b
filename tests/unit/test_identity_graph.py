import orjson
import pytest

from agents.identity.graph import GraphView, Node, candidates, has_known_identifier, identifiers_to_look_up, plan_batch, plan_event
from agents.identity.rules import IdentityRules
from schemas.errors import ConfigError
from schemas.events import Identifier, parse_event

RULES = IdentityRules.builtin()


def ev(message_id="m", **payload):
    payload.setdefault("type", "track")
    payload.setdefault("messageId", message_id)
    if payload["type"] == "track":
        payload.setdefault("event", "x")
    return parse_event(orjson.dumps(payload), channel="web", fallback_timestamp_ms=0)


def email(value):
    return {"traits": {"email": value}}


class NewIds:
    """Profile ids in creation order, like the real factory (time-prefixed)."""

    def __init__(self):
        self.n = 0

    def __call__(self, identifier):
        self.n += 1
        return f"p_9{self.n:03d}"


def view(owners=None, nodes=()):
    return GraphView({Identifier(*k.split(":", 1)): v for k, v in (owners or {}).items()}, {n.profile_id: n for n in nodes})


def test_new_person_gets_one_new_profile_with_every_identifier_claimed():
    plan = plan_event(ev(anonymousId="a1", userId="u1"), view(), RULES, NewIds())
    assert plan.profile_id == "p_9001"
    assert [str(c) for c in plan.claims] == ["user_id:u1", "anonymous_id:a1"]
    assert plan.merges == () and plan.blocked == ()


def test_web_app_pos_journey_is_one_profile_within_a_batch():
    events = [
        ev("m1", anonymousId="a1"),
        ev("m2", type="identify", anonymousId="a1", **email("ann@example.com")),
        ev("m3", userId="u1", context={"device": {"id": "d1"}, "traits": {"email": "ann@example.com"}}),
        ev("m4", context={"externalIds": [{"id": "L1", "type": "loyalty_id"}], "traits": {"email": "ANN@example.com"}}),
    ]
    plans = plan_batch(events, view(), RULES, NewIds())
    assert {p.profile_id for p in plans} == {"p_9001"}
    assert all(p.merges == () for p in plans)


def test_linking_two_profiles_merges_the_younger_into_the_older():
    g = view({"anonymous_id:a1": "p_2", "email:ann@example.com": "p_1"},
             [Node("p_2", identifiers=frozenset({"anonymous_id:a1"})), Node("p_1", identifiers=frozenset({"email:ann@example.com"}))])
    plan = plan_event(ev("m9", type="identify", anonymousId="a1", **email("ann@example.com")), g, RULES, NewIds())
    assert plan.profile_id == "p_1"
    [merge] = plan.merges
    assert (merge.absorbed, merge.survivor, merge.identifier, merge.message_id) == ("p_2", "p_1", "anonymous_id:a1", "m9")
    assert g.root("p_2") == "p_1"
    assert g.ids["p_1"] == {"anonymous_id:a1", "email:ann@example.com"}


def test_merge_protection_keeps_two_user_ids_apart():
    # the example: userId=B arrives with an email owned by the profile of userId=A
    g = view({"user_id:A": "p_1", "email:ann@example.com": "p_1"},
             [Node("p_1", identifiers=frozenset({"user_id:A", "email:ann@example.com"}))])
    plan = plan_event(ev("m", type="identify", userId="B", **email("ann@example.com")), g, RULES, NewIds())
    assert plan.profile_id == "p_9001", "B gets its own profile"
    assert [str(c) for c in plan.claims] == ["user_id:B"]
    assert plan.merges == ()
    [blocked] = plan.blocked
    assert (blocked.identifier, blocked.owner, blocked.types) == ("email:ann@example.com", "p_1", ("user_id",))


def test_merge_protection_refuses_a_second_user_id_for_a_known_profile():
    g = view({"anonymous_id:a1": "p_1", "user_id:A": "p_1"}, [Node("p_1", identifiers=frozenset({"user_id:A", "anonymous_id:a1"}))])
    plan = plan_event(ev(anonymousId="a1", userId="B"), g, RULES, NewIds())
    # user_id:B has the highest priority and is new; anonymous_id:a1's profile has user_id:A
    assert plan.profile_id == "p_9001" and [str(c) for c in plan.claims] == ["user_id:B"]
    assert [b.identifier for b in plan.blocked] == ["anonymous_id:a1"]


def test_chains_are_followed_to_the_root():
    g = view({"email:x@example.com": "p_3"}, [Node("p_3", parent="p_2"), Node("p_2", parent="p_1"), Node("p_1")])
    assert plan_event(ev(**email("x@example.com")), g, RULES, NewIds()).profile_id == "p_1"


def test_alias_links_previous_id_and_never_claims_it():
    g = view({"anonymous_id:a9": "p_5"}, [Node("p_5", identifiers=frozenset({"anonymous_id:a9"}))])
    alias = ev(type="alias", userId="u2", previousId="a9")
    assert Identifier("user_id", "a9") in identifiers_to_look_up([alias], RULES)
    plan = plan_event(alias, g, RULES, NewIds())
    assert plan.profile_id == "p_5" and [str(c) for c in plan.claims] == ["user_id:u2"]


def test_alias_of_two_known_profiles_merges_them():
    g = view({"anonymous_id:a9": "p_5", "user_id:u2": "p_7"},
             [Node("p_5", identifiers=frozenset({"anonymous_id:a9"})), Node("p_7", identifiers=frozenset({"user_id:u2"}))])
    plan = plan_event(ev(type="alias", userId="u2", previousId="a9"), g, RULES, NewIds())
    assert plan.profile_id == "p_5"
    assert [(m.absorbed, m.survivor) for m in plan.merges] == [("p_7", "p_5")]


def test_priority_comes_from_the_rules():
    order = [str(i) for i, _ in candidates(ev(anonymousId="a", userId="u", context={"externalIds": [{"id": "L", "type": "loyalty_id"}]}), RULES)]
    assert order == ["user_id:u", "loyalty_id:L", "anonymous_id:a"]


def test_rules_file_validation_names_the_path():
    with pytest.raises(ConfigError, match=r"identifiers.email.limit"):
        IdentityRules.parse({"identifiers": {"email": {"priority": 1, "limit": 0}}})
    with pytest.raises(ConfigError, match="unknown key"):
        IdentityRules.parse({"identifiers": {}, "colour": 1})
    assert IdentityRules.load().limit("user_id") == 1
    assert IdentityRules.load().violations(["user_id:a", "user_id:b", "email:x"]) == ["user_id"]


def test_a_fuzzy_match_joins_a_profile_only_when_no_identifier_is_known():
    g = view({"user_id:A": "p_1"}, [Node("p_1", identifiers=frozenset({"user_id:A", "crm_id:1"})), Node("p_2", parent="p_1")])
    walk_in = ev(context={"externalIds": [{"id": "2", "type": "crm_id"}]})
    plan = plan_event(walk_in, g, RULES, NewIds(), matched="p_2")
    assert plan.profile_id == "p_1" and [str(c) for c in plan.claims] == ["crm_id:2"] and plan.merges == ()


def test_a_fuzzy_match_respects_merge_protection():
    g = view({}, [Node("p_1", identifiers=frozenset({"user_id:A"}))])
    plan = plan_event(ev(userId="B"), g, RULES, NewIds(), matched="p_1")
    assert plan.profile_id == "p_9001", "a second user_id may not join through a fuzzy match"


def test_a_weak_identifier_is_kept_by_its_first_owner_and_links_nothing():
    rules = IdentityRules.parse({"identifiers": {"phone": {"priority": 4, "limit": 5, "strong": False}}})
    g = view({"phone:+14155550123": "p_1"}, [Node("p_1", identifiers=frozenset({"phone:+14155550123", "user_id:A"}))])
    sister = ev(userId="B", context={"traits": {"phone": "+14155550123"}})
    plan = plan_event(sister, g, rules, NewIds())
    assert plan.profile_id == "p_9001" and plan.merges == () and plan.blocked == ()
    assert [str(i) for i in plan.keeps] == ["user_id:B"], "the phone stays with its first owner"
    assert not has_known_identifier(ev(context={"traits": {"phone": "+14155550123"}}), g, rules)
    with pytest.raises(ConfigError, match="strong"):
        IdentityRules.parse({"identifiers": {"phone": {"priority": 1, "limit": 1, "strong": "no"}}})
