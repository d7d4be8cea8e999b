"""The pure parts of the matching store: block key names, candidate ranking, the
in-memory LocalBlocks, and the queued Redis commands of ``remember``."""

from __future__ import annotations

import doctest

import agents.identity.matching
from agents.identity.fuzzy import MatchRecord, blocking_keys
from agents.identity.matching import BLOCK_KEY, BOUNDED_SADD, MATCH_SET_KEY, LocalBlocks, MatchStore, block_key, rank_candidates

ANN = MatchRecord(given_name="ann", surname="lee", dob="1984-03-07", postcode="2135", phone="+14155550100")


def test_block_keys_are_keyed_digests():
    key = block_key("ph:+14155550100", "k1")
    assert key.startswith("cdp:blk:{") and key.endswith("}") and len(key) == len("cdp:blk:{}") + 32
    assert "4155550100" not in key
    assert key == block_key("ph:+14155550100", "k1") != block_key("ph:+14155550100", "k2")
    assert block_key("ph:+14155550100", "k1") != block_key("ph:+14155550101", "k1")


def test_rank_candidates_by_shared_keys_then_id():
    assert rank_candidates([[b"p3", b"p2"], [b"p2", b"p1"], ["p1"]], 10) == ["p1", "p2", "p3"]
    assert rank_candidates([[b"p3"], [b"p3"], [b"p9", b"p1"]], 2) == ["p3", "p1"]
    assert rank_candidates([], 5) == []


def test_local_blocks_find_bound_and_deduplicate():
    local = LocalBlocks(max_candidates=2, max_block=3, max_records=2)
    assert local.candidates(ANN) == []
    for i in range(5):
        local.remember(f"p_{i}", MatchRecord(given_name=f"kid{i}", surname="lee", phone="+14155550100"))
    assert len(local.blocks["ph:+14155550100"]) == 3  # a hot block stops growing
    assert len(local.candidates(ANN)) == 2
    local.remember("p_x", ANN)
    local.remember("p_x", ANN)
    local.remember("p_x", MatchRecord(given_name="ann", surname="lee", dob="1984-03-07"))
    local.remember("p_x", MatchRecord(given_name="ann", surname="lee", phone="+19999999999"))
    assert len(local.records["p_x"]) == 2
    assert local.candidates(ANN)[0][0] == "p_x"


class _Pipe:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def eval(self, *args):
        self.calls.append(args)
        return self


def test_remember_queues_one_bounded_sadd_per_key():
    store = MatchStore(redis=None, hash_key="k", max_block=7, max_records=3)
    pipe = _Pipe()
    store.remember(pipe, "p_1", ANN)
    assert pipe.calls[0] == (BOUNDED_SADD, 1, MATCH_SET_KEY % "p_1", ANN.to_json(), 3)
    blocks = pipe.calls[1:]
    assert [c[2] for c in blocks] == [block_key(k, "k") for k in blocking_keys(ANN)]
    assert all(c[:2] == (BOUNDED_SADD, 1) and c[3:] == ("p_1", 7) for c in blocks)
    assert all(c[2].startswith(BLOCK_KEY.split("{")[0]) for c in blocks)


def test_docstring_examples():
    result = doctest.testmod(agents.identity.matching, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
