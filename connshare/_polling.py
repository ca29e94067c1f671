"""The selector of connshare's loop (asyncio's, not uvloop): connshare's readers
run in place, and the leader's loop polls before it sleeps (``leader_spin_wait``).

Between two calls of a follower the leader's loop thread has nothing to do for
about 20 µs, so it sleeps in ``epoll_wait``, and the next request wakes it on a
cold core: about 6 µs here, on every sequential call. With ``leader_spin_wait``
the loop polls its selector (a zero timeout) for up to that long before a select
that would sleep. A request that comes meanwhile is read by a thread still
running; one that does not turns polling off for the next 2, 4, ... selects
(:class:`~connshare._inplace.Spin`), so an idle leader polls almost never.

The price is a busy core while it polls, and the GIL: a polling thread takes it
back after each zero-timeout select before a waiting thread can, so a thread of
the leader's own process that wants it waits, at worst, until the poll ends. The
loop does not poll while a thread waits on it, and a poll under way ends when one
begins to: a worker running a blocking method (the blocking echo was 14 µs
slower, measured), or a caller in this process waiting for a coroutine method the
loop runs (4 to 6 µs slower). asyncio's selector loop only (uvloop has no
selector to wrap).

The same selector runs connshare's own readers in place
(:meth:`PollingSelector.read_in_place`): the callback of a follower's connection
on the leader, or of a follower's home read, runs inside ``select()`` instead of
as a handle on asyncio's ready queue. That skips the handle's pass through the
queue and its context switch, and the loop sleeps again sooner: 1.5 to 4 µs off
a follower's sequential call, measured side by side. It applies only when asyncio
asked ``select()`` to wait, so no callback queued before the select is
overtaken; those that other threads queue during it (``call_soon_threadsafe``)
may be, and those that a reader queues run in the same pass of the loop rather
than the next. A reader runs in the loop thread's own context, not in a copy as
a handle does: running it in a copy cost half the gain.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import time
from collections.abc import Callable
from typing import Any

from ._inplace import Spin

log = logging.getLogger("connshare.polling")


class PollingSelector(selectors.DefaultSelector):
    """connshare's loop's selector: runs connshare's readers in place, and while
    :meth:`poll_for` has set a policy, polls up to its wait before a select that
    would sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.spin: Spin | None = None
        #: fd -> the reader callback registered for it with add_reader, to run inside select()
        self.in_place: dict[int, Callable[[], Any]] = {}

    def read_in_place(self, fd: int, callback: Callable[[], Any]) -> None:
        """Run ``callback``, the reader the loop has for ``fd``, inside ``select()``.
        It must not raise (what it does raise is logged, as the loop would), and it
        must tolerate a read that finds nothing. It runs in the loop thread's
        context, not in a copy of its own. It stops when the loop stops reading
        ``fd``."""
        self.in_place[fd] = callback

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = super().unregister(fileobj)
        self.in_place.pop(key.fd, None)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        # Some selectors modify by unregister and register (kqueue), and epoll's
        # unregisters when it fails: keep the reader only while it is still read.
        callback = self.in_place.pop(fd, None)
        key = super().modify(fileobj, events, data)
        if callback is not None and events & selectors.EVENT_READ:
            self.in_place[fd] = callback
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(timeout)
        # A zero timeout: the loop has callbacks queued, which run first.
        if ready and self.in_place and timeout != 0:
            return self._run_in_place(ready)
        return ready

    def _run_in_place(self, ready: list[tuple[selectors.SelectorKey, int]]) -> list[tuple[selectors.SelectorKey, int]]:
        """Run the in-place readers of ``ready``; return the rest for the loop."""
        in_place = self.in_place
        rest = []
        ran = False
        for key, events in ready:
            # Looked up now: a reader run just before may have removed this one.
            callback = in_place.get(key.fd) if events & selectors.EVENT_READ else None
            if callback is None:
                rest.append((key, events))
                continue
            if events & selectors.EVENT_WRITE:
                rest.append((key, selectors.EVENT_WRITE))
            ran = True
            try:
                callback()
            except (SystemExit, KeyboardInterrupt):
                raise  # as asyncio's handles do: they end the loop
            except BaseException:
                log.exception("connshare: the reader of fd %s failed", key.fd)
        if ran and rest:
            # A reader may have closed an fd, and another socket taken its number:
            # the loop would act on the old key against the new socket. Keep only
            # the keys still current; an event dropped here comes back at the next
            # select (level-triggered).
            current = self.get_map()
            rest = [(key, events) for key, events in rest if current.get(key.fd) is key]
        return rest

    def poll_for(self, spin: Spin | None) -> None:
        """On the loop's thread: poll with ``spin`` from now on (None: never)."""
        self.spin = spin
        if spin is None:
            self.__dict__.pop("select", None)
        else:
            self.select = self._select_polling  # type: ignore[method-assign]

    def _select_polling(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        spin = self.spin
        if spin is not None and (timeout is None or timeout > spin.wait) and not waits:
            until = spin.until()
            if until:
                select, now = super().select, time.monotonic
                while True:
                    ready = select(0)
                    if ready:
                        spin.answered()
                        return self._run_in_place(ready) if self.in_place else ready
                    if waits:  # a thread began to wait on the loop: let it have the GIL
                        break
                    if now() >= until:
                        spin.missed()
                        break
        return PollingSelector.select(self, timeout)


#: one item per thread waiting on connshare's loop now: a worker running a
#: blocking method for a follower, until its answer is written, or a caller in
#: this process waiting for a coroutine method the loop runs (deque appends and
#: pops are atomic)
waits: collections.deque = collections.deque()
#: the spin waits asked for by the nodes leading now (on connshare's loop thread)
_held: list[float] = []
_warned = False


def hold(selector: Any, wait: float) -> None:
    """On connshare's loop thread, as a node starts to lead with ``wait``: poll for
    the longest wait any leading node asked for. Under uvloop (no selector to
    poll) say so, once."""
    global _warned
    if not isinstance(selector, PollingSelector):
        if not _warned:
            _warned = True
            log.warning(
                "leader_spin_wait=%g has no effect: connshare's loop is uvloop here, which has no selector to poll "
                "(CONNSHARE_LOOP=asyncio runs asyncio's loop instead)",
                wait,
            )
        return
    _held.append(wait)
    _set(selector)


def release(selector: Any, wait: float) -> None:
    """On connshare's loop thread, as that node stops leading."""
    if wait in _held:
        _held.remove(wait)
    _set(selector)


def _set(selector: Any) -> None:
    if isinstance(selector, PollingSelector):
        longest = max(_held, default=0.0)
        if selector.spin is None or selector.spin.wait != longest:
            selector.poll_for(Spin(longest) if longest else None)


def _after_fork_in_child() -> None:
    global _warned
    _held.clear()
    waits.clear()
    _warned = False


os.register_at_fork(after_in_child=_after_fork_in_child)
