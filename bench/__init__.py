"""Benchmarks: ``python -m bench`` (``make bench``) runs them all and prints one table.

Every figure is printed beside a baseline measured in the same run, on the same
broker, from the same input. Benchmarks use their own topics (``bench.<run>.*``,
deleted at the end), their own consumer groups and their own Redis database
(``CDP_BENCH_REDIS_DB``, default 14, flushed), except the real worker's run, which
by its nature reads ``cdp.events.*`` and writes ``cdp.events.resolved`` and the
dead-letter topic (under its own consumer group). See docs/performance.md.
"""
