"""Benchmarks: ``python -m bench`` (``make bench``) prints the whole pipeline's table
first (``bench.whole``), then runs the other benchmarks of this package.

Every figure is printed beside a baseline measured in the same run, on the same
broker, from the same input. Benchmarks use their own topics (``bench.<run>.*``,
deleted at the end), their own consumer groups and their own Redis database
(``CDP_BENCH_REDIS_DB``, default 14, flushed), except the real worker's runs, which
by their nature read ``cdp.events.*`` and write ``cdp.events.resolved``,
``cdp.segment-changes`` and the dead-letter topic (under their own consumer
groups). See docs/performance.md.
"""
