"""Runs the leader's coroutine methods without a Task or a loop turn per call.

A coroutine method that finishes without waiting for anything (an echo, a cache
hit) needs no Task of its own. The runner takes the calls one read of a follower's
socket brought and runs each one's first step at once, inside that read, with a
*host* task lent as the current task: ``asyncio.current_task()`` and
``asyncio.timeout()`` work as in any task. Each call runs in its own copy of the
context, as it would in its own Task.

The host is a task parked on a future. The first call that waits for something
is handed to it: from then on that task drives only this call (as its own task
would, step by step, in the call's context), and a new host is parked for the
calls behind it, which run once it is, a loop turn later. So a call that suspends
costs one Task, as it would anyway, and a call that does not costs neither a Task
nor a loop turn: its answer leaves in the read that brought it. (A runner task per
read, started eagerly on 3.12+, cost the leader 36 % more instructions per
sequential call on 3.11, and 6 % more on 3.12.)

The leader's own callers on other threads use the runner too: a blocking caller
waits on a lock (``call_from_thread``), a coroutine on another event loop (the
app's, under uvicorn) on a future of its own loop (``call_async``). One callback
on the runner's loop and one back cost a fraction of what
``asyncio.run_coroutine_threadsafe`` costs (a Task, two chained futures, and a
condition variable or a third future). A coroutine whose loop has nothing else to
run waits on a lock too, for a fraction of a millisecond (``wait_in_place``, see
``_inplace``): a quick answer then costs its loop no pass at all.

Lending a task takes asyncio's ``_enter_task`` / ``_leave_task``, which every
asyncio since 3.7 has (its eager tasks use them) but does not document. Without
them, each call gets a Task of its own.
"""

from __future__ import annotations

import _thread
import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from ._deadlines import LoopDeadlines
from ._errors import CallTimeoutError, ClientClosedError
from ._follower import Pending
from ._inplace import InPlace
from ._options import MAX_SECONDS

try:
    from asyncio.tasks import _enter_task, _leave_task
except ImportError:  # pragma: no cover - a future asyncio without them
    _enter_task = _leave_task = None  # type: ignore[assignment]

#: ``done(rid, value, exc)``: answers one call
Done = Callable[[int, Any, "BaseException | None"], None]
#: a call queued to start: [coro, done, rid, timeout]; coro is None once withdrawn
Queued = list

#: hands an outcome over to a caller waiting in place, or to its future once it
#: stopped waiting: never to both, never to neither
_GATE = _thread.allocate_lock()


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


