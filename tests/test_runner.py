"""The leader's coroutine runner on a real event loop thread, at its edges."""

from __future__ import annotations

import asyncio
import threading

from connshare import CallTimeoutError
from connshare._runner import CoroRunner


def test_a_caller_whose_loop_closed_under_it_gets_its_timeout() -> None:
    # At interpreter exit connshare's loop can close while a caller on another
    # thread still waits: the caller must get its CallTimeoutError, not the
    # RuntimeError of posting the call's cancel to a closed loop.
    loop = asyncio.new_event_loop()
    runner = CoroRunner(loop)
    started = threading.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    outcome: list[BaseException] = []

    def caller() -> None:
        try:
            runner.call_from_thread(hang, (), {}, 1.0)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    try:
        assert started.wait(10), "the call did not start on the loop"
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        assert not thread.is_alive()
        loop.close()
    finally:
        t.join(10)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CallTimeoutError), outcome


def test_an_awaiting_caller_whose_runner_loop_closed_gets_its_timeout() -> None:
    # The same for a coroutine on another loop (the app's, under uvicorn).
    loop = asyncio.new_event_loop()
    runner = CoroRunner(loop)
    started = threading.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def caller() -> BaseException | None:
        call = asyncio.ensure_future(runner.call_async(hang, (), {}, 1.0, asyncio.get_running_loop()))
        while not started.is_set():
            await asyncio.sleep(0.01)
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        loop.close()
        try:
            await call
        except BaseException as exc:
            return exc
        return None

    try:
        exc = asyncio.run(asyncio.wait_for(caller(), 20))
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
    assert isinstance(exc, CallTimeoutError), exc
