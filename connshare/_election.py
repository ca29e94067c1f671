"""Winning the port, or finding the leader that holds it and proving we may follow it.

The leader is whoever binds and listens on 127.0.0.1:port. SO_REUSEADDR lets a new
leader bind while the old one's connections sit in TIME_WAIT; on Linux and macOS it
never lets two sockets listen on one address and port (SO_REUSEPORT would, and is
never set).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import sys

from ._errors import AuthenticationError, LimitExceededError, PortInUseError, ProtocolError, ProtocolVersionError
from ._options import Options
from ._protocol import (
    MAX_HANDSHAKE_FRAME,
    Challenge,
    Codec,
    Error,
    FollowerHandshake,
    FrameDecoder,
    HandshakeState,
    MessageDecoder,
    Welcome,
    to_message,
)

HOST = "127.0.0.1"
log = logging.getLogger("connshare.election")


class Retry(Exception):
    """The election should go round again: nobody listens, or a leader is coming or
    going. ``Retry("hung up")``: the peer hung up, which a program that is no
    leader does again and again."""


def try_bind(port: int) -> socket.socket | None:
    """A listening socket on the port, or None if another socket holds it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return None
        raise
    sock.setblocking(False)
    return sock


def _marker_name(port: int) -> bytes:
    return f"\0connshare-leader:{HOST}:{port}".encode()


def hold_marker(port: int) -> socket.socket | None:
    """Linux: an abstract Unix socket name, held while this process leads ``port``.

    Followers look for it when a handshake times out. A leader whose loop is busy
    (a real client's constructor runs there) cannot answer, but it holds this
    name, and a foreign program on the port does not. The kernel lets it go with
    the process; its scope, a network namespace, is that of 127.0.0.1."""
    if not sys.platform.startswith("linux"):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_marker_name(port))
    except OSError:
        sock.close()  # held still by the leader before us, on its way out
        return None
    return sock


def close_inherited(ports: set[int]) -> None:
    """In a forked child (Linux): close this process's copy of every socket on
    ``ports``, the listening socket, a leader's side of its followers, a
    follower's connection, and the marker. Those the parent had recorded are
    closed already; these are the ones it had not yet, a fork in the moment
    after a bind, an accept or a connect. Left open here, a copy would hold the
    port, or keep a dead leader's connection open, after the parent dies.

    The sockets are found by inode in /proc, not by wrapping each descriptor in
    a socket object, which would apply a socket.setdefaulttimeout() of the app's
    to every one of its sockets (making them non-blocking)."""
    if not ports or not sys.platform.startswith("linux"):
        return
    try:
        ours = _inodes_on(ports)
        if not ours:
            return
        for name in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue  # the listing's own descriptor, closed since
            if link.startswith("socket:[") and link[8:-1] in ours:
                os.close(int(name))  # this copy only: the parent's is untouched
    except OSError as exc:
        log.debug("closing inherited sockets: %r", exc)


