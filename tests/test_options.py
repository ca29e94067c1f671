from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from connshare import DEFAULT_PORT, Base, ConfigurationError, Options, cluster
from tests.conftest import kv_spec
from tests.harness import wait_until


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
        ({"max_frame_size": 100}, "max_frame_size"),  # too small for the handshake
        ({"response_timeout": float("inf")}, "response_timeout"),
        ({"response_timeout": float("nan")}, "response_timeout"),
        ({"max_wait_time": 1e12}, "max_wait_time"),
        ({"connect_timeout": float("inf")}, "connect_timeout"),
        ({"subscribe_timeout": float("inf")}, "subscribe_timeout"),
        ({"heartbeat_interval": float("inf")}, "heartbeat_interval"),
        ({"max_buffered_bytes": 1.5}, "max_buffered_bytes"),
        ({"transcode": object()}, "transcode"),
        ({"leader_nice": -21}, "leader_nice"),
        ({"leader_nice": 1.5}, "leader_nice"),
        ({"wait_in_place": -0.001}, "wait_in_place"),
        ({"wait_in_place": 0.5}, "wait_in_place"),
        ({"wait_in_place": True}, "wait_in_place"),
        ({"spin_wait": -0.0001}, "spin_wait"),
        ({"spin_wait": 0.01}, "spin_wait"),
        ({"spin_wait": True}, "spin_wait"),
        ({"spin_wait": "1ms"}, "spin_wait"),
        ({"leader_spin_wait": -0.0001}, "leader_spin_wait"),
        ({"leader_spin_wait": 0.002}, "leader_spin_wait"),
        ({"leader_spin_wait": False}, "leader_spin_wait"),
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


class Streams(Base):
    def __init__(self) -> None:
        super().__init__()
        self.ready(True)

    def route(self, method: str) -> str:
        return method

    def items(self) -> Iterator[int]:
        yield 1

    async def stream(self) -> AsyncIterator[int]:
        yield 1


def test_a_generator_method_is_not_delegated() -> None:
    # Its generator could not cross to another process: refused, not a surprise in followers.
    for name in ("items", "stream"):
        with pytest.raises(ConfigurationError, match="generator"):
            cluster(Streams).delegate(name)
    c = cluster(Streams, name="streams", single_mode=True, auto_generate=True).create()
    try:
        c.wait_ready(10)
        assert not hasattr(c, "items") and not hasattr(c, "stream")
        assert c.route("x") == "x"
        # invoke's own first parameter takes no keyword: a method's may be called "method"
        assert c.invoke("route", method="m") == "m"
        assert asyncio.run(c.ainvoke("route", method="m")) == "m"
    finally:
        c.close()


def _can_lower_nice() -> bool:
    """Whether this process may lower a thread's nice value (CAP_SYS_NICE, RLIMIT_NICE)."""
    tid = threading.get_native_id()
    now = os.getpriority(os.PRIO_PROCESS, tid)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, now - 1)
    except OSError:
        return False
    os.setpriority(os.PRIO_PROCESS, tid, now)
    return True


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is per thread on Linux only")


@linux_only
def test_the_leader_runs_its_loop_thread_at_leader_nice(port, upstream, spawn) -> None:
    if not _can_lower_nice():
        pytest.skip("lowering a nice value needs CAP_SYS_NICE or an RLIMIT_NICE allowance here")
    a, b = spawn([kv_spec(port, upstream.port, leader_nice=-4)], [kv_spec(port, upstream.port, leader_nice=-4)])
    for w in (a, b):
        w.ready()
    leader, follower = (a, b) if a.role()["is_leader"] else (b, a)
    assert leader.request("loop_nice") == -4
    assert follower.request("loop_nice") == 0
    assert follower.call("echo", 1) == 1
    leader.stop()  # SIGKILL: the follower takes the lead, and the priority with it
    wait_until(lambda: follower.role()["is_leader"], what="the follower to lead")
    wait_until(lambda: follower.request("loop_nice") == -4, what="the new leader's loop thread at nice -4")
    assert follower.call("echo", 2) == 2
    follower.request("close", "0")  # it leads no more: its loop thread has its old value back
    assert follower.request("loop_nice") == 0, "close() returned before the priority was given back"


def test_leader_spin_wait_under_uvloop_warns_and_the_leader_serves(port, upstream, spawn) -> None:
    # uvloop has no selector to poll: the option cannot work there, and a user who
    # set it should hear so rather than wonder.
    pytest.importorskip("uvloop")
    (w,) = spawn([{**kv_spec(port, upstream.port, leader_spin_wait=0.0001), "connshare_loop": "uvloop"}])
    w.ready()
    assert w.role()["is_leader"]
    assert w.call("echo", 3) == 3
    said = [m for m in w.request("warnings") if "leader_spin_wait=0.0001 has no effect" in m]
    assert len(said) == 1, w.request("warnings")


@linux_only
def test_a_refused_leader_nice_warns_and_the_leader_serves(port, upstream, spawn) -> None:
    # A worker without CAP_SYS_NICE (a container's default) may not lower its nice
    # value: connshare says so once and leads at the normal priority.
    (w,) = spawn([{**kv_spec(port, upstream.port, leader_nice=-4), "no_cap_sys_nice": True}])
    w.ready()
    assert w.role()["is_leader"]
    assert w.request("loop_nice") == 0
    assert w.call("echo", 3) == 3
    refused = [m for m in w.request("warnings") if "leader_nice=-4 was refused" in m]
    assert len(refused) == 1, w.request("warnings")