class _Host:
    """A task parked on ``fut``, lent as the current task; a call that waits is
    handed to it through ``fut``."""

    __slots__ = ("fut", "parked", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fut: asyncio.Future = loop.create_future()
        self.task: asyncio.Task
        self.parked = False  # it waits on fut


class _Waiter:
    """A caller's wait for one call the runner runs for it, from another thread: a
    follower's pending request (a lock for a blocking caller, a future on the
    caller's loop for a coroutine), and what cancels the call."""

    __slots__ = ("cancelled", "finished", "fn", "pending", "sync", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, sync: Any = None) -> None:
        self.pending = Pending(loop)
        self.cancelled = False
        self.finished = False  # set on the runner's loop, with the outcome
        self.task: asyncio.Task | None = None  # the task that runs the call
        self.fn: Any = None  # an awaited call's method, for its timeout's message
        #: a held lock an awaiting caller waits on in place, until it stops waiting
        self.sync = sync

    async def run(self, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple, kwargs: dict) -> Any:
        if self.cancelled:  # the caller gave up before the call started
            return None
        # The task lent for the first step drives the call if it waits.
        self.task = asyncio.current_task()
        return await fn(*args, **kwargs)

    def done(self, _rid: int, value: Any, exc: BaseException | None) -> None:
        self.finished = True
        if self.sync is not None:  # once None, it stays None
            with _GATE:
                sync = self.sync
                if sync is not None:
                    p = self.pending
                    p.ok, p.value = (True, value) if exc is None else (False, exc)
                    sync.release()
                    return
        self.pending.settle(exc is None, value if exc is None else exc)

    def cancel(self) -> None:
        """On the loop, after the caller gave up: cancel the call if it runs still."""
        self.cancelled = True
        if not self.finished and self.task is not None:
            self.task.cancel()


def _too_late(fn: Any) -> CallTimeoutError:
    return CallTimeoutError(f"{getattr(fn, '__name__', fn)!r} did not finish in time")


class Abandoned(RuntimeError):
    """A closing leader cancelled the call past its grace: answer nobody."""


class CoroRunner:
    """The leader's coroutine calls, run on its loop (one runner per loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wait_in_place: float = 0.0) -> None:
        self.loop = loop
        #: whether an awaiting caller may wait for the outcome in place (None: never)
        self.in_place = InPlace(wait_in_place) if wait_in_place else None
        #: calls whose first step has not run yet, with their timeouts
        self.queue: deque[Queued] = deque()
        #: (done, rid) -> its queued call, made at the first CANCEL that finds calls
        #: queued and kept until the queue empties: each CANCEL then costs O(1)
        self._qindex: dict[tuple[Done, int], Queued] | None = None
        #: a batch of calls is running (their answers wait for its end)
        self.running = False
        self._after: list[Callable[[], None]] = []
        #: the task lent to the calls that run now
        self._host: _Host | None = None
        #: tasks driving a call that waits, and the call's done: what the call waits
        #: on may hold the task weakly
        self._tasks: dict[asyncio.Task, Done] = {}
        #: those cancelled by cancel_running: nobody is to be answered
        self._abandoned: set[asyncio.Task] = set()
        #: those cancelled at their caller's timeout
        self._expired: set[asyncio.Task] = set()
        #: this process's own, cancelled as it closes its clients
        self._closed_own: set[asyncio.Task] = set()
        #: per (done, rid) of another process's call that waits, the task driving it
        #: (or about to): what a CANCEL from its caller cancels
        self._calls: dict[tuple[Done, int], asyncio.Task] = {}
        #: tasks whose call was withdrawn: answered already, so never again
        self._withdrawn: set[asyncio.Task] = set()
        #: per caller loop (call_async), the calls awaited on it, and their deadlines:
        #: one timer per loop, not per call (a timer per call cost 6 to 9 µs of 60 to 95)
        self._awaited: dict[asyncio.AbstractEventLoop, set[_Waiter]] = {}
        self._deadlines = LoopDeadlines(self._expire_due)

    async def cancel_running(self, timeout: float) -> None:
        """Cancel the calls made by other processes that are waiting for something
        (a closing leader's, past its grace), and give them up to ``timeout`` s to
        end. Their ``done`` gets :class:`Abandoned`: nothing is sent, and their
        callers hear that the leader left, as those of the calls that ended with
        the connection do. This process's own calls: :meth:`cancel_own`."""
        await self._cancel(self._abandoned, False, timeout)

    async def cancel_own(self, timeout: float) -> None:
        """Cancel this process's own calls still running (its clients are closing),
        before the real client closes under them: their callers get
        :class:`ClientClosedError`, as a follower's callers do. Up to ``timeout``
        s for them to end."""
        await self._cancel(self._closed_own, True, timeout)

    async def _cancel(self, marks: set[asyncio.Task], own: bool, timeout: float) -> None:
        tasks = [t for t, done in self._tasks.items() if not t.done() and isinstance(getattr(done, "__self__", None), _Waiter) is own]
        marks.update(tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def withdraw(self, done: Done, rid: int) -> bool:
        """Call ``rid`` answered by ``done`` lost its caller (on the loop): cancel it
        if it waits, or drop it if it has not started. ``done`` gets
        :class:`Abandoned` now, so the call's place is free for a request read
        next; nothing is answered. False if there is no such call (it has ended,
        or is not a coroutine one)."""
        if not rid:  # a oneway call: its caller waits for nothing
            return False
        key = (done, rid)
        task = self._calls.pop(key, None)
        if task is not None:
            if task in self._withdrawn or task.done():
                return False
            self._withdrawn.add(task)
            if task in self._tasks:
                task.cancel()
            # else the task has the call but has not begun to drive it: it cancels
            # itself once it does, so that the call sees a CancelledError in its own
            # context, not a GeneratorExit from close()
            done(rid, None, Abandoned("its caller cancelled the call"))
            return True
        if not self.queue:
            return False
        index = self._qindex
        if index is None:
            index = self._qindex = {(item[1], item[2]): item for item in self.queue}
        item = index.pop(key, None)
        if item is None:
            return False
        coro, item[0] = item[0], None  # skipped when its turn comes
        coro.close()  # never started: nothing runs
        done(rid, None, Abandoned("its caller cancelled the call before it started"))
        return True

    def submit(self, coro: Coroutine[Any, Any, Any], done: Done, rid: int, timeout: float | None = None) -> None:
        """Queue a call (on the loop); ``kick()`` once the read's calls are queued.
        A call that waits is cancelled ``timeout`` s later: its caller, in another
        process, has given up on it by then."""
        item = [coro, done, rid, timeout]
        self.queue.append(item)
        if self._qindex is not None:
            self._qindex[(done, rid)] = item

    def call_from_thread(self, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple, kwargs: dict, timeout: float) -> Any:
        """Run coroutine method ``fn`` on the loop for a caller on another thread and
        wait for its outcome. Raises CallTimeoutError after ``timeout`` s, having
        cancelled the call."""
        w = self._post(_Waiter(), fn, args, kwargs)
        if not w.pending.lock.acquire(True, timeout):  # type: ignore[union-attr]
            self._cancel_soon(w)
            raise _too_late(fn)
        return w.pending.outcome()

    async def call_async(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple, kwargs: dict, timeout: float, loop: asyncio.AbstractEventLoop
    ) -> Any:
        """Run coroutine method ``fn`` on the runner's loop for a coroutine on
        ``loop`` (another thread's, running this) and return its outcome. Raises
        CallTimeoutError after ``timeout`` s; a timeout or the caller's own
        cancellation cancels the call."""
        deadline = time.monotonic() + timeout
        in_place = self.in_place
        until = in_place.until(loop, deadline) if in_place is not None else 0.0
        if in_place is not None and until:
            sync = _thread.allocate_lock()
            sync.acquire()
            w = self._post(_Waiter(loop, sync), fn, args, kwargs)
            try:
                answered = sync.acquire(True, max(until - time.monotonic(), 0.0))
            except BaseException:  # interrupted: so is the call
                self._cancel_soon(w)
                raise
            if not answered:
                with _GATE:  # the outcome goes to the future from now on
                    w.sync = None
                    answered = sync.acquire(False)  # unless it came just now
            if answered:
                in_place.answered()
                return w.pending.outcome()
            in_place.missed()
        else:
            if in_place is not None:
                in_place.run = 0  # this call yields to the loop
            w = self._post(_Waiter(loop), fn, args, kwargs)
        w.fn = fn
        w.pending.deadline = deadline
        # The timeout is kept on the caller's loop: it ends the await even if the
        # runner's loop is stuck. Only this loop's thread touches its entry.
        waits = self._awaited.get(loop)
        if waits is None:
            waits = self._awaited[loop] = set()
        waits.add(w)
        self._deadlines.arm(loop, deadline)
        try:
            return await w.pending.fut  # type: ignore[misc]
        except BaseException:
            if not w.finished:  # timed out or cancelled here: so is the call
                self._cancel_soon(w)
            raise
        finally:
            waits.discard(w)
            if not waits:  # short-lived loops (asyncio.run per request) leave nothing
                self._awaited.pop(loop, None)

    def _expire_due(self, loop: asyncio.AbstractEventLoop, now: float) -> float | None:
        """On ``loop``: fail the calls awaited on it past their deadline; the next one."""
        upcoming: float | None = None
        for w in list(self._awaited.get(loop, ())):
            p = w.pending
            if p.deadline > now:  # type: ignore[operator]
                if upcoming is None or p.deadline < upcoming:  # type: ignore[operator]
                    upcoming = p.deadline
            elif not p.fut.done():  # type: ignore[union-attr]
                p.fut.set_exception(_too_late(w.fn))  # type: ignore[union-attr]
        return upcoming

    def _post(self, w: _Waiter, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple, kwargs: dict) -> _Waiter:
        """From another thread: queue ``w``'s call to start on the runner's loop."""
        coro = w.run(fn, args, kwargs)
        try:
            self.loop.call_soon_threadsafe(self._start, coro, w.done)
        except BaseException:  # the loop is closed
            coro.close()
            raise
        return w

    def _cancel_soon(self, w: _Waiter) -> None:
        try:
            self.loop.call_soon_threadsafe(w.cancel)
        except RuntimeError:  # the loop closed meanwhile (at exit): nothing runs the call
            pass

    def _start(self, coro: Coroutine[Any, Any, Any], done: Done) -> None:
        self.submit(coro, done, 0)
        self.kick()

    def kick(self) -> None:
        """Run the queued calls' first steps now (on the loop, outside any task)."""
        if self.queue and not self.running:
            self.running = True
            try:
                self._run_batch()
            finally:
                self.running = False
                after, self._after = self._after, []
                for fn in after:
                    fn()

    def after_batch(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the calls running now are done (on the loop): one send()
        of a batch's answers per follower."""
        self._after.append(fn)

    def _run_batch(self) -> None:
        loop, queue = self.loop, self.queue
        host = self._host
        if host is None or host.fut.done() or host.task.done():
            host = self._park()
        if not host.parked:
            # Lend a host only once it waits: one cancelled before its first
            # step would drop a call handed to it unseen. Its first step is
            # queued already, so this runs after it.
            loop.call_soon(self.kick)
            return
        task, fut = host.task, host.fut
        try:
            if _enter_task is None:
                raise RuntimeError("asyncio cannot lend a task")
            _enter_task(loop, task)
        except RuntimeError:  # or a task is running already (not our caller's case)
            while queue:
                item = queue.popleft()
                if self._qindex is not None:
                    self._take(item)
                if item[0] is not None:
                    self._own_task(*item)
            return
        try:
            while queue and not fut.done():
                item = queue.popleft()
                if self._qindex is not None:  # a CANCEL came with calls queued
                    self._take(item)
                coro, done, rid, timeout = item
                if coro is None:  # withdrawn
                    continue
                ctx = contextvars.copy_context()
                try:
                    step = ctx.run(coro.send, None)
                except StopIteration as stop:
                    done(rid, stop.value, None)
                    continue
                except BaseException as exc:
                    done(rid, None, exc)
                    continue
                # The call waits for something: the host drives it from here on
                # (it is the task the call saw), unless the call cancelled it.
                if fut.done():
                    coro.close()
                    done(rid, None, RuntimeError("the call was cancelled on the leader"))
                else:
                    task._log_destroy_pending = True  # type: ignore[attr-defined]
                    fut.set_result((coro, ctx, step, done, rid, timeout))
                    if rid:  # a CANCEL may come before the task drives it
                        self._calls[(done, rid)] = task
        finally:
            _leave_task(loop, task)
        if fut.done():  # a call took the host, or cancelled it: the rest wait for a new one
            self._park()
            if queue:
                loop.call_soon(self.kick)

    def _take(self, item: Queued) -> None:
        """``item``, just taken from the queue, out of the CANCEL index."""
        index = self._qindex
        assert index is not None
        if index.get((item[1], item[2])) is item:
            del index[(item[1], item[2])]
        if not self.queue:
            self._qindex = None

    def _park(self) -> _Host:
        host = self._host = _Host(self.loop)
        host.task = self.loop.create_task(self._hosted(host))
        # Parked, it holds no call: if its runner goes away, nothing is lost.
        host.task._log_destroy_pending = False  # type: ignore[attr-defined]
        return host

    async def _hosted(self, host: _Host) -> None:
        host.parked = True
        fut = host.fut
        try:
            coro, ctx, step, done, rid, timeout = await fut
        except asyncio.CancelledError:
            # Cancelled (by an earlier call it was lent to) after a call was handed
            # to it: that call must not be lost.
            if fut.done() and not fut.cancelled():
                coro, _, _, done, rid, timeout = fut.result()
                me = asyncio.current_task()
                assert me is not None
                try:
                    coro.close()
                finally:
                    self._calls.pop((done, rid), None)
                    if me in self._withdrawn:
                        self._withdrawn.discard(me)
                    else:
                        why = self._why_cancelled(me, timeout)
                        self._abandoned.discard(me)
                        done(rid, None, why)
            raise
        await self._drive(coro, ctx, step, done, rid, timeout)

    async def _drive(
        self, coro: Coroutine[Any, Any, Any], ctx: contextvars.Context, step: Any, done: Done, rid: int, timeout: float | None
    ) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._tasks[me] = done
        if rid:
            self._calls[(done, rid)] = me
        if me in self._withdrawn:  # its caller cancelled it before this began
            me.cancel()
        # Only a call that waits gets here, and pays for the timer.
        # (a peer's NaN or inf would be a timer nobody wants in the loop's heap)
        expiry = self.loop.call_later(timeout, self._expire, me) if timeout and 0 < timeout <= MAX_SECONDS else None
        try:
            value = await _Resume(coro, ctx, step)
        except asyncio.CancelledError:
            if me not in self._withdrawn:
                done(rid, None, self._why_cancelled(me, timeout))
            raise
        except BaseException as exc:
            if me not in self._withdrawn:
                done(rid, None, exc)
        else:
            if me not in self._withdrawn:
                done(rid, value, None)
        finally:
            if expiry is not None:
                expiry.cancel()
            self._tasks.pop(me, None)
            if rid and self._calls.get((done, rid)) is me:
                del self._calls[(done, rid)]
            self._withdrawn.discard(me)
            self._abandoned.discard(me)
            self._expired.discard(me)
            self._closed_own.discard(me)

    def _why_cancelled(self, task: asyncio.Task, timeout: float | None) -> BaseException:
        """What the caller of the call ``task`` drove is told of its cancellation."""
        if task in self._abandoned:
            return Abandoned("the leader closed with the call running")
        if task in self._closed_own:
            return ClientClosedError("this process closed its clients with the call running")
        if task in self._expired:
            return CallTimeoutError(f"the call did not finish within its timeout ({timeout:.3g} s): cancelled on the leader")
        return RuntimeError("the call was cancelled on the leader")

    def _expire(self, task: asyncio.Task) -> None:
        if not task.done():
            self._expired.add(task)
            task.cancel()

    def _own_task(self, coro: Coroutine[Any, Any, Any], done: Done, rid: int, timeout: float | None) -> None:
        """A Task for one call, from its first step (without ``_enter_task``)."""
        task = self.loop.create_task(self._drive(coro, contextvars.copy_context(), None, done, rid, timeout))
        if rid:  # a CANCEL may come before the task begins
            self._calls[(done, rid)] = task