def _inodes_on(ports: set[int]) -> set[str]:
    """Inodes of the sockets of this network namespace on 127.0.0.1:``ports``
    (either end), and of the leaders' markers."""
    # /proc/net/tcp writes an address as its 32 bits in host order, in hex
    host = f"{struct.unpack('=I', socket.inet_aton(HOST))[0]:08X}"
    ends = {f"{host}:{port:04X}" for port in ports}
    markers = {"@" + _marker_name(port)[1:].decode() for port in ports}
    inodes = set()
    for line in _lines("/proc/net/tcp")[1:]:
        fields = line.split()
        if fields[1] in ends or fields[2] in ends:
            inodes.add(fields[9])
    for line in _lines("/proc/net/unix")[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[7] in markers:
            inodes.add(fields[6])
    return inodes


def _lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def leader_holds_marker(port: int) -> bool:
    """Whether a connshare process leads ``port``, however busy (see hold_marker)."""
    if not sys.platform.startswith("linux"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(_marker_name(port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def port_owner(port: int) -> tuple[str | None, str | None]:
    """A description of the process listening on ``port`` and its status, where
    psutil can see it."""
    import psutil  # only for this diagnostic: ~0.6 MB a worker need not pay

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                try:
                    p = psutil.Process(c.pid)
                    cmd = " ".join(p.cmdline())[:200]
                    return f"pid {c.pid} ({p.name()}: {cmd})", p.status()
                except psutil.Error:
                    return f"pid {c.pid}", None
    except (psutil.Error, OSError):
        pass
    return None, None


Followed = tuple[socket.socket, Codec, MessageDecoder, "int | None", bytes]


async def connect_to_leader(loop: asyncio.AbstractEventLoop, port: int, opts: Options, codec: Codec, secret: bytes) -> Followed:
    """Connect to the port and pass the handshake: the socket, the codec to send
    with (it keeps to the leader's max_frame_size), the decoder of its messages,
    the leader's pid, and the bytes that came after WELCOME. Raises
    :class:`Retry` when the election should go round again; PortInUseError, or an
    authentication, version or limit error, when following there cannot work."""
    try:
        return await _connect(loop, port, opts, codec, secret)
    except PortInUseError:
        raise
    except OSError as exc:  # reset, not connected: a leader coming or going
        log.debug("connecting to port %s: %r", port, exc)
        raise Retry("hung up") from None


async def _connect(loop: asyncio.AbstractEventLoop, port: int, opts: Options, codec: Codec, secret: bytes) -> Followed:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    keep = False
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), opts.connect_timeout)
        except (ConnectionRefusedError, asyncio.TimeoutError):
            raise Retry() from None  # nobody listens: the next round may bind
        except ConnectionResetError:
            raise Retry("hung up") from None
        if sock.getsockname() == sock.getpeername():
            raise Retry()  # TCP connected to itself: nobody listens there
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hs = FollowerHandshake(secret, opts.max_frame_size)
        decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)  # a fake leader must not make us buffer much
        await loop.sock_sendall(sock, codec.encode(hs.start()))
        end = loop.time() + opts.connect_timeout
        got_bytes = False
        early = b""
        while hs.state is not HandshakeState.OPEN:
            left = end - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
            except asyncio.TimeoutError:
                if leader_holds_marker(port):
                    raise Retry() from None  # a busy leader: ask again (until max_wait_time)
                owner, status = port_owner(port)
                if status in ("stopped", "tracing-stop", "zombie"):
                    raise Retry() from None  # a hung leader: wait for it to die
                raise PortInUseError(port, f"no connshare handshake within connect_timeout={opts.connect_timeout} s", owner) from None
            except (ConnectionResetError, BrokenPipeError):
                raise Retry("hung up") from None
            if not data:
                if got_bytes and hs.peer_pid is None:  # it said something, and not a leader's challenge
                    owner, _ = port_owner(port)
                    raise PortInUseError(port, "the peer closed the connection during the handshake", owner)
                raise Retry("hung up")  # a leader going away, or not a leader
            got_bytes = True
            try:
                decoder.push(data)
                while (body := decoder.next()) is not None:
                    msg = to_message(codec.unpack(body))
                    if not isinstance(msg, (Challenge, Welcome, Error)):
                        raise ProtocolError(f"a {type(msg).__name__} during the handshake")
                    for reply in hs.receive(msg):
                        await loop.sock_sendall(sock, codec.encode(reply))
                    if hs.state is HandshakeState.OPEN:
                        early = decoder.rest()
                        break
            except LimitExceededError:
                if hs.peer_pid is None:  # said before it proved the secret: anyone can say it
                    raise Retry() from None
                raise
            except (AuthenticationError, ProtocolVersionError):
                raise
            except ProtocolError as exc:
                owner, _ = port_owner(port)
                raise PortInUseError(port, f"it does not speak connshare ({exc})", owner) from None
        keep = True
        send_codec = codec.limited(hs.peer_max_frame_size or codec.max_frame_size, "the leader's ")
        return sock, send_codec, codec.decoder(opts.max_frame_size), hs.peer_pid, early
    finally:
        if not keep:
            sock.close()
