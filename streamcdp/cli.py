"""``streamcdp``: the command line.

Every command has ``--help``; every error names what was wrong and exits non-zero.
Configuration comes from ``CDP_*`` environment variables (see ``streams.settings``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import orjson

from schemas.errors import ConfigError, StreamCDPError
from streams.settings import LOG_LEVELS, Settings

log = logging.getLogger("streamcdp")

EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        settings = Settings.from_env()
        return args.run(args, settings)
    except ConfigError as exc:
        print(f"streamcdp: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StreamCDPError as exc:
        print(f"streamcdp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConnectionError, OSError) as exc:
        print(f"streamcdp: cannot reach a required service: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamcdp",
        description="streamcdp: a real-time Customer Data Platform on Kafka and Redis.",
        epilog="Configuration: CDP_KAFKA_BOOTSTRAP, CDP_REDIS_URL, CDP_WEB_PORT, ... (see README).",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    worker = commands.add_parser("worker", help="run the stream-processing worker (foreground)")
    worker.add_argument("--loglevel", choices=LOG_LEVELS, help="override CDP_LOG_LEVEL")
    worker.set_defaults(run=_run_worker)

    collector = commands.add_parser(
        "collector",
        help="run the HTTP collector for Segment/RudderStack SDKs (foreground)",
        description="Serve the Segment-compatible HTTP Tracking API on CDP_COLLECTOR_PORT; "
        "write keys from CDP_WRITE_KEYS (KEY=channel,...) or CDP_WRITE_KEYS_FILE.",
    )
    collector.set_defaults(run=_run_collector)

    generate = commands.add_parser(
        "generate",
        help="produce realistic synthetic web/app/POS traffic",
        description="Produce synthetic Segment Spec events for a population of people who browse, "
        "identify, use the app and buy online and in store, to cdp.events.{web,app,pos}.",
    )
    generate.add_argument("--count", type=int, default=1000, help="events to produce (default 1000)")
    generate.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    generate.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same events")
    generate.add_argument("--bad-ratio", type=float, default=0.0, help="share of malformed records, 0..1 (default 0)")
    generate.add_argument(
        "--linkage", nargs=2, metavar=("ROWS.jsonl", "TRUTH.csv"),
        help="instead of producing traffic, write a labelled record-linkage set (households with typos, "
        "swapped names, moves and shared phones) as an import file plus its truth (crm_id,entity)",
    )
    generate.add_argument("--households", type=int, default=2000, help="households in the --linkage set (default 2000)")
    generate.set_defaults(run=_run_generate)

    importer = commands.add_parser(
        "import",
        help="import a CSV or JSONL file as identify events",
        description="Each row becomes an identify event on cdp.events.CHANNEL: columns user_id, email, "
        "phone and external_id.<type> are identifiers, every other column is a trait. Re-importing the "
        "same file produces the same messageIds, so nothing is counted twice. Exits 1 if any row failed.",
    )
    importer.add_argument("file", metavar="FILE", help="a .csv (with a header row) or .jsonl file")
    importer.add_argument("--channel", default="crm", help="channel and topic suffix (default crm)")
    importer.add_argument("--format", choices=("csv", "jsonl"), default=None, help="override the format guessed from the extension")
    importer.set_defaults(run=_run_import)

    dlq = commands.add_parser("dlq", help="the dead-letter topic")
    dlq_commands = dlq.add_subparsers(title="dlq commands", metavar="ACTION")
    replay = dlq_commands.add_parser(
        "replay",
        help="send dead letters back to their source topics (after fixing a producer)",
        description="Read cdp.events.dead-letter and produce each record's original key and bytes back to "
        "the topic it came from (header cdp.dlq.source.topic). Events that already went through are "
        "dropped again by messageId de-duplication. See docs/operations.md.",
    )
    replay.add_argument("--reason", help="only dead letters with this cdp.dlq.reason, e.g. schema_violation")
    replay.add_argument("--since", help="only dead letters rejected at or after this time (ISO 8601, or e.g. 2h for the last two hours)")
    replay.add_argument("--until", help="only dead letters rejected before this time (ISO 8601 or a duration ago)")
    replay.add_argument("--limit", type=int, help="replay at most this many")
    replay.add_argument("--source", default="cdp.events.dead-letter", help="the dead-letter topic to read (default cdp.events.dead-letter)")
    replay.add_argument("--dry-run", action="store_true", help="count what would be replayed, send nothing")
    replay.set_defaults(run=_run_dlq_replay)

    topics = commands.add_parser("topics", help="Kafka topics streamcdp uses")
    topics_commands = topics.add_subparsers(title="topics commands", metavar="ACTION")
    create = topics_commands.add_parser("create", help="create the missing topics and exit")
    create.set_defaults(run=_run_topics_create)
    listing = topics_commands.add_parser("list", help="print the topics streamcdp declares")
    listing.set_defaults(run=_run_topics_list)

    profile = commands.add_parser("profile", help="read profiles")
    profile_commands = profile.add_subparsers(title="profile commands", metavar="ACTION")
    get = profile_commands.add_parser(
        "get",
        help="print a profile as JSON",
        description="Print the profile with this id (p_...) or owning this identifier (type:value, "
        "e.g. email:ann@example.com, phone:+14155550100, user_id:u-17). Exits 3 when there is none.",
    )
    get.add_argument("id_or_identifier", metavar="ID_OR_IDENTIFIER")
    get.set_defaults(run=_run_profile_get)

    privacy = commands.add_parser("privacy", help="data-subject requests (docs/privacy.md)")
    privacy_commands = privacy.add_subparsers(title="privacy commands", metavar="ACTION")
    for kind, text, not_found in (
        ("access", "print everything held about the person as JSON", "nobody has the identifier"),
        ("delete", "delete every trace of the person; downstream is told on cdp.privacy.events",
         "nobody has the identifier"),
        ("suppress", "delete the person and drop their later events: each of their identifiers goes on the "
         "suppression list (as a keyed hash), also when nobody has the identifier yet", None),
        ("unsuppress", "lift the suppression that listed the identifier, for every identifier it listed",
         "the identifier is not on the suppression list"),
    ):
        ending = f". Exits 3 when {not_found}." if not_found else "."
        command = privacy_commands.add_parser(kind, help=text, description=text + ending)
        command.add_argument("identifier", metavar="IDENTIFIER", help="type:value, e.g. email:ann@example.com")
        command.set_defaults(run=_run_privacy, kind=kind)

    segments = commands.add_parser("segments", help="segment definitions (docs/segments.md)")
    segment_commands = segments.add_subparsers(title="segments commands", metavar="ACTION")
    apply = segment_commands.add_parser(
        "apply",
        help="validate a segment file and publish it to every worker",
        description="Validate a YAML or JSON segment definition and publish it to the compacted topic "
        "cdp.segment-definitions. Workers pick it up without a restart and back-fill it over existing "
        "profiles. A bad rule is refused with the path and the problem (exit 2).",
    )
    apply.add_argument("file", metavar="FILE", help="a .yaml/.yml or .json segment definition")
    apply.set_defaults(run=_run_segments_apply)
    segment_list = segment_commands.add_parser("list", help="print the current segments (id, version, name)")
    segment_list.add_argument("--json", action="store_true", help="print the definitions as JSON")
    segment_list.set_defaults(run=_run_segments_list)
    delete = segment_commands.add_parser(
        "delete", help="delete a segment", description="Publish a tombstone for ID; workers stop evaluating it."
    )
    delete.add_argument("segment_id", metavar="ID")
    delete.set_defaults(run=_run_segments_delete)
    return parser


def _run_privacy(args: argparse.Namespace, settings: Settings) -> int:
    from agents.activation.destinations import Destinations
    from agents.privacy import PrivacyService
    from agents.profiles.model import ProfileModel
    from streams.metrics import Metrics
    from streams.output import AiokafkaProducer
    from streams.redis_client import connect

    async def run() -> dict:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), acks="all")
        await producer.start()
        client = connect(settings.redis_url)
        try:
            service = PrivacyService(client, AiokafkaProducer(producer), Metrics(), ProfileModel.load(settings),
                                     hash_key=settings.id_hash_key, default_region=settings.phone_default_region,
                                     destinations=Destinations.load(settings.destinations or None))
            return await service.handle(args.kind, args.identifier)
        finally:
            await client.aclose()
            await producer.stop()

    result = asyncio.run(run())
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0 if result["status"] == "completed" else EXIT_NOT_FOUND


def _run_segments_apply(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from agents.segments.rules import parse_segment
    from streams.config_files import load_document
    from streams.segment_definitions import publish

    path = Path(args.file)
    if not path.exists():
        print(f"streamcdp: no such file: {path}", file=sys.stderr)
        return EXIT_NOT_FOUND
    from agents.profiles.computed import ComputedTraits

    from agents.activation.destinations import Destinations

    document = load_document(path, path, "segment")
    segment = parse_segment(document, source=str(path), computed=ComputedTraits.load(settings.computed_traits or None))
    destinations = Destinations.load(settings.destinations or None)
    unknown = [name for name in segment.destinations if name not in destinations]
    if unknown:
        raise ConfigError(
            f"{path}: destinations: {unknown[0]!r} is not a configured destination "
            f"(defined: {', '.join(sorted(destinations)) or 'none'}; docs/activation.md)"
        )
    asyncio.run(publish(settings, segment.id, segment.document))
    print(f"applied segment {segment.id} version {segment.version}")
    return 0


def _run_segments_list(args: argparse.Namespace, settings: Settings) -> int:
    from streams.segment_definitions import read_all

    current = asyncio.run(read_all(settings))
    if args.json:
        print(orjson.dumps(current, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
        return 0
    for segment_id, document in sorted(current.items()):
        name = document.get("name") or ""
        print(f"{segment_id}\tversion {document.get('version')}\t{name}".rstrip())
    return 0


def _run_segments_delete(args: argparse.Namespace, settings: Settings) -> int:
    from streams.segment_definitions import publish, read_all

    if args.segment_id not in asyncio.run(read_all(settings)):
        print(f"streamcdp: no segment {args.segment_id!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    asyncio.run(publish(settings, args.segment_id, None))
    print(f"deleted segment {args.segment_id}")
    return 0


def _run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streamcdp.runner import run_worker

    if args.loglevel:
        settings = Settings.from_env(log_level=args.loglevel)
    return run_worker(settings)


def _run_collector(args: argparse.Namespace, settings: Settings) -> int:
    from streamcdp.collector.server import run_collector

    return run_collector(settings)


def _run_generate(args: argparse.Namespace, settings: Settings) -> int:
    if args.linkage:
        from streamcdp.linkage_data import write_linkage_files

        return write_linkage_files(args.linkage[0], args.linkage[1], args.seed, args.households)
    from streamcdp.generate import run_generate

    if args.count < 0 or not 0.0 <= args.bad_ratio <= 1.0 or (args.rate is not None and args.rate <= 0):
        print("streamcdp: --count must be >= 0, --rate > 0, --bad-ratio within 0..1", file=sys.stderr)
        return EXIT_USAGE
    return run_generate(settings, args.count, args.rate, args.seed, args.bad_ratio)


def _run_import(args: argparse.Namespace, settings: Settings) -> int:
    from streamcdp.importer import run_import

    return run_import(settings, args.file, args.channel, args.format)


def _run_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    from streamcdp.replay import run_replay

    return run_replay(
        settings, source=args.source, reason=args.reason, since=args.since, until=args.until,
        limit=args.limit, dry_run=args.dry_run,
    )


def _run_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from streams.logs import configure
    from streams.topics import all_topics, ensure_topics

    configure(settings.log_format, "warn")
    created = asyncio.run(ensure_topics(settings, all_topics(_activation_topics(settings))))
    print(orjson.dumps({"created": created}).decode())
    return 0


def _activation_topics(settings: Settings) -> tuple[str, ...]:
    from agents.activation.destinations import Destinations

    return tuple(Destinations.load(settings.destinations or None).topics())


def _run_topics_list(args: argparse.Namespace, settings: Settings) -> int:
    from streams.topics import all_topics

    for spec in all_topics(_activation_topics(settings)):
        print(spec.name + ("  (compacted)" if spec.compacted else ""))
    return 0


def _run_profile_get(args: argparse.Namespace, settings: Settings) -> int:
    from agents.profiles.model import ProfileModel
    from agents.profiles.store import lookup_profile
    from streams.redis_client import connect

    model = ProfileModel.load(settings)

    async def fetch():
        client = connect(settings.redis_url)
        try:
            return await lookup_profile(
                client, args.id_or_identifier, hash_key=settings.id_hash_key,
                default_region=settings.phone_default_region, model=model,
            )
        finally:
            await client.aclose()

    try:
        profile = asyncio.run(fetch())
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            raise ConnectionError(f"Redis at {Settings.redacted(settings)['redis_url']}: {exc}") from exc
        raise
    if profile is None:
        print(f"streamcdp: no profile for {args.id_or_identifier!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    sys.stdout.write(orjson.dumps(profile, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
