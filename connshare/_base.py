"""``Base``: the SDK-style base of data clients and cluster clients.

Readiness (``ready(True)``, ``ready(exc)``, ``ready(callback)``, ``wait_ready()``,
``await ready()``), events (``on("error", fn)``, ``emit``), and an idempotent
``close()`` / ``aclose()`` with both context-manager forms.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import attrs

from ._errors import NotReadyError

log = logging.getLogger("connshare.base")

_UNSET = object()
_B = TypeVar("_B", bound="Base")


#: tasks of coroutine listeners and real-client calls, kept alive until they end
background: set[asyncio.Future] = set()


def keep(task: asyncio.Future) -> asyncio.Future:
    """Hold a reference to ``task`` until it is done (the loop only holds weak ones)."""
    background.add(task)
    task.add_done_callback(background.discard)
    return task


def _run_awaited(res: Any, fn: Any, what: str) -> None:
    """Run what a callback returned, if it is awaitable (an ``async def``
    listener, a lambda around one): on this thread's loop, else nowhere, said."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        log.error("%s %r returned an awaitable outside any event loop; it was not run", what, fn)
        if inspect.iscoroutine(res):
            res.close()  # no "never awaited" warning on top
        return

    def done(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s %r raised", what, fn, exc_info=task.exception())

    keep(asyncio.ensure_future(res, loop=loop)).add_done_callback(done)


def _closer() -> tuple[int, Any]:
    """Who is closing: the thread, and the task if a loop runs in it."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return threading.get_ident(), task


def _once(close: Callable[..., Any]) -> Callable[..., Any]:
    """Make a subclass's close() idempotent and mark the instance closed.

    Only the first close runs, but all of it: a ``super().close()`` made by that
    close runs the parent's body too (the instance is marked closed by then)."""

    if inspect.iscoroutinefunction(close):

        @functools.wraps(close)
        async def aclose_once(self: Base, *a: Any, **kw: Any) -> Any:
            if not self._close_enter(close):
                return None
            try:
                return await close(self, *a, **kw)
            finally:
                self._close_exit(close)

        return aclose_once

    @functools.wraps(close)
    def close_once(self: Base, *a: Any, **kw: Any) -> Any:
        if not self._close_enter(close):
            return None
        try:
            return close(self, *a, **kw)
        finally:
            self._close_exit(close)

    return close_once


@attrs.define(slots=False, eq=False, init=False)
class Base:
    """Readiness, events and an idempotent close, for any client.

    A subclass calls ``super().__init__()``, then ``self.ready(True)`` once it can
    serve (or ``self.ready(exc)`` if start-up failed; from any thread).
    """

    _ready_state: Any = attrs.field(init=False)
    _ready_cond: threading.Condition = attrs.field(init=False)
    _ready_callbacks: list = attrs.field(init=False)
    _listeners: dict = attrs.field(init=False)
    _closed: bool = attrs.field(init=False)
    #: the first close under way: who runs it, and which bodies of it are running
    _close_run: Any = attrs.field(init=False)

    def __init__(self) -> None:
        self._base_init()

    def _base_init(self) -> None:
        self._ready_state = _UNSET  # _UNSET, True, or the exception
        self._ready_cond = threading.Condition(threading.Lock())
        self._ready_callbacks = []
        self._listeners = {}
        self._closed = False
        self._close_run = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        for name in ("close", "aclose"):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_connshare_once", False):
                wrapped = _once(fn)
                wrapped._connshare_once = True  # type: ignore[attr-defined]
                setattr(cls, name, wrapped)

    def _closing_started(self) -> bool:
        """True if close already ran; marks it as running otherwise."""
        if getattr(self, "_closed", None) is None:
            self._base_init()  # a subclass forgot super().__init__()
        with self._ready_cond:
            if self._closed:
                return True
            self._closed = True
            return False

    def _close_enter(self, body: Callable[..., Any]) -> bool:
        """Whether ``body`` (one class's close) runs: the first close runs, and so
        do the parents' bodies it reaches through ``super()``; a second close, or a
        body calling itself again, does not."""
        if getattr(self, "_closed", None) is None:
            self._base_init()
        who = _closer()
        with self._ready_cond:
            run = self._close_run
            if run is not None and run[0] == who:
                if body in run[1]:
                    return False
                run[1].add(body)
                return True
            if self._closed:
                return False
            self._closed = True
            self._close_run = (who, {body})
            return True

    def _close_exit(self, body: Callable[..., Any]) -> None:
        with self._ready_cond:
            run = self._close_run
            if run is not None and run[0] == _closer():
                run[1].discard(body)
                if not run[1]:
                    self._close_run = None

    # -- readiness --------------------------------------------------------------

    def ready(self, flag: Any = _UNSET) -> Any:
        """``ready(True)`` marks ready; ``ready(exc)`` marks failed; ``ready(fn)``
        calls ``fn(None)`` once ready or ``fn(exc)`` on failure; ``await ready()``
        waits (from any event loop) and raises the failure."""
        if flag is _UNSET:
            return self._await_ready()
        if callable(flag) and not isinstance(flag, BaseException):
            with self._ready_cond:
                state = self._ready_state
                if state is _UNSET:
                    self._ready_callbacks.append(flag)
                    return None
            self._run_callback(flag, state)
            return None
        if flag is True or isinstance(flag, BaseException):
            self._settle_ready(flag)
            if isinstance(flag, BaseException):
                self.emit("error", flag)
            return None
        raise TypeError(f"ready() takes True, an exception or a callable, not {flag!r}")

    def _settle_ready(self, flag: Any, *, first: bool = False) -> None:
        """Set the ready state and wake its waiters and callbacks; emit nothing.
        ``first``: only if no state was set yet."""
        with self._ready_cond:
            if self._ready_state is not _UNSET and (first or (flag is True and self._ready_state is True)):
                return
            self._ready_state = flag
            callbacks, self._ready_callbacks = self._ready_callbacks, []
            self._ready_cond.notify_all()
        for cb in callbacks:
            self._run_callback(cb, flag)

    @staticmethod
    def _run_callback(cb: Callable[[Any], Any], state: Any) -> None:
        try:
            res = cb(None if state is True else state)
            if res is not None and inspect.isawaitable(res):
                _run_awaited(res, cb, "ready callback")
        except Exception:
            log.exception("ready callback %r raised", cb)

    @property
    def is_ready(self) -> bool:
        """True once ``ready(True)`` was called (False before, or after a failure)."""
        return self._ready_state is True

    def _reset_ready(self) -> None:
        with self._ready_cond:
            self._ready_state = _UNSET

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ready; raise the start-up failure, or TimeoutError."""
        with self._ready_cond:
            if not self._ready_cond.wait_for(lambda: self._ready_state is not _UNSET, timeout):
                raise TimeoutError(f"{type(self).__name__} not ready after {timeout} s")
            state = self._ready_state
        if state is not True:
            raise NotReadyError(f"{type(self).__name__} did not become ready: {state}") from state

    async def _await_ready(self) -> None:
        if self._ready_state is _UNSET:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def settle() -> None:
                if not fut.done():
                    fut.set_result(None)

            def done(_err: Any) -> None:
                loop.call_soon_threadsafe(settle)

            self.ready(done)
            await fut
        state = self._ready_state
        if state is not True:
            raise NotReadyError(f"{type(self).__name__} did not become ready: {state}") from state

    # -- events -----------------------------------------------------------------

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
        """Call ``listener(*args)`` on every ``event`` (``"error"``: the exception)."""
        if not callable(listener):  # here, not at the event it would miss
            raise TypeError(f"listener must be callable, not {listener!r}")
        self._listeners.setdefault(event, []).append(listener)
        return listener

    def off(self, event: str, listener: Callable[..., Any] | None = None) -> None:
        """Remove ``listener`` from ``event`` (every listener of it, if None)."""
        if listener is None:
            self._listeners.pop(event, None)
        else:
            ls = self._listeners.get(event, [])
            if listener in ls:
                ls.remove(listener)

    def emit(self, event: str, *args: Any) -> bool:
        """Call the listeners of ``event``; an error with no listener is logged."""
        listeners = list(self._listeners.get(event, ()))
        if not listeners:
            if event == "error":
                err = args[0] if args else None
                log.error(
                    "%s emitted an error with no listener: %r",
                    type(self).__name__,
                    err,
                    exc_info=err if isinstance(err, BaseException) else None,
                )
            return False
        for fn in listeners:
            try:
                res = fn(*args)
                if res is not None and inspect.isawaitable(res):
                    _run_awaited(res, fn, f"{event!r} listener")
            except Exception:
                log.exception("%r listener %r raised", event, fn)
        return True

    # -- closing ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once ``close()`` (or ``aclose()``) was called."""
        return bool(getattr(self, "_closed", False))

    def close(self) -> Awaitable[None] | None:
        """Release resources. Calling it again does nothing. A subclass may make
        it a coroutine (``async def close``): :meth:`aclose` then awaits it."""
        self._closing_started()
        return None

    async def aclose(self) -> None:
        """Awaitable close; runs a blocking ``close()`` in a thread."""
        if inspect.iscoroutinefunction(type(self).close):
            await cast("Awaitable[None]", self.close())
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self: _B) -> _B:
        if inspect.iscoroutinefunction(type(self).close):
            # __exit__ could only make the coroutine, never await it: nothing
            # would be closed.
            raise TypeError(f"{type(self).__name__}.close() is a coroutine: use 'async with', or 'await aclose()'")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self: _B) -> _B:
        await self.ready()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
