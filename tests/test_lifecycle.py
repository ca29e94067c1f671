"""A client's life in a process: subscriptions that end early, a client closed
beside another of its channel, closing before ready, app code that raises what
it should not on connshare's thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest

from connshare import APIClientBase, Base, ConcurrencyError, NotReadyError, cluster
from connshare._loop import get_loop
from tests.clients import CounterClient, KVClient
from tests.conftest import kv_spec
from tests.harness import wait_until


def test_a_subscription_ended_before_the_leaders_answer_leaves_nothing_behind(port, upstream, spawn) -> None:
    (leader,) = spawn([kv_spec(port, upstream.port)])
    leader.ready()
    (follower,) = spawn([kv_spec(port, upstream.port)])
    follower.ready()
    assert follower.role()["is_leader"] is False
    upstream.set("k", "v1")
    follower.request("subscribe_then_unsubscribe", "0", {"key": "k"}, "early")
    # A later subscription of the same process to the key gets its last value...
    follower.subscribe({"key": "k"}, "late")
    follower.wait_event("late", lambda v: v["value"] == "v1")
    # ...and once it ends, the leader lets go of the key upstream.
    follower.request("unsubscribe", "0", {"key": "k"})
    wait_until(lambda: upstream.watcher_count("k") == 0, what="the leader's upstream watch of k to end")


def test_closing_one_of_two_clients_of_a_channel_ends_what_it_subscribed_and_published(port, upstream, spawn) -> None:
    (leader,) = spawn([kv_spec(port, upstream.port)])
    leader.ready()
    (follower,) = spawn([dict(kv_spec(port, upstream.port), id="a"), dict(kv_spec(port, upstream.port), id="b")])
    follower.ready("a")
    follower.ready("b")
    follower.request("publish", "a", {"svc": "a"})
    follower.request("publish", "b", {"svc": "b"})
    follower.subscribe({"key": "ka"}, "a", cid="a")
    follower.subscribe({"key": "kb"}, "b", cid="b")
    wait_until(lambda: upstream.watcher_count("ka") and upstream.watcher_count("kb"), what="both watches upstream")
    upstream.set("ka", 1)
    follower.wait_event("a", lambda v: v["value"] == 1)

    follower.request("close", "a")
    wait_until(lambda: upstream.watcher_count("ka") == 0, what="the closed client's watch to end upstream")
    upstream.set("ka", 2)
    upstream.set("kb", 2)
    follower.wait_event("b", lambda v: v["value"] == 2)
    assert 2 not in [v["value"] for v in follower.values("a")]

    # The next leader publishes again what the process's open client published,
    # only. (The upstream drops a connection's publications when it ends.)
    leader.kill()
    wait_until(lambda: follower.role("b")["is_leader"], what="the follower to lead")
    wait_until(lambda: upstream.published() == [{"svc": "b"}], what="only b's publication, from the new leader")


def test_a_listener_that_calls_sys_exit_does_not_end_connshares_thread(port, upstream, spawn) -> None:
    (leader,) = spawn([kv_spec(port, upstream.port, response_timeout=5)])
    leader.ready()
    leader.request("subscribe_exiting", "0", {"key": "x"}, "x")
    upstream.set("x", 1)
    _, meta = leader.wait_event("x")
    assert meta["thread"] == "connshare-loop"
    assert leader.call("aecho", 2) == 2  # a coroutine call runs on that thread
    (follower,) = spawn([kv_spec(port, upstream.port, response_timeout=5)])
    follower.ready()
    assert follower.call("aecho", 3) == 3


def test_a_real_client_whose_constructor_raises_system_exit_fails_its_channel_only(port, upstream, spawn) -> None:
    failing = dict(kv_spec(port, upstream.port), args=[upstream.port, "exit"])
    counter = {"id": "1", "cls": "CounterClient", "options": {"port": port, "name": "counter"}, "delegates": ["incr"]}
    (leader,) = spawn([failing, counter])
    with pytest.raises(Exception) as info:
        leader.ready()
    assert info.value.isa("NotReadyError"), info.value.desc  # type: ignore[attr-defined]
    leader.ready("1")
    assert leader.call("incr", cid="1") == 1


def test_an_exception_whose_repr_and_str_raise_still_reaches_the_caller(port, upstream, spawn) -> None:
    (leader,) = spawn([kv_spec(port, upstream.port, response_timeout=5)])
    leader.ready()
    (follower,) = spawn([kv_spec(port, upstream.port, response_timeout=5)])
    follower.ready()
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        follower.call("boom", "unprintable")
    assert info.value.isa("UnprintableError"), info.value.desc  # type: ignore[attr-defined]
    assert info.value.desc["args"][1] == "<Unreprable: str() or repr() failed>"  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 4  # answered, not timed out
    assert follower.call("echo", 1) == 1


@pytest.mark.parametrize("method", ["boom", "aboom_kind"])
def test_a_frozen_exception_class_reaches_the_caller_as_itself(port, upstream, spawn, method) -> None:
    delegates = ["echo", "boom", "aboom_kind"]
    (leader,) = spawn([kv_spec(port, upstream.port, response_timeout=5, delegates=delegates)])
    leader.ready()
    (follower,) = spawn([kv_spec(port, upstream.port, response_timeout=5, delegates=delegates)])
    follower.ready()
    with pytest.raises(Exception) as info:
        follower.call(method, "frozen", timeout=20)
    assert info.value.isa("FrozenError"), info.value.desc  # type: ignore[attr-defined]
    assert info.value.desc["args"] == [3] and info.value.desc["remote_traceback"]  # type: ignore[attr-defined]
    assert follower.call("echo", 1) == 1


def test_a_call_in_flight_when_its_own_process_closes_says_so(port, upstream, spawn) -> None:
    (leader,) = spawn([kv_spec(port, upstream.port)])
    leader.ready()
    (follower,) = spawn([kv_spec(port, upstream.port)])
    follower.ready()
    follower.request("call_in_thread", "0", "sleep", [5], "slow")
    wait_until(lambda: follower.request("pending", "0") == 1, what="the call in flight")
    follower.request("close", "0")
    outcome, desc = follower.request("join_call", "slow")
    assert outcome == "raised" and desc["type"] == "ClientClosedError", desc  # not a lost leader: it is fine
    assert leader.call("echo", 1) == 1


def test_the_leaders_own_call_in_flight_when_it_closes_says_so(port, upstream, spawn) -> None:
    # A coroutine method called from a thread of the leader's own process: ended
    # before the real client closes under it, not left to its response_timeout.
    (leader,) = spawn([kv_spec(port, upstream.port, response_timeout=30)])
    leader.ready()
    leader.request("call_in_thread", "0", "invoke", ["asleep", 60], "own")  # blocks
    wait_until(lambda: leader.request("threads_waiting_on_loop") == 1, what="the call running")
    leader.request("close", "0")
    outcome, desc = leader.request("join_call", "own", 10)
    assert outcome == "raised" and desc["type"] == "ClientClosedError", (outcome, desc)


def test_closing_a_leader_whose_real_client_is_starting_ends_the_start(port, upstream) -> None:
    c = cluster(KVClient, port=port, name="kv", max_wait_time=60).delegate("echo").create(upstream.port, "never-ready")
    wait_until(lambda: c.is_leader, what="the lead")
    node = c._node
    c.close()
    # (before, it waited for the closed client's ready() until max_wait_time)
    wait_until(lambda: not node._tasks, timeout=5, what="the start to end")


class NeverReady(Base):
    """A real client that never says it is ready."""

    def slow(self) -> None:
        pass


def test_closing_a_client_before_it_is_ready_wakes_whoever_waits() -> None:
    c = cluster(NeverReady, name="never-ready", single_mode=True).delegate("slow").create()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            c.wait_ready(20)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    c.close()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(errors[0], NotReadyError) and type(errors[0].__cause__).__name__ == "ClientClosedError"
    with pytest.raises(NotReadyError):
        asyncio.run(c.ready())
    assert c.role == "closed" and c.closed and not c.is_leader


def test_wait_ready_on_connshares_thread_raises_rather_than_deadlocks(upstream) -> None:
    c = cluster(KVClient, name="wait-on-loop", single_mode=True).create(upstream.port)
    out: list[Any] = []
    done = threading.Event()

    def listener(value: Any) -> None:
        c2 = cluster(CounterClient, name="wait-on-loop-2", single_mode=True).create()
        t0 = time.monotonic()
        try:
            c2.wait_ready(3)
            out.append("ready")
        except Exception as exc:
            out.append(exc)
        out.append(time.monotonic() - t0)
        c2.close()
        done.set()

    try:
        c.wait_ready(10)
        upstream.set("w", 1)
        c.subscribe({"key": "w"}, listener)
        assert done.wait(10)
        assert isinstance(out[0], ConcurrencyError) and out[1] < 1, out
    finally:
        c.close()


def test_a_closed_client_says_so(port, upstream) -> None:
    c = cluster(KVClient, name="closed-role", port=port).create(upstream.port)
    c.wait_ready(10)
    assert c.role == "leader"
    c.close()
    assert c.role == "closed" and not c.is_leader


class StartFails(APIClientBase):
    DataClient = KVClient
    cluster_options = {"name": "api-start-fails", "single_mode": True}


def test_an_api_client_reports_a_start_up_failure_once(upstream, tmp_path) -> None:
    api = StartFails(upstream.port, f"ready-after:{tmp_path / 'fail'}")
    errors: list[BaseException] = []
    api.on("error", errors.append)
    (tmp_path / "fail").touch()
    try:
        with pytest.raises(NotReadyError):
            api.wait_ready(10)
        wait_until(lambda: errors, what="the error event")
        # Whatever the failure set off on connshare's loop has run by now.
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), get_loop()).result(5)
        assert len(errors) == 1, errors
    finally:
        api.close()


class EchoAPI(APIClientBase):
    DataClient = KVClient
    delegates = {"echo": "invoke"}

    def __init__(self, port: int, upstream_port: int) -> None:
        self.cluster_options = {"name": "echo-api", "port": port}
        super().__init__(upstream_port)


class ClosingAPI(EchoAPI):
    def __init__(self, port: int, upstream_port: int) -> None:
        super().__init__(port, upstream_port)
        self.cache = {"x": 1}

    def close(self) -> None:
        self.cache.clear()
        super().close()


def test_an_api_clients_close_that_calls_super_closes_the_shared_client(port, upstream) -> None:
    api = ClosingAPI(port, upstream.port)
    api.wait_ready(10)
    assert api.is_leader and api._client.echo(5) == 5
    api.close()
    assert api.cache == {} and api._client.closed and api._client.role == "closed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free for the next leader


@pytest.mark.parametrize("how", ["aclose", "async with"])
def test_an_api_clients_own_close_runs_when_closed_from_a_coroutine(port, upstream, how) -> None:
    async def main() -> ClosingAPI:
        api = ClosingAPI(port, upstream.port)
        if how == "aclose":
            await api.ready()
            await api.aclose()
        else:
            async with api:
                pass
        await api.aclose()  # again: nothing more
        return api

    api = asyncio.run(main())
    assert api.closed and api.cache == {} and api._client.closed and api._client.role == "closed"


def test_an_api_clients_aclose_closes_the_shared_client(port, upstream) -> None:
    async def main() -> APIClientBase:
        api = EchoAPI(port, upstream.port)
        await api.ready()
        await api.aclose()
        return api

    api = asyncio.run(main())
    assert api.closed and api._client.closed and api._client.role == "closed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


class SlowStart(Base):
    """A real client whose constructor waits for the test: what a process
    subscribes and publishes meanwhile is queued behind it."""

    def __init__(self, started: threading.Event, go: threading.Event) -> None:
        super().__init__()
        started.set()
        go.wait(10)
        self.listeners: list[Any] = []
        self.published: list[Any] = []
        self.ready(True)

    def subscribe(self, reg: Any, listener: Any) -> None:
        self.listeners.append(listener)

    def publish(self, reg: Any) -> None:
        self.published.append(reg)

    async def push(self, value: Any) -> int:
        for fn in self.listeners:
            fn(value)
        return len(self.listeners)

    async def counts(self) -> tuple[int, int]:
        return len(self.listeners), len(self.published)


def test_what_is_subscribed_and_published_while_the_real_client_starts_reaches_it_once() -> None:
    started, go = threading.Event(), threading.Event()
    c = cluster(SlowStart, name="slow-start", single_mode=True).delegate("push").delegate("counts").create(started, go)
    try:
        assert started.wait(10)
        got: list[Any] = []
        c.subscribe({"k": 1}, got.append)
        c.publish({"me": 1})
        go.set()
        c.wait_ready(10)
        assert asyncio.run(c.push("v")) == 1
        assert asyncio.run(c.counts()) == (1, 1)
        wait_until(lambda: got, what="the value")
        asyncio.run(c.counts())  # a pass of connshare's loop: a second delivery would be in by now
        assert got == ["v"]
    finally:
        go.set()
        c.close()


class LateAPI(APIClientBase):
    DataClient = KVClient
    delegates = {"echo": "invoke"}

    def __init__(self, port: int, upstream_port: int) -> None:
        self.cluster_options = {"name": "kv", "port": port, "is_leader": False, "max_wait_time": 1}
        super().__init__(upstream_port)

    def echo(self, value: Any) -> Any:
        return self._client.echo(value)


def test_an_api_clients_ready_callbacks_follow_the_shared_client_once_it_turns_ready(port, upstream, spawn) -> None:
    api = LateAPI(port, upstream.port)
    try:
        with pytest.raises(NotReadyError):
            api.wait_ready(10)  # no leader yet
        (leader,) = spawn([kv_spec(port, upstream.port)])
        leader.ready()
        wait_until(lambda: api.is_ready, what="the next election to find the leader")
        got: list[Any] = []
        api.ready(got.append)
        assert got == [None]
        assert api.echo(1) == 1
    finally:
        api.close()
