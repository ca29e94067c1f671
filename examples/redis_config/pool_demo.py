"""multiprocessing.Pool workers sharing one Redis config client with their parent.

    python -m examples.redis_config.pool_demo --start-method spawn
    python -m examples.redis_config.pool_demo --start-method fork

Options: ``--redis-url`` (default ``$REDIS_URL`` or redis://127.0.0.1:6379/0),
``--port`` (connshare's port; default ``$CONNSHARE_PORT`` or connshare's default),
``--processes`` (4), ``--client-name``.

The parent creates the client first and becomes the leader: the one process with
Redis connections. Then:

* ``spawn``: each pool worker starts a fresh interpreter; the pool's ``initializer``
  creates the worker's client, which follows the parent.
* ``fork``: the workers inherit the parent's client object (a module global set
  before the pool exists). connshare notices the fork: in each child the client joins
  the cluster again at once, as a follower, with the parent's watches.

Every task reports its pid, role and the value it holds; the parent changes the value
and every worker sees the change. The last lines print one JSON summary (the
integration tests read it), including how many Redis connections carry the client's
name: those of one data client, however many workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Any

import redis

from .client import DEFAULT_URL, ConfigClient, app_connections

KEY = "greeting"

#: This process's client: set by the parent (fork) or by the pool initializer (spawn).
CONFIG: ConfigClient | None = None
#: Makes the first round of tasks run on every worker, one each.
BARRIER: Any = None


def init_worker(barrier: Any, client_args: tuple | None) -> None:
    """Pool initializer. ``spawn``: a fresh process makes its own client. ``fork``:
    the worker already has the parent's."""
    global CONFIG, BARRIER
    BARRIER = barrier
    if client_args is not None:
        url, port, client_name = client_args
        CONFIG = ConfigClient(url, [KEY], port=port, client_name=client_name)


def task(expected: str, meet: bool = False) -> dict[str, Any]:
    """Wait (bounded) until this worker's cache holds ``expected``; say who we are."""
    config = CONFIG
    assert config is not None, "no client in this worker"
    if meet:
        BARRIER.wait(30)  # a worker waiting here takes no other task: each takes one
    config.wait_ready(30)
    value = config.wait_for(KEY, lambda v: v == expected, timeout=30)
    return {
        "pid": os.getpid(),
        "role": config.role,
        "is_leader": config.is_leader,
        "leader_pid": config.leader_pid,
        "value": value,
        "fetched": config.fetch(KEY),  # a call that goes through the leader to Redis
    }


def run(start_method: str, url: str, port: int | None, processes: int, client_name: str) -> dict[str, Any]:
    global CONFIG
    ctx = multiprocessing.get_context(start_method)
    parent = CONFIG = ConfigClient(url, [KEY], port=port, client_name=client_name)
    parent.wait_ready(30)
    first = f"hello from pid {os.getpid()} at {time.time():.3f}"
    parent.set(KEY, first)
    parent.wait_for(KEY, lambda v: v == first, timeout=30)

    client_args = (url, port, client_name) if start_method != "fork" else None
    barrier = ctx.Barrier(processes)
    with ctx.Pool(processes, initializer=init_worker, initargs=(barrier, client_args)) as pool:
        results = pool.starmap(task, [(first, True)] * processes, chunksize=1)
        second = f"changed at {time.time():.3f}"
        parent.set(KEY, second)
        results += pool.starmap(task, [(second, False)] * (processes * 2), chunksize=1)
        connections = app_connections(redis.Redis.from_url(url), client_name)
    parent_is_leader = parent.is_leader
    parent.close()
    return {
        "start_method": start_method,
        "parent_pid": os.getpid(),
        "parent_is_leader": parent_is_leader,
        "leader_pid": results[0]["leader_pid"],
        "worker_pids": sorted({r["pid"] for r in results}),
        "roles": sorted({r["role"] for r in results}),
        "leader_pids_seen": sorted({r["leader_pid"] for r in results}),
        "values_ok": all(r["value"] == r["fetched"] for r in results),
        "first": first,
        "second": second,
        "last_values": sorted({r["value"] for r in results[len(results) // 2 :]}),
        "redis_connections": connections,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--start-method", choices=multiprocessing.get_all_start_methods(), default="spawn")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_URL))
    p.add_argument("--port", type=int, default=None, help="connshare port (default: $CONNSHARE_PORT or connshare's default)")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--client-name", default=os.environ.get("CONFIG_CLIENT_NAME", "connshare-pool-demo"))
    a = p.parse_args(argv)
    summary = run(a.start_method, a.redis_url, a.port, a.processes, a.client_name)
    print(
        f"{a.start_method}: leader pid {summary['leader_pid']} (the parent is {summary['parent_pid']});"
        f" workers {summary['worker_pids']} were {summary['roles']};"
        f" they saw {summary['last_values']}; Redis connections named {a.client_name!r}: {summary['redis_connections']}"
    )
    print(json.dumps(summary))
    ok = summary["leader_pids_seen"] == [summary["parent_pid"]] and summary["values_ok"] and summary["last_values"] == [summary["second"]]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
