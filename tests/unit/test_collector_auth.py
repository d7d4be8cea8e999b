"""Write keys: configuration from the environment and a YAML file, authentication,
the anonymous mode, and that a key never shows up in an error or a repr."""

from __future__ import annotations

import base64

import pytest

from schemas.errors import ConfigError
from streamcdp.collector.auth import (
    ANONYMOUS,
    CHANNEL_TOPICS,
    Source,
    Unauthorized,
    WriteKeys,
    fingerprint,
    key_from_authorization,
    load_keys_file,
    parse_keys_env,
)
from streams.topics import EVENTS_APP, EVENTS_POS, EVENTS_WEB

SECRET = "wk_Sup3rSecret"


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def _config_error(**env) -> str:
    with pytest.raises(ConfigError) as caught:
        WriteKeys.from_env(env)
    return str(caught.value)


# ------------------------------------------------------------ environment


class TestKeysFromEnv:
    def test_key_equals_channel_list(self):
        sources = parse_keys_env(f" {SECRET}=web , k2=APP,k3=pos,k4=server ,")
        assert {k: s.channel for k, s in sources.items()} == {SECRET: "web", "k2": "app", "k3": "pos", "k4": "server"}
        assert sources[SECRET].key_id == fingerprint(SECRET)

    def test_empty_means_no_keys(self):
        assert parse_keys_env("") == {}
        assert parse_keys_env(" , ") == {}

    @pytest.mark.parametrize(
        "text, problem",
        [
            (f"{SECRET}", "no '='"),
            (f"{SECRET}=wbe", "not one of web, app, pos, server"),
            (f"{SECRET}=", "not one of"),
            ("=web", "empty"),
            (f"{SECRET}:x=web", "cannot contain ':'"),
            (f"{SECRET}=web,{SECRET}=pos", "twice"),
        ],
    )
    def test_mistakes_name_the_entry_never_the_key(self, text, problem):
        with pytest.raises(ConfigError) as caught:
            parse_keys_env(text)
        assert problem in str(caught.value)
        assert "CDP_WRITE_KEYS entry" in str(caught.value)
        assert SECRET not in str(caught.value)

    def test_no_keys_at_all_refuses_to_start_and_says_what_to_set(self):
        message = _config_error()
        for hint in ("CDP_WRITE_KEYS", "CDP_WRITE_KEYS_FILE", "CDP_COLLECTOR_ALLOW_ANONYMOUS"):
            assert hint in message

    def test_anonymous_mode_starts_without_keys(self):
        keys = WriteKeys.from_env({"CDP_COLLECTOR_ALLOW_ANONYMOUS": "true"})
        assert keys.allow_anonymous and keys.sources() == []

    def test_a_bad_anonymous_flag_fails_loudly(self):
        assert "CDP_COLLECTOR_ALLOW_ANONYMOUS" in _config_error(CDP_WRITE_KEYS="k=web", CDP_COLLECTOR_ALLOW_ANONYMOUS="maybe")


# ------------------------------------------------------------------- file


class TestKeysFile:
    def test_mapping_of_key_to_source_and_channel(self, tmp_path):
        path = tmp_path / "keys.yaml"
        path.write_text(f'"{SECRET}": {{source: shop-website, channel: web}}\nk2: {{channel: app}}\nk3: pos\n')
        sources = load_keys_file(path)
        assert sources[SECRET] == Source("shop-website", "web", fingerprint(SECRET))
        assert sources["k2"] == Source("app", "app", fingerprint("k2"))
        assert sources["k3"].channel == "pos"

    def test_an_empty_file_has_no_keys(self, tmp_path):
        path = tmp_path / "keys.yaml"
        path.write_text("# none yet\n")
        assert load_keys_file(path) == {}

    @pytest.mark.parametrize(
        "text, problem",
        [
            ("- a\n- b\n", "expected a mapping"),
            (f"{SECRET}: {{channel: tv}}\n", "not one of"),
            (f"{SECRET}: {{source: x}}\n", "not one of"),
            (f"{SECRET}: {{channel: web, colour: red}}\n", "unknown field(s) colour"),
            (f"{SECRET}: {{channel: web, source: ''}}\n", "'source'"),
            (f"{SECRET}: [web]\n", "expected {source"),
            ("12345: web\n", "must be a string"),
            (f"{SECRET}: {{channel: web\n", "not valid YAML"),
        ],
    )
    def test_mistakes_name_the_file_and_entry(self, tmp_path, text, problem):
        path = tmp_path / "keys.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_keys_file(path)
        assert problem in str(caught.value)
        assert str(path) in str(caught.value)

    def test_a_missing_file_fails_loudly(self, tmp_path):
        message = _config_error(CDP_WRITE_KEYS_FILE=str(tmp_path / "nope.yaml"))
        assert "CDP_WRITE_KEYS_FILE" in message and "nope.yaml" in message

    def test_env_and_file_add_up(self, tmp_path):
        path = tmp_path / "keys.yaml"
        path.write_text("k2: {source: ios, channel: app}\nk1: web\n")
        keys = WriteKeys.from_env({"CDP_WRITE_KEYS": "k1=web", "CDP_WRITE_KEYS_FILE": str(path)})
        assert keys.authenticate("k1").channel == "web"
        assert keys.authenticate("k2") == Source("ios", "app", fingerprint("k2"))

    def test_one_key_with_two_channels_is_refused(self, tmp_path):
        path = tmp_path / "keys.yaml"
        path.write_text(f'"{SECRET}": app\n')
        message = _config_error(CDP_WRITE_KEYS=f"{SECRET}=web", CDP_WRITE_KEYS_FILE=str(path))
        assert "both" in message and SECRET not in message and fingerprint(SECRET) in message


