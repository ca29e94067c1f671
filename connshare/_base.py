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


def _once(close: Callable[..., Any]) -> Callable[..., Any]:
    """Make a subclass's close() idempotent and mark the instance closed."""

    if inspect.iscoroutinefunction(close):

        @functools.wraps(close)
        async def aclose_once(self: Base, *a: Any, **kw: Any) -> Any:
            if self._closing_started():
                return None
            return await close(self, *a, **kw)

        return aclose_once

    @functools.wraps(close)
    def close_once(self: Base, *a: Any, **kw: Any) -> Any:
        if self._closing_started():
            return None
        return close(self, *a, **kw)

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

    def __init__(self) -> None:
        self._base_init()

    def _base_init(self) -> None:
        self._ready_state = _UNSET  # _UNSET, True, or the exception
        self._ready_cond = threading.Condition(threading.Lock())
        self._ready_callbacks = []
        self._listeners = {}
        self._closed = False

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
            with self._ready_cond:
                if self._ready_state is not _UNSET and flag is True and self._ready_state is True:
                    return None
                self._ready_state = flag
                callbacks, self._ready_callbacks = self._ready_callbacks, []
                self._ready_cond.notify_all()
            for cb in callbacks:
                self._run_callback(cb, flag)
            if isinstance(flag, BaseException):
                self.emit("error", flag)
            return None
        raise TypeError(f"ready() takes True, an exception or a callable, not {flag!r}")

    @staticmethod
    def _run_callback(cb: Callable[[Any], Any], state: Any) -> None:
        try:
            cb(None if state is True else state)
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
            raise NotReadyError(f"{type(self).__name__} failed to start: {state}") from state

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
            raise NotReadyError(f"{type(self).__name__} failed to start: {state}") from state

    # -- events -----------------------------------------------------------------

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
        """Call ``listener(*args)`` on every ``event`` (``"error"``: the exception)."""
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
                fn(*args)
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
