from __future__ import annotations

import pytest

from connshare import DEFAULT_PORT, Base, ConfigurationError, Options, cluster


class Thing(Base):
    def get(self) -> int:
        return 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"port": "7777"}, "port"),
        ({"response_timeout": 0}, "response_timeout"),
        ({"response_timeout": -1}, "response_timeout"),
        ({"max_wait_time": "soon"}, "max_wait_time"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"is_leader": "yes"}, "is_leader"),
        ({"is_broadcast": 1}, "is_broadcast"),
        ({"name": ""}, "name"),
        ({"secret": "short"}, "secret"),
        ({"max_frame_size": 0}, "max_frame_size"),
        ({"max_buffered_bytes": 1.5}, "max_buffered_bytes"),
        ({"transcode": object()}, "transcode"),
    ],
)
def test_a_bad_option_fails_at_once_naming_it(kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigurationError, match=repr(name)):
        cluster(Thing, **kwargs)


def test_unknown_option() -> None:
    with pytest.raises(ConfigurationError, match="unknown option"):
        cluster(Thing, prot=1234)


def test_port_defaults_to_env_then_fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONNSHARE_PORT", raising=False)
    assert Options().port == DEFAULT_PORT
    assert DEFAULT_PORT not in (7777, 8080, 6379, 5432) and DEFAULT_PORT < 32768
    monkeypatch.setenv("CONNSHARE_PORT", "31337")
    assert Options().port == 31337
    monkeypatch.setenv("CONNSHARE_PORT", "nope")
    with pytest.raises(ConfigurationError, match="CONNSHARE_PORT"):
        Options()


def test_single_mode_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNSHARE_SINGLE_MODE", "1")
    assert Options().single_mode is True
    monkeypatch.setenv("CONNSHARE_SINGLE_MODE", "0")
    assert Options().single_mode is False


def test_options_are_frozen() -> None:
    import attrs

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Options().port = 1  # type: ignore[misc]


def test_delegate_validation() -> None:
    b = cluster(Thing)
    with pytest.raises(ConfigurationError, match="'to' must be one of"):
        b.delegate("get", "call")
    with pytest.raises(ConfigurationError, match="no method 'nope'"):
        b.delegate("nope")
    with pytest.raises(ConfigurationError, match="public method"):
        b.delegate("_private")
    with pytest.raises(ConfigurationError, match="own API"):
        b.delegate("wait_ready")
    with pytest.raises(ConfigurationError, match="client class"):
        cluster(Thing(), port=1234)  # type: ignore[arg-type]
