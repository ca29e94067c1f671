"""The leader's loop polls before it sleeps: the ``leader_spin_wait`` option.

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
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import time
from typing import Any

from ._inplace import Spin

log = logging.getLogger("connshare.polling")


class PollingSelector(selectors.DefaultSelector):
    """connshare's loop's selector: while :meth:`poll_for` has set a policy, polls
    up to its wait before a select that would sleep. Without one, ``select`` is the
    plain selector's: a loop that does not poll pays no frame for it."""

    def __init__(self) -> None:
        super().__init__()
        self.spin: Spin | None = None

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
                        return ready
                    if waits:  # a thread began to wait on the loop: let it have the GIL
                        break
                    if now() >= until:
                        spin.missed()
                        break
        return super().select(timeout)


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
