"""A follower's connection to the leader.

Callers write their frame to the socket themselves, under a lock, and wait on a
private lock; one reader thread reads every frame and completes the waiters. That
saves the hop through an event loop thread that would double the latency of a
blocking call. Awaitable calls take the same path and are completed on the caller's
own loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import _thread
import asyncio
import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import (
    CallTimeoutError,
    ConnshareError,
    LeaderLostError,
    LeaderUnresponsiveError,
    NotSentError,
    ProtocolError,
)
from ._loop import mark_no_blocking_thread
from ._protocol import Codec, Error, FrameDecoder, MsgType
from ._remote import exception_from

if TYPE_CHECKING:
    from ._subs import LocalSub

log = logging.getLogger("connshare.follower")

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_PEEK = socket.MSG_PEEK | _DONTWAIT


class Pending:
    """A request waiting for its answer: a blocking caller's lock, or a future on
    the caller's loop. ``hook`` runs on the reader thread with the result, before
    any later frame is read (a SUBSCRIBE result must map its key id first)."""

    __slots__ = ("fut", "hook", "internal", "lock", "loop", "ok", "value")

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None = None, hook: Callable[[Any], None] | None = None, internal: bool = False
    ) -> None:
        self.loop = loop
        self.hook = hook
        #: connshare's own request (REGISTER, SUBSCRIBE): a pause of the leader
        #: does not fail it, only the end of the connection does
        self.internal = internal
        self.ok = False
        self.value: Any = None
        if loop is None:
            self.lock = _thread.allocate_lock()
            self.lock.acquire()
            self.fut = None
        else:
            self.lock = None
            self.fut = loop.create_future()

    def settle(self, ok: bool, value: Any, batch: dict | None = None) -> None:
        """Wake the waiter. With ``batch`` (the reader thread), a future's result is
        queued per loop, so that one wake-up settles every answer of one read."""
        self.ok = ok
        self.value = value
        if self.lock is not None:
            self.lock.release()
        elif batch is not None:
            batch.setdefault(self.loop, []).append((self.fut, ok, value))
        else:
            _wake(self.loop, [(self.fut, ok, value)])  # type: ignore[arg-type]

    def outcome(self) -> Any:
        if self.ok:
            return self.value
        raise self.value


def _wake(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_settle_futs, items)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody is waiting


def _settle_futs(items: list) -> None:
    for fut, ok, value in items:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


class FollowerConnection:
    """One TCP connection to the leader, after the handshake."""

    def __init__(
        self,
        sock: socket.socket,
        codec: Codec,
        decoder: FrameDecoder,
        peer_pid: int | None,
        on_lost: Callable[[FollowerConnection, BaseException], None],
        on_frame: Callable[[FollowerConnection, list], None],
    ) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.codec = codec
        self.decoder = decoder
        self.peer_pid = peer_pid
        self._on_lost = on_lost
        self._on_frame = on_frame
        self.send_lock = threading.Lock()
        self.pending: dict[int, Pending] = {}
        self._rids = itertools.count(1)
        self.keys: dict[int, LocalSub] = {}
        self.last_rx = time.monotonic()
        self.unresponsive = False
        self.draining = False  # the leader said GOODBYE: finish what was sent
        self.lost: BaseException | None = None
        self._reader = threading.Thread(target=self._read_loop, name="connshare-reader", daemon=True)

    def start(self, early: list[bytes]) -> None:
        """Start reading; ``early`` holds frames that came with the handshake."""
        self._early = early
        self._reader.start()

    # -- sending ------------------------------------------------------------------------

    def check_usable(self) -> None:
        if self.lost is not None:
            raise NotSentError(f"connection to the leader (pid {self.peer_pid}) is lost: {self.lost}")
        if self.unresponsive:
            raise LeaderUnresponsiveError(self.peer_pid, "no heartbeat answer")
        # A dead leader's FIN may sit unread for a moment: a request sent into that
        # socket would fail as "in flight", though it can never have run. One cheap
        # peek tells (EOF reads as b"" for as long as the socket lives).
        try:
            if self.sock.recv(1, _PEEK) == b"":
                raise NotSentError(f"the leader (pid {self.peer_pid}) closed the connection")
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            raise NotSentError(f"connection to the leader (pid {self.peer_pid}) broke: {exc}") from exc

    def send(self, frame: bytes, timeout: float | None = None) -> None:
        """Write a whole frame, or fail the connection: a half-sent frame would
        corrupt the stream."""
        with self.send_lock:
            try:
                n = self.sock.send(frame, _DONTWAIT)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.abort(exc)
                raise NotSentError(f"leader (pid {self.peer_pid}) connection broke: {exc}") from exc
            if n < len(frame):
                self._send_slow(memoryview(frame)[n:], timeout)

    def _send_slow(self, rest: memoryview, timeout: float | None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else 10.0)
        while rest:
            left = deadline - time.monotonic()
            if left <= 0:
                err = LeaderUnresponsiveError(self.peer_pid, "it stopped reading its socket")
                self.abort(err)
                raise err
            try:
                select.select([], [self.sock], [], left)
                n = self.sock.send(rest, _DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.abort(exc)  # a partial frame never runs: the leader needs all of it
                raise NotSentError(f"leader (pid {self.peer_pid}) connection broke: {exc}") from exc
            rest = rest[n:]

    def request_sync(self, wire_without_rid: list, timeout: float) -> Any:
        """Send a request from a blocking caller and wait for its answer."""
        self.check_usable()
        rid = next(self._rids)
        wire_without_rid[1] = rid
        frame = self.codec.pack(wire_without_rid)
        p = Pending()
        self.pending[rid] = p
        try:
            self.send(frame, timeout)
        except BaseException:
            self.pending.pop(rid, None)
            raise
        if not p.lock.acquire(True, timeout):  # type: ignore[union-attr]
            if self.pending.pop(rid, None) is not None:
                raise CallTimeoutError(f"no answer from the leader (pid {self.peer_pid}) within {timeout} s")
            # answered meanwhile; the lock is (being) released
            p.lock.acquire()  # type: ignore[union-attr]
        return p.outcome()

    def request_async(
        self,
        wire_without_rid: list,
        loop: asyncio.AbstractEventLoop,
        hook: Callable[[Any], None] | None = None,
        internal: bool = False,
    ) -> tuple[int, asyncio.Future]:
        """Send a request from a coroutine; returns its id and a future on ``loop``."""
        self.check_usable()
        rid = next(self._rids)
        wire_without_rid[1] = rid
        frame = self.codec.pack(wire_without_rid)
        p = Pending(loop, hook, internal)
        self.pending[rid] = p
        try:
            self.send(frame, 1.0)
        except BaseException:
            self.pending.pop(rid, None)
            raise
        return rid, p.fut  # type: ignore[return-value]

    def forget(self, rid: int) -> None:
        self.pending.pop(rid, None)

    def send_oneway(self, wire: list) -> None:
        self.check_usable()
        self.send(self.codec.pack(wire), 1.0)

    # -- reading ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        mark_no_blocking_thread()
        reason: BaseException = LeaderLostError("the leader closed the connection")
        try:
            for body in self._early:
                self._handle(self.codec.unpack(body))
            self._early = []
            sock = self.sock
            buf = bytearray(256 * 1024)
            view = memoryview(buf)
            feed = self.decoder.feed
            unpack = self.codec.unpack
            handle = self._handle
            while self.lost is None:
                n = sock.recv_into(buf)
                if not n:
                    break
                self.last_rx = time.monotonic()
                if self.unresponsive:
                    self.unresponsive = False
                    log.info("the leader (pid %s) answers again", self.peer_pid)
                batch: dict = {}
                for body in feed(view[:n]):
                    handle(unpack(body), batch)
                for loop, items in batch.items():
                    _wake(loop, items)
        except ProtocolError as exc:
            log.error("leader (pid %s) broke the protocol: %s", self.peer_pid, exc)
            reason = exc
        except OSError as exc:
            reason = LeaderLostError(f"connection to the leader broke: {exc}")
        except Exception as exc:
            log.exception("connshare reader failed")
            reason = exc
        self._finish(reason)

    def _handle(self, wire: list, batch: dict | None = None) -> None:
        t = wire[0]
        if t == MsgType.RESULT:
            p = self.pending.pop(wire[1], None)
            if p is not None:
                if p.hook is not None:
                    p.hook(wire[2])
                p.settle(True, wire[2], batch)
        elif t == MsgType.EVENT:
            sub = self.keys.get(wire[1])
            if sub is not None:
                sub.deliver(wire[2])
        elif t == MsgType.ERROR:
            msg = Error(*wire[1:])
            if msg.rid == 0:
                raise ProtocolError(f"the leader closed the connection: {msg.message}")
            p = self.pending.pop(msg.rid, None)
            if p is not None:
                p.settle(False, exception_from(msg, self.peer_pid), batch)
        elif t == MsgType.PING:
            self.send(self.codec.pack([MsgType.PONG, wire[1]]), 1.0)
        elif t == MsgType.PONG:
            pass
        elif t in (MsgType.GOODBYE, MsgType.CHANNEL_ERROR):
            self._on_frame(self, wire)
        else:
            raise ProtocolError(f"unexpected {MsgType(t).name} from the leader")
        if self.draining and not self.pending:
            self.close()

    # -- ending --------------------------------------------------------------------------

    def fail_pending(self, exc_factory: Callable[[], BaseException], internal_too: bool = True) -> None:
        if internal_too:
            failed, self.pending = self.pending, {}
        else:
            failed = {rid: p for rid, p in list(self.pending.items()) if not p.internal}
            for rid in failed:
                self.pending.pop(rid, None)
        for p in failed.values():
            p.settle(False, exc_factory())

    def mark_unresponsive(self) -> None:
        if not self.unresponsive:
            self.unresponsive = True
            log.warning("the leader (pid %s) stopped answering heartbeats", self.peer_pid)
            # The app's calls fail fast; connshare's own REGISTER/SUBSCRIBE wait for
            # the leader to wake or the connection to end (then they are redone).
            self.fail_pending(lambda: LeaderUnresponsiveError(self.peer_pid, "no heartbeat answer"), internal_too=False)

    def abort(self, exc: BaseException) -> None:
        """Break the connection now; the reader thread reports the loss."""
        if self.lost is None:
            self.lost = exc
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.abort(ConnshareError("closed"))

    def _finish(self, reason: BaseException) -> None:
        if self.lost is None:
            self.lost = reason
        pid = self.peer_pid
        self.fail_pending(lambda: LeaderLostError(f"the leader (pid {pid}) went away with the call in flight; it may or may not have run"))
        with self.send_lock:  # no sender may hold the fd number while it is reused
            try:
                self.sock.close()
            except OSError:
                pass
        self._on_lost(self, self.lost)
