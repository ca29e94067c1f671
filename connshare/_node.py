"""A process's membership of one port: the election, then leading or following.

One :class:`Node` per port per process (one more for single mode), shared by every
channel and every client the process creates on that port. Its state lives on
connshare's loop; the call paths that callers run on their own threads read the
per-channel ``route`` and touch nothing else.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import enum
import functools
import itertools
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Awaitable
from typing import Any

from . import _polling, _priority
from ._election import Retry, close_inherited, connect_to_leader, hold_marker, port_owner, try_bind
from ._errors import (
    CallTimeoutError,
    ChannelDownError,
    ChannelNotFoundError,
    ClientClosedError,
    ConfigurationError,
    ConnshareError,
    ElectionError,
    FrameTooLargeError,
    LeaderLostError,
    LeaderNotFoundError,
    LeaderUnresponsiveError,
    NotReadyError,
    NotSentError,
    PortInUseError,
    ProtocolError,
    awaitable,
    raised_again,
)
from ._follower import FollowerConnection
from ._host import ChannelHost
from ._leader import PeerProtocol
from ._loop import forbid_loop_thread, get_loop, loop_selector, on_loop_thread, stop_loop
from ._mirror import Mirror
from ._options import Options
from ._polling import waits
from ._protocol import (
    ONEWAY,
    T_INVOKE,
    Codec,
    MsgType,
)
from ._remote import exception_pushed
from ._runner import CoroRunner
from ._secret import load_or_create_secret
from ._spec import Avail, ChannelState, MethodSpec
from ._subs import Listener, LocalSub, canonical
from ._workers import WorkerPool

log = logging.getLogger("connshare.node")


class Role(enum.Enum):
    ELECTING = "electing"
    LEADER = "leader"
    FOLLOWER = "follower"
    LOCAL = "single"
    CLOSED = "closed"


#: How often a request that never reached a leader is sent again.
MAX_RESENDS = 3
#: how often a caller that found its route stale looks again until connshare's loop
#: has seen the connection's end: first after 0.5 ms (the loop needs well under a ms),
#: backing off to 20 ms while that loop is held up (a slow listener)
_STALE_POLL_S = (0.0005, 0.02)

#: how long past its deadline a caller waits for the election's verdict when that
#: verdict is due about as its own wait ends (an attempt and a back-off: < 0.1 s)
_VERDICT_GRACE_S = 0.25

#: A follower whose connections to the leader end within _SHORT_FOLLOW_S more
#: than twice in a row waits before the next: 0.05 s, doubling to 2 s. A leader
#: dying, or handing off, ends one such connection, not a run of them.
_SHORT_FOLLOW_S = 0.1
_REJOIN_DELAY_S = (0.05, 2.0)

#: A channel that has served in this process and whose real client then fails to
#: start (a new leader while its upstream is down) is started again after 0.1 s,
#: doubling to 5 s; a follower asks again for it on the same schedule.
_RESTART_DELAY_S = (0.1, 5.0)

#: After an election that found no leader and no port to lead on (its verdict
#: raised in the callers), the next runs 0.5 s later, doubling to every 30 s.
_REELECT_DELAY_S = (0.5, 30.0)

#: Failures of the connection, not answers of the leader: a subscription that met
#: one is kept, and sent again to the next connection or leader.
_CONNECTION_TROUBLE = (LeaderLostError, LeaderUnresponsiveError, CallTimeoutError, ClientClosedError, ProtocolError)


class _Attempts:
    """Whether a call whose connection failed may go to the next leader."""

    __slots__ = ("idempotent", "resends", "retried")

    def __init__(self, idempotent: bool) -> None:
        self.idempotent = idempotent
        self.resends = 0
        self.retried = False

    def again(self, exc: LeaderLostError) -> bool:
        if isinstance(exc, NotSentError):
            # It never reached the leader: always safe to send again, a few times
            # (a frame the leader keeps refusing must not loop forever).
            self.resends += 1
            return self.resends <= MAX_RESENDS
        if self.idempotent and not self.retried:  # in flight: once, if the app allows
            self.retried = True
            return True
        return False


def _call_for_await(fn: Any, args: Any, kwargs: dict) -> Any:
    """Blocking method ``fn`` run for a caller that awaits it (see awaitable())."""
    try:
        return fn(*args, **kwargs)
    except StopIteration as exc:
        raise awaitable(exc) from exc


if sys.version_info >= (3, 11):

    async def _within(aw: Awaitable[Any], left: float, method: str) -> Any:
        """``await aw``, or CallTimeoutError after ``left`` s, having cancelled it. A
        TimeoutError the method raises itself stays the method's, as in a follower."""
        cm = asyncio.timeout(left)
        try:
            async with cm:
                return await aw
        except TimeoutError:
            if cm.expired():
                raise CallTimeoutError(f"{method!r} did not finish in time") from None
            raise

else:  # pragma: no cover - 3.10: wait_for, whose own timeout comes from the call's cancellation

    async def _within(aw: Awaitable[Any], left: float, method: str) -> Any:
        try:
            return await asyncio.wait_for(aw, left)
        except asyncio.TimeoutError as exc:
            if not isinstance(exc.__cause__, asyncio.CancelledError):
                raise
            raise CallTimeoutError(f"{method!r} did not finish in time") from None


