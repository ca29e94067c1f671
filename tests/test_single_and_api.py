"""Single mode, APIClientBase, auto_generate and override."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

import pytest

from connshare import APIClientBase, cluster
from tests.clients import AppError, KVClient
from tests.conftest import kv_spec
from tests.harness import AgentError, wait_until


def test_single_mode_shares_one_real_client_per_name(upstream) -> None:
    def make() -> Any:
        return (
            cluster(KVClient, name="single-kv", single_mode=True).delegate("get").delegate("aecho").delegate("boom").create(upstream.port)
        )

    a, b = make(), make()
    try:
        a.wait_ready(10)
        b.wait_ready(10)
        assert a.is_leader and b.is_leader and a.role == "single"
        wait_until(lambda: upstream.total_connections >= 1)
        assert upstream.total_connections == 1  # one real client for both
        upstream.set("s", "v")
        assert a.get("s") == "v" and b.get("s") == "v"
        assert asyncio.run(b.aecho(3)) == 3
        with pytest.raises(AppError):
            a.boom("app")
        got_a: list = []
        got_b: list = []
        ev = threading.Event()
        a.subscribe({"key": "s"}, got_a.append)
        wait_until(lambda: got_a and got_a[-1]["value"] == "v", what="first value")
        assert upstream.watcher_count("s") == 1
        b.subscribe({"key": "s"}, lambda v: (got_b.append(v), ev.set()))
        assert ev.wait(5) and got_b[0]["value"] == "v"  # last value replayed at once
        assert upstream.watcher_count("s") == 1  # dedup
        upstream.set("s", "w")
        wait_until(lambda: got_a[-1]["value"] == "w" and got_b[-1]["value"] == "w", what="broadcast to both")
        a.unsubscribe({"key": "s"})
        b.unsubscribe({"key": "s"})
        wait_until(lambda: upstream.watcher_count("s") == 0, what="upstream unwatch")
    finally:
        a.close()
        b.close()
    wait_until(lambda: upstream.live_connections == 0, what="real client closed")


def test_single_mode_from_env(monkeypatch: pytest.MonkeyPatch, upstream) -> None:
    monkeypatch.setenv("CONNSHARE_SINGLE_MODE", "1")
    c = cluster(KVClient, name="env-single").delegate("echo").create(upstream.port)
    try:
        c.wait_ready(10)
        assert c.role == "single" and c.echo(1) == 1
    finally:
        c.close()


class ConfigAPI(APIClientBase):
    DataClient = KVClient
    delegates = {"get": "invoke"}
    cluster_options = {"name": "cfg-api", "single_mode": True}

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._cache: dict[str, Any] = {}
        self.misses = 0

    def setting(self, key: str) -> str:
        if key not in self._cache:
            self.misses += 1
            self._cache[key] = str(self._client.get(key))
        return self._cache[key]


def test_api_client_base_layers_business_logic(upstream) -> None:
    upstream.set("mode", "fast")
    api = ConfigAPI(upstream.port)
    try:
        api.wait_ready(10)
        assert api.is_leader
        assert api.setting("mode") == "fast" and api.setting("mode") == "fast"
        assert api.misses == 1
    finally:
        api.close()
        api.close()


def test_auto_generate_delegates_every_public_method(upstream) -> None:
    c = cluster(KVClient, name="auto", single_mode=True, auto_generate=True).create(upstream.port)
    try:
        c.wait_ready(10)
        assert c.echo(1) == 1 and c.whoami() > 0
        assert inspect.iscoroutinefunction(type(c).aecho) and not inspect.iscoroutinefunction(type(c).echo)
        assert asyncio.run(c.aecho(2)) == 2
        assert not hasattr(type(c), "_send")  # private methods stay private
    finally:
        c.close()


def test_override_sets_local_attributes(upstream) -> None:
    c = (
        cluster(KVClient, name="ov", single_mode=True)
        .delegate("echo")
        .override("echo", lambda v: ("local", v))
        .override("region", "eu")
        .create(upstream.port)
    )
    try:
        c.wait_ready(10)
        assert c.echo(1) == ("local", 1) and c.region == "eu"
    finally:
        c.close()


def test_forced_leader_and_a_port_that_stays_taken(port, upstream, spawn) -> None:
    (first,) = spawn([kv_spec(port, upstream.port, is_leader=True)])
    assert first.ready()["is_leader"]
    # a second forced leader cannot have the port: it fails after max_wait_time
    (second,) = spawn([kv_spec(port, upstream.port, is_leader=True, max_wait_time=0.3)])
    with pytest.raises(AgentError) as info:
        second.ready(timeout=10)
    assert info.value.desc["cause"] == "ElectionError"
    # a plain process follows the forced leader
    (third,) = spawn([kv_spec(port, upstream.port)])
    assert third.ready()["leader_pid"] == first.pid


def test_coroutine_listener_runs_on_the_loop_it_was_registered_from(upstream) -> None:
    c = cluster(KVClient, name="coro-listener", single_mode=True).create(upstream.port)
    try:
        c.wait_ready(10)
        upstream.set("cl", "v")

        async def main() -> tuple:
            loop = asyncio.get_running_loop()
            got: asyncio.Queue = asyncio.Queue()

            async def listener(value: Any) -> None:
                await got.put((value["value"], asyncio.get_running_loop() is loop))

            c.subscribe({"key": "cl"}, listener)
            return await asyncio.wait_for(got.get(), 10)

        assert asyncio.run(main()) == ("v", True)
    finally:
        c.close()


def test_two_live_listeners_on_one_port_are_impossible(port) -> None:
    from connshare._election import try_bind

    first = try_bind(port)
    assert first is not None
    try:
        assert try_bind(port) is None
    finally:
        first.close()
    again = try_bind(port)  # free once the first is gone
    assert again is not None
    again.close()
