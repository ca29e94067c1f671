"""Data clients the tests share through connshare. Imported by every process."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import os
import socket
import threading
import time
from typing import Any

from connshare import Base

CALL_VAR: contextvars.ContextVar[Any] = contextvars.ContextVar("call_var", default=None)


class AppError(Exception):
    """Loaded in every process: crosses the wire as itself."""


class Unreprable:
    def __repr__(self) -> str:
        raise AttributeError("half-built object")


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """A frozen dataclass exception: it refuses every attribute set, ``__cause__`` too."""

    code: int


class UnprintableError(AppError):
    def __str__(self) -> str:
        raise RuntimeError("no str")


#: values the leader makes for the encode_locally tests
MADE: dict[str, Any] = {
    "tuple": lambda: (1, (2, "x")),
    "set": lambda: {1, 2},
    "int_keys": lambda: {1: "a"},
    "nested": lambda: {"a": [(1, 2), {"b": (3,)}]},
}


class KVClient(Base):
    """Talks to tests.upstream over one TCP connection; knows nothing of processes."""

    instances = 0

    def __init__(self, port: int, fail: str | None = None) -> None:
        super().__init__()
        KVClient.instances += 1
        self.built_loop = asyncio.get_running_loop()
        self.pid = os.getpid()
        if fail == "ready":
            self.ready(RuntimeError("upstream refused us"))
            return
        if fail == "exit":
            raise SystemExit("config missing")
        if fail is not None and fail.startswith("slow-if:"):  # "slow-if:<path>:<seconds>"
            _, path, seconds = fail.split(":")
            if os.path.exists(path):  # an upstream slow to connect to, from the moment the test says
                time.sleep(float(seconds))
        if fail is not None and fail.startswith("gate:"):  # built only once the test says
            deadline = time.monotonic() + 30
            while not os.path.exists(fail[5:]) and time.monotonic() < deadline:
                time.sleep(0.01)
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._rfile = self._sock.makefile("rb")
        self._wlock = threading.Lock()
        self._ids = 0
        self._waiters: dict[int, Any] = {}
        self._listeners: dict[str, list[Any]] = {}
        self.bumped = 0
        self.notes: list[Any] = []
        self.regs: list[Any] = []
        self.refused: list[Any] = []
        threading.Thread(target=self._read, daemon=True).start()
        if fail == "never-ready":
            return
        if fail is not None and fail.startswith("ready-after:"):
            # refused by the upstream once the test says, after it has added its listeners
            deadline = time.monotonic() + 10
            while not os.path.exists(fail[12:]) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.ready(RuntimeError("upstream refused us"))
            return
        if fail is not None and fail.startswith("ready-if:") and os.path.exists(fail[9:]):
            # connected, but refused by the upstream from the moment the test says
            self.ready(RuntimeError("upstream refused us"))
            return
        self.ready(True)

    def _send(self, msg: dict) -> None:
        with self._wlock:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")

    def _read(self) -> None:
        try:
            for line in self._rfile:
                self._on_line(json.loads(line))
        except (OSError, ValueError):
            pass  # closed, or the upstream went away first (a test's teardown)

    def _on_line(self, msg: dict) -> None:
        if "event" in msg:
            for fn in list(self._listeners.get(msg["event"], ())):
                fn({"key": msg["event"], "value": msg["value"], "leader": self.pid})
        else:
            waiter = self._waiters.pop(msg["id"], None)
            if waiter is not None:  # None: the get() gave up waiting
                waiter[1].append(msg.get("value"))
                waiter[0].set()

    # -- the data API ------------------------------------------------------------------
    def subscribe(self, reg: dict, listener: Any) -> None:
        if reg.get("refuse_once") and reg not in self.refused:  # a transient upstream failure
            self.refused.append(reg)
            raise ValueError(f"upstream refused {reg['key']!r} this time")
        self.regs.append(reg)
        self._listeners.setdefault(reg["key"], []).append(listener)
        self._send({"op": "watch", "key": reg["key"]})

    async def asubscribe(self, reg: dict, listener: Any) -> None:
        """A coroutine subscribe (as an asyncio client's): its failure comes after
        the leader has answered the subscriber."""
        await asyncio.sleep(0)
        self.subscribe(reg, listener)

    def unsubscribe(self, reg: dict, listener: Any = None) -> None:
        self._listeners.pop(reg["key"], None)
        self._send({"op": "unwatch", "key": reg["key"]})

    def publish(self, reg: Any) -> None:
        if isinstance(reg, dict):
            self.regs.append(reg)
        self._send({"op": "publish", "reg": reg})

    def get(self, key: str) -> Any:
        self._ids += 1
        rid = self._ids
        ev, box = threading.Event(), []
        self._waiters[rid] = (ev, box)
        self._send({"op": "get", "id": rid, "key": key})
        ev.wait(5)
        return box[0]

    def echo(self, value: Any) -> Any:
        return value

    async def aecho(self, value: Any) -> Any:
        return value

    async def loop_id(self) -> bool:
        """True when run on the loop that built this client."""
        return asyncio.get_running_loop() is self.built_loop

    def whoami(self) -> int:
        return os.getpid()

    def thread_name(self) -> str:
        return threading.current_thread().name

    def thread_name_inline(self) -> str:
        return threading.current_thread().name

    def boom(self, kind: str) -> None:
        if kind == "key":
            raise KeyError("missing", 42)
        if kind == "app":
            raise AppError("bad thing", 7)
        if kind == "frozen":
            raise FrozenError(3)
        if kind == "unprintable":  # app code the error path runs: repr() and str() raise
            raise UnprintableError("half-built", Unreprable())
        if kind == "unknown":
            from tests import leader_only

            raise leader_only.LeaderOnlyError("only the leader knows me")
        raise ValueError(kind)

    async def aboom_kind(self, kind: str) -> None:
        await asyncio.sleep(0)
        self.boom(kind)

    async def aboom(self) -> None:
        await asyncio.sleep(0)
        raise AppError("async bad thing")

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    async def asleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    def first(self, items: list) -> Any:
        """next() of an empty list raises StopIteration, as such a method may."""
        return next(iter(items))

    async def aown_timeout(self) -> None:
        """A coroutine method whose own timeout fires: its TimeoutError is its own."""
        await asyncio.wait_for(asyncio.sleep(5), 0.01)

    async def asleep_noting(self, seconds: float, tag: Any) -> float:
        """Sleep; note ``tag`` if the call is cancelled meanwhile."""
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.notes.append(tag)
            raise
        return seconds

    async def astall(self, seconds: float) -> float:
        """A coroutine method that blocks the loop it runs on (a bug in a real client)."""
        time.sleep(seconds)
        return seconds

    async def acancel_self(self) -> str:
        """Cancel the task this call runs in, and return without waiting."""
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        return "cancelled its task"

    def emit_then_sleep(self, key: str, value: Any, seconds: float) -> float:
        """An upstream event for ``key`` while this call is still running."""
        for fn in list(self._listeners.get(key, ())):
            fn({"key": key, "value": value, "leader": self.pid})
        time.sleep(seconds)
        return seconds

    def make(self, kind: str) -> Any:
        """A value made here, on the leader; some cannot cross the wire."""
        return MADE[kind]()

    def emit_made(self, key: str, kind: str) -> None:
        """An upstream event for ``key`` whose value is ``make(kind)``."""
        for fn in list(self._listeners.get(key, ())):
            fn({"key": key, "value": MADE[kind](), "leader": self.pid})

    def reg_types(self) -> list[str]:
        """The type of the ``"extra"`` item of each reg this client was subscribed or
        published with."""
        return [type(reg.get("extra")).__name__ for reg in self.regs]

    async def araise_timeout(self) -> None:
        raise TimeoutError("upstream timed out", 3)

    def raise_timeout(self) -> None:
        raise TimeoutError("upstream timed out", 3)

    def trouble(self, message: str, unprintable: bool = False) -> None:
        """The upstream misbehaves: the real client emits an error event."""
        self.emit("error", UnprintableError(message) if unprintable else AppError(message))

    def bump(self, n: int = 1) -> None:
        time.sleep(0.2)
        self.bumped += n

    def bumps(self) -> int:
        return self.bumped

    async def anote(self, tag: Any) -> Any:
        """Record that this call reached the leader."""
        self.notes.append(tag)
        return tag

    def note_type(self, value: Any) -> None:
        """Record the type of what the call got (a oneway method in the tests)."""
        self.notes.append(type(value).__name__)

    def noted(self) -> list[Any]:
        return list(self.notes)

    async def asize(self, payload: str) -> int:
        """A small answer to a large request."""
        return len(payload)

    async def acontext(self, value: Any) -> Any:
        """Set a context variable; what it was before (each call has its own context)."""
        before = CALL_VAR.get()
        CALL_VAR.set(value)
        return before

    async def atimeout(self, wait: float, limit: float) -> str:
        """asyncio.timeout() around an optional wait, as redis.asyncio does."""
        try:
            async with asyncio.timeout(limit):  # type: ignore[attr-defined]
                task = asyncio.current_task()
                if wait:
                    await asyncio.sleep(wait)
                return "done" if task is asyncio.current_task() is not None else "task changed"
        except TimeoutError:
            return "timed out"

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader's makefile holds the fd open
            self._sock.close()
        except (OSError, AttributeError):
            pass


class CounterClient(Base):
    """A second channel: no upstream, just state in the leader."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.ready(True)

    def watch(self, reg: Any, listener: Any) -> None:
        """A subscription that never delivers a value."""

    def incr(self) -> int:
        self.n += 1
        return self.n

    def whoami(self) -> int:
        return os.getpid()
