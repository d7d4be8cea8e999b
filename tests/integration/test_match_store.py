"""MatchStore on the real Redis: blocks and match records written by ``remember``
are found by ``candidates``; key names carry no personal data; sets are bounded."""

from __future__ import annotations

import uuid

import pytest

from agents.identity.fuzzy import MatchRecord, blocking_keys
from agents.identity.matching import BLOCK_KEY, MATCH_SET_KEY, MatchStore, block_key

pytestmark = pytest.mark.asyncio(loop_scope="session")

HASH_KEY = "test-match-store-key"


def person(tag: str, **fields) -> MatchRecord:
    """A record no other test (or earlier run) shares a blocking key with: names,
    date of birth, street and postcode drawn from ``tag``."""
    seed = int(uuid.uuid5(uuid.NAMESPACE_OID, tag).hex[:8], 16)
    values = {
        "given_name": f"ann{tag}", "surname": f"lee{tag}",
        "dob": f"{1900 + seed % 100}-{1 + seed % 12:02d}-{1 + seed % 28:02d}",
        "street": f"{seed % 997} pinkerton cct", "postcode": f"z{seed:x}", "phone": None,
    }
    values.update(fields)
    return MatchRecord(**values)


def tag() -> str:
    return uuid.uuid4().hex[:10].translate(str.maketrans("0123456789", "qrstuvwxyz"))


async def remember(store: MatchStore, redis, items: list[tuple[str, MatchRecord]]) -> list:
    async with redis.pipeline(transaction=False) as pipe:
        for profile_id, record in items:
            store.remember(pipe, profile_id, record)
        return await pipe.execute()


async def test_remembered_records_are_found_as_candidates(redis):
    store = MatchStore(redis, HASH_KEY)
    t = tag()
    ann = person(t)
    typo = person(t, given_name=ann.given_name + "e", street=None, postcode=None)
    other = person(t, given_name="bob" + t, dob=ann.dob[:4] + "-12-30", street="9 other st", postcode=f"y{t}")
    p_ann, p_other = f"p_ann{t}", f"p_other{t}"
    await remember(store, redis, [(p_ann, ann), (p_other, other)])

    [found] = await store.candidates([typo])
    assert found[0] == (p_ann, [ann])  # most shared keys first
    assert p_other in [p for p, _ in found]  # shares the surname + birth year block only
    assert (p_other, [other]) in found


async def test_candidates_for_many_records_in_two_round_trips(redis):
    store = MatchStore(redis, HASH_KEY)
    t = tag()
    records = [person(t + str(i)) for i in range(3)]
    await remember(store, redis, [(f"p_{t}_{i}", r) for i, r in enumerate(records)])
    calls = []
    original = redis.pipeline

    def counting_pipeline(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    redis.pipeline = counting_pipeline
    try:
        found = await store.candidates(records + [person(tag())])
    finally:
        del redis.pipeline
    assert len(calls) == 2
    assert [lists[0][0] for lists in found[:3]] == [f"p_{t}_{i}" for i in range(3)]
    assert found[3] == []
    assert await store.candidates([]) == []


async def test_a_profile_keeps_distinct_records_and_remember_is_idempotent(redis):
    store = MatchStore(redis, HASH_KEY)
    t = tag()
    first, second = person(t), person(t, phone="+14155550100")
    profile = f"p_{t}"
    await remember(store, redis, [(profile, first), (profile, second), (profile, first)])
    await remember(store, redis, [(profile, first)])
    assert await redis.scard(MATCH_SET_KEY % profile) == 2
    records = (await store.records_of([profile]))[profile]
    assert sorted(records, key=MatchRecord.to_json) == sorted([first, second], key=MatchRecord.to_json)
    assert (await store.records_of([f"p_none{t}"])) == {f"p_none{t}": []}


async def test_block_and_match_keys_contain_no_personal_data(redis):
    store = MatchStore(redis, HASH_KEY)
    t = tag()
    record = person(t, phone="+14155550123")
    profile = f"p_{t}"
    await remember(store, redis, [(profile, record)])
    written = [block_key(k, HASH_KEY) for k in blocking_keys(record)]
    assert await redis.exists(*written) == len(written)
    for key in written:
        assert key.startswith("cdp:blk:{") and key.endswith("}")
        digest = key[len("cdp:blk:{"):-1]
        assert len(digest) == 32 and all(c in "0123456789abcdef" for c in digest)
    names = [k.decode() async for k in redis.scan_iter(match="cdp:blk:*", count=1000)]
    for secret in (record.surname, record.given_name, record.dob, record.dob[:4], record.postcode, "4155550123", "pinkerton"):
        assert not any(secret in name for name in names)
    assert block_key("ph:+14155550123", HASH_KEY) != block_key("ph:+14155550123", "another-key")
    assert MATCH_SET_KEY % profile == f"cdp:p:{{{profile}}}:match"  # the profile's hash tag
    assert BLOCK_KEY % "x" == "cdp:blk:{x}"


async def test_hot_blocks_and_match_sets_stop_growing_at_their_bound(redis):
    store = MatchStore(redis, HASH_KEY, max_candidates=3, max_block=4, max_records=2)
    t = tag()
    shared = "+1415" + str(uuid.uuid4().int)[:7]
    records = [person(f"{t}{i}", dob=None, street=None, postcode=None, phone=shared) for i in range(6)]
    replies = await remember(store, redis, [(f"p_{t}_{i}", r) for i, r in enumerate(records)])
    phone_block = block_key(f"ph:{shared}", HASH_KEY)
    assert await redis.scard(phone_block) == 4
    assert -1 in replies  # the bounded SADD said no
    [found] = await store.candidates([records[5]])
    assert len(found) == 3  # max_candidates

    profile = f"p_{t}_many"
    await remember(store, redis, [(profile, person(t, phone=f"+1415555{i:04d}")) for i in range(5)])
    assert await redis.scard(MATCH_SET_KEY % profile) == 2


async def test_an_unreadable_match_record_is_left_out_and_logged(redis, caplog):
    store = MatchStore(redis, HASH_KEY)
    t = tag()
    profile = f"p_{t}"
    good = person(t)
    await redis.sadd(MATCH_SET_KEY % profile, good.to_json(), b"[not a record]")
    assert (await store.records_of([profile]))[profile] == [good]
    assert "unreadable match record" in caplog.text
