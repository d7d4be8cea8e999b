"""Activation, pure parts: destinations (parsing, consent test, what each receives),
consent from events and identify traits, and the segment engine's derivation of
activations from memberships and consent (no Redis: the engine's evaluation is pure)."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from agents.activation.destinations import Destinations, consent_of
from agents.profiles.computed import ComputedTraits
from agents.profiles.model import ProfileModel
from agents.segments.engine import (
    BLOCKED, ENTERED, EXITED, SegmentEngine, State, _marker, activation_message, membership_exits, pick_traits,
)
from agents.segments.registry import SegmentRegistry
from schemas.errors import ConfigError
from schemas.events import parse_event
from streams.metrics import Metrics
from streams.settings import Settings

DESTINATIONS = {
    "destinations": {
        "email": {"purposes": ["marketing"], "identifiers": {"email": "clear", "user_id": "clear"},
                  "traits": ["first_name", "address.city", "computed.order_count"]},
        "ads": {"purposes": "Advertising", "identifiers": {"email": "sha256", "phone": "sha256"}},
        "ccpa": {"purposes": ["sale"], "unknown_consent": "allow", "identifiers": {"user_id": "clear"}},
    }
}


@pytest.fixture(scope="module")
def destinations() -> Destinations:
    return Destinations.parse(DESTINATIONS)


@pytest.fixture(scope="module")
def model() -> ProfileModel:
    return ProfileModel.load(Settings())


def consent_trait(granted: bool, at: int = 1000, message_id: str = "m") -> bytes:
    return b"%d|%s" % (at, orjson.dumps([granted, message_id, "web"]))


def test_the_shipped_destinations_parse_and_name_their_topics():
    shipped = Destinations.load()
    assert set(shipped) == {"email", "ads"}
    assert shipped["ads"].topic == "cdp.activations.ads"
    assert dict(shipped["ads"].identifiers) == {"email": "sha256", "phone": "sha256"}
    assert sorted(shipped.topics()) == ["cdp.activations.ads", "cdp.activations.email"]


@pytest.mark.parametrize(("document", "message"), [
    ({"destination": {}}, "one key, destinations"),
    ({"destinations": {"bad name!": {"purposes": ["x"]}}}, "destination name"),
    ({"destinations": {"e": {"purposes": []}}}, "e.purposes: name the consent purpose"),
    ({"destinations": {"e": {"purposes": ["a|b"]}}}, "not a purpose name"),
    ({"destinations": {"e": {"purposes": ["m"], "unknown_consent": "maybe"}}}, "expected deny or allow"),
    ({"destinations": {"e": {"purposes": ["m"], "identifiers": {"email": "md5"}}}}, "identifiers.email: expected clear or sha256"),
    ({"destinations": {"e": {"purposes": ["m"], "traits": "email"}}}, "e.traits: expected a list"),
    ({"destinations": {"e": {"purposes": ["m"], "fields": []}}}, "unknown option 'fields'"),
])
def test_bad_destinations_are_refused_with_the_path(document, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        Destinations.parse(document, source="d.yaml")


def test_consent_covers_every_purpose_and_unknown_follows_the_destination(destinations):
    email, ads, ccpa = destinations["email"], destinations["ads"], destinations["ccpa"]
    assert email.consented({"marketing": True}) and not email.consented({"marketing": False})
    assert not email.consented({})  # deny by default: no choice recorded, no activation
    assert ads.purposes == ("advertising",) and ads.consented({"advertising": True})
    assert ccpa.consented({}) and not ccpa.consented({"sale": False})


def test_consent_of_profile_traits_is_case_insensitive_and_latest_wins():
    traits = {
        "$consent.Marketing": consent_trait(True, at=1000),
        "$consent.marketing": consent_trait(False, at=2000),
        "$consent.ads": consent_trait(True),
        "plan": b'5|"pro"',
    }
    assert consent_of(traits) == {"marketing": False, "ads": True}


def test_identifiers_each_destination_may_receive(destinations):
    ids = ["email:ann@example.com", "phone:+4915112345678", "user_id:u1", "anonymous_id:a1"]
    assert destinations["email"].identifiers_of(ids) == [
        {"type": "email", "value": "ann@example.com"}, {"type": "user_id", "value": "u1"},
    ]
    assert destinations["ads"].identifiers_of(ids) == [
        {"type": "email", "sha256": hashlib.sha256(b"ann@example.com").hexdigest()},
        {"type": "phone", "sha256": hashlib.sha256(b"+4915112345678").hexdigest()},
    ]


def test_consent_from_identify_traits_and_from_category_preferences(model):
    def ev(**fields):
        payload = {"type": "identify", "userId": "u1", "messageId": "m1", "timestamp": "2026-11-20T10:00:00Z", **fields}
        return parse_event(orjson.dumps(payload), channel="app", fallback_timestamp_ms=0, default_region="US")

    assert dict(model.consent_of(ev(traits={"email_opt_in": True, "ads_opt_in": "yes"}))) == {"marketing": True}
    both = ev(traits={"email_opt_in": True}, context={"consent": {"categoryPreferences": {"marketing": False}}})
    assert dict(model.consent_of(both)) == {"marketing": False}  # the consent manager's choice wins
    track = parse_event(orjson.dumps({"type": "track", "event": "X", "userId": "u1", "messageId": "m2",
                                      "properties": {"email_opt_in": True}}),
                        channel="web", fallback_timestamp_ms=0, default_region="US")
    assert model.consent_of(track) == []
    traits = dict(model.traits_of(ev(traits={"ads_opt_in": False})))
    assert traits["ads_opt_in"] == b"false" and orjson.loads(traits["$consent.advertising"])[0] is False


def test_bad_consent_options_are_refused():
    with pytest.raises(ConfigError, match="consent.traits.x: expected a purpose name"):
        ProfileModel.parse({"consent": {"traits": {"x": 1}}}, ComputedTraits([]), source="p")


# --- the engine's derivation -------------------------------------------------------


def engine_with(destinations, model) -> tuple[SegmentEngine, Metrics]:
    registry = SegmentRegistry(model.computed, destinations)
    document = {"id": "vip", "version": 2, "destinations": ["email", "ads", "nowhere"],
                "rule": {"trait": "plan", "eq": "vip"}}
    registry.apply_record(b"vip", orjson.dumps(document))
    metrics = Metrics()
    return SegmentEngine(None, model, registry, metrics, None), metrics


def state(plan: str, consent: dict[str, bool], segments: dict[str, str] | None = None) -> State:
    traits = {"plan": b'1|"%s"' % plan.encode(), "first_name": b'1|"Ann"'}
    traits.update({f"$consent.{p}": consent_trait(g) for p, g in consent.items()})
    return State("p1", "3", traits, {}, dict(segments or {}), ["email:ann@example.com", "user_id:u1"])


def run(engine, st: State, membership: dict, cause: str = "m1") -> list:
    segments = list(engine.index.segments.values())
    found = engine._evaluate(st, segments, membership, cause, cause, 5000)
    entered = {t.segment_id for t in found if t.kind == ENTERED}
    return found + engine._activate(st, membership, entered, cause, cause, 5000)


def kinds(found) -> list[tuple[str, str | None]]:
    return sorted((t.kind, t.destination or "") for t in found)


def test_entry_activates_only_the_consented_destinations(destinations, model):
    engine, _ = engine_with(destinations, model)
    membership: dict[str, str] = {}
    found = run(engine, state("vip", {"marketing": True}), membership)
    assert kinds(found) == [(BLOCKED, "ads"), (ENTERED, ""), (ENTERED, "email")]
    assert set(membership) == {"vip", "vip>email"} and membership["vip>email"] == "2|5000"
    # The unknown destination is logged once, not activated.
    assert ("vip", "nowhere") in engine.registry._unknown
    # The marker on the event's record carries the activation, not the blocked entry.
    assert _marker(found) == "vip@2+,vip>email@2+"


def test_consent_granted_later_enters_and_revoked_exits_at_once(destinations, model):
    engine, _ = engine_with(destinations, model)
    membership: dict[str, str] = {}
    run(engine, state("vip", {"marketing": True}), membership)
    granted = run(engine, state("vip", {"marketing": True, "advertising": True}), membership, "m2")
    assert kinds(granted) == [(ENTERED, "ads")]
    revoked = run(engine, state("vip", {"marketing": False, "advertising": True}), membership, "m3")
    assert kinds(revoked) == [(EXITED, "email")]
    assert set(membership) == {"vip", "vip>ads"}
    left = run(engine, state("free", {"marketing": False, "advertising": True}), membership, "m4")
    assert kinds(left) == [(EXITED, ""), (EXITED, "ads")] and membership == {}


def test_a_deleted_segment_takes_its_activations_with_it(destinations, model):
    engine, _ = engine_with(destinations, model)
    membership = {"gone": "1|1|x", "gone>email": "1|1|x"}
    found = engine._activate(state("vip", {"marketing": True}), membership, set(), "expiry:9", None, 9)
    assert kinds(found) == [(EXITED, "email")] and found[0].segment_id == "gone" and "gone>email" not in membership


def test_activation_messages_carry_only_what_the_destination_may_receive(destinations, model):
    engine, _ = engine_with(destinations, model)
    membership: dict[str, str] = {}
    st = state("vip", {"marketing": True, "advertising": True})
    st.traits["address.city"] = b'1|"Oslo"'
    st.traits["national_id"] = b'1|"secret"'
    found = [t for t in run(engine, st, membership) if t.destination]
    by_destination = {t.destination: orjson.loads(activation_message(t, destinations[t.destination], st, model, 5000).value)
                      for t in found}
    email, ads = by_destination["email"], by_destination["ads"]
    assert email["type"] == "cdp.segment.entered" and email["specversion"] == "1.0" and email["subject"] == "p1"
    assert email["data"]["traits"] == {"first_name": "Ann", "address.city": "Oslo", "computed.order_count": 0}
    assert email["data"]["identifiers"] == [{"type": "email", "value": "ann@example.com"}, {"type": "user_id", "value": "u1"}]
    assert ads["data"]["traits"] == {} and "ann@example.com" not in orjson.dumps(ads).decode()
    assert ads["data"]["identifiers"][0]["sha256"] == hashlib.sha256(b"ann@example.com").hexdigest()
    assert email["id"] != ads["id"] and email["data"]["destination"] == "email"
    # Deterministic: the same transition, the same id.
    again = activation_message(found[0], destinations[found[0].destination], st, model, 9999)
    assert orjson.loads(again.value)["id"] == by_destination[found[0].destination]["id"]


def test_exits_for_a_deleted_or_merged_profile_reach_every_destination(destinations):
    metrics = Metrics()
    out = membership_exits("p1", {"vip": "2|1|x", "vip>ads": "2|1|x", "vip>old": "1|1|x"},
                           ["email:ann@example.com"], "deleted:p1", 7, metrics, destinations)
    topics = sorted(m.topic for m in out)
    assert topics == ["cdp.activations.ads", "cdp.activations.old", "cdp.segment-changes"]
    ads = orjson.loads(next(m.value for m in out if m.topic == "cdp.activations.ads"))
    assert ads["type"] == "cdp.segment.exited" and ads["data"]["identifiers"][0]["type"] == "email"
    assert ads["data"]["cause"] == "deleted"
    old = orjson.loads(next(m.value for m in out if m.topic == "cdp.activations.old"))
    assert old["data"]["identifiers"] == []  # not configured here: nothing about the person


def test_pick_traits_reads_paths_and_computed_traits(model):
    st = State("p", "1", {"address.city": b'1|"Oslo"', "email": b'1|"a@b.c"'}, {}, {}, [])
    assert pick_traits(["email", "address.city", "address.zip", "computed.nope"], st, model, 0) == {
        "email": "a@b.c", "address.city": "Oslo",
    }


# --- the CLI ------------------------------------------------------------------------


def test_segments_apply_refuses_an_unknown_destination_before_publishing(tmp_path, capsys, monkeypatch):
    from streamcdp.cli import EXIT_USAGE, main

    path = tmp_path / "seg.yaml"
    path.write_text("id: s1\nversion: 1\ndestinations: [email, crm]\nrule: {trait: plan, eq: pro}\n")
    # An unreachable broker: the check must refuse before any connection is tried.
    monkeypatch.setenv("CDP_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    assert main(["segments", "apply", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'crm' is not a configured destination" in err and "defined: ads, email" in err


def test_topics_list_names_each_destinations_topic(tmp_path, capsys, monkeypatch):
    from streamcdp.cli import main

    path = tmp_path / "destinations.yaml"
    path.write_text("destinations:\n  crm: {purposes: [service]}\n")
    monkeypatch.setenv("CDP_DESTINATIONS", str(path))
    assert main(["topics", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "cdp.activations.crm" in listed and "cdp.activations.email" not in listed and "cdp.segment-changes" in listed


def test_each_configured_destination_has_its_series_before_its_first_message():
    metrics = Metrics()
    metrics.precreate_destinations(Destinations.parse(DESTINATIONS))
    sample = metrics.registry.get_sample_value
    assert sample("cdp_kafka_produce_errors_total", {"topic": "cdp.activations.ads"}) == 0
    assert sample("cdp_activations_total", {"destination": "ccpa", "kind": "exited"}) == 0
    assert sample("cdp_activations_consent_blocked_total", {"destination": "email"}) == 0


def test_only_dead_letters_are_cut_when_too_large_for_the_broker():
    from streams.output import _shrunk
    from streams.records import OutboundMessage

    big = b"x" * (2 * 1024 * 1024)
    cut = _shrunk(OutboundMessage("cdp.events.dead-letter", b"k", big))
    assert len(cut.value) == 512 * 1024 and ("cdp.dlq.truncated", b"true") in cut.headers
    change = OutboundMessage("cdp.activations.email", b"p", big)
    assert _shrunk(change) is change  # never a cut (broken) JSON document


def test_the_commit_revision_moves_over_the_batchs_later_stateless_events():
    from agents.segments.engine import _own_revision

    # Evaluated at rev 7; the profile's later events of the batch (no segment
    # affected, no state answered) left 8 and 9: commit at 9.
    assert _own_revision("7", [(6, True), (7, True), (8, False), (9, False)]) == "9"
    # A gap (someone else's step in between): it stops before the gap, so the
    # commit names an older revision than Redis holds and is refused.
    assert _own_revision("7", [(7, True), (8, False), (10, False)]) == "8"
    assert _own_revision("7", [(7, True), (9, False)]) == "7"
    assert _own_revision("7", [(7, True)]) == "7"
