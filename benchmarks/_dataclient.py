"""The DataClient every connshare benchmark shares: a stand-in for an SDK client.

It knows nothing of processes. Construction opens ONE TCP connection to the
benchmark's upstream server (:class:`benchmarks._common.UpstreamServer`, which counts
accepted connections) and proves it with one echo round trip. Then:

* ``echo(p)`` / ``aecho(p)``: return ``p`` at once (no upstream round trip), as a
  plain and as a coroutine method.
* ``echo_pid(p)``: ``[pid, p]``, so a caller can tell which process answered.
* ``subscribe(reg, listener)`` / ``unsubscribe(reg, listener)`` / ``publish(reg)``:
  ``reg`` is ``{"key": str}``.
* An emitter that pushes ``{"seq", "t_us", "pid"}`` to the listeners of a key,
  ``t_us = time.monotonic_ns() / 1000`` at emission (CLOCK_MONOTONIC is system-wide,
  so any process can compute the delivery latency):

  - ``emit_every_ms=`` at construction: a ticker on the client's own event loop
    (connshare builds the real client on its loop thread), ``seq`` counting up;
  - ``start_ticker(key, interval_ms, seq)`` / ``stop_ticker()``;
  - ``start_burst(key, count, interval_ms, delay_ms)`` then ``burst_report()``: exactly
    ``count`` events ``interval_ms`` apart on absolute due times, with lateness and
    the synchronous cost of each push.

Importing this module imports connshare (for :class:`connshare.Base`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import recv_frame, send_frame
from connshare import Base

DEFAULT_KEY = "bench"


class BenchDataClient(Base):
    """One upstream connection; echo; subscriptions; an event emitter."""

    def __init__(self, upstream_port: int, emit_every_ms: float | None = None, key: str | None = DEFAULT_KEY) -> None:
        super().__init__()
        self.pid = os.getpid()
        self._subs: dict[str, list[Callable[[Any], Any]]] = {}
        sock = socket.create_connection(("127.0.0.1", upstream_port), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_frame(sock, [0, "echo", "hello"])
        if recv_frame(sock) != [0, "hello"]:
            raise ConnectionError("upstream did not answer the hello")
        self._sock: socket.socket | None = sock
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # built outside a loop (the "direct" mode): no emitter
        self._ticker: asyncio.Task | None = None
        self._burst: asyncio.Task | None = None
        self._burst_result: dict[str, Any] | None = None
        self._seq = 0
        if emit_every_ms:
            if self._loop is None:
                raise RuntimeError("emit_every_ms needs the client to be built on an event loop")
            self._ticker = self._loop.create_task(self._tick(key, emit_every_ms / 1000.0, None))
        self.ready(True)

    # -- calls --------------------------------------------------------------------------

    def echo(self, p: Any) -> Any:
        return p

    async def aecho(self, p: Any) -> Any:
        return p

    def echo_pid(self, p: Any) -> list[Any]:
        return [self.pid, p]

    def whoami(self) -> int:
        return self.pid

    # -- subscriptions ------------------------------------------------------------------

    def subscribe(self, reg: dict[str, Any], listener: Callable[[Any], Any]) -> None:
        self._subs.setdefault(reg["key"], []).append(listener)

    def unsubscribe(self, reg: dict[str, Any], listener: Callable[[Any], Any] | None = None) -> None:
        ls = self._subs.get(reg["key"])
        if not ls:
            return
        if listener is None:
            ls.clear()
        elif listener in ls:
            ls.remove(listener)

    def publish(self, reg: Any) -> None:
        pass

    def subscribed_keys(self) -> list[str]:
        return [k for k, ls in self._subs.items() if ls]

    # -- the emitter -----------------------------------------------------------------------

    def _emit(self, key: str, value: Any) -> None:
        for fn in list(self._subs.get(key, ())):
            fn(value)

    def _event(self, seq: int) -> dict[str, Any]:
        return {"seq": seq, "t_us": time.monotonic_ns() / 1000.0, "pid": self.pid}

    async def _tick(self, key: str | None, interval: float, seq: int | None) -> None:
        """Emit every ``interval`` s until cancelled; ``key=None``: every subscribed key;
        ``seq=None``: count up, else always that number."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            keys = self.subscribed_keys() if key is None else [key]
            for k in keys:
                if seq is None:
                    self._seq += 1
                self._emit(k, self._event(self._seq if seq is None else seq))

    async def start_ticker(self, key: str | None, interval_ms: float, seq: int | None = -1) -> bool:
        """(Re)start the ticker on this client's loop; returns at once."""
        await self.stop_ticker()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(key, interval_ms / 1000.0, seq))
        return True

    async def stop_ticker(self) -> bool:
        t, self._ticker = self._ticker, None
        if t is not None:
            t.cancel()
        return t is not None

    async def start_burst(self, key: str, count: int, interval_ms: float, delay_ms: float = 100.0) -> bool:
        """Emit ``count`` events ``interval_ms`` apart, the first in ``delay_ms``; returns at once."""
        if self._burst is not None and not self._burst.done():
            raise RuntimeError("a burst is running already")
        self._burst_result = None
        self._burst = asyncio.get_running_loop().create_task(self._run_burst(key, count, interval_ms, delay_ms))
        return True

    async def _run_burst(self, key: str, count: int, interval_ms: float, delay_ms: float) -> None:
        clock = time.monotonic_ns
        interval_ns = int(interval_ms * 1e6)
        start = clock() + int(delay_ms * 1e6)
        push_ns = [0] * count
        max_late = 0
        for i in range(count):
            due = start + i * interval_ns
            wait = (due - clock()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
            t = clock()
            max_late = max(max_late, t - due)
            self._emit(key, {"seq": i, "t_us": t / 1000.0, "pid": self.pid})
            push_ns[i] = clock() - t
        self._burst_result = {
            "emitted": count,
            "duration_ms": round((clock() - start) / 1e6, 3),
            "max_late_ms": round(max_late / 1e6, 3),
            "push_ns": push_ns,
        }

    async def burst_report(self) -> dict[str, Any] | None:
        """The last burst's report, or None while it runs."""
        if self._burst is not None and self._burst.done() and self._burst.exception() is not None:
            raise self._burst.exception()  # type: ignore[misc]
        return self._burst_result

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        for task in (self._ticker, self._burst):
            if task is not None and not task.done() and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(task.cancel)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


DELEGATES = ("echo", "aecho", "echo_pid", "whoami", "start_ticker", "stop_ticker", "start_burst", "burst_report")


def build_cluster_client(
    port: int, secret: str, upstream_port: int, *, name: str = "bench", dc_kwargs: dict | None = None, **options: Any
) -> Any:
    """``cluster(BenchDataClient, ...)`` with every bench method delegated."""
    from connshare import cluster

    builder = cluster(BenchDataClient, name=name, port=port, secret=secret, **options)
    for m in DELEGATES:
        builder.delegate(m)
    return builder.create(upstream_port, **(dc_kwargs or {}))
