"""Runs the leader's coroutine methods without a Task per call where none is needed.

A coroutine method that finishes without waiting for anything (an echo, a cache
hit) needs no Task of its own. A *runner* task takes the calls one read of a
follower's socket brought and runs each one's first step in turn, inside itself, so
that ``asyncio.current_task()`` and ``asyncio.timeout()`` work as in any task. Each
call runs in its own copy of the context, as it would in its own Task.

The first call that waits for something keeps the runner task: from then on that
task drives only this call (as its own task would, step by step, in the call's
context), and a new runner takes the calls queued behind it. So a call that
suspends costs one Task, as before, and a call that does not costs none.

On 3.12+ the runner starts eagerly: calls that do not suspend are answered within
the read that brought them.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

#: ``done(rid, value, exc)``: answers one call
Done = Callable[[int, Any, "BaseException | None"], None]

if sys.version_info >= (3, 12):

    def _start(coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> asyncio.Task:
        return asyncio.Task(coro, loop=loop, eager_start=True)

else:

    def _start(coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> asyncio.Task:
        return loop.create_task(coro)


class _Resume:
    """Drives a coroutine that its first step left waiting, from inside a task, as
    that task's own step would: every step in the call's context."""

    __slots__ = ("coro", "ctx", "step")

    def __init__(self, coro: Coroutine[Any, Any, Any], ctx: contextvars.Context, step: Any) -> None:
        self.coro = coro
        self.ctx = ctx
        self.step = step

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, ctx, step = self.coro, self.ctx, self.step
        while True:
            try:
                sent = yield step  # the task waits on what the call waits on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation: the call sees it
                try:
                    step = ctx.run(coro.throw, exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    step = ctx.run(coro.send, sent)
                except StopIteration as stop:
                    return stop.value


class CoroRunner:
    """The leader's coroutine calls, run on its loop (one runner per loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: deque[tuple[Coroutine[Any, Any, Any], Done, int]] = deque()
        self._idle = True  # no runner task is taking calls from the queue
        #: a runner is taking calls (their answers wait for the batch's end)
        self.running = False
        self._after: list[Callable[[], None]] = []
        #: tasks kept by a waiting call: what the call waits on may hold them weakly
        self._tasks: set[asyncio.Task] = set()

    def submit(self, coro: Coroutine[Any, Any, Any], done: Done, rid: int) -> None:
        """Queue a call (on the loop); ``kick()`` once the read's calls are queued."""
        self._queue.append((coro, done, rid))

    def kick(self) -> None:
        """Have a runner take the queued calls (on the loop)."""
        if self._idle and self._queue:
            self._idle = False
            self._spawn()

    def after_batch(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the calls running now are done (on the loop): one send()
        of a batch's answers per follower."""
        self._after.append(fn)

    def _end_batch(self) -> None:
        self.running = False
        after, self._after = self._after, []
        for fn in after:
            fn()

    def _spawn(self) -> None:
        _start(self._run(), self.loop)  # the loop holds it until it runs

    async def _run(self) -> None:
        queue = self._queue
        runner = True  # until a call keeps this task
        self.running = True
        try:
            while queue:
                coro, done, rid = queue.popleft()
                ctx = contextvars.copy_context()
                try:
                    step = ctx.run(coro.send, None)
                except StopIteration as stop:
                    done(rid, stop.value, None)
                    continue
                except BaseException as exc:
                    done(rid, None, exc)
                    continue
                # The call waits for something: this task is its own from here on,
                # and a new runner takes the calls behind it.
                runner = False
                self._end_batch()
                self._idle = True
                self.kick()
                me = asyncio.current_task()
                self._tasks.add(me)  # type: ignore[arg-type]
                try:
                    value = await _Resume(coro, ctx, step)
                except asyncio.CancelledError:
                    done(rid, None, RuntimeError("the call was cancelled on the leader"))
                    raise
                except BaseException as exc:
                    done(rid, None, exc)
                else:
                    done(rid, value, None)
                finally:
                    self._tasks.discard(me)  # type: ignore[arg-type]
                return
        finally:
            if runner:  # the queue is empty; or answering failed (a bug): go on
                self._end_batch()
                self._idle = True
                self.kick()
