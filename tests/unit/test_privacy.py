"""Pure parts of privacy requests and suppression: the suppression marker can never
be a profile id, which events a marker suppresses, the suppression list's entries,
the keys a wipe drops, and the request kinds the CLI offers."""

from __future__ import annotations

import asyncio
import doctest

import orjson
import pytest

import agents.identity.store
import agents.privacy
from agents.identity.rules import IdentityRules
from agents.identity.store import SUPPRESSED, is_suppressed, suppressed_events, wipe_keys
from agents.privacy import KINDS, PrivacyService, SuppressionEntry
from schemas.events import Identifier, parse_event
from streams.keys import ProfileKeys, new_profile_id

RULES = IdentityRules.builtin()


def ev(message_id="m", **payload):
    payload.setdefault("type", "track")
    payload.setdefault("messageId", message_id)
    if payload["type"] == "track":
        payload.setdefault("event", "x")
    return parse_event(orjson.dumps(payload), channel="web", fallback_timestamp_ms=0)


def test_the_marker_is_never_a_profile_id():
    for now_ms in (0, 1, 1_700_000_000_000, 36**9 - 1):
        for identifier in (Identifier("email", "ann@example.com"), Identifier("anonymous_id", "~suppressed")):
            profile_id = new_profile_id(identifier, "key", now_ms)
            assert profile_id.startswith("p_") and profile_id != SUPPRESSED
            assert not is_suppressed(profile_id) and not is_suppressed(profile_id.encode())
    assert not SUPPRESSED.startswith("p_")
    assert is_suppressed(SUPPRESSED) and is_suppressed(SUPPRESSED.encode())
    assert not is_suppressed(None) and not is_suppressed("")


def test_an_event_with_any_suppressed_identifier_is_suppressed():
    email = Identifier("email", "ann@example.com")
    anon = Identifier("anonymous_id", "a-ann")
    events = [
        ev("m1", anonymousId="a-other"),
        ev("m2", type="identify", anonymousId="a-new", traits={"email": "Ann@Example.com"}),  # the email, normalised
        ev("m3", anonymousId="a-ann"),
        ev("m4", type="alias", userId="u-new", previousId="a-ann"),  # the alias's previousId is looked up too
        ev("m5", userId="u-ann", context={"traits": {"phone": "+14155550100"}}),
    ]
    owners = {email: SUPPRESSED, anon: SUPPRESSED, Identifier("anonymous_id", "a-other"): "p_1"}
    assert suppressed_events(events, owners, RULES) == [False, True, True, True, False]
    # No marker among the owners: nothing is suppressed (the common case, no walk).
    assert suppressed_events(events, {email: "p_1", anon: "p_1"}, RULES) == [False] * 5


def test_suppression_entries_round_trip_without_clear_text():
    entry = SuppressionEntry("email", 1_700_000_000_123, "privacy-0123abcd", "p_0abcdef")
    assert entry.encode() == "email|1700000000123|privacy-0123abcd|p_0abcdef"
    assert SuppressionEntry.decode(entry.encode().encode()) == entry
    nobody = SuppressionEntry("phone", 5, "privacy-ff", None)
    assert nobody.encode() == "phone|5|privacy-ff|" and SuppressionEntry.decode(nobody.encode()) == nobody
    # An external type is free text: it may hold the separator.
    odd = SuppressionEntry("crm|id", 7, "privacy-1", "p_2")
    assert SuppressionEntry.decode(odd.encode()) == odd
    for bad in (None, b"", b"email", b"email|soon|privacy-1|", "a|b"):
        assert SuppressionEntry.decode(bad) is None


def test_one_suppression_is_recognised_by_request_or_by_profile():
    first = SuppressionEntry("email", 1, "privacy-a", "p_1")
    assert first.same_suppression(SuppressionEntry("phone", 1, "privacy-a", "p_1"))
    # Run again after it stopped midway: a new request id, the same profile.
    assert first.same_suppression(SuppressionEntry("anonymous_id", 2, "privacy-b", "p_1"))
    assert not first.same_suppression(SuppressionEntry("email", 3, "privacy-c", "p_9"))
    # People without a profile are told apart by the request only.
    alone = SuppressionEntry("email", 4, "privacy-d", None)
    assert not alone.same_suppression(SuppressionEntry("email", 5, "privacy-e", None))


def test_a_wipe_drops_every_key_of_the_profile_on_its_slot():
    keys = ProfileKeys("p_abc")
    wiped = wipe_keys("p_abc")
    assert wiped[:2] == [keys.meta, keys.ids]  # WIPE_PROFILE reads the ids from KEYS[2]
    assert sorted(wiped) == sorted([keys.meta, *keys.state()]) and len(set(wiped)) == len(wiped)
    assert {k[k.index("{"):k.index("}") + 1] for k in wiped} == {"{p_abc}"}


def test_unknown_request_kinds_are_refused_before_any_io():
    assert KINDS == ("access", "delete", "suppress", "unsuppress")
    service = PrivacyService(None, None, None, None, hash_key="", default_region="US")
    with pytest.raises(ValueError, match="expected one of access, delete, suppress, unsuppress"):
        asyncio.run(service.handle("erase", "email:ann@example.com"))


def test_the_cli_offers_every_kind():
    from streamcdp.cli import _parser

    parser = _parser()
    for kind in KINDS:
        args = parser.parse_args(["privacy", kind, "email:ann@example.com"])
        assert (args.kind, args.identifier) == (kind, "email:ann@example.com")


@pytest.mark.parametrize("module", [agents.privacy, agents.identity.store])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
