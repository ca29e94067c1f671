"""Deadlines of awaited calls: one timer per event loop, not one per call.

Arming and cancelling a timer per call cost more than the call's ``send()``, and a
loop with timers pending arms a kernel timer in every ``select``. So each loop gets
one timer, for the earliest deadline of the waits on it; when it fires, the owner
fails what is due and names the next deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: ``expire(loop, now)``: fail the waits on ``loop`` due by ``now``; return the
#: earliest deadline still ahead (``time.monotonic()``), or None
Expire = Callable[[asyncio.AbstractEventLoop, float], "float | None"]


class LoopDeadlines:
    """One expiry timer per event loop, set for its earliest deadline."""

    def __init__(self, expire: Expire) -> None:
        self._expire = expire
        self.armed: dict[asyncio.AbstractEventLoop, tuple[float, asyncio.TimerHandle]] = {}

    def arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """On ``loop``'s thread: have ``expire`` run on it by ``deadline``."""
        armed = self.armed.get(loop)
        if armed is not None:
            if armed[0] <= deadline:
                return
            armed[1].cancel()
        elif len(self.armed) > 8:  # forget loops that closed with a timer set
            for old in [lp for lp in list(self.armed) if lp.is_closed()]:
                self.armed.pop(old, None)
        handle = loop.call_later(max(deadline - time.monotonic(), 0.0), self._fire, loop)
        self.armed[loop] = (deadline, handle)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.armed.pop(loop, None)
        upcoming = self._expire(loop, time.monotonic())
        if upcoming is not None:
            self.arm(loop, upcoming)
