"""One connshare event loop per process, on a daemon thread, started lazily.

Blocking front doors reach it through ``concurrent.futures``; calling them on the
loop's own thread raises :class:`ConcurrencyError` instead of deadlocking. After a
fork the child forgets the parent's loop (its thread did not survive the fork) and
starts its own on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import encodings.idna  # noqa: F401  (see below)
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from threading import get_ident
from typing import Any, TypeVar

from ._errors import ConcurrencyError
from ._polling import PollingSelector

# Imported above, not lazily by the loop thread's first getaddrinfo: a fork while
# that thread holds the import lock leaves the child unable to import it
# ("LookupError: unknown encoding: idna" under gunicorn --preload).

log = logging.getLogger("connshare.loop")
T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
#: the loop thread's ident: checked on every blocking call
_ident: int | None = None
#: the selector of connshare's loop, when it is asyncio's (``leader_spin_wait``)
_selector: PollingSelector | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """connshare's loop in this process, started on first use."""
    global _loop, _thread, _ident
    loop = _loop
    if loop is not None:
        return loop
    with _lock:
        if _loop is None:
            loop = _new_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                _serve(loop)

            _thread = threading.Thread(target=run, name="connshare-loop", daemon=True)
            _thread.start()
            started.wait()
            _ident = _thread.ident
            _loop = loop
        return _loop


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (the ``fast`` extra) unless CONNSHARE_LOOP=asyncio."""
    global _selector
    if os.environ.get("CONNSHARE_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    _selector = PollingSelector()
    return asyncio.SelectorEventLoop(_selector)


def add_reader_in_place(loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[[], Any]) -> None:
    """``loop.add_reader(fd, callback)``; on connshare's own asyncio loop, the
    callback then runs inside the selector's ``select()`` (see ``_polling``)."""
    loop.add_reader(fd, callback)
    if loop is _loop and _selector is not None:
        _selector.read_in_place(fd, callback)


def loop_selector() -> PollingSelector | None:
    """The selector of connshare's loop; None under uvloop."""
    return _selector


def loop_thread_id() -> int | None:
    return _ident


def on_loop_thread() -> bool:
    return _ident == get_ident()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """Run connshare's loop for good. A SystemExit raised by app code it runs (a
    listener calling ``sys.exit()``, a real client's constructor) ends only the
    thread it is raised in, as in any thread, and here that thread serves every
    call and event of the process: log it and go on."""
    while True:
        try:
            loop.run_forever()
            return
        except (SystemExit, KeyboardInterrupt) as exc:
            log.error("app code raised %r on connshare's loop thread; the loop goes on", exc, exc_info=exc)


def forbid_loop_thread(what: str) -> None:
    """Raise ConcurrencyError when a blocking call runs on connshare's own thread."""
    if on_loop_thread():
        raise ConcurrencyError(
            f"{what} would block connshare's own thread and deadlock; use the awaitable API (or a coroutine listener) there"
        )


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on connshare's loop and wait for it from a foreign thread."""
    forbid_loop_thread("a blocking connshare call")
    fut = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise


def stop_loop(timeout: float) -> None:
    """Stop connshare's loop and wait up to ``timeout`` for its thread to end (at
    interpreter exit: connshare's clients are closed by then)."""
    with _lock:
        loop, thread = _loop, _thread
    if loop is None or thread is None or thread.ident == get_ident():
        return
    try:
        loop.call_soon_threadsafe(loop.stop)
    except RuntimeError:
        return  # closed already
    thread.join(timeout)


def _after_fork_in_child() -> None:
    global _loop, _thread, _ident, _lock, _selector
    # The loop's thread does not exist in the child; its selector and self-pipe are
    # shared with the parent. Forget them without closing (closing would touch fds
    # the parent still uses).
    _loop = None
    _thread = None
    _ident = None
    _selector = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
