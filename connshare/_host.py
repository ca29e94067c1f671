"""The leader's side of one channel: the one real client, its upstream subscriptions
(once per key, however many processes subscribe), last values, and fan-out.

Everything here runs on connshare's loop thread, except the listeners the real
client calls, which may fire on any thread and hop onto the loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, Protocol

from ._base import Base, keep
from ._errors import ClientClosedError, EncodeError, FrameTooLargeError, MethodNotAllowedError, NotReadyError
from ._loop import on_loop_thread
from ._protocol import Codec, MsgType
from ._spec import ChannelState, MethodSpec
from ._subs import Listener

log = logging.getLogger("connshare.host")


class Sink(Protocol):
    def push(self, key: KeyState, value: Any) -> None: ...

    def refused(self, host: ChannelHost, key: KeyState, exc: BaseException) -> None:
        """The real client refused the key's subscription after it was attached."""


class KeyState:
    """One upstream subscription and who gets its values."""

    __slots__ = ("canon", "frame", "has_value", "id", "listener", "method", "reg", "rr", "sinks", "unsendable", "value")

    def __init__(self, key_id: int, method: str, reg: Any, canon: bytes) -> None:
        self.id = key_id
        self.method = method
        self.reg = reg
        self.canon = canon
        self.sinks: list[Sink] = []
        self.has_value = False
        self.value: Any = None
        self.frame: bytes | None = None
        self.listener: Callable[[Any], None] | None = None
        self.rr = 0
        self.unsendable: Exception | None = None

    def event_frame(self, codec: Codec) -> bytes | None:
        """The EVENT frame of the last value, encoded once for every follower."""
        if self.frame is None:
            try:
                self.frame = codec.pack([MsgType.EVENT, self.id, self.value])
            except (EncodeError, FrameTooLargeError) as exc:
                log.error("a value of %s(%r) cannot be sent to followers: %s", self.method, self.reg, exc)
                self.unsendable = exc
                return None
        return self.frame


