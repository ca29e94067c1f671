"""A process's own subscriptions: one per (method, key), however many listeners.

The same :class:`LocalSub` object serves whatever role the process has: the leader's
channel host delivers into it directly; a follower's connection delivers into it
from the wire. It keeps the last value, so a listener added later gets it at once.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from ._base import keep
from ._loop import get_loop

if TYPE_CHECKING:
    from ._host import KeyState
    from ._mirror import Mirror

#: the loop running on this thread, or None (asyncio's own fast check)
_running_loop = asyncio._get_running_loop

log = logging.getLogger("connshare.subs")

#: one item per listener call queued to connshare's loop from another thread and not
#: yet run (deque appends and pops are atomic): while there are any, a reader on
#: that loop must queue its listener calls behind them, not run them at once
_queued_home: collections.deque = collections.deque()
# a forked child has a loop of its own, with none of those calls queued on it
os.register_at_fork(after_in_child=_queued_home.clear)


def canonical(reg: Any) -> bytes:
    """A key for ``reg`` that does not depend on dict order."""

    def norm(v: Any) -> Any:
        if isinstance(v, dict):
            return [[norm(k), norm(x)] for k, x in sorted(v.items(), key=lambda kv: repr(kv[0]))]
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    return msgpack.packb(norm(reg), use_bin_type=True, default=repr)


class Listener:
    """A listener and where it runs: the loop it was registered from, else connshare's."""

    __slots__ = ("fn", "loop", "owner")

    def __init__(self, fn: Callable[[Any], Any], owner: Any = None) -> None:
        self.fn = fn
        #: the client that subscribed it: its close() or unsubscribe(reg) ends it
        self.owner = owner
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None

    def call(self, value: Any, now: list | None = None) -> None:
        """Run the listener with ``value`` on its loop. ``now``: the reader on
        connshare's loop runs the listeners queued there once its read is done,
        in this loop turn, unless calls queued from other threads are still due."""
        loop = self.loop
        if loop is None:
            loop = get_loop()
        elif loop.is_closed():
            # Registered inside a loop that has ended (an asyncio.run()): dropping
            # its values would be silent loss, so connshare's loop runs it from now on.
            log.warning("listener %r was registered on an event loop that has closed; it runs on connshare's loop from now on", self.fn)
            self.loop = None
            loop = get_loop()
        try:
            if _running_loop() is loop:  # read on that loop: no self-pipe wake-up
                if now is not None and not _queued_home:
                    now.append((self, value))
                else:
                    loop.call_soon(self.run, value)
            elif loop is get_loop():
                _queued_home.append(None)
                try:
                    loop.call_soon_threadsafe(self._run_queued, value)
                except RuntimeError:
                    _queued_home.pop()
                    raise
            else:
                loop.call_soon_threadsafe(self.run, value)
        except RuntimeError:  # that loop was closed under us
            pass

    @classmethod
    def home(cls, fn: Callable[[Any], Any]) -> Listener:
        """``fn`` as a listener of connshare's loop: it runs there in order with the
        event listeners that run there."""
        ls = cls.__new__(cls)
        ls.fn, ls.loop, ls.owner = fn, None, None
        return ls

    def _run_queued(self, value: Any) -> None:
        _queued_home.pop()
        self.run(value)

    def run(self, value: Any) -> None:
        """Run the listener here and now (on its loop)."""
        try:
            res = self.fn(value)
            # an async def listener, or a lambda around one: run what it made
            if res is not None and inspect.isawaitable(res):
                keep(asyncio.ensure_future(res)).add_done_callback(_log_task_error)
        except Exception:
            log.exception("subscription listener %r raised", self.fn)


def _log_task_error(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("subscription listener raised", exc_info=task.exception())


def _without(listeners: list[Listener], fn: Callable[[Any], Any] | None, owner: Any) -> list[Listener]:
    # A loop in a frame of its own, called under a lock: on CPython 3.13 and 3.14
    # an interrupt (Ctrl-C) that lands on a loop's backward jump skips every
    # handler of that loop's frame (python/cpython#130279), a ``with``'s exit too.
    return [ls for ls in listeners if not ((fn is None or ls.fn == fn) and (owner is None or ls.owner is owner))]


class LocalSub:
    """This process's subscription to one key of one channel."""

    __slots__ = ("canon", "has_value", "key_id", "listeners", "lock", "method", "mirror", "reg", "sent_on", "value")

    def __init__(self, method: str, reg: Any, canon: bytes) -> None:
        self.method = method
        self.reg = reg
        self.canon = canon
        self.listeners: list[Listener] = []
        self.has_value = False
        self.value: Any = None
        self.key_id: int | None = None  # the leader's id for it, while following
        #: the route (a ChannelHost or a connection) it was last subscribed on: the
        #: route's replay and the subscribe() queued before it send it once between them
        self.sent_on: Any = None
        self.lock = threading.Lock()
        #: encode_locally: values from this process's own channel host cross the wire
        self.mirror: Mirror | None = None

    def add(self, listener: Listener) -> None:
        with self.lock:
            self.listeners.append(listener)
            has, value = self.has_value, self.value
        if has:
            listener.call(value)

    def remove(self, fn: Callable[[Any], Any] | None, owner: Any = None) -> bool:
        """Drop ``fn`` (every listener if None) of ``owner`` (of any client if
        None); True when none is left."""
        with self.lock:
            self.listeners = _without(self.listeners, fn, owner)
            return not self.listeners

    def refused(self, host: Any, key: Any, exc: BaseException) -> None:
        """As a sink of this process's channel host: the real client refused it."""
        host.state.drop_refused(self, exc)

    def deliver(self, value: Any, now: list | None = None) -> None:
        with self.lock:
            self.has_value = True
            self.value = value
            listeners = list(self.listeners)
        for ls in listeners:
            ls.call(value, now)

    def push(self, key: KeyState, value: Any) -> None:
        """As a sink of the leader's channel host (this process leads)."""
        if self.mirror is not None:
            sendable, value = self.mirror.event(key)
            if not sendable:
                return  # as for a follower; the channel reports it
        self.deliver(value)
