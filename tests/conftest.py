from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import Worker
from tests.upstream import UpstreamServer


def pick_port() -> int:
    """A port that is free now; every test takes its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        "delegates", ["get", "echo", "aecho", "loop_id", "whoami", "boom", "aboom", "sleep", "asleep", "bumps", ["bump", "invoke_oneway"]]
    )
    return {
        "id": "0",
        "cls": "KVClient",
        "args": [upstream_port],
        "options": {"port": port, "name": "kv", **options},
        "delegates": delegates,
    }