# ----------------------------------------------------------- authenticate


class TestAuthenticate:
    keys = WriteKeys({SECRET: Source("shop", "web", fingerprint(SECRET)), "k-pos": Source("till", "pos")})

    def test_a_known_key_gives_its_source(self):
        assert self.keys.authenticate(SECRET).name == "shop"
        assert self.keys.authenticate("k-pos").topic == EVENTS_POS

    @pytest.mark.parametrize("wrong", [SECRET[:-1], SECRET + "x", SECRET.upper(), "", " " + SECRET])
    def test_a_wrong_key_is_refused(self, wrong):
        with pytest.raises(Unauthorized) as caught:
            self.keys.authenticate(wrong)
        assert caught.value.code == "invalid_write_key"
        assert SECRET not in str(caught.value)

    def test_a_missing_key_is_refused(self):
        with pytest.raises(Unauthorized) as caught:
            self.keys.authenticate(None)
        assert caught.value.code == "missing_write_key"
        assert "basic auth" in caught.value.message

    def test_the_keys_are_not_kept_or_shown(self):
        assert SECRET not in repr(self.keys)
        assert all(SECRET not in repr(s) for s in self.keys.sources())
        assert SECRET not in fingerprint(SECRET)

    def test_anonymous_without_keys_accepts_everything_as_web(self):
        keys = WriteKeys({}, allow_anonymous=True)
        assert keys.authenticate(None) is ANONYMOUS
        assert keys.authenticate("whatever") is ANONYMOUS
        assert ANONYMOUS.topic == EVENTS_WEB

    def test_anonymous_with_keys_accepts_no_key_but_not_a_wrong_one(self):
        keys = WriteKeys({SECRET: Source("shop", "app")}, allow_anonymous=True)
        assert keys.authenticate(None) is ANONYMOUS
        assert keys.authenticate(SECRET).topic == EVENTS_APP
        with pytest.raises(Unauthorized):
            keys.authenticate("wrong")


class TestChannels:
    def test_every_channel_has_an_inbound_topic(self):
        assert CHANNEL_TOPICS == {"web": EVENTS_WEB, "app": EVENTS_APP, "pos": EVENTS_POS, "server": EVENTS_WEB}

    def test_server_sources_go_to_the_web_topic_and_say_so(self):
        server = Source("backend", "server")
        assert server.topic == EVENTS_WEB and server.channel_note == "server"
        assert Source("shop", "web").channel_note is None


# ------------------------------------------------------------- the header


class TestAuthorizationHeader:
    @pytest.mark.parametrize(
        "header, key",
        [
            (None, None),
            ("", None),
            (_basic(f"{SECRET}:"), SECRET),  # what both Python SDKs send
            (_basic(f"{SECRET}:ignored"), SECRET),
            (_basic(SECRET), SECRET),
            ("basic " + _basic(f"{SECRET}:")[6:], SECRET),
            (_basic(":"), None),
        ],
    )
    def test_the_key_is_the_user_name(self, header, key):
        assert key_from_authorization(header) == key

    @pytest.mark.parametrize(
        "header, code",
        [
            ("Bearer abc", "unsupported_authorization"),
            ("Basic !!!not-base64", "invalid_authorization"),
            ("Basic " + base64.b64encode(b"\xff\xfe:").decode(), "invalid_authorization"),
        ],
    )
    def test_anything_else_is_refused(self, header, code):
        with pytest.raises(Unauthorized) as caught:
            key_from_authorization(header)
        assert caught.value.code == code
