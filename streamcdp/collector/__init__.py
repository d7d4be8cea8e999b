"""The HTTP collector: the Segment HTTP Tracking API in front of the inbound topics.

Existing Segment and RudderStack SDKs send to it unchanged (change the host name);
it authenticates the write key, enriches each message (``messageId``,
``receivedAt``), and answers 200 only once Kafka acknowledged every message.

Modules: ``messages`` (pure: body decoding, limits, enrichment, partition keys),
``auth`` (write keys), ``metrics``, ``app`` (the aiohttp routes), ``server``
(``run_collector``: the process, its producer, graceful shutdown). See
``docs/collector.md``.
"""
