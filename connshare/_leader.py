"""The leader's end of each follower connection, over the sans-I/O core.

Reads run on connshare's loop (``add_reader``). Writes may come from any thread: a
worker thread that ran a blocking method writes its answer straight to the socket
under the peer's lock, instead of handing it back to the loop first. Bytes the
socket does not take at once wait in a bounded buffer that the loop flushes.

A peer that breaks the protocol, fails the handshake, floods, or stops reading is
dropped with a logged reason; every other follower keeps being served."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from ._errors import (
    ChannelNotFoundError,
    ConnshareError,
    EncodeError,
    FrameTooLargeError,
    LimitExceededError,
    ProtocolError,
)
from ._host import ChannelHost, KeyState
from ._loop import add_reader_in_place
from ._polling import waits
from ._protocol import (
    MAX_HANDSHAKE_FRAME,
    ONEWAY,
    T_INVOKE,
    T_RESULT,
    ErrorCode,
    FrameDecoder,
    HandshakeState,
    LeaderHandshake,
    MessageDecoder,
    MsgType,
    to_message,
)
from ._remote import code_for, error_message, pushed_error, unsendable_result
from ._runner import Abandoned

if TYPE_CHECKING:
    from ._node import Node

log = logging.getLogger("connshare.leader")


#: how long after a hang-up in the handshake the peer's process is looked for
HANGUP_CHECK_S = 0.5


def _report_hangup(addr: Any, pid: int | None) -> None:
    """Log a peer that hung up on our proof: a warning if its process lives on
    (most likely another secret), else a note (it was exiting). A peer in another
    pid namespace may be missed: it then raised AuthenticationError itself."""
    import psutil  # rarely needed: not worth its memory in every worker

    try:
        alive = pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        alive = False
    if alive:
        log.warning("leader: peer %s (pid %s) hung up during the handshake and lives on: another secret, or it closed just then", addr, pid)
    else:
        log.info("leader: peer %s (pid %s) hung up during the handshake as it exited", addr, pid)


class PeerProtocol:
    """One follower, as the leader sees it."""

    def __init__(self, node: Node, sock: socket.socket) -> None:
        self.node = node
        self.loop = node.loop
        self.codec = node.codec
        self.options = node.options
        # Until the peer has proved it knows the secret, a frame can only be a
        # handshake message: a stranger must not make us buffer max_frame_size.
        self.decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        #: the open connection's messages: set once the handshake is done
        self.stream: MessageDecoder | None = None
        self.handshake = LeaderHandshake(node.secret, node.options.max_frame_size)
        #: the largest message this peer takes (set from its AUTH): a larger answer
        #: or value is refused here, rather than end its connection there
        self.out_limit = node.options.max_frame_size
        self.sock = sock
        self.fd = sock.fileno()
        self.addr: Any = sock.getpeername()
        self.closed = False
        self.channels: dict[int, ChannelHost] = {}
        self.subs: dict[int, tuple[ChannelHost, KeyState]] = {}
        # Requests in flight: those run on the loop (counted there, no lock) and
        # those run by worker threads (counted under _wlock).
        self.inflight_loop = 0
        self.inflight_threads = 0
        self._refused = 0  # requests refused for max_inflight_per_follower
        self._tasks: set[asyncio.Task] = set()  # pending REGISTERs, ended with the peer
        self.last_rx = time.monotonic()
        self._wlock = threading.Lock()
        self._wbuf = bytearray()
        self._hs_timer: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def open(self) -> bool:
        """The handshake is done."""
        return self.stream is not None

    @property
    def inflight(self) -> int:
        return self.inflight_loop + self.inflight_threads

    @property
    def pid(self) -> int | None:
        return self.handshake.peer_pid

    def start(self) -> None:
        """Begin serving (on the loop)."""
        # Peers still in the handshake do not count towards max_followers (anyone
        # can connect; see _handshake_step), but so many at once are refused: such a
        # refusal, made before we prove the secret, only makes a follower try again.
        if len(self.node.peers) >= 2 * self.options.max_followers:
            self.node.peers.add(self)
            self._refuse(LimitExceededError(f"{len(self.node.peers) - 1} connections at once; try again"), ErrorCode.LIMIT)
            return
        self.node.peers.add(self)
        add_reader_in_place(self.loop, self.fd, self._on_readable)
        self._hs_timer = self.loop.call_later(self.options.connect_timeout, self._handshake_timeout)

    # -- the socket (loop side) --------------------------------------------------------

    def _on_readable(self) -> None:
        # recv_into one buffer per leader: recv(256 KiB) would mmap and munmap a
        # fresh block on every read.
        buf = self.node.read_buffer
        try:
            n = self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"read failed: {exc}")
            return
        if not n:
            if not self.open and self.handshake.state is HandshakeState.SENT_CHALLENGE:
                # What a connshare follower with another secret does on our proof;
                # or one that was leaving just then (a worker recycled as it
                # connected). Which, its pid tells a moment later.
                self.loop.call_later(HANGUP_CHECK_S, _report_hangup, self.addr, self.pid)
            self._lost("closed the connection in the middle of a message" if (self.stream or self.decoder).buffered else None)
            return
        self.data_received(memoryview(buf)[:n])

    def _on_writable(self) -> None:
        with self._wlock:
            if self.closed:
                return
            try:
                n = self.sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.loop.call_soon(self._lost, f"write failed: {exc}")
                return
            del self._wbuf[:n]
            if not self._wbuf:
                self._writer_armed = False
                self.loop.remove_writer(self.fd)
                if self._closing_after_flush:
                    self.loop.call_soon(self._lost, None)

    _closing_after_flush = False
    _corked = False
    _writer_armed = False

    def _lost(self, reason: str | None) -> None:
        """The connection is over (on the loop): release everything it held."""
        if reason is not None and not self.closed:
            log.debug("peer %s (pid %s): %s", self.addr, self.pid, reason)
        self.closed = True
        if self.fd < 0:
            return
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        with self._wlock:
            self.fd = -1
            self._wbuf.clear()
            self.sock.close()
        self.node.peers.discard(self)
        for host, ks in self.subs.values():
            host.unsubscribe(ks, self)
        self.subs.clear()
        for host in self.channels.values():
            host.peers.discard(self)
        self.channels.clear()
        if self.open:
            log.debug("follower pid %s at %s left", self.pid, self.addr)
        self.node.on_peer_gone(self)

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            stream = self.stream
            if stream is None:
                data = self._handshake_data(data)
                stream = self.stream
                if stream is None or not data:
                    return
            for wire in stream.feed(data):
                if self.closed or self._closing_after_flush:
                    return  # being closed: nothing more it sends is read
                # Calls skip _dispatch's frame: a call after an idle wait meets
                # cold caches, where each Python frame costs a fraction of a µs.
                if wire[0] == T_INVOKE:
                    self._invoke(wire)
                else:
                    self._dispatch(wire)
        except ProtocolError as exc:
            self.drop(f"protocol error: {exc}")
        except Exception as exc:  # a bug of ours must not take the leader down
            log.exception("leader: handling a frame from %s failed", self.addr)
            self.drop(f"internal error: {exc!r}")
        finally:
            self.node.runner.kick()  # the coroutine calls this read brought
            self.last_rx = time.monotonic()  # after the answers: nobody waits on it

    # -- sending (any thread) --------------------------------------------------------------

    def write(self, frame: bytes, on_loop: bool | None = None) -> None:
        """Send ``frame`` from any thread (``on_loop``: whether this is the loop's
        thread, if the caller knows)."""
        over = False
        if on_loop is None:
            on_loop = self.node.on_loop()
        with self._wlock:
            if self.closed or self.fd < 0:
                return
            if self._wbuf or self._corked:
                # Behind a backlog, or a write this loop turn already went out:
                # queue it, to leave in one send() with the others (_uncork).
                # Judge the backlog before this frame: one frame larger than the
                # limit, to a follower that keeps up, is no reason to drop it.
                over = len(self._wbuf) > self.options.max_buffered_bytes
                if not over:
                    self._wbuf += frame
            elif on_loop and (runner := self.node.runner).running and runner.queue:
                # More calls of this read run next: their answers leave together
                # when the batch ends. The last (or only) call's answer needs no cork.
                self._wbuf += frame
                self._corked = True
                runner.after_batch(self._uncork)
            else:
                try:
                    n = self.sock.send(frame)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    return  # the reader sees the broken socket and cleans up
                if n < len(frame):
                    self._wbuf += memoryview(frame)[n:]
                    self._arm_writer()
                elif on_loop and not self.node.runner.running:
                    # The first answer of a loop turn goes at once (no latency
                    # cost); the rest of this turn's answers are batched.
                    self._corked = True
                    self.loop.call_soon(self._uncork)
        if over:
            self.drop(f"follower is not reading: over max_buffered_bytes={self.options.max_buffered_bytes} queued")

    def _uncork(self) -> None:
        """Send what this loop turn queued, in one send() (on the loop)."""
        with self._wlock:
            self._corked = False
            if self.closed or self.fd < 0 or not self._wbuf or self._writer_armed:
                return
            try:
                n = self.sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return
            del self._wbuf[:n]
            if self._wbuf:
                self._arm_writer()

    def _arm_writer(self) -> None:
        """Have the loop flush the backlog when the socket can take it (under _wlock)."""
        if self._writer_armed:
            return
        self._writer_armed = True
        if self.node.on_loop():
            self.loop.add_writer(self.fd, self._on_writable)
        else:
            self.loop.call_soon_threadsafe(self._arm_writer_on_loop)

    def _arm_writer_on_loop(self) -> None:
        if self.fd >= 0 and self._wbuf:
            self.loop.add_writer(self.fd, self._on_writable)

    def send(self, wire: list) -> None:
        self.write(self.codec.pack(wire))

    def drop(self, reason: str) -> None:
        """Disconnect this peer now (from any thread), logging why."""
        if self.closed:
            return
        self.closed = True
        log.warning("leader: dropping peer %s (pid %s): %s", self.addr, self.pid, reason)
        if self.node.on_loop():
            self._lost(reason)
        else:
            self.loop.call_soon_threadsafe(self._lost, reason)

    def close_after_flush(self) -> None:
        """Close once queued bytes are out (on the loop)."""
        with self._wlock:
            queued = bool(self._wbuf)
            if queued:
                self._closing_after_flush = True
                self._arm_writer()  # its flush closes; corked bytes have no writer yet
        if not queued:
            self._lost(None)

    def _refuse(self, exc: Exception, code: int) -> None:
        log.warning("leader: refusing peer %s: %s", self.addr, exc)
        self.write(self.codec.encode(error_message(0, exc, code)))
        self.close_after_flush()

    # -- handshake --------------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        if not self.open:
            self.drop("no handshake within connect_timeout")

    def _handshake_data(self, data: bytes | memoryview) -> bytes:
        """Take the handshake's frames from ``data``; returns the bytes after the
        handshake, once it is done (messages of the open connection)."""
        decoder = self.decoder
        decoder.push(data)
        while not (self.closed or self._closing_after_flush):
            body = decoder.next()
            if body is None:
                return b""
            self._handshake_step(self.codec.unpack(body))
            if self.open:
                return decoder.rest()
        return b""

    def _handshake_step(self, wire: list) -> None:
        try:
            replies = self.handshake.receive(to_message(wire))
        except ConnshareError as exc:
            log.warning("leader: peer %s failed the handshake: %s", self.addr, exc)
            self.write(self.codec.encode(LeaderHandshake.reply_for(exc)))
            self.close_after_flush()
            return
        if self.handshake.state is HandshakeState.OPEN and self._followers_full():
            # Only now: a follower believes a refusal from a leader that has proven it
            # knows the secret, and strangers that never do cannot fill the places.
            self._refuse(LimitExceededError(f"the leader serves max_followers={self.options.max_followers} already"), ErrorCode.LIMIT)
            return
        for m in replies:
            self.write(self.codec.encode(m))
        if self.handshake.state is HandshakeState.OPEN:
            self.out_limit = min(self.out_limit, self.handshake.peer_max_frame_size or self.out_limit)
            self.stream = self.codec.decoder(self.options.max_frame_size)
            if self._hs_timer is not None:
                self._hs_timer.cancel()
            if self.node.leaving:
                self.send([MsgType.GOODBYE])

    def _followers_full(self) -> bool:
        return sum(1 for p in self.node.peers if p.open) >= self.options.max_followers

    # -- messages ---------------------------------------------------------------------------

    def _dispatch(self, wire: list) -> None:
        """Every message but INVOKE (data_received calls _invoke itself)."""
        t = wire[0]
        if t == MsgType.PING:
            self.send([MsgType.PONG, wire[1]])
        elif t == MsgType.PONG:
            pass
        elif t == MsgType.SUBSCRIBE:
            self._subscribe(wire)
        elif t == MsgType.UNSUBSCRIBE:
            entry = self.subs.pop(wire[1], None)
            if entry is not None:
                entry[0].unsubscribe(entry[1], self)
        elif t == MsgType.PUBLISH:
            self._publish(wire)
        elif t == MsgType.CANCEL:
            # A blocking method's call runs on to its end: a thread cannot be stopped.
            self.node.runner.withdraw(self._finish, wire[1])
        elif t == MsgType.REGISTER:
            # Not calls: one may wait for as long as this process takes to create
            # its channel. Bounded on their own, with the same limit.
            limit = self.options.max_inflight_per_follower
            if len(self._tasks) >= limit:
                self._error(wire[1], LimitExceededError(f"max_inflight_per_follower={limit} REGISTERs waiting"))
                return
            task = self.node.spawn(self._register(wire[1], wire[2], wire[3]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.drop(f"unexpected {MsgType(t).name} from a follower")

    def _error(self, rid: int, exc: BaseException) -> None:
        if rid:
            self.send(error_message(rid, exc, code_for(exc)).to_wire())

    def _admit(self, threaded: bool) -> None:
        """Count one more request in flight (to run on a worker thread, or on the
        loop), or raise LimitExceededError."""
        limit = self.options.max_inflight_per_follower
        if self.inflight_loop + self.inflight_threads >= limit:
            self._refused += 1
            if self._refused == 1:
                log.warning("leader: peer %s (pid %s) has %s requests in flight; refusing more", self.addr, self.pid, limit)
            raise LimitExceededError(f"max_inflight_per_follower={limit} calls in flight")
        if threaded:
            with self._wlock:
                self.inflight_threads += 1
        else:
            self.inflight_loop += 1

    async def _register(self, rid: int, name: str, cls: str) -> None:
        try:
            host = await self.node.host_for(name)
            ours = host.state.cls.__qualname__
            if cls != ours:
                # Another app's client under the same name on this port: serving it
                # would hand it our real client.
                log.warning("leader: pid %s asked for channel %r as a %s; it is a %s here", self.pid, name, cls, ours)
                raise ChannelNotFoundError(
                    f"channel {name!r} of the leader (pid {os.getpid()}) on port {self.options.port} is a {ours}, "
                    f"not a {cls}: another app uses this port and name; give each app its own port (port= or CONNSHARE_PORT)"
                )
        except Exception as exc:
            self._error(rid, exc)
            return
        if self.closed:
            return
        self.channels[host.id] = host
        host.peers.add(self)
        self.send([MsgType.RESULT, rid, host.id])

    def _host(self, channel: int) -> ChannelHost:
        host = self.channels.get(channel)
        if host is None:
            raise ChannelNotFoundError(f"channel id {channel} is not registered on this connection")
        return host

    def _subscribe(self, wire: list) -> None:
        _, rid, channel, method, reg = wire
        try:
            host = self._host(channel)
            if len(self.subs) >= self.options.max_subscriptions_per_follower:
                raise LimitExceededError(f"max_subscriptions_per_follower={self.options.max_subscriptions_per_follower}")
            ks = host.subscribe(method, reg, self.node.canonical(reg))
        except Exception as exc:
            self._error(rid, exc)
            return
        # Answer first: the follower must know the key id before its first EVENT.
        self.send([MsgType.RESULT, rid, ks.id])
        if ks.id not in self.subs:
            self.subs[ks.id] = (host, ks)
            host.attach(ks, self)
        else:  # a newer subscription of the follower's to a key it has: it wants the last value
            host.replay(ks, self)

    def push(self, ks: KeyState, value: Any) -> None:
        frame = ks.event_frame(self.codec)
        if frame is None:
            return
        if len(frame) > self.out_limit:
            # Sent, it would end the connection there; and the replay on the next
            # one would end that too. The follower's listeners hear why instead.
            hit = self.subs.get(ks.id)
            if hit is not None:
                self.send_channel_error(hit[0], _too_large(f"a value of {ks.method}({ks.reg!r})", len(frame), self.out_limit))
            return
        self.write(frame)

    def _publish(self, wire: list) -> None:
        _, channel, method, reg = wire
        try:
            self._host(channel).publish(method, reg)
        except Exception as exc:
            log.warning("leader: publish from pid %s failed: %r", self.pid, exc)

    def send_channel_error(self, host: ChannelHost, exc: BaseException) -> None:
        self.send(pushed_error(MsgType.CHANNEL_ERROR, host.id, exc))

    def refused(self, host: ChannelHost, ks: KeyState, exc: BaseException) -> None:
        """As a sink: the real client refused ``ks`` after this follower had it."""
        if self.subs.get(ks.id, (None, None))[1] is ks:
            del self.subs[ks.id]
        self.send(pushed_error(MsgType.SUB_ERROR, ks.id, exc))

    def _invoke(self, wire: list) -> None:
        _, rid, channel, method, args, kwargs, flags, timeout = wire
        if flags & ONEWAY:
            rid = 0
        try:
            fn, spec = (self.channels.get(channel) or self._host(channel)).resolve_spec(method)  # _host() raises
            threaded = not (spec.is_coro or spec.inline)
            self._admit(threaded)
        except Exception as exc:
            self._error(rid, exc)
            return
        if threaded:
            waits.append(None)  # no poll on the loop until this call's answer is written
            self.node.thread_call_started()
            self.node.workers.submit(self._run_blocking, rid, fn, args, kwargs, self._finish_threaded)
            return
        self.node.inflight_loop += 1
        if not spec.is_coro:
            self._run_blocking(rid, fn, args, kwargs, self._finish)  # delegated inline: never blocks
            return
        try:
            coro = fn(*args, **kwargs)
        except Exception as exc:
            self._finish(rid, None, exc)
            return
        self.node.runner.submit(coro, self._finish, rid, timeout if rid else None)

    def _run_blocking(self, rid: int, fn: Any, args: list, kwargs: dict, done: Any) -> None:
        """On a worker thread (or the loop, for inline methods): run the method,
        write the answer from here."""
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            done(rid, None, exc)
        else:
            done(rid, value, None)

    def _finish(self, rid: int, value: Any, exc: BaseException | None) -> None:
        """Answer request ``rid``, which ran on the loop (on the loop)."""
        try:
            # Answer first: the loop reads no request before the counts drop, so a
            # follower that waits for this answer is never refused for it.
            self._answer(rid, value, exc, True)
        finally:
            self.inflight_loop -= 1
            node = self.node
            node.inflight_loop -= 1
            if node.leaving:
                node.maybe_drained()

    def _finish_threaded(self, rid: int, value: Any, exc: BaseException | None) -> None:
        """Answer request ``rid``, which ran on this worker thread."""
        try:
            with self._wlock:
                self.inflight_threads -= 1
            self.node.thread_call_done()
            self._answer(rid, value, exc, False)
        finally:
            waits.pop()

    def _answer(self, rid: int, value: Any, exc: BaseException | None, on_loop: bool) -> None:
        if isinstance(exc, Abandoned):
            return  # closing: the follower hears the connection end instead
        if rid and not self.closed:
            if exc is None:
                try:
                    frame = self.codec.pack([T_RESULT, rid, value])
                    if len(frame) > self.out_limit:
                        raise _too_large("the result", len(frame), self.out_limit)
                except (EncodeError, FrameTooLargeError) as e:
                    exc = unsendable_result(e)
                else:
                    self.write(frame, on_loop)
            if exc is not None:
                if not isinstance(exc, Exception):
                    exc = RuntimeError(repr(exc))
                self.send(error_message(rid, exc, code_for(exc)).to_wire())
        elif exc is not None and not rid:
            log.warning("leader: oneway call from pid %s raised %r", self.pid, exc)


def _too_large(what: str, size: int, limit: int) -> FrameTooLargeError:
    return FrameTooLargeError(f"{what} is {size} bytes on the wire, over the follower's max_frame_size={limit}")