class Node:
    """This process on one port (or in single mode)."""

    def __init__(self, options: Options, key: Any) -> None:
        self.options = options
        self.key = key
        self.single = options.single_mode
        self.port = options.port
        self.loop = get_loop()
        self.codec = Codec(options.max_frame_size, options.transcode)
        self.mirror = Mirror(self.codec)  # for the channels that encode_locally
        self.secret: bytes = b""
        self.role = Role.ELECTING
        self.leader_pid: int | None = None
        self.channels: dict[str, ChannelState] = {}
        self.hosts: dict[str, ChannelHost] = {}
        self.peers: set[PeerProtocol] = set()
        self.conn: FollowerConnection | None = None
        self._accept_task: asyncio.Future | None = None
        self._workers: WorkerPool | None = None
        self._count_lock = threading.Lock()
        #: every peer reads into this on the loop thread, one at a time
        self.read_buffer = bytearray(256 * 1024)
        self.runner = CoroRunner(self.loop, options.wait_in_place or 0.0)  # the leader's coroutine calls
        self._tasks: set[asyncio.Task] = set()
        self._listen_sock: socket.socket | None = None
        #: held while leading: see _election.hold_marker
        self._marker: socket.socket | None = None
        # Followers' calls in flight here: run on the loop (counted there, no
        # lock), and run by worker threads (under _count_lock).
        self.inflight_loop = 0
        self._inflight_threads = 0
        self.leaving = False
        self.closing = False
        self.fatal: BaseException | None = None
        self._elect_until = 0.0  # when the running election gives up (monotonic)
        self.clients: weakref.WeakSet = weakref.WeakSet()
        self._key_ids = itertools.count(1)
        self._host_ids = itertools.count(1)
        self._hosts_changed: asyncio.Event | None = None
        self._conn_done: asyncio.Future | None = None
        self._drained: asyncio.Event | None = None
        self._closed_cf: concurrent.futures.Future = concurrent.futures.Future()
        self._main: asyncio.Task | None = None
        self.canonical = canonical
        asyncio.run_coroutine_threadsafe(self._start(), self.loop)

    def spawn(self, coro: Any) -> asyncio.Task:
        """A task on connshare's loop, referenced until it ends (on the loop)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- channels ------------------------------------------------------------------------

    def attach(self, client: Any, state: ChannelState) -> ChannelState:
        """Join ``client`` to its channel; a second client of the name shares it."""
        with _nodes_lock:
            if self.closing:
                raise ClientClosedError("this process's connshare node is closing")
            existing = self.channels.get(state.name)
            if existing is not None and existing.cls is not state.cls:
                raise ConfigurationError(
                    f"name: channel {state.name!r} on port {self.port} is a {existing.cls.__qualname__} in this process; "
                    f"a {state.cls.__qualname__} needs a name of its own"
                )
            self.clients.add(client)
            if existing is None:
                state.clients.append(client)
                self.channels[state.name] = state
            else:
                existing.clients.append(client)
        if existing is not None:
            if existing.route is not None:
                client.ready(True)
            elif existing.fatal is not None:
                client.ready(existing.fatal)
            elif existing.down is not None:
                client.ready(existing.down)
            return existing
        self.loop.call_soon_threadsafe(self._channel_added, state)
        return state

    def detach(self, client: Any, state: ChannelState) -> concurrent.futures.Future | None:
        """``client`` closed; the last client of the process closes the node, and
        gets a future that is done once it has."""
        with _nodes_lock:
            if client in state.clients:
                state.clients.remove(client)
            self.clients.discard(client)
            last = not any(st.clients for st in self.channels.values())
            closing = last and not self.closing
            if closing:
                self.closing = True
        if closing:
            return self._close_now()
        if not last:
            # The process's other clients go on: what this one subscribed and
            # published goes with it, as if its process had left.
            with state.lock:
                gone = _drop_listener(state, None, None, client)
                _drop_publications(state, client)
            for sub in gone:
                self.loop.call_soon_threadsafe(self._unsub_route, state, sub)
        return None

    def _close_now(self) -> concurrent.futures.Future:
        """Close the node (``closing`` is set); a future done once it has."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        return self._closed_cf

    def _channel_added(self, state: ChannelState) -> None:
        if self.fatal is not None:
            self._channel_failed(state, self.fatal)
        elif self.role in (Role.LEADER, Role.LOCAL):
            self._start_host(state)
        elif self.role is Role.FOLLOWER and self.conn is not None:
            self.spawn(self._register(self.conn, state))
        if self._hosts_changed is not None:
            self._hosts_changed.set()

    def _set_route(self, state: ChannelState, route: Any) -> None:
        state.route = route
        state.fatal = None  # an election that found no leader, before this one
        state.down = None
        state.served = True
        if not state.avail.done():
            state.avail.set_result(None)
        for c in list(state.clients):
            c.ready(True)

    def _clear_route(self, state: ChannelState) -> None:
        if state.avail.done():
            state.avail = Avail()
        state.route = None  # after the new Avail: a caller that sees None waits on it
        state.down = None  # the next leader may serve it: callers wait for it again
        state.wire_id = None
        for sub in state.subs.values():
            sub.key_id = None

    def _channel_down(self, state: ChannelState, host: ChannelHost | None, exc: BaseException, delay: float) -> None:
        """The channel cannot serve for now: calls raise at once, each process hears
        it once per outage, and the real client (or a follower's registration) is
        tried again in ``delay`` s."""
        if host is not None:
            err = ChannelDownError(f"channel {state.name!r}: the real client failed to start: {exc!r}; trying again")
            host.down = err
        else:  # the leader's answer says why
            err = ChannelDownError(f"{exc}; trying again")
        err.__cause__ = exc
        first = state.down is None
        state.down = err
        if not state.avail.done():
            state.avail.set_result(None)  # wake waiters: they raise state.down
        if first:
            log.warning("%s (in %g s, then less and less often)", err, delay)
            for c in list(state.clients):
                if state.served:
                    c.emit("error", err)
                else:  # not ready yet: wait_ready() raises it, and calls work once it serves
                    c.ready(err)

    def _channel_failed(self, state: ChannelState, exc: BaseException) -> None:
        state.fatal = exc
        if not state.avail.done():
            state.avail.set_result(None)  # wake waiters: they raise state.fatal
        for c in list(state.clients):
            c.ready(exc)

    # -- the election ---------------------------------------------------------------------

    async def _start(self) -> None:
        self._hosts_changed = asyncio.Event()
        self._drained = asyncio.Event()
        self._main = asyncio.current_task()
        try:
            if self.single:
                self.role = Role.LOCAL
                self.leader_pid = os.getpid()
                for st in list(self.channels.values()):
                    self._start_host(st)
                await asyncio.Event().wait()  # until cancelled by _shutdown
            self.secret = self.options.secret_bytes() or load_or_create_secret(self.port)
            await self._serve_port()
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            if self.closing:  # close() during the election: nothing went wrong
                log.debug("connshare on port %s closed while starting: %r", self.port, exc)
            else:
                log.error("connshare on port %s cannot serve: %r", self.port, exc)
            self.fatal = exc
            for st in list(self.channels.values()):
                self._channel_failed(st, exc)

    async def _serve_port(self) -> None:
        """Lead, or follow and elect again whenever the leader is lost, until the
        node closes. A verdict of no leader (and no port to lead on) fails the
        channels, and the election runs again a while later."""
        short = 0  # connections in a row that ended within _SHORT_FOLLOW_S
        verdicts = 0  # elections in a row that found no leader
        while not self.closing:
            try:
                won = await self._elect()
            except ConnshareError as exc:
                if self.closing:
                    raise
                verdicts += 1
                delay = min(_REELECT_DELAY_S[0] * 2 ** (verdicts - 1), _REELECT_DELAY_S[1])
                self._no_leader(exc, delay, verdicts == 1)
                await asyncio.sleep(delay)
                continue
            verdicts = 0
            self.fatal = None
            if isinstance(won, socket.socket):
                await self._lead(won)
                return
            began = time.monotonic()
            await self._follow(*won)
            short = short + 1 if time.monotonic() - began < _SHORT_FOLLOW_S else 0
            if short > 2 and not self.closing:
                # A leader that takes us and drops us at once, again and again:
                # back off rather than reconnect in a tight loop.
                delay = min(_REJOIN_DELAY_S[0] * 2 ** (short - 3), _REJOIN_DELAY_S[1])
                log.warning("pid %s: %s connections to the leader in a row ended at once; next try in %g s", os.getpid(), short, delay)
                await asyncio.sleep(delay)

    def _no_leader(self, exc: BaseException, delay: float, first: bool) -> None:
        """The election's verdict: no leader, and no port to lead on. Calls raise it
        at once until an election finds one."""
        self.fatal = exc
        if first:
            log.error("connshare on port %s cannot serve: %r; electing again in %g s, then less and less often", self.port, exc, delay)
            for st in list(self.channels.values()):
                self._channel_failed(st, exc)
        else:  # said once: the reason is kept up to date, quietly
            log.info("connshare on port %s still cannot serve: %r", self.port, exc)
            for st in list(self.channels.values()):
                st.fatal = exc

    async def _elect(self) -> Any:
        """A listening socket if we won, else (connection, the bytes after its handshake)."""
        opts = self.options
        loop = self.loop
        # One deadline, on the clock callers read too (they wait for its verdict).
        self._elect_until = time.monotonic() + opts.max_wait_time
        delay = 0.0005
        self.role = Role.ELECTING
        hung_up_since: float | None = None
        while True:
            if opts.is_leader is not False:
                sock = try_bind(self.port)
                if sock is not None:
                    return sock
            if opts.is_leader is not True:
                try:
                    return await self._connect()
                except Retry as r:
                    # A leader going away hangs up for a moment; a program that
                    # keeps accepting and hanging up is not a leader at all.
                    if r.args and r.args[0] == "hung up":
                        hung_up_since = hung_up_since or loop.time()
                        if loop.time() - hung_up_since > opts.connect_timeout:
                            owner, _ = port_owner(self.port)
                            why = "it accepts connections and hangs up without a connshare handshake"
                            raise PortInUseError(self.port, why, owner) from None
                    else:
                        hung_up_since = None
            if self.closing:
                raise ClientClosedError("closed during the election")
            if time.monotonic() > self._elect_until:
                if opts.is_leader is False:
                    raise LeaderNotFoundError(f"no connshare leader on port {self.port} within max_wait_time={opts.max_wait_time} s")
                if opts.is_leader is True:
                    raise ElectionError(f"is_leader=True, but port {self.port} stayed taken for max_wait_time={opts.max_wait_time} s")
                raise ElectionError(f"could neither bind nor follow on port {self.port} within max_wait_time={opts.max_wait_time} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _connect(self) -> tuple[FollowerConnection, bytes]:
        sock, codec, decoder, peer_pid, early = await connect_to_leader(self.loop, self.port, self.options, self.codec, self.secret)
        opts = self.options
        conn = FollowerConnection(
            sock,
            codec,
            decoder,
            peer_pid,
            self._on_conn_lost,
            self._on_conn_frame,
            self.loop,
            opts.wait_in_place or 0.0,
            opts.spin_wait or 0.0,
        )
        return conn, early

    # -- leading ---------------------------------------------------------------------------

    async def _lead(self, sock: socket.socket) -> None:
        self.role = Role.LEADER
        self.leader_pid = os.getpid()
        self._listen_sock = sock
        self._marker = hold_marker(self.port)
        log.info("pid %s leads port %s", os.getpid(), self.port)
        nice = self.options.leader_nice
        if nice is not None:
            _priority.hold(nice)
        spin = self.options.leader_spin_wait or 0.0
        if spin:
            _polling.hold(loop_selector(), spin)
        try:
            self._accept_task = self.spawn(self._accept_loop(sock))
            for st in list(self.channels.values()):
                self._start_host(st)
            interval = self.options.heartbeat_interval
            while not self.closing:
                if interval is None:  # no heartbeat: wait to be cancelled
                    await asyncio.Event().wait()
                    continue
                slept_from = time.monotonic()
                await asyncio.sleep(interval)
                if time.monotonic() - slept_from > 2 * interval:
                    # This loop was held up (a slow constructor, a SIGSTOP): what
                    # the followers sent meanwhile may be unread yet.
                    continue
                silent = time.monotonic() - 3 * interval
                for peer in list(self.peers):
                    if peer.open and peer.last_rx < silent:
                        peer.drop(f"no heartbeat for {3 * interval:g} s")
        finally:
            if nice is not None:
                _priority.release(nice)
            if spin:
                _polling.release(loop_selector(), spin)

    async def _accept_loop(self, sock: socket.socket) -> None:
        while not self.leaving:
            try:
                conn, _ = await self.loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self.leaving:
                    return
                log.warning("leader: accept failed: %r", exc)  # EMFILE and such: back off
                await asyncio.sleep(0.05)
                continue
            try:
                PeerProtocol(self, conn).start()
            except OSError:
                conn.close()  # gone before we could look at it

    def on_loop(self) -> bool:
        return on_loop_thread()

    @property
    def workers(self) -> WorkerPool:
        if self._workers is None:
            self._workers = WorkerPool(self.options.worker_threads)
        return self._workers

    @property
    def inflight(self) -> int:
        return self.inflight_loop + self._inflight_threads

    def thread_call_started(self) -> None:
        with self._count_lock:
            self._inflight_threads += 1

    def thread_call_done(self) -> None:
        with self._count_lock:
            self._inflight_threads -= 1
            idle = self._inflight_threads + self.inflight_loop == 0
        if idle and self.leaving:
            self.loop.call_soon_threadsafe(self.maybe_drained)

    def _start_host(self, state: ChannelState) -> None:
        if state.name in self.hosts:
            return
        host = ChannelHost(state, self.loop, self.codec, self._key_ids, next(self._host_ids))
        self.hosts[state.name] = host
        if self._hosts_changed is not None:
            self._hosts_changed.set()

        async def start() -> None:
            delay = _RESTART_DELAY_S[0]
            while (exc := await host.start()) is not None:
                if self.hosts.get(state.name) is not host:
                    return  # closed meanwhile
                if not state.served:
                    # Its first start: the app hears why at once (wait_ready()), as
                    # it would from a client of its own, and nothing is retried.
                    host.fail(exc)
                    err = NotReadyError(f"channel {state.name!r}: the real client failed to start: {exc!r}")
                    err.__cause__ = exc
                    self._channel_failed(state, err)
                    return
                self._channel_down(state, host, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RESTART_DELAY_S[1])
                if self.hosts.get(state.name) is not host:
                    return
            if self.hosts.get(state.name) is not host:
                await host.close()  # the node closed while it started: not to be leaked
                return
            if host.down is not None:
                log.warning("channel %r: the real client started again", state.name)
                host.down = None
            for sub in list(state.subs.values()):
                self._host_subscribe(host, state, sub)
            for key, (reg, token) in list(state.publications.items()):
                state.pub_sent[key] = (host, token)
                self._host_call(state, host.publish, key[0], reg)
            self._set_route(state, host)

        host.starter = self.spawn(start())

    def _host_subscribe(self, host: ChannelHost, state: ChannelState, sub: LocalSub) -> None:
        sub.sent_on = host
        try:
            ks = host.subscribe(sub.method, sub.reg, sub.canon)
        except Exception as exc:
            state.drop_refused(sub, exc)  # as in a follower: subscribing again asks again
            return
        host.attach(ks, sub)

    @staticmethod
    def _host_call(state: ChannelState, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            state.emit_error(exc)

    async def host_for(self, name: str) -> ChannelHost:
        """The host of channel ``name``, once this process creates it. A follower's
        REGISTER waits for as long as that takes (a client may be created on first
        use; the follower says so to its app after its own max_wait_time), or until
        this leader leaves."""
        assert self._hosts_changed is not None
        while name not in self.hosts:
            if self.leaving:
                # Not "no such channel": the next leader's process may host it.
                raise NotSentError(f"the leader (pid {os.getpid()}) is leaving and hosts no channel {name!r}: ask the next one")
            self._hosts_changed.clear()
            await self._hosts_changed.wait()
        host = self.hosts[name]
        while not host.ready.done():
            if host.down is not None:  # being started again: say so now, not at the timeout
                raise ChannelDownError(f"channel {name!r}: the leader's real client failed to start: {host.down.__cause__!r}")
            await asyncio.shield(host.attempt)
        try:
            host.ready.result()
        except Exception as exc:
            raise NotReadyError(f"channel {name!r}: the leader's real client failed to start: {exc!r}") from exc
        return host

    def on_peer_gone(self, peer: PeerProtocol) -> None:
        self.maybe_drained()

    def maybe_drained(self) -> None:
        if self.leaving and self._drained is not None and self.inflight == 0:
            self._drained.set()

    # -- following --------------------------------------------------------------------------

    async def _follow(self, conn: FollowerConnection, early: bytes) -> None:
        self.role = Role.FOLLOWER
        self.conn = conn
        self.leader_pid = conn.peer_pid
        self._conn_done = self.loop.create_future()
        log.info("pid %s follows leader pid %s on port %s", os.getpid(), conn.peer_pid, self.port)
        conn.start(early)
        hb = self.spawn(self._heartbeat(conn))
        try:
            await asyncio.gather(*(self._register(conn, st) for st in list(self.channels.values())))
            await self._conn_done
        finally:
            hb.cancel()

    async def _register(self, conn: FollowerConnection, state: ChannelState) -> None:
        delay = _RESTART_DELAY_S[0]
        while True:
            try:
                wire_id = await self._register_once(conn, state)
                break
            except NotReadyError as exc:
                if conn is not self.conn:
                    return
                if not state.served and not isinstance(exc, ChannelDownError):
                    self._channel_failed(state, exc)  # its first start failed: for good
                    return
                # The leader is building its real client again (its upstream is
                # down), or it failed after this process had it: ask again.
                self._channel_down(state, None, exc, delay)
            except ChannelNotFoundError as exc:
                if conn is self.conn:
                    self._channel_failed(state, exc)
                return
            except _CONNECTION_TROUBLE as exc:
                log.debug("registering %r failed: %r", state.name, exc)  # redone on the next connection
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_DELAY_S[1])
            if conn is not self.conn or self.closing:
                return
        if conn is not self.conn:
            return
        state.wire_id = wire_id
        state.fatal = None
        try:
            for sub in list(state.subs.values()):
                self._send_subscribe(conn, state, sub)
            for key, (reg, token) in list(state.publications.items()):
                state.pub_sent[key] = (conn, token)
                self._send_publication(conn, state, wire_id, key[0], reg)
        except LeaderLostError:
            return
        self._set_route(state, (conn, wire_id))

    async def _register_once(self, conn: FollowerConnection, state: ChannelState) -> int:
        _, fut = conn.request_async([MsgType.REGISTER, 0, state.name, state.cls.__qualname__], self.loop, internal=True)
        try:
            # Our own max_wait_time bounds the wait callers see, whatever the leader's is.
            return await asyncio.wait_for(asyncio.shield(fut), state.options.max_wait_time)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:
            fut.cancel()  # shielded: else it would fail unseen when the connection ends
            raise
        if conn is self.conn:
            # Calls and wait_ready() raise this from now on; the request stays with
            # the leader, whose process may create the channel later (a client made
            # on first use), and then answers it.
            self._channel_failed(
                state,
                ChannelNotFoundError(
                    f"the leader (pid {conn.peer_pid}) on port {self.port} hosts no channel {state.name!r} "
                    f"(waited max_wait_time={state.options.max_wait_time} s; still waiting for it); if another app "
                    "uses this port, give each app its own port (port= or CONNSHARE_PORT)"
                ),
            )
        return await fut

    def _send_subscribe(self, conn: FollowerConnection, state: ChannelState, sub: LocalSub) -> None:
        def mapped(key_id: int) -> None:  # in the reader (any thread), before the first EVENT
            with state.lock:
                live = state.subs.get((sub.method, sub.canon)) is sub
                if live:
                    conn.keys[key_id] = sub
                    sub.key_id = key_id
            if not live:  # unsubscribed before the answer came, so unsubscribe() sent nothing
                self.loop.call_soon_threadsafe(self._withdraw, conn, state, sub, key_id)

        sub.sent_on = conn
        try:
            _, fut = conn.request_async([MsgType.SUBSCRIBE, 0, state.wire_id, sub.method, sub.reg], self.loop, mapped, internal=True)
        except FrameTooLargeError as exc:  # over the leader's max_frame_size, below ours
            state.drop_refused(sub, exc)
            return
        fut.add_done_callback(functools.partial(self._subscribed, state, sub))

    @staticmethod
    def _send_publication(conn: FollowerConnection, state: ChannelState, wire_id: int, method: str, reg: Any) -> None:
        try:
            conn.send_oneway([MsgType.PUBLISH, wire_id, method, reg])
        except FrameTooLargeError as exc:  # over the leader's max_frame_size, below ours
            state.emit_error(exc)

    @staticmethod
    def _subscribed(state: ChannelState, sub: LocalSub, fut: asyncio.Future) -> None:
        exc = fut.cancelled() or fut.exception()
        if exc is True or exc is None or isinstance(exc, _CONNECTION_TROUBLE):
            return  # kept: subscribed again on the next connection or leader
        # The leader refused it (a limit, not delegated, the real client raised).
        state.drop_refused(sub, exc)

    async def _heartbeat(self, conn: FollowerConnection) -> None:
        interval = self.options.heartbeat_interval
        if interval is None:
            return
        token = 0
        while conn.lost is None:
            await asyncio.sleep(interval)
            token += 1
            # Unread data proves the leader alive: only our reader is late.
            if time.monotonic() - conn.last_rx > 3 * interval and not conn.has_unread():
                conn.mark_unresponsive()
            try:
                await self.loop.run_in_executor(None, conn.send, self.codec.pack([MsgType.PING, token]), interval)
            except Exception:
                pass

    def _on_conn_lost(self, conn: FollowerConnection, reason: BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self._conn_lost, conn, reason)
        except RuntimeError:
            pass

    def _conn_lost(self, conn: FollowerConnection, reason: BaseException) -> None:
        if conn is not self.conn:
            return
        log.info("pid %s lost leader pid %s: %s", os.getpid(), conn.peer_pid, reason)
        self._leave_conn()

    def _leave_conn(self) -> None:
        self.conn = None
        for st in self.channels.values():
            self._clear_route(st)
        if self._conn_done is not None and not self._conn_done.done():
            self._conn_done.set_result(None)

    def _on_conn_frame(self, conn: FollowerConnection, wire: list, now: list | None) -> None:
        if wire[0] != MsgType.GOODBYE:
            # After the listeners of the events read before it, before those after.
            Listener.home(functools.partial(self._conn_frame, conn)).call(wire, now)
        else:
            self.loop.call_soon_threadsafe(self._conn_frame, conn, wire)

    def _conn_frame(self, conn: FollowerConnection, wire: list) -> None:
        if wire[0] == MsgType.GOODBYE:
            if conn is self.conn:
                log.info("leader pid %s hands off; electing the next", conn.peer_pid)
                conn.draining = True
                if not conn.pending:
                    conn.close()
                self._leave_conn()
        elif wire[0] == MsgType.CHANNEL_ERROR:
            for st in self.channels.values():
                if st.wire_id == wire[1] and conn is self.conn:
                    st.emit_error(exception_pushed(wire, conn.peer_pid))
        elif wire[0] == MsgType.SUB_ERROR and conn is self.conn:
            sub = conn.keys.get(wire[1])
            if sub is None:
                return
            for st in self.channels.values():
                if st.subs.get((sub.method, sub.canon)) is sub:
                    with st.lock:
                        if conn.keys.get(wire[1]) is sub:
                            del conn.keys[wire[1]]
                            sub.key_id = None
                    st.drop_refused(sub, exception_pushed(wire, conn.peer_pid))
                    break

    # -- calls (any thread) -------------------------------------------------------------

    def _route_or_wait(self, state: ChannelState, stale: Any, until: float) -> tuple[Any, float]:
        """The channel's route if it has a usable one, else (None, how long to wait
        for one). Raises why there will be none: the channel failed, the client is
        closed, or the time is up."""
        route = state.route
        if route is not None and route is not stale:
            return route, 0.0
        if state.fatal is not None:
            raise raised_again(state.fatal)
        if state.down is not None:
            raise raised_again(state.down)
        if self.closing and self.role is Role.CLOSED:
            raise ClientClosedError("the client is closed")
        now = time.monotonic()
        left = until - now
        if left <= 0 and self.role is Role.ELECTING and self._elect_until - until < _VERDICT_GRACE_S:
            # The election gives its verdict (a leader, or why there is none) as
            # this wait ends: that is the truer answer than a timeout.
            left = self._elect_until + _VERDICT_GRACE_S - now
        if left <= 0:
            raise CallTimeoutError(f"no connshare leader for channel {state.name!r} on port {self.port} in time")
        # After a stale route, wait in slices. While it is still current its Avail is
        # already done and signals nothing, so the callers poll (_STALE_POLL_S).
        return None, min(left, 0.05) if stale is not None else left

    def _route_sync(self, state: ChannelState, stale: Any, until: float) -> Any:
        poll = _STALE_POLL_S[0]
        while True:
            avail = state.avail  # before the check: a route set after it completes this one
            route, wait = self._route_or_wait(state, stale, until)
            if route is not None:
                return route
            forbid_loop_thread("waiting for a connshare leader")
            if avail.done():
                # Still the stale route's Avail: nothing signals until connshare's loop
                # sees the loss and replaces it, so sleep and let that loop run
                # rather than spin on the GIL it needs.
                time.sleep(min(wait, poll))
                poll = min(poll * 2, _STALE_POLL_S[1])
                continue
            try:
                avail.result(wait)
            except concurrent.futures.TimeoutError:
                pass

    async def _route_async(self, state: ChannelState, stale: Any, until: float) -> Any:
        poll = _STALE_POLL_S[0]
        while True:
            avail = state.avail
            route, wait = self._route_or_wait(state, stale, until)
            if route is not None:
                return route
            if avail.done():  # as in _route_sync: poll, do not spin
                await asyncio.sleep(min(wait, poll))
                poll = min(poll * 2, _STALE_POLL_S[1])
                continue
            try:
                await asyncio.wait_for(asyncio.wrap_future(avail), wait)
            except asyncio.TimeoutError:
                pass

    def invoke_sync(self, state: ChannelState, spec: MethodSpec, args: tuple, kwargs: dict, timeout: float) -> Any:
        start = time.monotonic()
        deadline = start + timeout
        route = state.route
        waited = route is None  # for a route: the time left is less than timeout
        stale = None
        attempts: _Attempts | None = None
        while True:
            if route is None or route is stale:
                route = self._route_sync(state, stale, min(deadline, start + self.options.max_wait_time))
            if type(route) is ChannelHost:
                return self._local_sync(route, spec.name, args, kwargs, deadline, state.options.encode_locally)
            conn, wire_id = route
            try:
                left = deadline - time.monotonic() if waited else timeout
                if left <= 0:
                    raise CallTimeoutError(f"no connshare leader for channel {state.name!r} on port {self.port} in time")
                return conn.request_sync([T_INVOKE, 0, wire_id, spec.name, args, kwargs, 0, left], left)
            except LeaderLostError as exc:
                attempts = attempts or _Attempts(spec.idempotent)
                if not attempts.again(exc):
                    raise
                stale = route
                waited = True

    def _encoded_local(self, host: ChannelHost, method: str, args: Any, kwargs: dict, deadline: float) -> tuple:
        """encode_locally: the real client's ``method`` wrapped to pass its outcome
        through the wire, whether it is a coroutine one, and its arguments as the
        wire brings them."""
        args, kwargs = self.mirror.args(method, args, kwargs, deadline - time.monotonic())
        fn, is_coro = host.resolve(method)
        return self.mirror.wrap(fn, is_coro), is_coro, args, kwargs

    def _local_sync(self, host: ChannelHost, method: str, args: Any, kwargs: dict, deadline: float, encode: bool) -> Any:
        if encode:
            fn, is_coro, args, kwargs = self._encoded_local(host, method, args, kwargs, deadline)
        else:  # no extra frame on the leader's own calls (a blocking one takes ~1 µs)
            fn, is_coro = host.resolve(method)
        if not is_coro:
            return fn(*args, **kwargs)
        forbid_loop_thread(f"the blocking call of coroutine method {method!r}")
        waits.append(None)  # a polling loop would keep this thread from the GIL
        try:
            return self.runner.call_from_thread(fn, args, kwargs, max(deadline - time.monotonic(), 0.0))
        finally:
            waits.pop()

    async def invoke_async(self, state: ChannelState, spec: MethodSpec, args: tuple, kwargs: dict, timeout: float) -> Any:
        start = time.monotonic()
        deadline = start + timeout
        loop = asyncio.get_running_loop()
        route = state.route
        stale = None
        attempts: _Attempts | None = None
        while True:
            if route is None or route is stale:
                route = await self._route_async(state, stale, min(deadline, start + self.options.max_wait_time))
            if type(route) is ChannelHost:
                return await self._local_async(route, spec.name, args, kwargs, deadline, loop, state.options.encode_locally)
            conn, wire_id = route
            try:
                rid, fut = conn.request_async(
                    [T_INVOKE, 0, wire_id, spec.name, args, kwargs, 0, timeout], loop, deadline=deadline, timeout=timeout
                )
                try:
                    return await fut
                except asyncio.CancelledError:
                    # the caller's own cancellation (wait_for, a task group): the
                    # leader stops the call now, not at its timeout
                    conn.withdraw(rid)
                    raise
                finally:
                    if not fut.done():
                        conn.forget(rid)
            except LeaderLostError as exc:
                attempts = attempts or _Attempts(spec.idempotent)
                if not attempts.again(exc):
                    raise
                stale = route

    async def _local_async(
        self, host: ChannelHost, method: str, args: Any, kwargs: dict, deadline: float, loop: asyncio.AbstractEventLoop, encode: bool
    ) -> Any:
        if encode:
            fn, is_coro, args, kwargs = self._encoded_local(host, method, args, kwargs, deadline)
        else:  # no extra frame on the leader's own calls (a blocking one takes ~1 µs)
            fn, is_coro = host.resolve(method)
        left = max(deadline - time.monotonic(), 0.0)
        if is_coro and loop is not self.loop:  # the app's own loop (uvicorn's)
            waits.append(None)
            try:
                return await self.runner.call_async(fn, args, kwargs, left, loop)
            finally:
                waits.pop()
        if not is_coro:
            # a blocking method awaited in the leader: the caller loop's executor
            try:
                job = loop.run_in_executor(None, _call_for_await, fn, args, kwargs)
            except RuntimeError as exc:  # shut down: the loop ends, or the process exits
                raise ClientClosedError(f"cannot run {method!r}: the event loop's executor is shut down ({exc})") from exc
            return await _within(job, left, method)
        return await _within(fn(*args, **kwargs), left, method)

    def invoke_oneway(self, state: ChannelState, spec: MethodSpec, args: tuple, kwargs: dict) -> None:
        wire = [MsgType.INVOKE, 0, 0, spec.name, list(args), kwargs, ONEWAY, None]
        body = self.codec.pack(wire)  # raise EncodeError here, in the caller
        if state.options.encode_locally:  # what the call gets if this process leads
            sent = self.mirror.decode(body)
            args, kwargs = tuple(sent[4]), sent[5]
        route = state.route
        if route is not None and type(route) is not ChannelHost:
            conn, wire[2] = route
            try:
                conn.send_oneway(wire)
                return
            except Exception:
                pass
        self.loop.call_soon_threadsafe(lambda: self.spawn(self._oneway_later(state, spec, args, kwargs)))

    async def _oneway_later(self, state: ChannelState, spec: MethodSpec, args: tuple, kwargs: dict) -> None:
        try:
            route = await self._route_async(state, None, time.monotonic() + self.options.max_wait_time)
            if type(route) is ChannelHost:
                fn, is_coro = route.resolve(spec.name)
                if is_coro:
                    await fn(*args, **kwargs)
                else:
                    await self.loop.run_in_executor(None, _call_for_await, fn, args, kwargs)
            else:
                conn, wire_id = route
                conn.send_oneway([MsgType.INVOKE, 0, wire_id, spec.name, list(args), kwargs, ONEWAY, None])
        except Exception:
            log.exception("oneway call %r failed", spec.name)

    # -- subscriptions and publications (any thread) --------------------------------------------

    def subscribe(self, state: ChannelState, method: str, reg: Any, listener: Any) -> None:
        body = self.codec.pack([MsgType.SUBSCRIBE, 0, 0, method, reg])  # EncodeError in the caller
        # Keyed by the caller's reg, as unsubscribe() will be: a decoded copy of a
        # user type may not repr() the same.
        canon = canonical(reg)
        encode = state.options.encode_locally
        if encode:  # the real client gets the reg a follower's subscription brings
            reg = self.mirror.subscription(body)
        with state.lock:
            sub = state.subs.get((method, canon))
            new = sub is None
            if sub is None:
                sub = state.subs[(method, canon)] = LocalSub(method, reg, canon)
                if encode:
                    sub.mirror = self.mirror
        sub.add(listener)
        if new:
            self.loop.call_soon_threadsafe(self._sub_route, state, sub)

    def _sub_route(self, state: ChannelState, sub: LocalSub) -> None:
        route = state.route
        if type(route) is ChannelHost:
            if sub.sent_on is not route:
                self._host_subscribe(route, state, sub)
        elif route is not None and sub.sent_on is not route[0]:
            try:
                self._send_subscribe(route[0], state, sub)
            except LeaderLostError:
                pass  # resubscribed on the next leader
        t = self.options.subscribe_timeout
        if t is not None:
            self.loop.call_later(t, self._sub_timeout, state, sub)

    def _sub_timeout(self, state: ChannelState, sub: LocalSub) -> None:
        if not sub.has_value and state.subs.get((sub.method, sub.canon)) is sub:
            state.emit_error(
                CallTimeoutError(
                    f"subscription {sub.method}({sub.reg!r}) got no value within subscribe_timeout={self.options.subscribe_timeout} s"
                )
            )

    def unsubscribe(self, state: ChannelState, reg: Any, listener: Any, owner: Any) -> None:
        canon = canonical(reg)
        with state.lock:
            gone = _drop_listener(state, canon, listener, owner)
        for sub in gone:
            self.loop.call_soon_threadsafe(self._unsub_route, state, sub)

    def _unsub_route(self, state: ChannelState, sub: LocalSub) -> None:
        route = state.route
        if type(route) is ChannelHost:
            ks = route.keys.get((sub.method, sub.canon))
            if ks is not None:
                route.unsubscribe(ks, sub)
        elif route is not None and sub.key_id is not None:
            self._withdraw(route[0], state, sub, sub.key_id)

    def _withdraw(self, conn: FollowerConnection, state: ChannelState, sub: LocalSub, key_id: int) -> None:
        """On connshare's loop: tell the leader that ``sub`` is gone. Not if a newer
        subscription to the same key has taken its place: its SUBSCRIBE, sent from
        this loop, before or after, keeps the key (the leader replays the last
        value to it), and an UNSUBSCRIBE behind it would leave it with nothing."""
        if conn.keys.get(key_id) is sub:
            del conn.keys[key_id]
        with state.lock:
            if (sub.method, sub.canon) in state.subs:
                return
        if conn is not self.conn:
            return  # that connection is gone, and what it subscribed with it
        try:
            conn.send_oneway([MsgType.UNSUBSCRIBE, key_id])
        except LeaderLostError:
            pass

    def publish(self, state: ChannelState, method: str, reg: Any, owner: Any) -> None:
        body = self.codec.pack([MsgType.PUBLISH, 0, method, reg])  # EncodeError in the caller
        if state.options.encode_locally:
            reg = self.mirror.publication(body)
        key = (method, canonical(reg))
        token = object()
        with state.lock:
            # Last published, last replayed: a replay that ended on an older
            # publication would undo the newer one where the last one wins.
            state.publications.pop(key, None)
            state.publications[key] = (reg, token)
            state.publishers.setdefault(key, set()).add(owner)
        self.loop.call_soon_threadsafe(self._pub_route, state, key, reg, token)

    def _pub_route(self, state: ChannelState, key: tuple[str, bytes], reg: Any, token: object) -> None:
        route = state.route
        if route is None:
            return  # published on the next route
        target = route if type(route) is ChannelHost else route[0]
        sent = state.pub_sent.get(key)
        if sent is not None and sent[0] is target and sent[1] is token:
            return  # the route's replay sent this very publish()
        state.pub_sent[key] = (target, token)
        if type(route) is ChannelHost:
            self._host_call(state, route.publish, key[0], reg)
        else:
            try:
                self._send_publication(route[0], state, route[1], key[0], reg)
            except LeaderLostError:
                pass  # published again on the next leader

    # -- closing -------------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        try:
            await self._shutdown_inner()
        except Exception:
            log.exception("closing connshare on port %s failed", self.port)
        finally:
            self.role = Role.CLOSED
            _forget(self)
            if not self._closed_cf.done():
                self._closed_cf.set_result(None)

    async def _shutdown_inner(self) -> None:
        if self.role is Role.LEADER:
            # Graceful handoff: free the port, tell the followers, answer what is in
            # flight, and only then close the real clients.
            self.leaving = True
            if self._hosts_changed is not None:
                self._hosts_changed.set()  # REGISTERs waiting for a channel: answered now, not at the grace
            if self._accept_task is not None:
                self._accept_task.cancel()
                # let the cancel land first: it unregisters the socket from the selector
                await asyncio.gather(self._accept_task, return_exceptions=True)
            if self._marker is not None:
                self._marker.close()  # before the port: the next leader takes both
                self._marker = None
            if self._listen_sock is not None:
                self._listen_sock.close()  # the port is free for the next leader
            for peer in list(self.peers):
                if peer.open:
                    peer.send([MsgType.GOODBYE])
            grace = self.loop.time() + min(self.options.response_timeout, 10.0)
            assert self._drained is not None
            while (self.inflight or any(not p.closed for p in self.peers)) and self.loop.time() < grace:
                self._drained.clear()
                try:
                    await asyncio.wait_for(self._drained.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
            for peer in list(self.peers):
                peer.close_after_flush()
            # Coroutine calls still running past the grace: their callers hear that
            # the leader left. End them, rather than leave them running on against
            # a closed client, or pending until the loop goes at exit.
            await self.runner.cancel_running(1.0)
        # This process's own calls, leader or single mode, end before the real
        # client closes under them.
        await self.runner.cancel_own(1.0)
        if self.conn is not None:
            # (what still waits on it hears so: see FollowerConnection._finish)
            self.conn.abort(ClientClosedError("this process closed its clients"))
            self.conn = None
        for st in self.channels.values():
            self._clear_route(st)
            st.fatal = ClientClosedError("the client is closed")
            if not st.avail.done():
                st.avail.set_result(None)
        hosts = list(self.hosts.values())
        self.hosts.clear()
        for host in hosts:
            await host.close()
        main = self._main
        if main is not None and main is not asyncio.current_task():
            main.cancel()
            # Its finally blocks give back what leading held (the loop's polling, the
            # process's priority): done before close() returns, not just after.
            await asyncio.wait({main}, timeout=1.0)
        if self._workers is not None:
            self._workers.shutdown()

    def drop_after_fork(self) -> None:
        """In a forked child: let go of the parent's sockets without touching them."""
        socks = []
        if self._listen_sock is not None:
            socks.append(self._listen_sock)
        if self._marker is not None:
            socks.append(self._marker)  # a child must not hold the name when the leader is gone
        for peer in self.peers:
            socks.append(peer.sock)
        if self.conn is not None:
            socks.append(self.conn.sock)
            self.conn.forget_epoll()
        for s in socks:
            try:
                fd = s.detach() if isinstance(s, socket.socket) else s.fileno()
                if fd >= 0:
                    os.close(fd)
            except (OSError, AttributeError):
                pass


_nodes: dict[Any, Node] = {}
_nodes_lock = threading.Lock()


def node_for(options: Options) -> Node:
    """This process's node for the options' port (or for single mode)."""
    key = "single" if options.single_mode else options.port
    with _nodes_lock:
        node = _nodes.get(key)
        if node is None or node.closing:
            node = _nodes[key] = Node(options, key)
        return node


def _forget(node: Node) -> None:
    with _nodes_lock:
        if _nodes.get(node.key) is node:
            del _nodes[node.key]


def _after_fork_in_child() -> None:
    global _nodes_lock
    _nodes_lock = threading.Lock()
    nodes = list(_nodes.values())
    _nodes.clear()
    for node in nodes:
        node.drop_after_fork()
    close_inherited({node.port for node in nodes if not node.single})
    for node in nodes:
        for client in list(node.clients):
            client._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

#: how long interpreter exit waits for the nodes an app left open to close
_EXIT_GRACE_S = 5.0


def _drop_listener(state: ChannelState, canon: bytes | None, listener: Any, owner: Any) -> list[LocalSub]:
    """Under ``state.lock``: drop ``listener`` (every one, if None) of ``owner``
    from the subscriptions to ``canon`` (to any key, if None); those left with
    none, taken out of ``state.subs``. (A loop in a frame of its own, so that an
    interrupt cannot skip the lock's release: see _subs._without.)"""
    gone = []
    for key, sub in list(state.subs.items()):
        if (canon is None or sub.canon == canon) and sub.remove(listener, owner):
            del state.subs[key]
            gone.append(sub)
    return gone


def _drop_publications(state: ChannelState, owner: Any) -> None:
    """Under ``state.lock``: forget what ``owner`` alone published (in a frame of its
    own, as _drop_listener)."""
    for key, owners in list(state.publishers.items()):
        owners.discard(owner)
        if not owners:
            del state.publishers[key]
            state.publications.pop(key, None)
            state.pub_sent.pop(key, None)


def _mark_closing(nodes: list[Node]) -> list[Node]:
    """Under ``_nodes_lock``: the nodes not closing yet, marked closing (in a frame
    of its own, as _drop_listener)."""
    fresh = [n for n in nodes if not n.closing]
    for n in fresh:
        n.closing = True
    return fresh


def _close_at_exit() -> None:
    """At interpreter exit: close the nodes the app left open, as its close() would
    (a leader hands off), then stop connshare's loop. A loop thread left running
    into the interpreter's finalization crashes the process under uvloop."""
    with _nodes_lock:
        nodes = list(_nodes.values())
        fresh = _mark_closing(nodes)
    done = [n._closed_cf for n in nodes]
    for n in fresh:
        try:
            n._close_now()
        except RuntimeError:  # its loop is closed already: nothing runs there
            n._closed_cf.cancel()
    if not concurrent.futures.wait(done, _EXIT_GRACE_S).not_done:
        log.debug("connshare closed at exit")
    else:
        log.warning("connshare: closing at exit took over %s s; exiting anyway", _EXIT_GRACE_S)
    stop_loop(1.0)


# Registered at import: atexit runs handlers last in, first out, so an app's own
# close() registered after it runs first, and finds nothing left to do here.
atexit.register(_close_at_exit)
