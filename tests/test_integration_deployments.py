"""Real deployments of examples/redis_config: redis-server, gunicorn (4 sync workers,
Flask) and uvicorn (4 workers, Starlette), and multiprocessing.Pool, all started here
on free ports and killed at teardown.

For each app server: Redis sees as many connections from the app with 4 workers as
with 1 (one data client's worth); a value set in Redis reaches all 4 workers; after
SIGKILL of the leader worker the server replaces it, requests keep being answered, the
next change reaches all 4 workers and the connection count is back to one client's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from examples.redis_config import set_config
from tests.integration_servers import REDIS_SERVER, AppServer, RedisServer, base_env, free_port, run_in_group, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]

KEY = "greeting"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def app_servers(tmp_path: Path) -> Iterator[Callable[..., AppServer]]:
    started: list[AppServer] = []

    def start(kind: str, workers: int, env: dict[str, str], **kw: bool) -> AppServer:
        server = AppServer(kind, workers, tmp_path, env, **kw)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


def app_env(redis_server: RedisServer, client_name: str) -> dict[str, str]:
    return base_env(REDIS_URL=redis_server.url, CONNSHARE_PORT=str(free_port()), CONFIG_CLIENT_NAME=client_name, CONFIG_KEYS=KEY)


def has(value: str) -> Callable[[dict], bool]:
    return lambda r: r["value"] == value


def single_leader(responses: dict[int, dict]) -> int:
    """All workers agree on one leader, and it is one of them."""
    leaders = {r["leader_pid"] for r in responses.values()}
    assert len(leaders) == 1, f"workers disagree about the leader: {responses}"
    leader = leaders.pop()
    assert leader in responses, f"leader {leader} is not a worker: {sorted(responses)}"
    assert [p for p, r in responses.items() if r["is_leader"]] == [leader]
    assert {r["role"] for p, r in responses.items() if p != leader} == {"follower"}
    return leader


def wait_connections(redis_server: RedisServer, name: str, n: int, when: str) -> None:
    wait_until(lambda: redis_server.connections(name) == n, 15, lambda: f"{n} connections {when}, have {redis_server.connections(name)}")


def baseline_connections(start: Callable[..., AppServer], kind: str, redis_server: RedisServer, value: str) -> int:
    """Redis connections of the app with a single worker: one data client's worth."""
    name = f"baseline-{uuid.uuid4().hex[:8]}"
    one = start(kind, 1, app_env(redis_server, name))
    one.wait_all(has(value), "the single worker to hold the value")
    n = redis_server.connections(name)
    one.stop()
    wait_connections(redis_server, name, 0, "once the single worker is gone")
    return n


@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
def test_app_server_shares_one_redis_client(kind: str, redis_server: RedisServer, app_servers: Callable[..., AppServer]) -> None:
    r = redis_server.client
    v0 = f"v0-{uuid.uuid4().hex[:6]}"
    set_config(r, KEY, v0)

    baseline = baseline_connections(app_servers, kind, redis_server, v0)
    assert 1 <= baseline <= 2, f"one data client: one command connection and one pub/sub connection, got {baseline}"

    name = f"app-{kind}-{uuid.uuid4().hex[:8]}"
    app = app_servers(kind, 4, app_env(redis_server, name))
    responses, failures = app.wait_all(has(v0), "all 4 workers to hold the first value")
    leader = single_leader(responses)
    wait_connections(redis_server, name, baseline, "with 4 workers")
    print(f"\n{kind}: connections with 1 worker: {baseline}; with 4 workers: {redis_server.connections(name)}")

    # A change made in Redis reaches every worker.
    v1 = f"v1-{uuid.uuid4().hex[:6]}"
    set_config(r, KEY, v1)
    responses, failures = app.wait_all(has(v1), "all 4 workers to get the change made in Redis")
    assert single_leader(responses) == leader
    before_kill = redis_server.connection_ids(name)
    assert len(before_kill) == baseline
    assert not failures, failures

    # The leader dies: the server replaces it, a follower takes over.
    os.kill(leader, signal.SIGKILL)
    wait_until(lambda: leader not in app.worker_pids() and len(app.worker_pids()) == 4, 30, "the killed leader to be replaced")
    responses, failures = app.wait_all(
        lambda x: x["value"] == v1 and x["leader_pid"] not in (None, leader), "a new leader, known to all 4 workers"
    )
    new_leader = single_leader(responses)
    assert new_leader != leader and leader not in responses
    assert not failures, f"requests failed after the leader was killed: {failures}"

    # The next change (through a worker's HTTP endpoint, then the leader) reaches all 4.
    v2 = f"v2-{uuid.uuid4().hex[:6]}"
    app.put(KEY, v2)
    assert r.get("config:" + KEY) == v2.encode()
    responses, failures = app.wait_all(has(v2), "all 4 workers (one new) to get the next change")
    assert single_leader(responses) == new_leader
    assert not failures, failures
    wait_connections(redis_server, name, baseline, "after the kill")
    # The key held a value before the app started: a worker (the first ones, or
    # the one that replaced the leader) answers only once it holds it.
    unsettled = [a for a in app.answers if a["value"] is None]
    assert not unsettled, f"{len(unsettled)} of {len(app.answers)} answers came before the worker held the values: {unsettled[:3]}"
    after = redis_server.connection_ids(name)
    assert not after & before_kill, "the killed leader's connections are still open"
    print(f"{kind}: connections after the leader was killed and replaced: {len(after)} (none of the old ones)")


