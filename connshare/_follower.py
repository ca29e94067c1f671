"""A follower's connection to the leader.

Callers write their frame to the socket themselves, under a lock. Whoever holds the
read token reads the socket and completes every waiter it finds answered. By
default that is connshare's own event loop (the *home* loop, where listeners run):
its selector watches a private epoll set holding the socket, so any thread can arm
or disarm it with one ``epoll_ctl``. Others read instead of it, to spare a thread
wake-up per call:

* a blocking caller that finds the token free takes it and reads its own answer
  (the home loop is disarmed meanwhile), so the answer wakes the caller
  directly instead of the home loop that would then wake the caller: one thread
  wake-up less per call;
* an event loop awaiting an answer, when the token is free, becomes the reader
  role: its selector watches the socket (``add_reader``) and it reads there and
  settles its own futures in place, again with no other thread between the
  answer and the caller. It keeps the role while reads bring it answers, and gives
  it back after a read that brought it none. A loop that stalls (or closes) while
  answers wait unread loses the role to the home loop within about a second;
* the role loop's own awaited request, when nothing else is in flight and its loop
  has nothing else to run, waits for its answer in place (``wait_in_place``, a
  fraction of a millisecond): an answer read there completes the await without a
  pass of the loop, which would cost two (the read, then the task's wake-up).

The home loop completes blocking callers through a private lock, awaitable ones
on other loops with ``call_soon_threadsafe`` (one wake-up per loop per read), and
its own futures and event deliveries in place.

Without ``select.epoll`` (not Linux) the home loop watches the socket itself and
always reads.
"""

from __future__ import annotations

import _thread
import asyncio
import itertools
import logging
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._deadlines import LoopDeadlines
from ._errors import (
    CallTimeoutError,
    ClientClosedError,
    ConnshareError,
    LeaderLostError,
    LeaderUnresponsiveError,
    NotSentError,
    ProtocolError,
    awaitable,
)
from ._inplace import InPlace, Spin
from ._loop import add_reader_in_place
from ._protocol import T_RESULT, Codec, Error, MessageDecoder, MsgType
from ._remote import exception_from

if TYPE_CHECKING:
    from ._subs import LocalSub

log = logging.getLogger("connshare.follower")

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_PEEK = socket.MSG_PEEK | _DONTWAIT
#: Linux: the first byte of TCP_INFO is the connection's state (1: established)
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_ESTABLISHED = b"\x01"
_EPOLL = getattr(select, "epoll", None)
_EPOLLIN = getattr(select, "EPOLLIN", 0)
#: a caller reading its own answer wakes this often to check its deadline and the
#: connection (SO_RCVTIMEO: the blocking recv itself times out, no extra syscall)
_READ_SLICE_US = 50_000
#: how often the home loop looks at an event loop holding the reader role, and how
#: long data may sit unread under it before the home loop takes the role back
_WATCH_S = 0.25
_STALL_S = 0.5
#: how long a request's sender waits for room in the socket's buffer before the
#: leader counts as not reading: whatever the call's timeout, since the send holds
#: the connection's send lock, which every other caller, the heartbeat and the
#: readers' PONGs need
_SEND_WAIT = 1.0
#: frames a loop turn queues are sent once they reach this much; each send() then
#: waits (at most _SEND_WAIT) for room for one piece, not for the whole burst
_QUEUE_BYTES = 256 * 1024
#: select() takes no fd above this; a connection on one never waits in place
_SELECT_MAX = 1024


