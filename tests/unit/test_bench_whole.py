"""The pure parts of the whole-pipeline benchmark (bench.whole) and of what it shares
(bench.common, bench.faust_consume, bench.counted_worker): metrics samples, key
kinds, memory per profile, targets met or missed, and the rendered table."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import whole
from bench.common import (
    gauge,
    histogram_percentiles,
    latencies_ms,
    percentiles,
    prometheus_samples,
    sample_by_label,
    sample_sum,
    samples_delta,
)
from bench.faust_consume import _percentiles as child_percentiles
from bench.whole import Memory, Report, Row, WholeOptions, key_kind, render, verdicts

ROOT = Path(__file__).resolve().parents[2]

METRICS = textwrap.dedent("""\
    # HELP cdp_redis_call_duration_seconds Duration of one pipelined Redis round trip.
    # TYPE cdp_redis_call_duration_seconds histogram
    cdp_redis_call_duration_seconds_bucket{le="0.001",op="identity"} 3.0
    cdp_redis_call_duration_seconds_bucket{le="+Inf",op="identity"} 4.0
    cdp_redis_call_duration_seconds_count{op="identity"} 4.0
    cdp_redis_call_duration_seconds_sum{op="identity"} 0.004
    cdp_redis_call_duration_seconds_bucket{le="0.001",op="profile"} 1.0
    cdp_redis_call_duration_seconds_bucket{le="+Inf",op="profile"} 6.0
    cdp_redis_call_duration_seconds_count{op="profile"} 6.0
    cdp_redis_call_duration_seconds_sum{op="profile"} 0.02
    # HELP cdp_events_processed_total Events processed.
    # TYPE cdp_events_processed_total counter
    cdp_events_processed_total 990.0
    # HELP cdp_dead_letters_total Dead letters.
    # TYPE cdp_dead_letters_total counter
    cdp_dead_letters_total{reason="invalid_json"} 6.0
    cdp_dead_letters_total{reason="schema"} 4.0
    # HELP cdp_segment_transitions_total Segment changes.
    # TYPE cdp_segment_transitions_total counter
    cdp_segment_transitions_total{kind="entered",segment="s-1"} 5.0
    cdp_segment_transitions_total{kind="exited",segment="s-1"} 2.0
    cdp_segment_transitions_total{kind="entered",segment="s-2"} 0.0
    # HELP cdp_worker_ready 1 while ready.
    # TYPE cdp_worker_ready gauge
    cdp_worker_ready 1.0
    # HELP cdp_bench_redis_requests Requests written to Redis connections by this process (bench).
    # TYPE cdp_bench_redis_requests gauge
    cdp_bench_redis_requests 57.0
