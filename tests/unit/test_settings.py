import pytest

from schemas.errors import ConfigError
from streams.settings import Settings, mask_url_password, parse_duration


def test_defaults_match_the_spec():
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "localhost:9092"
    assert s.redis_url == "redis://localhost:6379/0"
    assert (s.topic_partitions, s.web_port, s.collector_port) == (8, 6066, 8088)


def test_environment_is_parsed_and_overrides_win():
    s = Settings.from_env(
        {"CDP_KAFKA_BOOTSTRAP": "k1:9092, k2:9092", "CDP_DEDUPE_TTL": "2d", "CDP_EMIT_RESOLVED": "false",
         "CDP_PHONE_DEFAULT_REGION": "de", "CDP_LOG_FORMAT": "JSON"},
        web_port=7000,
    )
    assert s.bootstrap_servers() == ["k1:9092", "k2:9092"]
    assert s.kafka_url() == "kafka://k1:9092;k2:9092"
    assert s.dedupe_ttl_s == 2 * 86400
    assert s.emit_resolved is False
    assert s.phone_default_region == "DE"
    assert s.log_format == "json"
    assert s.web_port == 7000


@pytest.mark.parametrize(
    "variable, value",
    [("CDP_TOPIC_PARTITIONS", "eight"), ("CDP_TOPIC_PARTITIONS", "0"), ("CDP_WEB_PORT", "70000"),
     ("CDP_EMIT_RESOLVED", "maybe"), ("CDP_DEDUPE_TTL", "soon"), ("CDP_LOG_FORMAT", "xml"),
     ("CDP_PHONE_DEFAULT_REGION", "Germany")],
)
def test_bad_values_fail_loudly_naming_the_variable(variable, value):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().web_port = 1  # type: ignore[misc]


def test_secrets_are_masked():
    s = Settings.from_env({"CDP_REDIS_URL": "redis://:s3cret@redis:6379/0", "CDP_ID_HASH_KEY": "k"})
    shown = s.redacted()
    assert "s3cret" not in str(shown)
    assert shown["id_hash_key"] == "***"
    assert mask_url_password("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"


def test_durations():
    assert parse_duration("250ms") == 0.25
    assert parse_duration("90") == 90
    assert parse_duration("10m") == 600
    with pytest.raises(ValueError):
        parse_duration("-1s")
