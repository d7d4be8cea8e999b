"""Synthetic web, app and in-store traffic in the Segment Spec shape (SPEC section 2).

A population of people, each with their own identifiers, drawn from ``seed``:

* everyone starts as an anonymous visitor of the web shop (``anonymousId``): pages,
  ``Product Viewed``, ``Product Added``;
* some sign in (``identify`` with ``userId``, an email typed as people type it, a
  phone number for some, a loyalty card as ``context.externalIds`` for members);
* signed-in people keep browsing the web, use the app (``userId`` +
  ``context.device.id``: screens, products, orders) and pay at a store till (POS:
  ``Order Completed`` with the receipt email or the loyalty card);
* orders carry products with categories, a currency and a total.

So the same person shows up on web, app and POS under identifiers that only overlap
pairwise, which is what identity resolution is for. ``generate_events`` is pure and
deterministic: the same arguments give the same events. Message ids depend on
``seed`` and ``start_ms``, so two runs started at different times do not collide.
With ``bad_ratio`` some records are replaced by :class:`Malformed` values that the
ingest stage must dead-letter, each carrying the reason it must give.

``produce_generated`` writes the events to ``cdp.events.<channel>``, keyed by each
event's strongest identifier, optionally paced; ``streamcdp generate`` runs it.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

import orjson

from schemas.identifiers import collect_identifiers
from streams.settings import Settings

CHANNELS = ("web", "app", "pos")
DEFAULT_START_MS = 1_795_168_800_000  # 2026-11-20T10:00:00Z
EVENTS_PER_PERSON = 20  # the default population: one person per 20 events
DEFAULT_GAP_MS = 50.0  # mean time between two events of the whole population

_SHOP = "https://shop.example.com"
_REFERRERS = ("", "https://www.google.com/", "https://www.bing.com/", "https://newsletter.example.com/", "https://www.instagram.com/")
_FIRST = ("Ann", "Ben", "Chloé", "Dan", "Eva", "Femi", "Grace", "Hugo", "Ines", "Jun", "Kai", "Lena", "Mia", "Noah", "Omar", "Priya", "Rosa", "Sam", "Tariq", "Zoë")
_LAST = ("Lee", "Smith", "García", "Müller", "Rossi", "Nguyen", "Okafor", "Kim", "Novak", "Silva", "Dubois", "Cohen", "Jensen", "Ivanova", "Brown", "Khan")
_MAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com")
# (country, currency, locale, store ids); phones written the way people in each write them.
_REGIONS = (
    ("US", "USD", "en-US", ("NYC-05", "SFO-02", "CHI-11")),
    ("US", "USD", "en-US", ("NYC-05", "SFO-02", "CHI-11")),
    ("GB", "GBP", "en-GB", ("LON-01", "MAN-03")),
    ("DE", "EUR", "de-DE", ("BER-02", "MUC-04")),
    ("FR", "EUR", "fr-FR", ("PAR-07",)),
)
_PRODUCTS = (
    ("sku-1001", "Travel Stroller", "baby", 249.0),
    ("sku-1002", "Baby Monitor", "baby", 89.9),
    ("sku-1003", "Organic Cotton Onesie", "baby", 14.5),
    ("sku-1004", "Nappy Bag", "baby", 39.0),
    ("sku-2001", "Wooden Train Set", "toys", 34.99),
    ("sku-2002", "Building Blocks 500", "toys", 49.0),
    ("sku-3001", "Wireless Earbuds", "electronics", 129.0),
    ("sku-3002", "Smart Speaker", "electronics", 79.0),
    ("sku-3003", "USB-C Charger", "electronics", 19.99),
    ("sku-4001", "Linen Duvet Cover", "home", 69.0),
    ("sku-4002", "Cast Iron Pan", "home", 45.0),
    ("sku-4003", "Scented Candle", "home", 12.0),
    ("sku-5001", "Rain Jacket", "fashion", 119.0),
    ("sku-5002", "Merino Sweater", "fashion", 89.0),
    ("sku-5003", "Running Socks 3-pack", "sports", 15.0),
    ("sku-5004", "Yoga Mat", "sports", 35.0),
    ("sku-6001", "Vitamin C Serum", "beauty", 24.0),
    ("sku-6002", "Hand Cream", "beauty", 8.5),
    ("sku-7001", "Espresso Beans 1kg", "grocery", 21.0),
    ("sku-7002", "Green Tea 50 bags", "grocery", 6.5),
)
_PAGES = (("/", "Home"), ("/c/baby", "Baby"), ("/c/toys", "Toys"), ("/c/electronics", "Electronics"), ("/c/home", "Home & Living"), ("/deals", "Deals"), ("/stores", "Our stores"))
_SCREENS = ("Home", "Search", "Category", "Wish List", "Cart", "Account")
_BROWSERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
)
_DEVICES = (("Apple", "iPhone15,2", "ios", "iOS", "18.1"), ("samsung", "SM-S921B", "android", "Android", "14"), ("Google", "Pixel 8", "android", "Android", "15"))
_WEB_LIBRARY = {"name": "analytics.js", "version": "5.2.1"}
_APP_LIBRARIES = {"ios": {"name": "analytics-swift", "version": "1.6.2"}, "android": {"name": "analytics-kotlin", "version": "1.17.0"}}
_POS_LIBRARY = {"name": "till-bridge", "version": "2.3.0"}
_APP = {"name": "Example Shop", "version": "4.12.0", "build": "41200"}
# What ingest must answer for each kind of malformed record.
MALFORMED_REASONS = ("invalid_json", "invalid_utf8", "not_an_object", "unknown_type", "schema_violation", "no_identifier", "empty")


class Malformed(bytes):
    """A deliberately malformed record value: raw bytes, and ``reason``, the reject
    reason ingest must give it (a ``schemas.events.RejectReason`` value)."""

    def __new__(cls, value: bytes, reason: str) -> "Malformed":
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj


@dataclass(slots=True)
class _Person:
    web_anonymous_id: str
    app_anonymous_id: str
    user_id: str
    email: str  # as the person types it: case and spaces vary between events
    phone: str | None
    device: tuple | None  # (id, manufacturer, model, type, os name, os version); None: no app
    loyalty_id: str | None
    first_name: str
    last_name: str
    country: str
    currency: str
    locale: str
    stores: tuple[str, ...]
    browser: str
    marketing: bool
    signed_in: bool = False


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(4 * digits):0{digits}x}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _person(seed: int, index: int) -> _Person:
    rng = random.Random(f"streamcdp-person:{seed}:{index}")
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    country, currency, locale, stores = rng.choice(_REGIONS)
    local = f"{first}.{last}".encode("ascii", "ignore").decode().lower() + f".{_hex(rng, 5)}"
    email = f"{local}@{rng.choice(_MAIL_DOMAINS)}"
    phone = None
    if rng.random() < 0.5:
        number = rng.randrange(10_000_000)
        if country == "US":
            phone = rng.choice(("({a}) 555-{b}", "+1 {a} 555 {b}", "{a}.555.{b}")).format(a=200 + number % 700, b=f"{number % 10_000:04d}")
        elif country == "GB":
            phone = f"+44 7700 9{number % 100_000:05d}"
        elif country == "DE":
            phone = f"+49 151 {number:07d}"
        else:
            phone = f"+33 6 {number % 100:02d} {number // 100 % 100:02d} {number // 10_000 % 100:02d} {number // 1_000_000:02d}"
    device = None
    if rng.random() < 0.45:
        manufacturer, model, kind, os_name, os_version = rng.choice(_DEVICES)
        device = (_uuid(rng).upper() if kind == "ios" else _hex(rng, 16), manufacturer, model, kind, os_name, os_version)
    return _Person(
        web_anonymous_id=_uuid(rng),
        app_anonymous_id=_uuid(rng),
        user_id=f"u-{_hex(rng, 10)}",
        email=email,
        phone=phone,
        device=device,
        loyalty_id=f"L-{rng.randrange(10**9):09d}" if rng.random() < 0.4 else None,
        first_name=first,
        last_name=last,
        country=country,
        currency=currency,
        locale=locale,
        stores=stores,
        browser=rng.choice(_BROWSERS),
        marketing=rng.random() < 0.6,
    )


def _iso(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class _Simulation:
    def __init__(self, seed: int, people: int, start_ms: int, mean_gap_ms: float) -> None:
        self.seed = seed
        self.people = people
        self.rng = random.Random(f"streamcdp-traffic:{seed}")
        self.ids = random.Random(f"streamcdp-message-ids:{seed}:{start_ms}")
        self.population: dict[int, _Person] = {}
        self.now_ms = float(start_ms)
        self.mean_gap_ms = mean_gap_ms

    def next_event(self) -> tuple[str, dict]:
        rng = self.rng
        self.now_ms += rng.expovariate(1.0 / self.mean_gap_ms) if self.mean_gap_ms > 0 else 0.0
        # A few people are far more active than most (index skewed toward 0).
        index = int(self.people * rng.random() ** 1.6)
        person = self.population.get(index)
        if person is None:
            person = self.population[index] = _person(self.seed, index)
        if not person.signed_in:
            if rng.random() < 0.15:
                person.signed_in = True
                return "web", self._identify_web(person)
            return "web", self._web(person)
        channel = rng.choices(CHANNELS, (4, 5 if person.device else 0, 2))[0]
        if channel == "app":
            return "app", self._app(person)
        if channel == "pos":
            return "pos", self._pos(person)
        if rng.random() < 0.04:
            return "web", self._identify_web(person)
        return "web", self._web(person)

    # ---------------------------------------------------------------- shapes

    def _base(self, kind: str, context: dict) -> dict:
        return {"type": kind, "messageId": _uuid(self.ids), "timestamp": _iso(int(self.now_ms)), "context": context}

    def _typed_email(self, person: _Person) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            return person.email.title()
        if roll < 0.25:
            return f" {person.email} "
        return person.email

    def _web_context(self, person: _Person, path: str, title: str) -> dict:
        return {
            "library": _WEB_LIBRARY,
            "page": {"path": path, "url": _SHOP + path, "referrer": self.rng.choice(_REFERRERS), "title": title},
            "userAgent": person.browser,
            "locale": person.locale,
        }

    def _product(self) -> dict:
        sku, name, category, price = self.rng.choice(_PRODUCTS)
        return {"sku": sku, "name": name, "category": category, "price": price}

    def _web(self, person: _Person) -> dict:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            path, title = rng.choice(_PAGES)
            event = self._base("page", self._web_context(person, path, title))
            event["name"] = title
        elif roll < 0.88:
            product = self._product()
            path = f"/p/{product['sku']}"
            event = self._base("track", self._web_context(person, path, product["name"]))
            event["event"] = "Product Viewed" if roll < 0.7 else "Product Added"
            event["properties"] = {**product, "currency": person.currency}
        else:
            event = self._order(person, self._web_context(person, "/checkout/complete", "Thank you"), "web")
        event["anonymousId"] = person.web_anonymous_id
        if person.signed_in:
            event["userId"] = person.user_id
        return event

    def _identify_web(self, person: _Person) -> dict:
        event = self._base("identify", self._web_context(person, "/account/login", "Sign in"))
        event["anonymousId"] = person.web_anonymous_id
        event["userId"] = person.user_id
        traits = {"email": self._typed_email(person), "firstName": person.first_name, "lastName": person.last_name, "country": person.country}
        if person.phone and self.rng.random() < 0.7:
            traits["phone"] = person.phone
        event["traits"] = traits
        event["context"]["consent"] = {"categoryPreferences": {"analytics": True, "marketing": person.marketing}}
        if person.loyalty_id:
            event["context"]["externalIds"] = [{"id": person.loyalty_id, "type": "loyalty_id", "collection": "users", "encoding": "none"}]
        return event

    def _app(self, person: _Person) -> dict:
        device_id, manufacturer, model, kind, os_name, os_version = person.device
        context = {
            "library": _APP_LIBRARIES[kind],
            "app": _APP,
            "device": {"id": device_id, "manufacturer": manufacturer, "model": model, "type": kind},
            "os": {"name": os_name, "version": os_version},
            "locale": person.locale,
            "network": {"wifi": self.rng.random() < 0.6},
        }
        roll = self.rng.random()
        if roll < 0.3:
            event = self._base("screen", context)
            event["name"] = self.rng.choice(_SCREENS)
        elif roll < 0.85:
            event = self._base("track", context)
            event["event"] = "Product Viewed" if roll < 0.7 else "Product Added"
            event["properties"] = {**self._product(), "currency": person.currency}
        else:
            event = self._order(person, context, "app")
        event["userId"] = person.user_id
        event["anonymousId"] = person.app_anonymous_id
        return event

    def _pos(self, person: _Person) -> dict:
        rng = self.rng
        store = rng.choice(person.stores)
        context = {"channel": "pos", "library": _POS_LIBRARY, "location": {"store_id": store, "register": f"{store}-T{rng.randrange(1, 6)}"}}
        # At the till people give the loyalty card, the email for the receipt, or both.
        use_card = person.loyalty_id is not None and rng.random() < 0.8
        if not use_card or rng.random() < 0.3:
            context["traits"] = {"email": self._typed_email(person)}
        if use_card:
            context["externalIds"] = [{"id": person.loyalty_id, "type": "loyalty_id"}]
        context["consent"] = {"categoryPreferences": {"marketing": person.marketing}}
        return self._order(person, context, "pos")

    def _order(self, person: _Person, context: dict, channel: str) -> dict:
        rng = self.rng
        products = []
        for _ in range(1 + int(rng.random() ** 2 * 3)):
            product = self._product()
            product["quantity"] = 1 + int(rng.random() ** 3 * 3)
            products.append(product)
        total = round(sum(p["price"] * p["quantity"] for p in products), 2)
        event = self._base("track", context)
        event["event"] = "Order Completed"
        event["properties"] = {
            "order_id": f"{channel}-{_hex(self.ids, 12)}",
            "total": total,
            "revenue": round(total / 1.2, 2),
            "currency": person.currency,
            "products": products,
        }
        return event


def _malformed(event: dict, rng: random.Random) -> Malformed:
    kind = rng.choice(MALFORMED_REASONS)
    if kind == "invalid_json":
        return Malformed(orjson.dumps(event)[:-1], kind)  # lost its closing brace
    if kind == "invalid_utf8":
        return Malformed(orjson.dumps(event).replace(b'"type":', b'"\xe9type":', 1), kind)  # latin-1 byte
    if kind == "not_an_object":
        return Malformed(orjson.dumps([event]), kind)
    if kind == "unknown_type":
        return Malformed(orjson.dumps({**event, "type": "trak"}), kind)
    if kind == "schema_violation":
        return Malformed(orjson.dumps({**event, "userId": rng.randrange(1, 10**6)}), kind)  # a number
    if kind == "no_identifier":
        bare = {"type": "track", "event": "Product Viewed", "messageId": event["messageId"], "timestamp": event["timestamp"], "properties": {"sku": "sku-1001"}}
        return Malformed(orjson.dumps(bare), kind)
    return Malformed(b"", "empty")


def generate_events(
    n: int,
    *,
    seed: int,
    people: int | None = None,
    start_ms: int = DEFAULT_START_MS,
    mean_gap_ms: float = DEFAULT_GAP_MS,
    bad_ratio: float = 0.0,
) -> Iterator[tuple[str, dict | Malformed]]:
    """``n`` events as ``(channel, value)``, in event-time order.

    ``value`` is a Segment Spec event (a dict, encode it with orjson) or, for about
    ``bad_ratio`` of them, a :class:`Malformed` record (bytes) standing in for one.
    ``people`` defaults to one person per :data:`EVENTS_PER_PERSON` events. Same
    arguments, same events; malformed records replace events without changing the
    others.
    """
    if people is None:
        people = max(10, n // EVENTS_PER_PERSON)
    if people < 1:
        raise ValueError("people must be at least 1")
    simulation = _Simulation(seed, people, start_ms, mean_gap_ms)
    bad = random.Random(f"streamcdp-malformed:{seed}")
    for _ in range(n):
        channel, event = simulation.next_event()
        if bad_ratio > 0 and bad.random() < bad_ratio:
            yield channel, _malformed(event, bad)
        else:
            yield channel, event


def encode(value: dict | bytes) -> bytes:
    """A generated value as record bytes."""
    return value if isinstance(value, bytes) else orjson.dumps(value)


def record_key(value: dict | bytes, default_region: str = "US") -> bytes | None:
    """The record key: the event's strongest identifier as ``type:value``
    (normalised as ingest does), or None for a malformed record."""
    if not isinstance(value, dict):
        return None
    context = value.get("context") or {}
    candidates: list[tuple[str, object]] = []
    if "userId" in value:
        candidates.append(("user_id", value["userId"]))
    for traits in (value.get("traits"), context.get("traits")):
        if traits:
            candidates.extend((t, traits[t]) for t in ("email", "phone") if t in traits)
    candidates.extend((x["type"], x["id"]) for x in context.get("externalIds") or ())
    if "device" in context:
        candidates.append(("device_id", context["device"]["id"]))
    if "anonymousId" in value:
        candidates.append(("anonymous_id", value["anonymousId"]))
    identifiers = collect_identifiers(candidates, default_region)
    return str(identifiers[0]).encode() if identifiers else None


def inbound_topic(channel: str) -> str:
    return f"cdp.events.{channel}"


OnAck = Callable[[object, float], None]


async def send_events(
    producer,
    events: Iterable[tuple[str, dict | bytes]],
    *,
    topic_of: Callable[[str], str] = inbound_topic,
    rate: float | None = None,
    on_ack: OnAck | None = None,
    window: int = 2000,
) -> Counter:
    """Produce ``events`` with a started ``AIOKafkaProducer``; return counts per channel
    (and ``malformed``). At most ``rate`` events/s if given; raises if a send fails.

    ``on_ack(metadata, sent_at)`` is called for each acknowledged record, with the
    wall-clock time (``time.time()``) just before it was handed to the producer.
    """
    counts: Counter = Counter()
    pending: list[tuple[Awaitable, float]] = []
    started = time.monotonic()
    for i, (channel, value) in enumerate(events):
        if rate:
            ahead = started + i / rate - time.monotonic()
            if ahead > 0.001:
                await asyncio.sleep(ahead)
        raw = encode(value)
        sent_at = time.time()
        pending.append((await producer.send(topic_of(channel), raw, key=record_key(value)), sent_at))
        counts[channel] += 1
        if isinstance(value, Malformed):
            counts["malformed"] += 1
        if len(pending) >= window:
            await _settle(pending, on_ack)
    await _settle(pending, on_ack)
    return counts


async def _settle(pending: list[tuple[Awaitable, float]], on_ack: OnAck | None) -> None:
    results = await asyncio.gather(*(future for future, _ in pending))
    if on_ack is not None:
        for metadata, (_, sent_at) in zip(results, pending):
            on_ack(metadata, sent_at)
    pending.clear()


async def produce_generated(
    settings: Settings,
    n: int,
    *,
    rate: float | None = None,
    seed: int = 0,
    bad_ratio: float = 0.0,
    people: int | None = None,
    start_ms: int | None = None,
) -> dict:
    """Produce ``n`` generated events to ``cdp.events.<channel>``; return a summary.

    Event times follow the pace: at ``rate`` events/s from now on, or, unpaced, spread
    over the recent past ending now. Creates the inbound topics if they are missing.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from streams.topics import INBOUND, all_topics, ensure_topics

    gap_ms = 1000.0 / rate if rate else DEFAULT_GAP_MS
    if start_ms is None:
        start_ms = int(time.time() * 1000 - (0 if rate else n * gap_ms))
    await ensure_topics(settings, tuple(s for s in all_topics() if s.name in INBOUND))
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), acks="all", linger_ms=5, max_batch_size=256 * 1024)
    started = time.monotonic()
    try:
        await producer.start()
        events = generate_events(n, seed=seed, people=people, start_ms=start_ms, mean_gap_ms=gap_ms, bad_ratio=bad_ratio)
        counts = await send_events(producer, events, rate=rate)
    except KafkaError as exc:
        raise ConnectionError(f"Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}: {exc}") from exc
    finally:
        await producer.stop()
    seconds = time.monotonic() - started
    return {
        "produced": n,
        "malformed": counts["malformed"],
        "channels": {c: counts[c] for c in CHANNELS},
        "topics": [inbound_topic(c) for c in CHANNELS],
        "seed": seed,
        "start_ms": start_ms,
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds, 1) if seconds > 0 else None,
    }


def run_generate(settings: Settings, count: int, rate: float | None, seed: int, bad_ratio: float) -> int:
    """``streamcdp generate``: produce, then print a one-line JSON summary."""
    summary = asyncio.run(produce_generated(settings, count, rate=rate, seed=seed, bad_ratio=bad_ratio))
    print(orjson.dumps(summary).decode())
    return 0
