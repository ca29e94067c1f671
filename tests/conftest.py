from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import Worker
from tests.upstream import UpstreamServer

_PORTS_PER_WORKER = 600
_handed_out: set[int] = set()


def pick_port() -> int:
    """A port that is free now, and that no other test of this run is handed.

    Ports from bind(0) are free only until released, and under ``-n auto`` two
    workers can be handed the same one a moment apart: then two tests share a
    leader. Each xdist worker takes ports from its own block below Linux's
    ephemeral range (32768+), so no outgoing connection takes one either.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    base = 20000 + (index % 20) * _PORTS_PER_WORKER
    for _ in range(1000):
        port = base + random.randrange(_PORTS_PER_WORKER)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: also skips TIME_WAIT leftovers
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {base}..{base + _PORTS_PER_WORKER}")


@pytest.fixture
def port() -> int:
    return pick_port()


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer()
    yield server
    server.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., list[Worker]]]:
    """Start worker processes (all at once); every one is reaped at teardown."""
    started: list[Worker] = []

    def start(*specs_per_worker: list[dict[str, Any]]) -> list[Worker]:
        ws = [Worker(specs) for specs in specs_per_worker]
        started.extend(ws)
        for w in ws:
            w.wait_started()
        return ws

    yield start
    for w in started:
        w.stop()


def kv_spec(port: int, upstream_port: int, **options: Any) -> dict[str, Any]:
    delegates = options.pop(
        "delegates",
        [
            *("get", "echo", "aecho", "loop_id", "whoami", "boom", "aboom", "sleep", "asleep", "bumps"),
            ["bump", "invoke_oneway"],
            ["asubscribe", "subscribe"],
        ],
    )
    return {
        "id": "0",
        "cls": "KVClient",
        "args": [upstream_port],
        "options": {"port": port, "name": "kv", **options},
        "delegates": delegates,
    }
