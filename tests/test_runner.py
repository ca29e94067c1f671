"""The leader's coroutine runner on a real event loop thread, at its edges."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import attrs
import pytest

from connshare import CallTimeoutError, _runner
from connshare._runner import CoroRunner


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