@pytest.mark.parametrize("how", ["factory", "post_fork"])
def test_gunicorn_preload_is_safe(how: str, redis_server: RedisServer, app_servers: Callable[..., AppServer]) -> None:
    """--preload. ``factory``: the app factory (and so the client) runs in the master
    before the fork; the master leads and every worker follows it. ``post_fork``: the
    factory leaves the client to gunicorn_conf.py's post_fork hook; a worker leads."""
    r = redis_server.client
    v0 = f"v0-{uuid.uuid4().hex[:6]}"
    set_config(r, KEY, v0)
    name = f"preload-{how}-{uuid.uuid4().hex[:8]}"
    if how == "factory":
        app = app_servers("gunicorn", 4, app_env(redis_server, name), preload=True)
        responses, _ = app.wait_all(lambda x: x["value"] == v0 and x["role"] == "follower", "all 4 workers to follow and hold the value")
        assert {x["leader_pid"] for x in responses.values()} == {app.proc.pid}  # type: ignore[union-attr]
    else:
        app = app_servers(
            "gunicorn", 4, app_env(redis_server, name), preload=True,
            conf="examples/redis_config/gunicorn_conf.py", app="examples.redis_config.wsgi_app:create_app(eager=False)",
        )  # fmt: skip
        responses, _ = app.wait_all(has(v0), "all 4 workers to hold the value")
        single_leader(responses)
    v1 = f"v1-{uuid.uuid4().hex[:6]}"
    set_config(r, KEY, v1)
    responses, failures = app.wait_all(has(v1), "all 4 workers to get the change")
    assert not failures, failures
    n = wait_until(lambda: redis_server.connections(name), 15, "the leader's connections")
    assert n == 2, f"not one data client's worth of connections (one command, one pub/sub): {n}"
    print(f"\ngunicorn --preload ({how}): connections with 4 workers: {n}")


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_pool_demo(start_method: str, redis_server: RedisServer) -> None:
    name = f"pool-{start_method}-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "examples.redis_config.pool_demo", "--start-method", start_method, "--redis-url", redis_server.url,
           "--port", str(free_port()), "--client-name", name, "--processes", "4"]  # fmt: skip
    res = run_in_group(cmd, base_env(), timeout=90)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["parent_is_leader"] is True
    assert len(summary["worker_pids"]) == 4 and summary["parent_pid"] not in summary["worker_pids"]
    assert summary["roles"] == ["follower"]
    assert summary["leader_pids_seen"] == [summary["parent_pid"]]
    assert summary["last_values"] == [summary["second"]] and summary["values_ok"]
    assert summary["redis_connections"] == 2, summary
    wait_until(lambda: redis_server.connections(name) == 0, 15, "the demo's connections to close")
