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
loop does not poll while a blocking method runs on a worker thread, which would
wait for the GIL in its turn (14 µs more per blocking call, measured). asyncio's
selector loop only (uvloop has no selector to wrap).
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable
from typing import Any

from ._inplace import Spin


class PollingSelector(selectors.DefaultSelector):
    """connshare's loop's selector: polls up to ``spin.wait`` before it sleeps."""

    def __init__(self) -> None:
        super().__init__()
        #: set while this process leads with leader_spin_wait (on the loop's thread)
        self.spin: Spin | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        spin = self.spin
        if spin is not None and (timeout is None or timeout > spin.wait) and not _threads_busy():
            until = spin.until()
            if until:
                select, now = super().select, time.monotonic
                while True:
                    ready = select(0)
                    if ready:
                        spin.answered()
                        return ready
                    if now() >= until:
                        spin.missed()
                        break
        return super().select(timeout)


#: per node leading now with a spin wait: the wait, and its count of blocking
#: methods running on worker threads (all changed on connshare's loop thread)
_held: list[tuple[float, Callable[[], int]]] = []


def _threads_busy() -> bool:
    return any(running() for _, running in _held)


def hold(selector: Any, wait: float, running: Callable[[], int]) -> None:
    """On connshare's loop thread, as a node starts to lead with ``wait``: poll for
    the longest wait any leading node asked for, while none of them has a blocking
    method running (``running()``)."""
    _held.append((wait, running))
    _set(selector)


def release(selector: Any, wait: float, running: Callable[[], int]) -> None:
    """On connshare's loop thread, as that node stops leading."""
    if (wait, running) in _held:
        _held.remove((wait, running))
    _set(selector)


def _set(selector: Any) -> None:
    if isinstance(selector, PollingSelector):
        longest = max((wait for wait, _ in _held), default=0.0)
        if selector.spin is None or selector.spin.wait != longest:
            selector.spin = Spin(longest) if longest else None


os.register_at_fork(after_in_child=_held.clear)
