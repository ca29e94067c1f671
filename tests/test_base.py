from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from connshare import Base, NotReadyError


class Client(Base):
    def __init__(self) -> None:
        super().__init__()
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


def test_ready_true_wakes_waiters_and_callbacks() -> None:
    c = Client()
    seen = []
    c.ready(seen.append)
    assert not c.is_ready
    threading.Timer(0.01, c.ready, args=(True,)).start()
    c.wait_ready(5)
    assert c.is_ready and seen == [None]
    c.ready(seen.append)  # after the fact: called at once
    assert seen == [None, None]


def test_ready_with_an_exception_fails_waiters_and_emits_error() -> None:
    c = Client()
    errors = []
    c.on("error", errors.append)
    exc = RuntimeError("upstream down")
    c.ready(exc)
    with pytest.raises(NotReadyError) as info:
        c.wait_ready(1)
    assert info.value.__cause__ is exc and errors == [exc]
    got = []
    c.ready(got.append)
    assert got == [exc]


def test_wait_ready_times_out() -> None:
    with pytest.raises(TimeoutError):
        Client().wait_ready(0.01)


def test_await_ready_from_any_loop() -> None:
    c = Client()

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.01, c.ready, True)
        await c.ready()

    asyncio.run(main())
    asyncio.run(c.ready())  # already ready


def test_close_is_idempotent_in_every_form() -> None:
    c = Client()
    c.close()
    c.close()
    with c:
        pass
    asyncio.run(c.aclose())
    assert c.closes == 1 and c.closed


def test_a_client_with_an_async_close_refuses_a_plain_with() -> None:
    class AsyncClient(Base):
        closes = 0

        async def close(self) -> None:
            self.closes += 1

    c = AsyncClient()
    c.ready(True)
    with pytest.raises(TypeError, match="async with"), c:
        pass

    async def main() -> None:
        async with c:
            pass

    asyncio.run(main())
    assert c.closes == 1 and c.closed


def test_async_with_waits_ready_and_closes() -> None:
    async def main() -> Client:
        c = Client()
        c.ready(True)
        async with c:
            assert c.is_ready
        return c

    assert asyncio.run(main()).closes == 1


def test_error_with_no_listener_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    Client().emit("error", ValueError("lost"))
    assert "lost" in caplog.text


def test_a_raising_listener_does_not_stop_the_others() -> None:
    c = Client()
    got = []
    c.on("change", lambda v: 1 / 0)
    c.on("change", got.append)
    c.emit("change", 5)
    assert got == [5]


def test_a_listener_that_is_not_callable_is_refused_when_added() -> None:
    c = Client()
    with pytest.raises(TypeError, match="callable"):
        c.on("error", 42)  # type: ignore[arg-type]
    c.emit("error", ValueError("nobody"))  # nothing was added


def test_a_close_that_calls_super_runs_every_level_once() -> None:
    class Conn(Base):
        def __init__(self) -> None:
            super().__init__()
            self.log: list[str] = []

        def close(self) -> None:
            self.log.append("conn")

    class Pooled(Conn):
        def close(self) -> None:
            self.log.append("pool")
            super().close()
            self.close()  # a close that reaches itself again does not run again

    p = Pooled()
    p.close()
    p.close()
    assert p.log == ["pool", "conn"] and p.closed


def test_an_async_close_that_awaits_super_runs_every_level_once() -> None:
    class Conn(Base):
        log: list[str]

        async def close(self) -> None:
            self.log.append("conn")

    class Pooled(Conn):
        async def close(self) -> None:
            self.log.append("pool")
            await super().close()

    async def main() -> list[str]:
        p = Pooled()
        p.log = []
        # Two closers at once on one loop: only the first runs, whole.
        await asyncio.gather(p.aclose(), p.aclose())
        await p.aclose()
        return p.log

    assert asyncio.run(main()) == ["pool", "conn"]


def test_a_second_close_from_another_thread_does_not_run_the_body_again() -> None:
    entered, release = threading.Event(), threading.Event()

    class Slow(Base):
        runs = 0

        def close(self) -> None:
            self.runs += 1
            entered.set()
            release.wait(5)

    s = Slow()
    t = threading.Thread(target=s.close)
    t.start()
    assert entered.wait(5)
    s.close()  # returns at once: the first close is under way
    release.set()
    t.join(5)
    assert s.runs == 1


def test_a_listener_that_returns_a_coroutine_has_it_run() -> None:
    got: list = []

    async def handler(value: Any) -> None:
        got.append(value)

    class AsyncCallable:
        async def __call__(self, value: Any) -> None:
            got.append(("obj", value))

    async def main() -> None:
        c = Client()
        c.on("change", lambda v: handler(v))
        c.on("change", AsyncCallable())
        c.ready(lambda err: handler("ready"))
        c.emit("change", 1)
        c.ready(True)
        for _ in range(10):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert sorted(map(repr, got)) == sorted(map(repr, [1, ("obj", 1), "ready"]))


def test_a_coroutine_listener_outside_any_loop_is_reported_not_dropped(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(value: Any) -> None:
        raise AssertionError("not run")

    c = Client()
    c.on("change", handler)
    c.emit("change", 1)
    assert "outside any event loop" in caplog.text
