"""The leader's coroutine runner on a real event loop thread, at its edges."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from connshare import CallTimeoutError, _runner
from connshare._runner import CoroRunner
from tests.harness import wait_until


@attrs.define
class LoopThread:
    """A runner on an event loop of its own thread, and a call that never ends."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    runner: CoroRunner
    started: threading.Event = attrs.Factory(threading.Event)

    async def hang(self) -> None:
        self.started.set()
        await asyncio.Event().wait()

    def close(self) -> None:
        """Stop the loop and close it, as at interpreter exit."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.close()
        # The calls left hanging here, as at exit, stay pending: asyncio would log
        # "Task was destroyed but it is pending!" when one is collected, in the
        # middle of a later test.
        for task in asyncio.all_tasks(self.loop):
            task._log_destroy_pending = False  # type: ignore[attr-defined]


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    lt = LoopThread(loop, thread, CoroRunner(loop))
    try:
        yield lt
    finally:
        lt.close()


def test_a_caller_whose_loop_closed_under_it_gets_its_timeout(lt: LoopThread) -> None:
    # At interpreter exit connshare's loop can close while a caller on another
    # thread still waits: the caller must get its CallTimeoutError, not the
    # RuntimeError of posting the call's cancel to a closed loop.
    outcome: list[BaseException] = []

    def caller() -> None:
        try:
            lt.runner.call_from_thread(lt.hang, (), {}, 1.0)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    try:
        assert lt.started.wait(10), "the call did not start on the loop"
        lt.close()
    finally:
        t.join(10)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CallTimeoutError), outcome


def test_an_awaiting_caller_whose_runner_loop_closed_gets_its_timeout(lt: LoopThread) -> None:
    # The same for a coroutine on another loop (the app's, under uvicorn).
    async def caller() -> BaseException | None:
        call = asyncio.ensure_future(lt.runner.call_async(lt.hang, (), {}, 1.0, asyncio.get_running_loop()))
        while not lt.started.is_set():
            await asyncio.sleep(0.01)
        lt.close()
        try:
            await call
        except BaseException as exc:
            return exc
        return None

    exc = asyncio.run(asyncio.wait_for(caller(), 20))
    assert isinstance(exc, CallTimeoutError), exc


class _SignallingGate:
    """Stands in for the runner's gate: tells when someone is about to take it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entering = threading.Event()

    def __enter__(self) -> None:
        self.entering.set()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_an_outcome_that_meets_the_end_of_a_wait_in_place_reaches_the_future(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runner hands a call's outcome to a caller waiting in place (a lock), or
    # to its future once the caller stopped waiting. It looks outside the gate,
    # then again inside: here the caller stops waiting between the two looks, as
    # call_async does when its wait runs out. The outcome must reach the future,
    # or the caller would await it forever. The interleaving is forced, not hoped for.
    gate = _SignallingGate()
    monkeypatch.setattr(_runner, "_GATE", gate)
    loop = asyncio.new_event_loop()
    try:
        sync = threading.Lock()
        sync.acquire()
        w = _runner._Waiter(loop, sync)
        finishing = threading.Thread(target=w.done, args=(1, "the answer", None))
        with gate.lock:  # what the caller holds while it stops waiting
            finishing.start()
            assert gate.entering.wait(10), "the outcome never came to the gate"
            w.sync = None
            assert not sync.acquire(False)  # no outcome for the waiting caller yet
        finishing.join(10)
        assert not finishing.is_alive()
        fut = w.pending.fut
        assert fut is not None
        assert loop.run_until_complete(asyncio.wait_for(fut, 10)) == "the answer"
    finally:
        loop.close()


def _on_loop(lt: LoopThread, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in one callback of the runner's loop; its value."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            out.set_result(fn())
        except BaseException as exc:
            out.set_exception(exc)

    lt.loop.call_soon_threadsafe(run)
    return out.result(10)


@attrs.define
class _Calls:
    """A peer's calls as the runner sees them: what each call saw, how each was answered."""

    saw: dict[int, str] = attrs.Factory(dict)
    answers: list[tuple[int, Any, BaseException | None]] = attrs.Factory(list)
    cleaned: threading.Event = attrs.Factory(threading.Event)

    def done(self, rid: int, value: Any, exc: BaseException | None) -> None:
        self.answers.append((rid, value, exc))

    async def call(self, rid: int, seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        except BaseException as exc:
            self.saw[rid] = type(exc).__name__
            raise
        finally:
            await asyncio.sleep(0)  # cleanup that awaits: a close() would make it raise
            self.cleaned.set()
        self.saw[rid] = "ran"
        return "ran"


def _runner_state(r: CoroRunner) -> tuple:
    return (len(r._calls), len(r._withdrawn), len(r._tasks), len(r.queue), r._qindex)


@pytest.mark.parametrize("lend", [True, False], ids=["lent_task", "task_per_call"])
def test_a_withdrawn_call_is_answered_once_at_once_and_cancelled_in_its_own_context(
    lt: LoopThread, lend: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CANCEL answers the call (Abandoned, which sends nothing) inside the read
    # that brought it, so that its place is free for the next request of that
    # read. The call itself sees a CancelledError, whether its task drives it
    # already or has only just been handed it (a GeneratorExit from close()
    # would skip its except clauses, and fail cleanup that awaits). Without a
    # task to lend (task_per_call), a call whose task has not begun never runs.
    if not lend:
        monkeypatch.setattr(_runner, "_enter_task", None)
    r, calls = lt.runner, _Calls()
    _on_loop(lt, lambda: (r.submit(calls.call(0, 0), calls.done, 100), r.kick()))  # parks a host
    wait_until(lambda: len(calls.answers) == 1, what="the first call")

    def handed_then_withdrawn() -> bool:
        r.submit(calls.call(1, 600), calls.done, 1)
        r.kick()  # the call waits: it is handed to the host task, which has not run yet
        return r.withdraw(calls.done, 1) and len(calls.answers) == 2

    assert _on_loop(lt, handed_then_withdrawn)
    if lend:
        wait_until(lambda: calls.saw.get(1) and calls.cleaned.is_set(), what="the call to see its cancellation")
        assert calls.saw[1] == "CancelledError"
    else:
        wait_until(lambda: _on_loop(lt, lambda: _runner_state(r)) == (0, 0, 0, 0, None), what="the runner to hold nothing")
        assert 1 not in calls.saw

    _on_loop(lt, lambda: (r.submit(calls.call(2, 600), calls.done, 2), r.kick()))
    wait_until(lambda: _on_loop(lt, lambda: len(r._tasks)) == 1, what="the call to wait in its task")
    assert _on_loop(lt, lambda: r.withdraw(calls.done, 2) and len(calls.answers) == 3)
    wait_until(lambda: calls.saw.get(2), what="the waiting call to see its cancellation")
    assert calls.saw[2] == "CancelledError"
    assert [(rid, type(exc).__name__) for rid, _, exc in calls.answers[1:]] == [(1, "Abandoned"), (2, "Abandoned")]
    wait_until(lambda: _on_loop(lt, lambda: _runner_state(r)) == (0, 0, 0, 0, None), what="the runner to hold nothing")
    assert len(calls.answers) == 3, "answered twice"


def test_a_withdrawn_call_that_has_not_started_never_runs(lt: LoopThread) -> None:
    # The INVOKE and its CANCEL came in one read: the call never starts. Its
    # neighbours in the queue run; a CANCEL of a call that is not there (answered,
    # a oneway call, or another's) changes nothing.
    r, calls = lt.runner, _Calls()

    def queue_then_withdraw() -> list:
        for rid in (1, 2, 3):
            r.submit(calls.call(rid, 0), calls.done, rid)
        out = [r.withdraw(calls.done, 2), r.withdraw(calls.done, 2), r.withdraw(calls.done, 9), r.withdraw(calls.done, 0)]
        r.submit(calls.call(4, 0), calls.done, 4)  # queued after the index was made
        out.append(r.withdraw(calls.done, 4))
        r.kick()
        return out

    assert _on_loop(lt, queue_then_withdraw) == [True, False, False, False, True]
    wait_until(lambda: len(calls.answers) == 4, what="the calls left to run")
    assert sorted((rid, type(exc).__name__ if exc else value) for rid, value, exc in calls.answers) == [
        (1, "ran"),
        (2, "Abandoned"),
        (3, "ran"),
        (4, "Abandoned"),
    ]
    assert 2 not in calls.saw and 4 not in calls.saw
    wait_until(lambda: _on_loop(lt, lambda: _runner_state(r)) == (0, 0, 0, 0, None), what="the runner to hold nothing")