class Pending:
    """A request waiting for its answer: a blocking caller's lock, or a future on
    the caller's loop. ``hook`` runs in the reader with the result, before
    any later frame is read (a SUBSCRIBE result must map its key id first)."""

    __slots__ = ("deadline", "fut", "hook", "internal", "lock", "loop", "ok", "timeout", "value")
    lock: _thread.LockType | None
    fut: asyncio.Future[Any] | None

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        hook: Callable[[Any], None] | None = None,
        internal: bool = False,
        deadline: float | None = None,
        timeout: float = 0.0,
    ) -> None:
        self.loop = loop
        self.hook = hook
        #: when an awaited request fails with CallTimeoutError (time.monotonic()),
        #: and the timeout it was given, for the message
        self.deadline = deadline
        self.timeout = timeout
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
        """Wake the waiter. With ``batch`` (a reader), a future's result is
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


class _Sending(Pending):
    """Holds a request's place in ``pending`` while its frame is sent, before
    its Pending is made (a caller that reads its own answer makes it after the
    send). A connection with a request on its way is not idle, and a GOODBYE
    closes only an idle one. Failing it does nothing: its sender looks at the
    connection again once its Pending is in place."""

    __slots__ = ()

    def settle(self, ok: bool, value: Any, batch: dict | None = None) -> None:
        pass


_SENDING = _Sending()


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
                fut.set_exception(awaitable(value))


class FollowerConnection:
    """One TCP connection to the leader, after the handshake."""

    def __init__(
        self,
        sock: socket.socket,
        codec: Codec,
        decoder: MessageDecoder,
        peer_pid: int | None,
        on_lost: Callable[[FollowerConnection, BaseException], None],
        on_frame: Callable[[FollowerConnection, list, list | None], None],
        home: asyncio.AbstractEventLoop,
        wait_in_place: float = 0.0,
        spin_wait: float = 0.0,
    ) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.codec = codec
        self.decoder = decoder
        self.peer_pid = peer_pid
        self._on_lost = on_lost
        self._on_frame = on_frame
        self._home = home
        self.send_lock = threading.Lock()
        self.pending: dict[int, Pending] = {}
        self._rids = itertools.count(1)
        self.keys: dict[int, LocalSub] = {}
        self.last_rx = time.monotonic()
        self.unresponsive = False
        self.draining = False  # the leader said GOODBYE: finish what was sent
        self.parted = False  # the leader said GOODBYE: its events are no longer ours
        self.lost: BaseException | None = None
        self._finished = False
        #: held by the one thread reading the socket
        self._rtoken = threading.Lock()
        #: the event loop holding the reader role, if any (changed under _rtoken)
        self._role: asyncio.AbstractEventLoop | None = None
        self._here: asyncio.AbstractEventLoop | None = None  # the role loop, while it reads
        self._got_mine = False
        #: loops whose selector watches our fd; the socket is closed only once
        #: none does, or a reused fd number could be unwatched by mistake
        self._watching: set[asyncio.AbstractEventLoop] = set()
        self._reg_lock = threading.Lock()
        self._close_deferred = False
        self._watch_armed = False  # the home loop's look at the role loop is scheduled
        self._home_closed = False
        self._backlog: deque[list] = deque()  # messages read, not yet handled
        #: frames queued by an event loop's turn (_send_in_turn), and that loop
        self._wbuf = bytearray()
        self._wrids: list[int] = []  # the requests whose frames wait in _wbuf
        #: requests whose frames a failed send() never wrote: they fail as not sent
        self._unsent: set[int] = set()
        self._cork: asyncio.AbstractEventLoop | None = None
        self._corks = 0  # how many turns have queued; the watchdog spots a stuck one
        self._corks_seen = -1
        #: awaited requests' deadlines: one timer per event loop
        self._deadlines = LoopDeadlines(self._expire_due)
        self._buf = bytearray(256 * 1024)
        self._view = memoryview(self._buf)
        self._fd = sock.fileno()
        #: whether an awaited request may wait for its answer in place (None: never)
        self._in_place = InPlace(wait_in_place) if wait_in_place and self._fd < _SELECT_MAX else None
        #: how long a caller reading its own answer polls before it sleeps (None: never)
        self._spin = Spin(spin_wait) if spin_wait else None
        self._ep: Any = None
        if _EPOLL is not None:
            self._ep = _EPOLL(1)
            self._ep.register(self._fd, _EPOLLIN)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, _READ_SLICE_US))
        #: what the home loop's selector watches
        self._home_fd = self._ep.fileno() if self._ep is not None else self._fd

    def start(self, early: bytes) -> None:
        """Start reading (on the home loop); ``early`` holds the bytes that came
        after the handshake."""
        with self._rtoken:
            self._here = self._home
            try:
                self._consume(memoryview(early) if early else None)
            finally:
                self._here = None
        add_reader_in_place(self._home, self._home_fd, self._home_read)

    # -- sending ------------------------------------------------------------------------

    def check_usable(self, peek: bool = True) -> None:
        """Raise unless a request sent now can reach the leader. ``peek``: also
        ask the socket, not only what the readers have seen."""
        if peek or self.lost is not None:
            self._check_open()
        if self.unresponsive:
            raise LeaderUnresponsiveError(self.peer_pid, "no heartbeat answer")

    def _check_open(self) -> None:
        """Raise NotSentError if the connection is over, even if nobody has read its
        end yet: a dead leader's FIN may sit unread for a moment, and a request sent
        into that socket would fail as "in flight", though it can never have run.
        On Linux the TCP state tells, even with answers still unread ahead of the
        FIN; elsewhere a peek (EOF reads as b"" once nothing is left ahead of it)."""
        if self.lost is not None:
            raise NotSentError(f"connection to the leader (pid {self.peer_pid}) is lost: {self.lost}")
        if _TCP_INFO is not None:
            try:
                state = self.sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
            except OSError as exc:
                raise NotSentError(f"connection to the leader (pid {self.peer_pid}) broke: {exc}") from exc
            if state != _ESTABLISHED:
                raise NotSentError(f"the leader (pid {self.peer_pid}) closed the connection")
            return
        try:
            if self.sock.recv(1, _PEEK) == b"":
                raise NotSentError(f"the leader (pid {self.peer_pid}) closed the connection")
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            raise NotSentError(f"connection to the leader (pid {self.peer_pid}) broke: {exc}") from exc

    def send(self, frame: bytes, timeout: float = _SEND_WAIT) -> None:
        """Write a whole frame, or fail the connection: a half-sent frame would
        corrupt the stream. Frames an event loop queued go out first, in order.
        ``timeout``: how long to wait for room in the socket's buffer."""
        with self.send_lock:
            self._send_locked(frame, timeout)

    def _send_locked(self, frame: bytes | bytearray, timeout: float = _SEND_WAIT) -> None:
        taken: Iterable[int] = ()
        try:
            if self._wbuf:
                self._wbuf += frame
                frame, self._wbuf = self._wbuf, bytearray()
                taken, self._wrids = self._wrids, []
            try:
                n = self.sock.send(frame, _DONTWAIT)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._unsent.update(taken)  # not a byte left: none of them can run
                self.abort(exc)
                raise NotSentError(f"leader (pid {self.peer_pid}) connection broke: {exc}") from exc
            if n < len(frame):
                self._send_slow(memoryview(frame)[n:], timeout)
        except ConnshareError:
            raise  # the connection is aborted already
        except BaseException as exc:
            # A KeyboardInterrupt in a caller mid-send: a frame may be half sent, or
            # queued ones taken and dropped. The stream cannot go on (the next frame
            # would complete the half one as garbage), so it ends: what is in
            # flight fails as after a leader's loss, and the node reconnects.
            self.abort(LeaderLostError(f"sending was interrupted by {exc!r}"))
            raise

    def _send_in_turn(self, frame: bytes, loop: asyncio.AbstractEventLoop, rid: int) -> None:
        """On ``loop``'s thread, while other requests are in flight: the first frame
        of a loop turn leaves at once, the rest of that turn's frames together in
        one send() when the loop comes round (answers to many requests resume many
        callers in one turn, and each would otherwise pay a send())."""
        with self.send_lock:
            if self._cork is loop:
                self._wbuf += frame
                self._wrids.append(rid)
                if len(self._wbuf) < _QUEUE_BYTES:
                    return
                self._flush_locked()  # a burst leaves in bounded pieces
                burst = True
            else:
                self._send_locked(frame)
                if self._cork is not None:
                    return  # another loop's turn is queueing: its frames left with ours
                self._cork_locked(loop)
                burst = False
        if burst:
            # Read the answers that came meanwhile, if this loop is the reader, so
            # that the leader's buffer of answers for us drains while we send (it
            # drops a follower that stops reading).
            self._read_if_reader(loop, None if loop is self._home else loop)
        else:
            self._uncork_later(loop)

    def _cork_locked(self, loop: asyncio.AbstractEventLoop) -> None:
        self._cork = loop
        self._corks += 1

    def _flush_locked(self) -> None:
        """Send the frames a loop turn queued, unless the connection is over: they
        never left then, and fail as NotSentError (safe to send again)."""
        try:
            self._check_open()
        except NotSentError as exc:
            self.abort(exc)  # whoever reads the end fails them, as not sent
            raise
        self._send_locked(b"")

    def _uncork_later(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon(self._uncork, loop)
        with self._reg_lock:
            watch, self._watch_armed = not self._watch_armed, True
        if watch:
            self._arm_watch()

    def _precork(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``, which just settled answers: the callers they resume run next
        turn, and the requests they make then leave together, in one send() at the
        end of that turn (the _uncork is queued behind their wake-ups)."""
        with self.send_lock:
            if self._cork is not None:
                return
            self._cork_locked(loop)
        self._uncork_later(loop)

    def _uncork(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Send what a loop turn queued (on that loop; or on the home loop for a
        loop that stalled or closed with frames queued)."""
        with self.send_lock:
            if self._cork is not loop:
                return
            self._cork = None
            if not self._wbuf:
                return
            try:
                self._flush_locked()
            except ConnshareError as exc:
                # The connection is aborted: the reader fails every request in it.
                log.debug("sending queued requests failed: %r", exc)

    def _send_slow(self, rest: memoryview, timeout: float) -> None:
        deadline = time.monotonic() + timeout
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
        # Read our own answer when nobody else is reading.
        ep, rtoken = self._ep, self._rtoken
        reading = ep is not None and rtoken.acquire(False)
        if reading and self._role is not None:
            self._reclaim_closed_role()
            self._drop_role_of_blocked_loop()
            if self._role is not None:  # an event loop reads: it answers us
                rtoken.release()
                reading = False
        if not reading:
            return self._request_read_elsewhere(rid, frame, timeout)
        # _arm() inline, twice: each call meets cold caches after the wait, and
        # a frame costs more then than the few lines it would save.
        try:
            # The home loop stands aside until we are done. Before the send: with
            # other threads about, this one may get the GIL back only after the
            # answer came, and the home loop would spin on it meanwhile.
            try:
                ep.modify(self._fd, 0)
            except (OSError, ValueError):
                pass  # the connection ended and its socket is closed
            deadline = time.monotonic() + timeout  # the send is part of the call
            p = self._send_then_pend(rid, frame)
            mine = self._read_own_answer(p.lock, rid, deadline)
            if mine is not None:
                if self.draining and not self.pending:
                    self.close()
                return mine[2]
        except BaseException:
            self.pending.pop(rid, None)  # interrupted: nobody takes its answer now
            raise
        finally:
            try:
                ep.modify(self._fd, _EPOLLIN)  # data that came meanwhile wakes the home loop
            except (OSError, ValueError):
                pass
            rtoken.release()
        return self._outcome(rid, p, deadline, timeout)

    def _read_own_answer(self, lock: Any, rid: int, deadline: float) -> list | None:
        """request_sync's reads, until its answer comes (returned if it came alone
        in its read), ``lock`` (its Pending's) is released, or ``deadline``.

        A frame of its own, with no handler: CPython 3.13 and 3.14 can raise an
        interrupt (Ctrl-C) that lands on a loop's backward jump past every handler
        of the frame it lands in (python/cpython#130279), and a caller waits here
        for most of its call. Raised here, it reaches request_sync's handlers,
        which give the read token back."""
        spin = self._spin
        while lock.locked() and not self._finished and time.monotonic() < deadline:
            if spin is None:
                mine = self._read_once(0, rid)
            else:  # first poll, then (if that found nothing) sleep in recv
                mine = self._poll_for(spin, rid, deadline)
                spin = None
            # Our answer, alone in its read, goes straight back to us; unless the
            # request was failed meanwhile (its lock tells the outcome).
            if mine is not None and self.pending.pop(rid, None) is not None:
                return mine
        return None

    def _send_then_pend(self, rid: int, frame: bytes, *pending: Any) -> Pending:
        """With the read token held: send request ``rid``, then make its
        ``Pending(*pending)``. Nobody reads the answer before us, so what the
        caller needs only once it comes is made while the leader works instead
        of before the send; a placeholder holds the request's place meanwhile."""
        self.pending[rid] = _SENDING
        try:
            self.send(frame)
        except BaseException:
            self.pending.pop(rid, None)
            raise
        p = Pending(*pending)
        self.pending[rid] = p
        if self.unresponsive and not p.internal:  # marked while we sent, before it could fail us
            self.pending.pop(rid, None)  # unless it failed it just now
            raise LeaderUnresponsiveError(self.peer_pid, "no heartbeat answer")
        return p

    def _request_read_elsewhere(self, rid: int, frame: bytes, timeout: float) -> Any:
        """A blocking caller's request while another thread reads the socket."""
        p = Pending()
        self.pending[rid] = p
        deadline = time.monotonic() + timeout
        try:
            self.send(frame)
        except BaseException:
            self.pending.pop(rid, None)
            raise
        return self._outcome(rid, p, deadline, timeout)

    def _outcome(self, rid: int, p: Pending, deadline: float, timeout: float) -> Any:
        """Wait (until ``deadline``) for whoever reads to settle ``p``."""
        lock: Any = p.lock
        try:
            got = not lock.locked() or lock.acquire(True, max(deadline - time.monotonic(), 0.0))
        except BaseException:
            self.pending.pop(rid, None)  # interrupted: nobody takes its answer now
            raise
        if not got:
            if self.pending.pop(rid, None) is not None:
                raise CallTimeoutError(f"no answer from the leader (pid {self.peer_pid}) within {timeout:.3g} s")
            # answered meanwhile; the lock is (being) released
            if not lock.acquire(True, max(timeout, 1.0)):  # never expected: a bound, not a hang
                raise CallTimeoutError(f"the answer from the leader (pid {self.peer_pid}) was read but not delivered")
        return p.outcome()

    def forget_epoll(self) -> None:
        """In a forked child: close our copy of the epoll descriptor."""
        if self._ep is not None:
            self._ep.close()

    def _arm(self, events: int) -> None:
        """Let the home loop wait for data (EPOLLIN) or not (0)."""
        try:
            self._ep.modify(self._fd, events)
        except (OSError, ValueError):
            pass  # the connection ended and its socket is closed

    def request_async(
        self,
        wire_without_rid: list,
        loop: asyncio.AbstractEventLoop,
        hook: Callable[[Any], None] | None = None,
        internal: bool = False,
        deadline: float | None = None,
        timeout: float = 0.0,
    ) -> tuple[int, asyncio.Future]:
        """Send a request from a coroutine on ``loop``; returns its id and a future on
        ``loop``. With ``deadline`` (``time.monotonic()``), the future fails with
        CallTimeoutError then, unless answered."""
        # Queue behind this loop's turn when it is corked (_precork: a read answered
        # several of its callers, and the first of their new requests would
        # otherwise leave alone, none being left in flight, to be answered alone),
        # or while other requests are in flight.
        corked = self._cork is loop
        busy = corked or bool(self.pending)
        # A queued frame is looked at when its queue is sent (_flush_locked).
        self.check_usable(peek=not corked)
        rid = next(self._rids)
        wire_without_rid[1] = rid
        frame = self.codec.pack(wire_without_rid)
        if self._role is not loop and loop is not self._home and self._ep is not None:
            self._take_role(loop)
        in_place = self._in_place
        if in_place is not None and not busy and self._role is loop and self._rtoken.acquire(False):
            try:
                if self._role is loop:  # still: nobody reads before we do
                    return self._request_in_place(in_place, rid, frame, loop, hook, internal, deadline, timeout)
            finally:
                self._rtoken.release()
        p = Pending(loop, hook, internal, deadline, timeout)
        self.pending[rid] = p
        if in_place is not None:
            in_place.run = 0  # this request yields to the loop
        try:
            if busy:
                self._send_in_turn(frame, loop, rid)
            else:
                self.send(frame)
        except BaseException:
            self.pending.pop(rid, None)
            raise
        if deadline is not None:
            self._deadlines.arm(loop, deadline)
        return rid, p.fut  # type: ignore[return-value]

    def _request_in_place(
        self,
        in_place: InPlace,
        rid: int,
        frame: bytes,
        loop: asyncio.AbstractEventLoop,
        hook: Callable[[Any], None] | None,
        internal: bool,
        deadline: float | None,
        timeout: float,
    ) -> tuple[int, asyncio.Future]:
        """request_async on ``loop``, the reader, with the read token held: send
        first, then wait for the answer in place if the loop has nothing else to
        run (see _inplace)."""
        p = self._send_then_pend(rid, frame, loop, hook, internal, deadline, timeout)
        fut: asyncio.Future = p.fut  # type: ignore[assignment]
        try:
            until = in_place.until(loop, deadline)
            if until:
                self._wait_in_place(in_place, fut, rid, loop, until)
            else:
                in_place.run = 0  # this request yields to the loop
        except BaseException:
            self.pending.pop(rid, None)
            raise
        if deadline is not None and not fut.done():
            self._deadlines.arm(loop, deadline)
        return rid, fut

    def _wait_in_place(self, in_place: InPlace, fut: asyncio.Future, rid: int, loop: asyncio.AbstractEventLoop, until: float) -> None:
        """On ``loop``'s thread, the reader, request ``rid`` sent: read until its
        answer settles ``fut`` or ``until`` passes (the loop's selector then reads
        it, as for any awaited request)."""
        spin = self._spin
        while not fut.done() and not self._finished:
            self._here = loop
            try:
                if spin is not None:  # first poll, then (if that found nothing) sleep in select()
                    mine = self._poll_for(spin, rid, until)
                    spin = None
                else:
                    left = until - time.monotonic()
                    # select(), not the socket's timeout: SO_RCVTIMEO counts in jiffies (8 ms here)
                    if left <= 0 or not select.select((self._fd,), (), (), left)[0]:
                        in_place.missed()
                        return
                    mine = self._read_once(_DONTWAIT, rid)
            finally:
                self._here = None
            if mine is not None and self.pending.pop(rid, None) is not None:
                fut.set_result(mine[2])
                if self.draining and not self.pending:
                    self.close()
                break
        in_place.answered()

    def _poll_for(self, spin: Spin, rid: int, limit: float) -> list | None:
        """With the read token held, request ``rid`` sent: read without sleeping
        until ``spin_wait`` or ``limit`` (``time.monotonic()``) passes. Returns what
        ``_read_once`` does for ``rid``; None as well once its answer was handled
        with other frames, the connection ended, or the time ran out."""
        until = spin.until()
        if not until:
            return None
        until = min(until, limit)
        pending = self.pending
        while True:
            mine = self._read_once(_DONTWAIT, rid)
            if mine is not None or rid not in pending or self._finished:
                spin.answered()
                return mine
            if time.monotonic() >= until:
                spin.missed()
                return None

    # -- deadlines of awaited requests ------------------------------------------------------

    def _expire_due(self, loop: asyncio.AbstractEventLoop, now: float) -> float | None:
        """On ``loop``: fail its requests past their deadline; the next deadline."""
        upcoming: float | None = None
        for rid, p in list(self.pending.items()):
            if p.loop is not loop or p.deadline is None:
                continue
            if p.deadline > now:
                if upcoming is None or p.deadline < upcoming:
                    upcoming = p.deadline
            elif self.pending.pop(rid, None) is p and not p.fut.done():  # type: ignore[union-attr]
                p.fut.set_exception(  # type: ignore[union-attr]
                    CallTimeoutError(f"no answer from the leader (pid {self.peer_pid}) within {p.timeout:.3g} s")
                )
        return upcoming

    # -- an event loop as the reader -------------------------------------------------------

    def _take_role(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``'s thread: become the reader if nobody else is reading."""
        if not self._rtoken.acquire(False):
            return
        watch = False
        try:
            self._reclaim_closed_role()
            with self._reg_lock:
                if self._role is not None or self._finished or self._home_closed:
                    return
                loop.add_reader(self._fd, self._loop_read, loop)
                self._watching.add(loop)
                # libuv (uvloop) makes a watched fd non-blocking, for good: a caller
                # reading its own answer needs a blocking recv (with SO_RCVTIMEO)
                self.sock.setblocking(True)
                self._arm(0)
                self._role = loop
                watch, self._watch_armed = not self._watch_armed, True
        except (NotImplementedError, RuntimeError, OSError):
            pass  # a loop without add_reader: the home loop reads
        finally:
            self._rtoken.release()
        if watch:
            self._arm_watch()

    def _reclaim_closed_role(self) -> None:
        """Free the reader role of an event loop that closed holding it (an
        ``asyncio.run()`` that ended), for the caller about to take it: its selector
        is gone, and nobody would read until the next watch tick."""
        with self._reg_lock:
            role = self._role
            if role is not None and role.is_closed():
                self._role = None
                self._watching.discard(role)
                self._arm(_EPOLLIN)

    def _drop_role_of_blocked_loop(self) -> None:
        """With the read token held, in a blocking caller: if the loop holding the
        reader role is this thread's own (a blocking call inside a coroutine), that
        loop cannot read until the call returns; the caller reads instead, rather
        than wait for connshare's loop to find the role stalled (over 0.5 s)."""
        role = self._role
        if role is None or role is not asyncio._get_running_loop():
            return
        with self._reg_lock:
            if self._role is not role:
                return
            self._role = None
            self._arm(_EPOLLIN)
        self._unwatch(role)
        log.debug("a blocking call on the event loop that reads the leader connection; it reads for itself")

    def _arm_watch(self) -> None:
        try:
            self._home.call_soon_threadsafe(self._watch_tick)
        except RuntimeError:
            pass  # connshare's loop is gone: the process is exiting

    def _loop_read(self, loop: asyncio.AbstractEventLoop) -> None:
        """``loop``'s reader callback: one read, futures of this loop settled here."""
        # The token is held for one read at most while a loop has the role (blocking
        # callers then do not read), so waiting for it is short. Re-check the role
        # while waiting: if it was taken back, a blocking caller may hold the token
        # for a whole call.
        while not self._rtoken.acquire(True, 0.005):
            if self._role is not loop:
                self._unwatch(loop)
                return
        try:
            if self._role is not loop:
                self._unwatch(loop)
                return
            self._here, self._got_mine = loop, False
            try:
                self._read_once(_DONTWAIT)
            finally:
                self._here = None
            if self._finished or not self._got_mine:
                self._role = None
                self._arm(_EPOLLIN)
                self._unwatch(loop)
        finally:
            self._rtoken.release()

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``'s thread: stop watching the socket; close it if it was left
        open for this."""
        with self._reg_lock:
            if loop in self._watching:
                self._watching.discard(loop)
                try:
                    loop.remove_reader(self._fd)
                except (RuntimeError, OSError, ValueError):
                    pass
            close = self._close_deferred and not self._watching
        if close:
            self._close_sock()

    def _watch_tick(self) -> None:
        """On the home loop, every _WATCH_S while a loop has the role or queues
        frames: send frames a loop queued and then stalled on (or closed), and take
        the role back from a loop that closed, or that leaves data unread (it is
        blocked by the app's code), so that other callers, events and heartbeats
        go on."""
        with self._reg_lock:
            role = self._role
            if (role is None and self._cork is None) or self._finished:
                self._watch_armed = False
                return
        self._home.call_later(_WATCH_S, self._watch_tick)
        cork = self._cork
        if cork is not None and (self._corks == self._corks_seen or cork.is_closed()):
            self._uncork(cork)
        self._corks_seen = self._corks
        if role is None:
            return
        reading = time.monotonic() - self.last_rx < _STALL_S
        if not role.is_closed() and (reading or not self.has_unread()):
            return  # the loop reads, or is only idle
        if not self._rtoken.acquire(False):
            return  # the role loop is reading after all
        try:
            if self._role is not role:
                return
            self._role = None
            self._arm(_EPOLLIN)
        finally:
            self._rtoken.release()
        log.debug("an event loop holding the leader connection's reader role stalled; connshare's loop reads")
        try:
            role.call_soon_threadsafe(self._unwatch_if_not_role, role)
        except RuntimeError:  # a closed loop: its selector is gone with it
            with self._reg_lock:
                self._watching.discard(role)

    def _unwatch_if_not_role(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._role is not loop:
            self._unwatch(loop)

    def has_unread(self) -> bool:
        """Whether the leader sent something not read yet (it is alive, the
        reader is late)."""
        try:
            self.sock.recv(1, _PEEK)  # data, or b"" for the end: either waits for a read
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def forget(self, rid: int) -> None:
        self.pending.pop(rid, None)

    def withdraw(self, rid: int) -> None:
        """The caller of request ``rid`` was cancelled: forget the request and, if
        it was not answered yet, ask the leader to cancel the call. Never raises: the
        caller is on its way out with its CancelledError."""
        if self.pending.pop(rid, None) is None:
            return  # answered (or failed) already
        try:
            self.send(self.codec.pack([MsgType.CANCEL, rid]))
        except Exception as exc:  # the connection is over: so is the call
            log.debug("CANCEL of request %s not sent: %r", rid, exc)
        if self.draining and not self.pending:
            self.close()  # as when its last answer comes

    def send_oneway(self, wire: list) -> None:
        self.check_usable()
        self.send(self.codec.pack(wire))

    # -- reading ------------------------------------------------------------------------

    def _home_read(self) -> None:
        """The home loop's reader callback: the default reader."""
        if self._finished:
            self._close_home()
            return
        self._read_if_reader(self._home, None, True)

    def _read_if_reader(self, loop: asyncio.AbstractEventLoop, role: asyncio.AbstractEventLoop | None, listeners_now: bool = False) -> None:
        """One read on ``loop``'s thread, if the reader role is ``role`` (None:
        connshare's loop reads) and nobody else is reading now (they disarm us, or
        are about to). ``listeners_now`` (the home loop's reader callback): run the
        listeners of the events read on this loop in this turn, not the next."""
        if not self._rtoken.acquire(False):
            return
        now: list | None = None
        try:
            if self._role is role and not self._finished:
                self._here = loop
                if listeners_now:
                    now = self._now = []
                try:
                    self._read_once(_DONTWAIT)
                finally:
                    self._here = None
                    self._now = None
        finally:
            self._rtoken.release()
            if now:
                # One loop pass less per event (a fifth of a follower's work per
                # event), and the read token is free while app code runs.
                for listener, value in now:
                    listener.run(value)

    def _close_home(self) -> None:
        """On the home loop, once the connection is over: stop watching, close the
        epoll set, and the socket once no other loop's selector watches it."""
        if self._home_closed:
            return
        self._home_closed = True
        try:
            self._home.remove_reader(self._home_fd)
        except (RuntimeError, OSError, ValueError):
            pass
        self._release_fds()

    def _release_fds(self) -> None:
        if self._ep is not None:
            self._ep.close()
        with self._reg_lock:
            self._unwatch_all()
            self._close_deferred = bool(self._watching)
        if not self._close_deferred:
            self._close_sock()

    def _unwatch_all(self) -> None:
        """Under ``_reg_lock``: have every loop watching the socket stop. A loop in
        a frame of its own, so that an interrupt cannot skip the lock's release
        (see _read_own_answer)."""
        for loop in list(self._watching):
            try:
                loop.call_soon_threadsafe(self._unwatch, loop)
            except RuntimeError:
                self._watching.discard(loop)

    def _close_sock(self) -> None:
        with self.send_lock:  # no sender may hold the fd number while it is reused
            try:
                self.sock.close()
            except OSError:
                pass

    def _read_once(self, flags: int, rid: int = -1) -> list | None:
        """One recv and the frames it completes (with the read token held). With
        ``rid``, a blocking caller reading its own answer: a read that brings
        that RESULT alone returns it unhandled, for the caller to take."""
        # A KeyboardInterrupt (or any exception) can land in a reading caller as
        # its recv returns, before what it read is handled: those frames would be
        # gone, the connection looking fine (a SUBSCRIBE's answer lost is a
        # subscription that never hears a value). While that may have happened,
        # end the connection instead: the node reconnects and resubscribes.
        unsure = True
        try:
            try:
                n = self.sock.recv_into(self._buf, 0, flags)
            except (BlockingIOError, InterruptedError):
                unsure = False
                return None  # nothing yet; or a reading caller's time slice passed
            except OSError as exc:
                unsure = False
                self._finish(LeaderLostError(f"connection to the leader broke: {exc}"))
                return None
            if not n:
                unsure = False
                self._finish(LeaderLostError("the leader closed the connection"))
                return None
            self.last_rx = time.monotonic()
            if self.unresponsive:
                self.unresponsive = False
                log.info("the leader (pid %s) answers again", self.peer_pid)
            return self._consume(self._view[:n], rid)
        except BaseException as exc:
            if unsure:
                self.abort(LeaderLostError(f"reading was interrupted by {exc!r}"))
            raise

    def _consume(self, data: memoryview | None, rid: int = -1) -> list | None:
        try:
            if data is not None:
                msgs = self.decoder.feed(data)
                if len(msgs) == 1 and not self._backlog:
                    wire = msgs[0]
                    if wire[0] == T_RESULT:
                        if wire[1] == rid:
                            return wire
                        # One answer to a coroutine of the loop that reads: settled
                        # here, as _drain would, minus its backlog, batch and dispatch.
                        p = self.pending.get(wire[1])
                        here = self._here
                        if p is not None and p.loop is here and here is not None and p.hook is None:
                            del self.pending[wire[1]]
                            self._answer(p, True, wire[2], None)
                            self._settled_mine(1)
                            if self.draining and not self.pending:
                                self.close()
                            return None
                self._backlog.extend(msgs)
            self._drain()
        except ProtocolError as exc:
            log.error("leader (pid %s) broke the protocol: %s", self.peer_pid, exc)
            self._finish(exc)
        except (NotSentError, LeaderUnresponsiveError) as exc:  # a PONG found the connection broken
            self._finish(exc)
        except Exception as exc:
            log.exception("connshare reader failed")
            self._finish(exc)
        # (an interrupt of a reading caller here ends the connection: _read_once)
        return None

    def _drain(self) -> None:
        """Handle the frames read so far; those left by an interrupted reader first."""
        backlog = self._backlog
        batch: dict = {}
        self._settled_here = 0
        try:
            self._handle_all(backlog, batch)
        finally:
            for loop, items in batch.items():
                _wake(loop, items)
            if self._settled_here:
                self._settled_mine(self._settled_here)

    def _handle_all(self, backlog: deque[list], batch: dict) -> None:
        # A loop in a frame of its own: an interrupt of a reading caller must not
        # skip _drain's wake-ups (see _read_own_answer).
        while backlog:
            self._handle(backlog.popleft(), batch)

    def _settled_mine(self, mine: int) -> None:
        """A read settled ``mine`` answers of the reading loop's own callers in place."""
        self._got_mine = True
        if mine > 1 or self.pending:  # not for a lone caller
            self._precork(self._here)  # type: ignore[arg-type]

    _settled_here = 0
    #: listeners to run once the home loop's read is done (see _read_if_reader)
    _now: list | None = None

    def _answer(self, p: Pending, ok: bool, value: Any, batch: dict | None) -> None:
        """Settle ``p``: in place if the reading loop is its caller's (that caller's
        wake-up is queued on this loop either way), else through ``batch``."""
        fut = p.fut
        if fut is not None and p.loop is self._here:
            self._settled_here += 1
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(awaitable(value))
        else:
            p.settle(ok, value, batch)

    def _handle(self, wire: list, batch: dict | None = None) -> None:
        t = wire[0]
        if t == T_RESULT:
            p = self.pending.pop(wire[1], None)
            if p is not None:
                if p.hook is not None:
                    try:
                        p.hook(wire[2])
                    except Exception as exc:  # popped: settle it, or its caller waits for good
                        err = ProtocolError(f"the leader's answer to an internal request is malformed: {exc!r}")
                        self._answer(p, False, err, batch)
                        raise err from exc
                self._answer(p, True, wire[2], batch)
        elif t == MsgType.EVENT:
            sub = self.keys.get(wire[1])
            if sub is not None and not self.parted:
                sub.deliver(wire[2], self._now)
        elif t == MsgType.ERROR:
            msg = Error(*wire[1:])
            if msg.rid == 0:
                raise ProtocolError(f"the leader closed the connection: {msg.message}")
            p = self.pending.pop(msg.rid, None)
            if p is not None:
                self._answer(p, False, exception_from(msg, self.peer_pid), batch)
        elif t == MsgType.PING:
            self.send(self.codec.pack([MsgType.PONG, wire[1]]))
        elif t == MsgType.PONG:
            pass
        elif t in (MsgType.GOODBYE, MsgType.CHANNEL_ERROR, MsgType.SUB_ERROR):
            if t == MsgType.GOODBYE:
                # The next leader has the subscriptions from now on: values this
                # one still sends would interleave with its (older after newer).
                self.parted = True
            self._on_frame(self, wire, self._now)
        else:
            raise ProtocolError(f"unexpected {MsgType(t).name} from the leader")
        if self.draining and not self.pending:
            self.close()

    # -- ending --------------------------------------------------------------------------

    def fail_pending(self, exc_factory: Callable[[int], BaseException], internal_too: bool = True) -> None:
        if internal_too:
            failed, self.pending = self.pending, {}
        else:
            failed = {rid: p for rid, p in list(self.pending.items()) if not p.internal}
            for rid in failed:
                self.pending.pop(rid, None)
        for rid, p in failed.items():
            p.settle(False, exc_factory(rid))

    def mark_unresponsive(self) -> None:
        if not self.unresponsive:
            self.unresponsive = True
            log.warning("the leader (pid %s) stopped answering heartbeats", self.peer_pid)
            # The app's calls fail fast; connshare's own REGISTER/SUBSCRIBE wait for
            # the leader to wake or the connection to end (then they are redone).
            self.fail_pending(lambda _rid: LeaderUnresponsiveError(self.peer_pid, "no heartbeat answer"), internal_too=False)

    def abort(self, exc: BaseException) -> None:
        """Break the connection now; whoever reads next reports the loss."""
        if self.lost is None:
            self.lost = exc
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.abort(ConnshareError("closed"))

    def _finish(self, reason: BaseException) -> None:
        """The connection is over (whoever read the end): fail what waits, report
        the loss once. The home loop closes the socket."""
        if self._finished:
            return
        self._finished = True
        if self.lost is None:
            self.lost = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # readable now: its reader wakes
        except OSError:
            pass
        with self.send_lock:  # what still waits to be sent never will be
            unsent = self._unsent.union(self._wrids)
            self._wbuf, self._wrids, self._unsent = bytearray(), [], set()
        pid = self.peer_pid
        closed_here = isinstance(self.lost, ClientClosedError)

        def error(rid: int) -> BaseException:
            if rid in unsent:
                return NotSentError(f"the connection to the leader (pid {pid}) ended before the request was sent")
            if closed_here:  # the leader is fine: this process left it
                return ClientClosedError(f"the client was closed with the call in flight; it may or may not have run (leader pid {pid})")
            return LeaderLostError(f"the leader (pid {pid}) went away with the call in flight; it may or may not have run")

        self.fail_pending(error)
        self._on_lost(self, self.lost)
        try:
            self._home.call_soon_threadsafe(self._close_home)
        except RuntimeError:  # connshare's loop is closed: its selector is gone too
            self._home_closed = True
            self._release_fds()
