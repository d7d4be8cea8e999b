from agents.identity.core import assign, identifiers_to_look_up
from schemas.events import Identifier, parse_event
import orjson


def ev(**payload):
    payload.setdefault("type", "track")
    if payload["type"] == "track":
        payload.setdefault("event", "x")
    return parse_event(orjson.dumps(payload), channel="web", fallback_timestamp_ms=0)


def new_id(identifier: Identifier) -> str:
    return f"p({identifier})"


def test_new_identifiers_start_a_profile_named_after_the_best_identifier():
    e = ev(anonymousId="a1", userId="u1")
    [a] = assign([e], {}, new_id)
    assert a.profile_id == "p(user_id:u1)"
    assert a.new_profile
    assert set(a.claims) == {Identifier("user_id", "u1"), Identifier("anonymous_id", "a1")}


def test_an_owned_identifier_decides_and_the_others_are_claimed_for_it():
    e = ev(anonymousId="a1", context={"traits": {"email": "Ann@Example.com"}})
    [a] = assign([e], {Identifier("anonymous_id", "a1"): "p_old"}, new_id)
    assert a.profile_id == "p_old" and not a.new_profile
    assert a.claims == (Identifier("email", "ann@example.com"),)


def test_higher_priority_owner_wins_when_two_profiles_are_linked():
    e = ev(userId="u1", anonymousId="a1")
    owners = {Identifier("anonymous_id", "a1"): "p_anon", Identifier("user_id", "u1"): "p_user"}
    [a] = assign([e], owners, new_id)
    assert a.profile_id == "p_user" and a.claims == ()


def test_later_events_of_a_batch_see_earlier_claims():
    first = ev(anonymousId="a1")
    second = ev(type="identify", anonymousId="a1", userId="u1")
    third = ev(userId="u1", context={"device": {"id": "d1"}})
    a, b, c = assign([first, second, third], {}, new_id)
    assert a.profile_id == b.profile_id == c.profile_id == "p(anonymous_id:a1)"
    assert b.claims == (Identifier("user_id", "u1"),)
    assert c.claims == (Identifier("device_id", "d1"),)


def test_alias_previous_id_is_looked_up_as_user_or_anonymous_id_and_never_claimed():
    alias = ev(type="alias", userId="u2", previousId="a9")
    lookup = identifiers_to_look_up([alias])
    assert Identifier("user_id", "a9") in lookup and Identifier("anonymous_id", "a9") in lookup
    [a] = assign([alias], {Identifier("anonymous_id", "a9"): "p_anon"}, new_id)
    assert a.profile_id == "p_anon"
    assert a.claims == (Identifier("user_id", "u2"),)


def test_lookup_list_is_distinct():
    events = [ev(anonymousId="a1"), ev(anonymousId="a1", userId="u1")]
    assert identifiers_to_look_up(events) == [Identifier("anonymous_id", "a1"), Identifier("user_id", "u1")]
