"""The leader's coroutine runner on a real event loop thread, at its edges."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import attrs
import pytest

from connshare import CallTimeoutError
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