class ChannelHost:
    """Owns the real client of one channel in the leader process."""

    def __init__(self, state: ChannelState, loop: asyncio.AbstractEventLoop, codec: Codec, key_ids: Any, host_id: int) -> None:
        self.state = state
        #: the channel's id on the wire, for every follower of this leader
        self.id = host_id
        self.loop = loop
        self.codec = codec
        self._key_ids = key_ids
        self.real: Any = None
        self.ready: asyncio.Future[None] = loop.create_future()
        #: done when the attempt to start under way ends (replaced by the next)
        self.attempt: asyncio.Future[None] = loop.create_future()
        #: why the real client is not serving, while it is being started again
        self.down: BaseException | None = None
        #: the task that starts it (and starts it again), ended by close()
        self.starter: asyncio.Task | None = None
        self.keys: dict[tuple[str, bytes], KeyState] = {}
        self.peers: set[Any] = set()
        self.broadcast = state.options.is_broadcast
        #: resolve_spec's answers, per method name (every remote call asks)
        self._calls: dict[str, tuple[Callable[..., Any], MethodSpec]] = {}

    async def start(self) -> BaseException | None:
        """Build the real client on connshare's loop and wait until it is ready: one
        attempt. ``ready`` is done if it succeeded; if it failed, the error is
        returned and the caller settles ``ready`` (:meth:`fail`) or tries again."""
        st = self.state
        real = None
        try:
            real = st.cls(*st.args, **st.kwargs)
            self.real = real
            if isinstance(real, Base):
                real.on("error", self._on_real_error)
                await asyncio.wait_for(real.ready(), st.options.max_wait_time)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("channel %r: the real client failed to start: %r", st.name, exc)
            if real is not None:
                # Built but never ready: it may hold a connection. Closed now, so
                # that a retry does not leave it open.
                await self.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            # A SystemExit too: raised here it would end connshare's loop thread.
            return exc if isinstance(exc, Exception) else NotReadyError(repr(exc))
        finally:
            attempt, self.attempt = self.attempt, self.loop.create_future()
            attempt.set_result(None)
        if not self.ready.done():
            self.ready.set_result(None)
        return None

    def fail(self, exc: BaseException) -> None:
        """No more attempts: whoever waits for ``ready`` gets ``exc``."""
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: waiters re-raise it

    # -- errors from the real client ---------------------------------------------

    def _on_real_error(self, exc: BaseException) -> None:
        if on_loop_thread():
            self._fan_error(exc)
        else:
            self.loop.call_soon_threadsafe(self._fan_error, exc)

    def _fan_error(self, exc: BaseException) -> None:
        # after the listeners of the values before it, as in a follower
        Listener.home(self.state.emit_error).call(exc)
        for peer in list(self.peers):
            peer.send_channel_error(self, exc)

    # -- subscriptions -------------------------------------------------------------

    def subscribe(self, method: str, reg: Any, canon: bytes) -> KeyState:
        """The key for ``reg``, subscribing upstream if it is new. Attach sinks with
        :meth:`attach`; a key left with no sink is released by :meth:`unsubscribe`."""
        spec = self.state.spec.get(method)
        if spec is None or spec.to != "subscribe":
            raise MethodNotAllowedError(f"{method!r} is not delegated as a subscribe method on channel {self.state.name!r}")
        ks = self.keys.get((method, canon))
        if ks is not None:
            return ks
        ks = KeyState(next(self._key_ids), method, reg, canon)
        self.keys[(method, canon)] = ks
        loop = self.loop

        def listener(value: Any, ks: KeyState = ks) -> None:
            if on_loop_thread():
                self._emit(ks, value)
            else:
                loop.call_soon_threadsafe(self._emit, ks, value)

        ks.listener = listener
        try:
            self._call_real(method, reg, listener, refused=functools.partial(self._refused, ks))
        except BaseException:
            del self.keys[(method, canon)]
            raise
        return ks

    def attach(self, ks: KeyState, sink: Sink) -> None:
        """Add ``sink`` to the key and give it the last value, if there is one."""
        ks.sinks.append(sink)
        self.replay(ks, sink)

    def replay(self, ks: KeyState, sink: Sink) -> None:
        """Give ``sink``, attached to ``ks``, the key's last value, if it has one."""
        if ks.has_value and (self.broadcast or len(ks.sinks) == 1):
            sink.push(ks, ks.value)
            if ks.unsendable is not None:
                # The replay could not be sent: tell this sink now (the others heard
                # when the value came), not everyone at the next value.
                exc, ks.unsendable = ks.unsendable, None
                to_peer = getattr(sink, "send_channel_error", None)
                if to_peer is not None:
                    to_peer(self, exc)
                else:  # this process's own subscription
                    self.state.emit_error(exc)

    def unsubscribe(self, ks: KeyState, sink: Sink) -> None:
        """Detach ``sink``; the last one out unsubscribes upstream."""
        try:
            ks.sinks.remove(sink)
        except ValueError:
            return
        if ks.sinks or self.keys.get((ks.method, ks.canon)) is not ks:
            return
        del self.keys[(ks.method, ks.canon)]
        unsub = self.state.kind_method("unsubscribe")
        if unsub is None and hasattr(self.real, "unsubscribe"):
            unsub = "unsubscribe"
        if unsub is not None and self.real is not None:
            try:
                self._call_real(unsub, ks.reg, ks.listener)
            except Exception:
                log.exception("channel %r: upstream unsubscribe of %r failed", self.state.name, ks.reg)

    def _emit(self, ks: KeyState, value: Any) -> None:
        if self.keys.get((ks.method, ks.canon)) is not ks:
            return  # unsubscribed meanwhile
        ks.has_value = True
        ks.value = value
        ks.frame = None
        sinks = ks.sinks
        if not sinks:
            return
        if not self.broadcast:
            ks.rr = (ks.rr + 1) % len(sinks)
            sinks = [sinks[ks.rr]]
        for sink in list(sinks):
            try:
                sink.push(ks, value)
            except Exception:
                log.exception("channel %r: delivering %r failed", self.state.name, ks.reg)
        if ks.unsendable is not None:
            # followers missed this value: tell every process, not just the log
            exc, ks.unsendable = ks.unsendable, None
            self._fan_error(exc)

    def publish(self, method: str, reg: Any) -> None:
        spec = self.state.spec.get(method)
        if spec is None or spec.to != "publish":
            raise MethodNotAllowedError(f"{method!r} is not delegated as a publish method on channel {self.state.name!r}")
        self._call_real(method, reg)

    def _call_real(self, method: str, *args: Any, refused: Callable[[BaseException], None] | None = None) -> None:
        """Call a subscribe/unsubscribe/publish method of the real client on the loop.
        A coroutine one that fails calls ``refused`` with its error, if given, and
        tells every process otherwise."""
        res = getattr(self.real, method)(*args)
        if inspect.isawaitable(res):
            keep(asyncio.ensure_future(res)).add_done_callback(functools.partial(self._after_real, refused or self._fan_error))

    def _after_real(self, refused: Callable[[BaseException], None], task: asyncio.Future) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("channel %r: real client call failed: %r", self.state.name, exc)
            refused(exc)

    def _refused(self, ks: KeyState, exc: BaseException) -> None:
        """A coroutine subscribe failed, after its subscribers were attached: they
        hear it, and forget it, so that subscribing again asks again."""
        if self.keys.get((ks.method, ks.canon)) is not ks:
            return  # unsubscribed meanwhile: nobody to tell
        del self.keys[(ks.method, ks.canon)]
        sinks, ks.sinks = ks.sinks, []
        for sink in sinks:
            try:
                sink.refused(self, ks, exc)
            except Exception:
                log.exception("channel %r: telling a subscriber of %r failed", self.state.name, ks.reg)

    # -- invokes -----------------------------------------------------------------------

    def resolve(self, method: str) -> tuple[Callable[..., Any], bool]:
        """The real bound method and whether it is a coroutine function."""
        fn, spec = self.resolve_spec(method)
        return fn, spec.is_coro

    def resolve_spec(self, method: str) -> tuple[Callable[..., Any], MethodSpec]:
        """The real bound method and its delegate spec; MethodNotAllowedError if it
        is not delegated as a call."""
        hit = self._calls.get(method)
        if hit is None:
            spec = self.state.spec.get(method)
            if spec is None or spec.to not in ("invoke", "invoke_oneway"):
                raise MethodNotAllowedError(f"{method!r} is not a delegated method of channel {self.state.name!r}")
            real = self.real
            hit = getattr(real, method), spec
            if real is not None:
                # Bound once: a method replaced on the real instance later is
                # not seen by remote calls.
                self._calls[method] = hit
        return hit

    async def close(self) -> None:
        starter = self.starter
        if starter is not None and starter is not asyncio.current_task() and not starter.done():
            starter.cancel()  # closed while it starts: no wait for a client closed here
            self.fail(ClientClosedError(f"channel {self.state.name!r} closed while its real client started"))
        real, self.real = self.real, None
        self._calls.clear()
        self.keys.clear()
        if real is None:
            return
        try:
            res = real.close() if hasattr(real, "close") else None
            if inspect.isawaitable(res):
                await res
        except Exception:
            log.exception("channel %r: closing the real client failed", self.state.name)
