"""A hand-driven connshare peer on a raw socket, for the hostile-input tests.

It speaks the wire protocol itself (frames, handshake) so a test can do exactly
what a real follower never would: skip or fake the handshake, authenticate and then
send garbage, flood, or stop reading. It never uses connshare's follower code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from connshare._protocol import DEFAULT_MAX_FRAME_SIZE as MAX_FRAME
from connshare._protocol import MAGIC, NONCE_SIZE, PROTOCOL_VERSION, MsgType, _proof

HEADER = struct.Struct(">I")


def frame(body: bytes) -> bytes:
    """A handshake frame: the body's length, then the body."""
    return HEADER.pack(len(body)) + body


def pack(wire: Any) -> bytes:
    """One message of an open connection, of any msgpack value (no shape or key
    checks: that is the point)."""
    return msgpack.packb(wire, use_bin_type=True)


def hs_pack(wire: Any) -> bytes:
    """One handshake frame of any msgpack value."""
    return frame(pack(wire))


def unpack_first(data: bytes) -> Any:
    """The value of the first handshake frame in ``data``."""
    (n,) = HEADER.unpack_from(data)
    return msgpack.unpackb(data[4 : 4 + n], raw=False)


class Closed(Exception):
    """The other side closed the connection (FIN or RST)."""


class RawPeer:
    """One TCP connection to 127.0.0.1:port, driven by hand."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.addr = self.sock.getsockname()
        self._buf = bytearray()
        self.nonce = os.urandom(NONCE_SIZE)
        self.leader_pid: int | None = None
        self.auth_proof: bytes | None = None
        self._rids = iter(range(1, 1 << 62))
        #: past the handshake: messages have no length prefix, and arrive here
        self.open = False
        self._stream = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.log_mark = 0  # where a LogCapture stood when this peer connected

    # -- bytes ---------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> bool:
        """Send; False if the leader had already closed the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def send(self, wire: Any) -> bool:
        """Send one message: a handshake frame until the handshake is done."""
        return self.send_raw(pack(wire) if self.open else hs_pack(wire))

    def _next(self) -> Any:
        """The next whole message buffered, or None."""
        if self.open:
            try:
                return next(self._stream)
            except StopIteration:
                return None
        if len(self._buf) >= 4:
            (n,) = HEADER.unpack_from(self._buf)
            if len(self._buf) >= 4 + n:
                body = bytes(self._buf[4 : 4 + n])
                del self._buf[: 4 + n]
                return msgpack.unpackb(body, raw=False, strict_map_key=False)
        return None

    def recv(self, timeout: float = 5.0) -> list:
        """The next message (a wire array); raises Closed on EOF/RST, TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from the leader")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                raise Closed("reset") from None
            if not data:
                raise Closed("eof")
            if self.open:
                self._stream.feed(data)
            else:
                self._buf += data

    def recv_until(self, pred: Callable[[list], bool], timeout: float = 5.0) -> tuple[list, list]:
        """Read until a message matches ``pred``: (that message, those before it)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            msg = self.recv(max(deadline - time.monotonic(), 0.001))
            if pred(msg):
                return msg, seen
            seen.append(msg)

    def wait_closed(self, timeout: float = 5.0) -> list:
        """Read until the leader closes the connection; the messages read meanwhile.
        Raises TimeoutError if it is still open at the deadline."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            try:
                got.append(self.recv(max(deadline - time.monotonic(), 0.001)))
            except Closed:
                return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the protocol ------------------------------------------------------------------

    def hello(self, magic: str = MAGIC, version: int = PROTOCOL_VERSION) -> list:
        """Send HELLO; return the leader's answer (a CHALLENGE, or an ERROR)."""
        self.send([MsgType.HELLO, magic, version, os.getpid(), self.nonce])
        return self.recv()

    def handshake(self, secret: bytes | str, pipelined: bytes = b"") -> None:
        """Authenticate with ``secret``, checking the leader's proof like a follower;
        ``pipelined``: bytes sent right behind AUTH, in the same send()."""
        key = secret.encode() if isinstance(secret, str) else secret
        challenge = self.hello()
        assert challenge[0] == MsgType.CHALLENGE, challenge
        _, _magic, _version, pid, leader_nonce, proof = challenge
        assert proof == _proof(key, b"L", self.nonce, leader_nonce), "the leader does not know the secret"
        self.leader_pid = pid
        self.auth_proof = _proof(key, b"F", leader_nonce, self.nonce)
        self.send_raw(hs_pack([MsgType.AUTH, self.auth_proof, MAX_FRAME]) + pipelined)
        welcome = self.recv()
        assert welcome[0] == MsgType.WELCOME and len(welcome) == 2, welcome
        self.open = True
        self._stream.feed(bytes(self._buf))  # what came after WELCOME
        self._buf.clear()

    def rid(self) -> int:
        return next(self._rids)

    def request(self, wire: list, timeout: float = 5.0) -> list:
        """Send a request whose wire[1] is 0 (filled here); its RESULT or ERROR."""
        rid = self.rid()
        wire = list(wire)
        wire[1] = rid
        self.send(wire)
        msg, _ = self.recv_until(lambda m: m[0] in (MsgType.RESULT, MsgType.ERROR) and m[1] == rid, timeout)
        return msg

    def register(self, name: str, cls: str = "BlastClient") -> int:
        """REGISTER channel ``name`` as a ``cls`` (the hostile tests' leader hosts
        a BlastClient as "b") and return its id."""
        msg = self.request([MsgType.REGISTER, 0, name, cls])
        assert msg[0] == MsgType.RESULT, msg
        return msg[2]

    def invoke(self, channel: int, method: str, *args: Any, timeout: float = 5.0) -> list:
        return self.request([MsgType.INVOKE, 0, channel, method, list(args), {}, 0, None], timeout)

    def ping(self, token: int, timeout: float = 5.0) -> None:
        """PING and wait for its PONG (other messages are skipped)."""
        self.send([MsgType.PING, token])
        self.recv_until(lambda m: m == [MsgType.PONG, token], timeout)