""")


# ---------------------------------------------------------------- metrics samples


def test_samples_are_parsed_summed_and_split_by_label():
    samples = prometheus_samples(METRICS)
    assert sample_sum(samples, "cdp_redis_call_duration_seconds_count") == 10
    assert sample_by_label(samples, "cdp_redis_call_duration_seconds_count", "op") == {"identity": 4, "profile": 6}
    assert sample_sum(samples, "cdp_events_processed_total") + sample_sum(samples, "cdp_dead_letters_total") == 1000
    assert gauge(samples, "cdp_bench_redis_requests") == 57
    assert gauge(samples, "cdp_worker_ready") == 1
    assert gauge(samples, "cdp_no_such_metric") is None


def test_known_segments_are_those_with_a_transition_series_even_at_zero():
    assert whole.known_segments(prometheus_samples(METRICS)) == {"s-1", "s-2"}
    assert whole.known_segments({}) == set()


def test_delta_between_two_scrapes():
    before = prometheus_samples(METRICS)
    after = prometheus_samples(METRICS.replace("cdp_bench_redis_requests 57.0", "cdp_bench_redis_requests 80.0")
                               .replace("cdp_events_processed_total 990.0", "cdp_events_processed_total 1990.0"))
    delta = samples_delta(before, after)
    assert gauge(delta, "cdp_bench_redis_requests") == 23
    assert sample_sum(delta, "cdp_events_processed_total") == 1000
    assert sample_sum(delta, "cdp_redis_call_duration_seconds_count") == 0


def test_histogram_percentiles_sum_over_other_labels_and_interpolate():
    samples = prometheus_samples(METRICS)
    # 10 observations: 4 at or under 1 ms, 6 above (only known to be past the top bound).
    p = histogram_percentiles({}, samples, "cdp_redis_call_duration_seconds", qs=(20, 40, 90))
    assert p[0] == pytest.approx(0.5)  # rank 2 of 4 in [0, 1 ms]
    assert p[1] == pytest.approx(1.0)
    assert p[2] == pytest.approx(1.0)  # in +Inf: the last finite bound
    assert histogram_percentiles(samples, samples, "cdp_redis_call_duration_seconds") is None


def test_percentiles_are_nearest_rank_and_the_child_agrees():
    values = list(range(1, 101))
    assert percentiles(values) == [50, 95, 99]
    assert percentiles([7.0]) == [7.0, 7.0, 7.0]
    assert child_percentiles([float(v) for v in values]) == percentiles(values)


def test_latencies_only_for_keys_seen_in_the_given_order():
    arrived = {"m1": 10.0, "m2": 11.0, "m3": 12.0}
    seen = {"m2": 11.5, "m1": 10.25, "other": 1.0}
    assert latencies_ms(arrived, seen, ["m1", "m2", "m3"]) == [250.0, 500.0]


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize(("key", "kind"), [
    ("cdp:p:{p_0abc}:meta", "meta"),
    ("cdp:p:{p_0abc}:history", "history"),
    ("cdp:p:{p_0abc}:segments", "segments"),
    ("cdp:id:{0123abcd}", "id index"),
    ("cdp:blk:{n:smith}", "match blocks"),
    ("cdp:seg:due:{3}", "other"),
    ("cdp:seg:backfilled", "other"),
    ("cdp:p:{broken", "other"),
])
def test_key_kinds(key, kind):
    assert key_kind(key) == kind


def test_memory_per_profile_besides_history():
    memory = Memory(profiles=10, keys=50, by_kind={"meta": 3000, "history": 40000, "seen": 9000, "id index": 5000, "other": 1000})
    assert memory.total == 5800
    assert memory.history == 4000
    assert memory.besides_history == 1800
    assert memory.per_profile("seen", "id index") == 1400
    empty = Memory(0, 0, {})
    assert empty.total == empty.history == empty.besides_history == 0


# ---------------------------------------------------------------- targets


def _report(*, worker_rate=3000.0, p99=80.0, redis=0.05, besides=1500.0, with_pair=True) -> Report:
    report = Report()
    report.rows["a"] = Row("a", "(a) raw", events_per_s=10_000.0, latency={1000.0: [5, 9, 12], 5000.0: [20, 40, 60]}, redis_per_event=0.0)
    report.rows["b"] = Row("b", "(b) faust", events_per_s=5_000.0, latency={1000.0: [10, 20, 30]}, redis_per_event=0.0)
    memory = Memory(profiles=1, keys=10, by_kind={"history": 4000, "meta": int(besides)})
    report.rows["w100"] = Row(
        "w100", "(w100) worker", events_per_s=worker_rate, latency={1000.0: [20, 50, p99]}, redis_per_event=redis,
        redis_declared_per_event=0.01, cpu_per_1000=1.25, memory=memory,
    )
    if with_pair:
        report.rows["w100×2"] = Row("w100×2", "(w100×2) two workers: total", events_per_s=4000.0, redis_per_event=0.06, cpu_per_1000=1.5)
        report.rows["w100×2/1"] = Row("w100×2/1", "worker 1 of (w100×2)", events_per_s=2100.0, part_of="w100×2")
        report.rows["w100×2/2"] = Row("w100×2/2", "worker 2 of (w100×2)", events_per_s=1900.0, part_of="w100×2")
    return report


def test_every_target_met():
    found = verdicts(_report(), WholeOptions())
    assert [v.met for v in found] == [True, True, True, True]
    assert found[0].figure == "(w100) 0.30× (a); (w100×2) 0.40×"
    assert found[1].figure == "(w100) 80.0 ms"


def test_every_target_missed():
    found = verdicts(_report(worker_rate=2000.0, p99=100.0, redis=2.5, besides=2049.0), WholeOptions())
    assert [v.met for v in found] == [False, False, False, False]


def test_targets_at_their_bounds_are_met():
    found = verdicts(_report(worker_rate=2500.0, p99=99.9, redis=2.0, besides=2048.0), WholeOptions())
    assert [v.met for v in found] == [True, True, True, True]


def test_targets_not_measured_when_the_worker_row_failed_or_the_rate_was_not_offered():
    report = _report(with_pair=False)
    report.rows["w100"] = Row("w100", "(w100) worker", error="boom")
    assert [v.met for v in verdicts(report, WholeOptions())] == [None, None, None, None]
    report = _report()
    report.rows["w100"].latency = {5000.0: [1, 2, 3]}
    assert verdicts(report, WholeOptions(rates=(5000.0,)))[1].met is None


# ---------------------------------------------------------------- the table


def test_cells_ratios_and_formats():
    report = _report()
    a, b = report.rows["a"], report.rows["b"]
    rates = (1000.0, 5000.0)
    assert whole.cells(report.rows["a"], rates, a, b) == [
        "(a) raw", "10,000", "1.00×", "2.00×", "5.0 / 9.0 / 12.0", "20.0 / 40.0 / 60.0", "0", "—", "—",
    ]
    assert whole.cells(report.rows["w100"], rates, a, b) == [
        "(w100) worker", "3,000", "0.30×", "0.60×", "20.0 / 50.0 / 80.0", "—", "0.0500 (0.0100)", "1.250", "1,500 / 5,500",
    ]
    part = whole.cells(report.rows["w100×2/1"], rates, a, b)
    assert part[0] == "  worker 1 of (w100×2)" and part[1] == "2,100"
    failed = Row("x", "(x) broken", error="boom")
    assert whole.cells(failed, rates, a, b)[1:4] == ["failed", "—", "—"]


def test_histogram_figures_past_the_top_bucket_are_lower_bounds():
    assert whole.fmt_histogram_ms([12.5, 10_000.0, 10_000.0]) == "12.5 / ≥ 10,000 / ≥ 10,000"
    assert whole.fmt_histogram_ms(None) == "—"


def test_render_prints_facts_one_table_targets_and_notes():
    report = _report(p99=150.0)
    report.facts = [("CPU", "test cpu"), ("Load", "load average 0.1 0.2 0.3")]
    report.notes = ["a note"]
    text = render(report, WholeOptions(), 12.0)
    lines = text.splitlines()
    assert "  CPU        test cpu" in lines
    head = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    assert lines[head] == (
        "| row | events/s sustained | vs (a) | vs (b) | p50 / p95 / p99 ms at 1,000/s | p50 / p95 / p99 ms at 5,000/s | "
        "Redis round trips/event (declared) | CPU s per 1,000 events | Redis B per profile: besides history / total |"
    )
    assert lines[head + 1] == "|---|" + "---:|" * 8
    body = lines[head + 2:head + 2 + 5]
    assert [line.split(" | ")[0] for line in body] == [
        "| (a) raw", "| (b) faust", "| (w100) worker", "| (w100×2) two workers: total", "|   worker 1 of (w100×2)",
    ]
    assert all(line.count("|") == 10 for line in body)
    assert "| p99 < 100 ms at 1,000 events/s (to the segment change) | (w100) 150.0 ms | MISSED |" in lines
    assert "| ≤ 2 Redis round trips per event, amortised | (w100) 0.0500 | met |" in lines
    assert "- a note" in lines
    assert lines[-1] == "- Total bench time 12 s."


def test_render_lists_failures():
    report = _report()
    report.rows["w100×2"].error = "workers[2]: timed out"
    assert "- (w100×2) FAILED: workers[2]: timed out" in render(report, WholeOptions(), 1.0)


# ---------------------------------------------------------------- options


def test_options_from_the_command_line():
    args = whole.parser().parse_args(["--events", "5000", "--rates", "1000,5000,200", "--workers", "1,2,2", "--zero"])
    options = whole.options_from(args)
    assert options.events == 5000 and options.rates == (1000.0, 5000.0, 200.0)
    assert options.workers == (1, 2) and options.zero
    assert whole.check(options) is None
    assert whole.check(WholeOptions(events=10)) is not None
    assert whole.check(WholeOptions(segments=0)) is not None


@pytest.mark.parametrize("text", ["", "0", "1,-2", "x"])
def test_bad_number_lists_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        whole._numbers(float)(text)


def test_python_m_bench_takes_the_table_options_and_skips():
    from bench.__main__ import OTHER_BENCHMARKS, _parser

    args = _parser().parse_args(["--events", "3000", "--skip", "bench.collector", "--headline-only"])
    assert whole.options_from(args).events == 3000 and args.skip == "bench.collector" and args.headline_only
    assert "bench.segments" not in OTHER_BENCHMARKS  # its rows are the table's


# ---------------------------------------------------------------- the counted worker


def test_counted_worker_counts_requests_and_exposes_them():
    # In a child: install() patches redis-py and streams.metrics for the whole process.
    script = textwrap.dedent("""
        import asyncio
        from prometheus_client import generate_latest
        from redis.asyncio.connection import AbstractConnection, Connection

        sent = []

        async def fake_send(self, command, check_health=True):
            sent.append(command)

        AbstractConnection.send_packed_command = fake_send
        from bench.counted_worker import install
        install()
        from streams.metrics import Metrics

        metrics = Metrics()

        async def main():
            connection = Connection()
            await connection.send_packed_command(b"PING")
            await connection.send_packed_command([b"MULTI", b"EXEC"])

        asyncio.run(main())
        assert len(sent) == 2
        print(generate_latest(metrics.registry).decode())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert gauge(prometheus_samples(done.stdout), "cdp_bench_redis_requests") == 2
