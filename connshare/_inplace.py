"""When an awaited call may wait for its answer on its own event loop's thread.

An awaited call that yields costs its loop two passes before the caller runs again:
one to notice the answer, one to wake the caller's task. Here a pass costs about 7 µs,
about a fifth of a quick call. When the loop has nothing else to do, waiting for a
quick answer on the loop's thread costs nothing anybody else wanted, and the await
completes without yielding. The policy keeps that cheap for everyone else:

* only while the loop has nothing to run: no callback ready and no timer due within
  the wait. asyncio's queues are private attributes; a loop without them (uvloop)
  never waits in place;
* never more than ``RUN`` answered waits in a row: the loop still polls its I/O
  every millisecond or so of such calls;
* a wait that ends with no answer (a slow method, a busy leader) turns waiting off
  for the next 2, then 4, ... up to ``BACKOFF_MAX`` calls, so that slow calls pay
  the wait only now and then.
"""

from __future__ import annotations

import asyncio
import time

#: answered waits in a row before a call yields to the loop anyway
RUN = 16
#: the most calls a wait that timed out turns waiting off for
BACKOFF_MAX = 1024


class _Backoff:
    """A wait that ended with no answer turns waiting off for the next 2, then 4,
    ... up to ``BACKOFF_MAX`` calls. Not locked: a stale count only moves a wait
    by a call."""

    __slots__ = ("backoff", "skip", "wait")

    def __init__(self, wait: float) -> None:
        self.wait = wait  # seconds
        self.skip = 0  # calls left before waiting again
        self.backoff = 1

    def missed(self) -> None:
        """A wait ended with no answer: the next calls skip theirs."""
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.skip = self.backoff


class Spin(_Backoff):
    """``spin_wait``: how long a follower's caller that reads its own answer polls
    the socket before it sleeps. A thread that sleeps for an answer 30 µs away
    wakes on a cold core (about 6 µs here, on top of the round trip); one that
    polls is running when the answer comes, and keeps a core busy meanwhile."""

    __slots__ = ()

    def until(self) -> float:
        """When this call stops polling (``time.monotonic()``), or 0.0: do not poll."""
        if self.skip:
            self.skip -= 1
            return 0.0
        return time.monotonic() + self.wait

    def answered(self) -> None:
        self.backoff = 1


class InPlace(_Backoff):
    """The policy's state for one connection (or the leader's own callers)."""

    __slots__ = ("run",)

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.run = 0  # answered waits since the loop last ran

    def until(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> float:
        """When a call awaited on ``loop`` (on its thread) stops waiting in place
        (``time.monotonic()``), or 0.0 if it must not wait there."""
        if self.skip:
            self.skip -= 1
            return 0.0
        if self.run >= RUN:
            return 0.0
        ready = getattr(loop, "_ready", None)
        timers = getattr(loop, "_scheduled", None)
        if ready is None or ready or timers is None:
            return 0.0
        wait = self.wait
        if timers and timers[0].when() < loop.time() + wait:
            return 0.0
        until = time.monotonic() + wait
        return until if deadline is None or deadline > until else 0.0  # due sooner: its timer fails it

    def answered(self) -> None:
        self.run += 1
        self.backoff = 1
