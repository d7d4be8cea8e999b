"""What an event contributes to its profile: traits by path, consent, history entry;
and the options file."""

from __future__ import annotations

import orjson
import pytest

from agents.profiles.computed import ComputedTraits
from agents.profiles.model import DEFAULT_PATH, ProfileModel, unflatten
from schemas.errors import ConfigError
from schemas.events import parse_event
from streams.settings import Settings


def ev(**fields):
    payload = {"type": "identify", "userId": "u1", "messageId": "m1", "timestamp": "2026-11-20T10:00:00Z", **fields}
    return parse_event(orjson.dumps(payload), channel="app", fallback_timestamp_ms=0, default_region="US")


@pytest.fixture(scope="module")
def model() -> ProfileModel:
    return ProfileModel.load(Settings())


def test_the_shipped_options(model):
    assert DEFAULT_PATH.exists()
    assert model.history_length == 20 and model.history_properties_bytes == 512
    assert model.sensitive.is_sensitive("national_id")


def test_traits_by_path_with_sensitive_ones_protected(model):
    traits = dict(model.traits_of(ev(traits={"plan": "pro", "address": {"city": "Oslo", "geo": {"lat": 59.9}},
                                             "empty": {}, "tags": ["a"], "passport": "P123"})))
    assert traits["plan"] == b'"pro"' and traits["address.city"] == b'"Oslo"' and traits["address.geo.lat"] == b"59.9"
    assert traits["empty"] == b"{}" and traits["tags"] == b'["a"]'
    assert b"P123" not in traits["passport"] and orjson.loads(traits["passport"])["sensitive"] is True


def test_consent_choices_become_dollar_fields(model):
    traits = dict(model.traits_of(ev(context={"consent": {"categoryPreferences": {"ads": True, "odd": 1, "": True}}})))
    assert traits == {"$consent.ads": b'[true,"m1","app"]'}


def test_history_entry_keeps_small_properties_and_omits_big_ones(model):
    small = ev(type="track", event="Clicked", properties={"button": "buy"})
    at, _, body = model.history_entry(small).partition(b"|")
    assert int(at) == small.timestamp_ms
    assert orjson.loads(body) == {"messageId": "m1", "type": "track", "event": "Clicked", "channel": "app", "properties": {"button": "buy"}}
    big = ev(type="track", event="Clicked", properties={"blob": "x" * 600})
    assert orjson.loads(model.history_entry(big).partition(b"|")[2])["propertiesOmitted"] is True
    secret = ev(type="track", event="Checked", properties={"iban": "DE89370400440532013000"})
    assert b"DE8937" not in model.history_entry(secret)


def test_history_off(model):
    off = ProfileModel(model.computed, model.sensitive, 0, 512)
    assert off.history_entry(ev()) == b""


def test_unflatten_lets_the_later_write_win_on_conflicts():
    fields = {"address": (5, "Main St 1"), "address.city": (9, "Oslo"), "plan": (1, "pro")}
    assert unflatten(fields) == {"address": {"city": "Oslo"}, "plan": "pro"}
    fields = {"address": (10, "Main St 1"), "address.city": (9, "Oslo")}
    assert unflatten(fields) == {"address": "Main St 1"}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"history": {"length": -1}}, "history.length"),
        ({"history": {"length": "20"}}, "history.length"),
        ({"history": {"max_properties_bytes": 10**6}}, "max_properties_bytes"),
        ({"histroy": {}}, "expected a mapping with the keys history, sensitive and/or consent"),
        ({"sensitive": {"traits": "passport"}}, "sensitive"),
    ],
)
def test_bad_options_are_refused(document, message):
    with pytest.raises(ConfigError, match=message):
        ProfileModel.parse(document, ComputedTraits([]), source="p.yaml")


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "ids", "aggregate": "distinct", "property": "traits.passport"},
        {"name": "last_iban", "aggregate": "last", "property": ["properties.amount", "properties.bank.iban"]},
        {"name": "per_ssn", "aggregate": "count", "per": "traits.ssn"},
        {"name": "max_tax", "aggregate": "max", "property": "traits.tax_id"},
    ],
)
def test_computed_traits_may_not_store_sensitive_values(entry):
    computed = ComputedTraits.parse({"computed_traits": [entry]})
    with pytest.raises(ConfigError, match="sensitive"):
        ProfileModel.parse({}, computed, source="p.yaml")


def test_counting_over_a_sensitive_field_stores_no_value():
    computed = ComputedTraits.parse({"computed_traits": [{"name": "checks", "aggregate": "count", "property": "traits.passport"}]})
    ProfileModel.parse({}, computed, source="p.yaml")