class FakeServer:
    """Holds a port like a foreign program would: accepts connections, records every
    byte they send, and answers each with ``reply(first_frame_bytes) -> bytes | None``
    (or greets first, or hangs up at once)."""

    def __init__(
        self, port: int, reply: Callable[[bytes], bytes | None] | None = None, greeting: bytes = b"", hang_up: bool = False
    ) -> None:
        self.reply = reply
        self.greeting = greeting
        self.hang_up = hang_up
        self.received: list[bytearray] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        # As most servers do. Without it the connections it closes first sit in
        # TIME_WAIT without SO_REUSEADDR, and Linux refuses to bind the port, even
        # to a socket with it, for a minute after the server has gone.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self._conns: list[socket.socket] = []
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.hang_up:
                conn.close()
                continue
            with self.lock:
                self._conns.append(conn)
                buf = bytearray()
                self.received.append(buf)
            threading.Thread(target=self._serve, args=(conn, buf), daemon=True).start()

    def _serve(self, conn: socket.socket, buf: bytearray) -> None:
        try:
            if self.greeting:
                conn.sendall(self.greeting)
            answered = False
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                with self.lock:
                    buf += data
                if self.reply is not None and not answered and len(buf) >= 4 and len(buf) >= 4 + HEADER.unpack_from(buf)[0]:
                    answered = True
                    out = self.reply(bytes(buf))
                    if out:
                        conn.sendall(out)
        except OSError:
            pass

    def frames(self) -> list[list]:
        """Every frame every connection sent, decoded."""
        out = []
        with self.lock:
            bufs = [bytes(b) for b in self.received]
        for b in bufs:
            pos = 0
            while len(b) - pos >= 4:
                (n,) = HEADER.unpack_from(b, pos)
                if len(b) - pos - 4 < n:
                    break
                out.append(msgpack.unpackb(b[pos + 4 : pos + 4 + n], raw=False))
                pos += 4 + n
        return out

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._thread.join(5)


class FakeLeader(FakeServer):
    """Holds a port like a connshare leader that knows the secret. Once a
    follower's handshake is done it runs ``serve(conn, bytes_read_after_auth)``,
    if given, then hangs up. ``opened``: when each handshake was done
    (``time.monotonic()``)."""

    def __init__(
        self, port: int, secret: bytes, serve: Callable[[socket.socket, bytes], None] | None = None, exits_mid_handshake: bool = False
    ) -> None:
        self.secret = secret
        self.serve = serve
        #: after its first CHALLENGE, stop listening and hang up, as a leader that dies then
        self.exits_mid_handshake = exits_mid_handshake
        self.opened: list[float] = []
        super().__init__(port)

    def _serve(self, conn: socket.socket, buf: bytearray) -> None:
        def read_frame() -> list:
            while len(buf) < 4 or len(buf) < 4 + HEADER.unpack_from(buf)[0]:
                data = conn.recv(65536)
                if not data:
                    raise OSError("closed")
                buf.extend(data)
            (n,) = HEADER.unpack_from(buf)
            body = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            return msgpack.unpackb(body, raw=False)

        try:
            hello = read_frame()
            nonce = os.urandom(NONCE_SIZE)
            proof = _proof(self.secret, b"L", hello[4], nonce)
            conn.sendall(hs_pack([MsgType.CHALLENGE, MAGIC, PROTOCOL_VERSION, os.getpid(), nonce, proof]))
            if self.exits_mid_handshake:
                self.sock.close()
                return
            auth = read_frame()
            assert auth[1] == _proof(self.secret, b"F", nonce, hello[4]), "the follower does not know the secret"
            conn.sendall(hs_pack([MsgType.WELCOME, MAX_FRAME]))
            with self.lock:
                self.opened.append(time.monotonic())
            if self.serve is not None:
                self.serve(conn, bytes(buf))
        except OSError:
            pass
        finally:
            conn.close()


class LogCapture(logging.Handler):
    """Records every message of the ``connshare`` loggers, from any thread, while
    installed (``with LogCapture() as logs:``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()
        self._logger = logging.getLogger("connshare")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.records.append((record.levelno, record.name, record.getMessage()))

    def __enter__(self) -> LogCapture:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def messages(self, level: int = logging.WARNING, since: int = 0) -> list[str]:
        """Messages at ``level`` or above, from record number ``since`` on."""
        with self._lock:
            return [m for lvl, _, m in self.records[since:] if lvl >= level]

    def mark(self) -> int:
        """A record number for ``messages(since=...)``."""
        with self._lock:
            return len(self.records)

    def about(self, addr: tuple, since: int = 0, level: int = logging.WARNING) -> list[str]:
        """Messages at ``level`` or above that name the peer at ``addr`` (a port may
        be reused: pass ``since=mark()`` taken before that peer connected)."""
        return [m for m in self.messages(level, since) if str(addr) in m]
