"""Local security: who may talk to a leader, whom a follower talks to, and what may
cross the wire. Real sockets, real processes; raw peers speak the protocol by hand."""

from __future__ import annotations

import collections
import decimal
import http.server
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import connshare
from connshare import (
    AuthenticationError,
    ConfigurationError,
    EncodeError,
    NotReadyError,
    PortInUseError,
    ProtocolVersionError,
)
from connshare._leader import PeerProtocol
from connshare._protocol import DEFAULT_MAX_FRAME_SIZE as MAX_FRAME
from connshare._protocol import MAGIC, PROTOCOL_VERSION, ErrorCode, MsgType, _proof
from connshare._secret import load_or_create_secret, secret_dir, secret_path
from tests.harness import AgentError, wait_until
from tests.hostile_clients import TRANSCODE, BlastClient, Money, blast_spec, in_process_leader
from tests.rawpeer import HEADER, FakeServer, LogCapture, RawPeer, hs_pack, pack, unpack_first

ROOT = Path(__file__).resolve().parent.parent

SECRET = "the secret of this app, 32 chars"
OTHER = "the secret of another app, too!!"


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    with LogCapture() as capture:
        yield capture


# -- 1. authentication ------------------------------------------------------------------


def _mode(path: os.PathLike) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_default_secret_is_a_private_per_port_file_that_gates_the_port(port, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        with in_process_leader(port) as leader:  # no secret=: the per-user file
            os.umask(old_umask)
            directory, path = secret_dir(), secret_path(port)
            assert directory == tmp_path / f"connshare-{os.getuid()}"
            assert _mode(directory) == 0o700 and stat.S_ISDIR(os.lstat(directory).st_mode)
            assert _mode(path) == 0o600 and stat.S_ISREG(os.lstat(path).st_mode)
            assert os.lstat(directory).st_uid == os.lstat(path).st_uid == os.getuid()
            key = load_or_create_secret(port)
            assert len(key) >= 32 and key == load_or_create_secret(port) == path.read_bytes().strip()
            other_key = load_or_create_secret(port + 1 if port < 65535 else port - 1)
            assert other_key != key  # keyed by port
            # the file's key opens the port; another port's key does not
            with RawPeer(port) as p:
                p.handshake(key)
                ch = p.register("b")
                assert p.invoke(ch, "echo", "hi")[::2] == [MsgType.RESULT, "hi"]
            with RawPeer(port) as p:
                challenge = p.hello()
                p.send([MsgType.AUTH, _proof(other_key, b"F", challenge[4], p.nonce), MAX_FRAME])
                (err,) = p.wait_closed()
                assert err[0] == MsgType.ERROR and err[2] == ErrorCode.AUTH
            assert leader.history()["echo"] == 1
    finally:
        os.umask(old_umask)


def test_unsafe_secret_files_are_refused(port, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory, path = secret_dir(), secret_path(port)
    # a directory others can enter
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with pytest.raises(ConfigurationError, match="accessible to other users"):
        load_or_create_secret(port)
    directory.chmod(0o700)
    # a key file others can read
    load_or_create_secret(port)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="mode 0600"):
        load_or_create_secret(port)
    # a symlink planted where the key file goes
    path.unlink()
    target = tmp_path / "planted"
    target.write_text("x" * 64)
    target.chmod(0o600)
    path.symlink_to(target)
    with pytest.raises(ConfigurationError, match="symlink"):
        load_or_create_secret(port)
    path.unlink()
    if os.getuid() == 0:  # root can hand the file to another user
        load_or_create_secret(port)
        os.chown(path, 65534, -1)
        with pytest.raises(ConfigurationError, match="owned by this user"):
            load_or_create_secret(port)
        path.unlink()
    # a symlink planted where the directory goes
    directory.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    directory.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigurationError, match="not a directory owned"):
        load_or_create_secret(port)
    # and through the public API: the client does not start, and says why
    c = connshare.cluster(BlastClient, port=port, name="b").delegate("echo").create()
    try:
        with pytest.raises(NotReadyError) as info:
            c.wait_ready(10)
        assert isinstance(info.value.__cause__, ConfigurationError)
    finally:
        c.close()


def _hostile_no_hello(p: RawPeer, legit: RawPeer) -> None:
    p.send([MsgType.REGISTER, 1, "b", "BlastClient"])
    p.send([MsgType.INVOKE, 2, 1, "echo", ["stolen"], {}, 0, None])
    p.send([MsgType.SUBSCRIBE, 3, 1, "subscribe", {"key": "guarded"}])


def _hostile_skip_auth(p: RawPeer, legit: RawPeer) -> None:
    assert p.hello()[0] == MsgType.CHALLENGE
    _hostile_no_hello(p, legit)


def _hostile_other_secret(p: RawPeer, legit: RawPeer) -> None:
    challenge = p.hello()
    p.send([MsgType.AUTH, _proof(OTHER.encode(), b"F", challenge[4], p.nonce), MAX_FRAME])
    _hostile_no_hello(p, legit)


def _hostile_random_proof(p: RawPeer, legit: RawPeer) -> None:
    p.hello()
    p.send([MsgType.AUTH, os.urandom(32), MAX_FRAME])
    _hostile_no_hello(p, legit)


def _hostile_replayed_proof(p: RawPeer, legit: RawPeer) -> None:
    # A proof recorded from a good session, replayed with that session's nonce: the
    # leader's fresh nonce makes it worthless.
    p.nonce = legit.nonce
    p.hello()
    p.send([MsgType.AUTH, legit.auth_proof, MAX_FRAME])
    _hostile_no_hello(p, legit)


def _hostile_pipelined(p: RawPeer, legit: RawPeer) -> None:
    # Everything at once, without waiting for the challenge.
    p.send_raw(
        hs_pack([MsgType.HELLO, MAGIC, PROTOCOL_VERSION, os.getpid(), p.nonce])
        + hs_pack([MsgType.AUTH, b"\0" * 32, MAX_FRAME])
        + hs_pack([MsgType.REGISTER, 1, "b", "BlastClient"])
        + hs_pack([MsgType.SUBSCRIBE, 2, 1, "subscribe", {"key": "guarded"}])
    )


def _hostile_other_version(p: RawPeer, legit: RawPeer) -> None:
    p.send([MsgType.HELLO, MAGIC, PROTOCOL_VERSION + 1, os.getpid(), p.nonce])
    _hostile_no_hello(p, legit)


def _hostile_other_magic(p: RawPeer, legit: RawPeer) -> None:
    p.send([MsgType.HELLO, "GET / HTTP/1.1", PROTOCOL_VERSION, os.getpid(), p.nonce])
    _hostile_no_hello(p, legit)


HOSTILE: list[tuple[Callable[[RawPeer, RawPeer], None], int]] = [
    (_hostile_no_hello, ErrorCode.PROTOCOL),
    (_hostile_skip_auth, ErrorCode.PROTOCOL),
    (_hostile_other_secret, ErrorCode.AUTH),
    (_hostile_random_proof, ErrorCode.AUTH),
    (_hostile_replayed_proof, ErrorCode.AUTH),
    (_hostile_pipelined, ErrorCode.AUTH),
    (_hostile_other_version, ErrorCode.VERSION),
    (_hostile_other_magic, ErrorCode.PROTOCOL),
]


def test_raw_client_without_the_secret_cannot_invoke_or_subscribe(port, logs) -> None:
    with in_process_leader(port, secret=SECRET) as leader, RawPeer(port) as legit:
        legit.handshake(SECRET)  # a good session, to record its proof for the replay
        for attack, code in HOSTILE:
            mark = logs.mark()
            with RawPeer(port) as p:
                attack(p, legit)
                got = p.wait_closed()  # the leader hangs up on it
                # at most a CHALLENGE, then one ERROR about the connection, and nothing more
                if got and got[0][0] == MsgType.CHALLENGE:
                    got = got[1:]
                assert len(got) == 1 and got[0][:3] == [MsgType.ERROR, 0, code], (attack.__name__, got)
                wait_until(lambda p=p, mark=mark: logs.about(p.addr, mark), what=f"a log naming {p.addr}")
        # nothing reached the real client
        assert leader.history() == {"echo": 0, "subscribed": []}
        assert not leader._node.hosts["b"].keys
        # control: the same requests with the secret do reach it
        ch = legit.register("b")
        assert legit.invoke(ch, "echo", "hello")[2] == "hello"
        key = legit.request([MsgType.SUBSCRIBE, 0, ch, "subscribe", {"key": "guarded"}])[2]
        leader.send("guarded", "news")
        legit.recv_until(lambda m: m == [MsgType.EVENT, key, "news"])
        assert leader.history() == {"echo": 1, "subscribed": ["guarded"]}


def test_a_stranger_that_says_nothing_is_dropped_after_connect_timeout(port, logs) -> None:
    with in_process_leader(port, secret=SECRET, connect_timeout=0.5), RawPeer(port) as p:
        t0 = time.monotonic()
        assert p.wait_closed(10) == []
        assert time.monotonic() - t0 < 5
        assert any("no handshake within connect_timeout" in m for m in logs.about(p.addr))


def test_a_stranger_cannot_make_the_leader_buffer_a_large_frame(port, logs) -> None:
    # Before the handshake only handshake-sized frames are read: a stranger announcing
    # 1 MB (well under max_frame_size) is dropped at once, not after connect_timeout.
    with in_process_leader(port, secret=SECRET, connect_timeout=60), RawPeer(port) as p:
        p.send_raw(HEADER.pack(1 << 20) + b"\0" * 1000)
        assert p.wait_closed(10) == []
        assert any("max_frame_size" in m for m in logs.about(p.addr))


def test_messages_sent_right_behind_the_handshake_are_served(port) -> None:
    # The handshake's messages carry a length and the open connection's do not:
    # both kinds in one read are told apart.
    with in_process_leader(port, secret=SECRET), RawPeer(port) as p:
        p.handshake(SECRET, pipelined=pack([MsgType.PING, 7]) + pack([MsgType.REGISTER, 1, "b", "BlastClient"]))
        assert p.recv() == [MsgType.PONG, 7]
        assert p.recv()[:2] == [MsgType.RESULT, 1]
        assert p.invoke(p.register("b"), "echo", "after")[2] == "after"


def _agent_error(fn: Callable[[], Any]) -> AgentError:
    with pytest.raises(AgentError) as info:
        fn()
    return info.value


def test_a_follower_with_another_secret_gets_authentication_error(port, spawn, logs) -> None:
    with in_process_leader(port, secret=SECRET) as leader:
        good, bad = spawn([blast_spec(port, secret=SECRET)], [blast_spec(port, secret=OTHER)])
        t0 = time.monotonic()
        err = _agent_error(lambda: bad.ready(timeout=20))
        assert time.monotonic() - t0 < 5
        assert err.type == "NotReadyError" and err.desc["cause"] == "AuthenticationError"
        err = _agent_error(lambda: bad.call("echo", "sensitive"))
        assert err.type == "AuthenticationError" and "secret" in err.desc["message"]
        assert good.ready()["leader_pid"] == os.getpid()
        assert good.call("echo", "fine") == "fine"
        assert leader.history()["echo"] == 1  # only the good follower's call ran
        # the leader warns of the peer that gave up on its proof and lives on
        wait_until(
            lambda: any(f"pid {bad.pid}" in m and "another secret" in m for m in logs.messages()), what="a warning naming the bad follower"
        )


_HANG_UP_AND_EXIT = """
import os, sys
from tests.rawpeer import RawPeer
peer = RawPeer(int(sys.argv[1]))
peer.hello()  # the leader's challenge: hang up on it, as a worker recycled just then
print(os.getpid())
"""


def test_a_peer_that_exits_during_the_handshake_is_noted_not_warned_of(port, logs) -> None:
    with in_process_leader(port, secret=SECRET):
        mark = logs.mark()
        done = subprocess.run([sys.executable, "-c", _HANG_UP_AND_EXIT, str(port)], cwd=ROOT, timeout=60, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        pid = int(done.stdout)
        wait_until(
            lambda: any(f"pid {pid}" in m and "as it exited" in m for m in logs.messages(logging.INFO, since=mark)),
            what="a note of the peer that exited",
        )
        assert not [m for m in logs.messages(since=mark) if "handshake" in m]


# -- 2. somebody else holds the port ----------------------------------------------------------


def _challenge_reply(version: int = PROTOCOL_VERSION, magic: str = MAGIC, key: bytes | None = None) -> Callable[[bytes], bytes]:
    def reply(hello_frame: bytes) -> bytes:
        hello = unpack_first(hello_frame)
        nonce = os.urandom(16)
        proof = _proof(key, b"L", hello[4], nonce) if key else os.urandom(32)
        return hs_pack([MsgType.CHALLENGE, magic, version, 4242, nonce, proof])

    return reply


IMPOSTORS = {
    "leader without the secret": (_challenge_reply(), AuthenticationError),
    "leader of another app": (_challenge_reply(key=OTHER.encode()), AuthenticationError),
    "leader of a newer protocol": (_challenge_reply(version=PROTOCOL_VERSION + 1), ProtocolVersionError),
    "leader refusing our version": (
        lambda _: hs_pack([MsgType.ERROR, 0, ErrorCode.VERSION, "ProtocolVersionError", "leader speaks another protocol", [], ""]),
        ProtocolVersionError,
    ),
    "another msgpack protocol": (_challenge_reply(magic="not-connshare"), PortInUseError),
    "a web server": (lambda _: b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", PortInUseError),
}


@pytest.mark.parametrize("kind", list(IMPOSTORS))
def test_a_follower_sends_nothing_to_an_impostor(port, kind: str) -> None:
    reply, expected = IMPOSTORS[kind]
    server = FakeServer(port, reply)
    client = connshare.cluster(BlastClient, port=port, name="b", secret=SECRET, connect_timeout=3).delegate("echo").create()
    try:
        t0 = time.monotonic()
        with pytest.raises(NotReadyError) as info:
            client.wait_ready(10)
        took = time.monotonic() - t0
        assert isinstance(info.value.__cause__, expected), repr(info.value.__cause__)
        assert took < 3, took  # from the answer itself, not a timeout
        with pytest.raises(expected):
            client.echo("app data")
        if expected is PortInUseError:
            exc = info.value.__cause__
            assert exc.port == port and str(port) in str(exc) and f"pid {os.getpid()}" in (exc.owner or "")
        # all it ever sent: HELLO, nothing after it (no AUTH proof, no request, no data)
        frames = server.frames()
        assert frames and all(f[0] == MsgType.HELLO for f in frames), frames
        assert b"app data" not in b"".join(bytes(b) for b in server.received)
    finally:
        client.close()
        server.close()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()


def test_a_port_held_by_an_http_server_raises_port_in_use_error_quickly(port) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    connect_timeout = 1.0
    client = connshare.cluster(BlastClient, port=port, name="b", connect_timeout=connect_timeout).delegate("echo").create()
    try:
        t0 = time.monotonic()
        with pytest.raises(NotReadyError) as info:
            client.wait_ready(20)
        took = time.monotonic() - t0
        exc = info.value.__cause__
        assert isinstance(exc, PortInUseError) and isinstance(exc, OSError)
        assert exc.port == port and f"127.0.0.1:{port}" in str(exc)
        assert f"pid {os.getpid()}" in (exc.owner or "") and exc.owner in str(exc)  # psutil names the owner: this process
        assert took < connect_timeout + 2, took
        t0 = time.monotonic()
        with pytest.raises(PortInUseError):
            client.echo("x")
        assert time.monotonic() - t0 < 0.5  # it never hangs afterwards either
        print(f"PortInUseError after {took:.3f} s (connect_timeout={connect_timeout})")
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_server_that_speaks_first_is_recognised_at_once(port) -> None:
    # A database-like greeting: refused from its first bytes, not after connect_timeout.
    server = FakeServer(port, greeting=b"\x4a\x00\x00\x00\x0a8.0.36\x00")
    client = connshare.cluster(BlastClient, port=port, name="b", secret=SECRET, connect_timeout=10).delegate("echo").create()
    try:
        t0 = time.monotonic()
        with pytest.raises(NotReadyError) as info:
            client.wait_ready(20)
        assert isinstance(info.value.__cause__, PortInUseError)
        assert time.monotonic() - t0 < 6  # at once, not after connect_timeout (10 s)
        with pytest.raises(PortInUseError):
            client.echo(1)  # at once, while the program holds the port
        # and once it is gone, the next election finds the port free
        server.close()
        wait_until(lambda: client.is_leader, what="the port to be led once the program left")
        assert client.echo(1) == 1
    finally:
        client.close()
        server.close()


def test_a_program_that_accepts_and_hangs_up_gives_port_in_use_error(port) -> None:
    server = FakeServer(port, hang_up=True)
    client = (
        connshare.cluster(BlastClient, port=port, name="b", secret=SECRET, connect_timeout=0.5, max_wait_time=2).delegate("echo").create()
    )
    try:
        t0 = time.monotonic()
        with pytest.raises(NotReadyError) as info:
            client.wait_ready(10)
        assert isinstance(info.value.__cause__, PortInUseError), repr(info.value.__cause__)
        assert time.monotonic() - t0 < 1.5  # about connect_timeout, not max_wait_time
    finally:
        client.close()
        server.close()


# -- 6. wire values -----------------------------------------------------------------------------


def test_unencodable_values_raise_in_the_caller_and_nothing_is_sent(port, spawn, monkeypatch) -> None:
    seen: list[tuple[int | None, Any]] = []

    def recording(handle: Callable[[PeerProtocol, list], None]) -> Callable[[PeerProtocol, list], None]:
        def record(self: PeerProtocol, wire: list) -> None:
            if wire[0] not in (MsgType.PING, MsgType.PONG):
                seen.append((self.pid, wire))
            handle(self, wire)

        return record

    # Every message the leader handles: calls go to _invoke, the rest to _dispatch.
    for name in ("_invoke", "_dispatch"):
        monkeypatch.setattr(PeerProtocol, name, recording(getattr(PeerProtocol, name)))
    with in_process_leader(port, secret=SECRET) as leader:
        (w,) = spawn([blast_spec(port, secret=SECRET, delegates=["echo", "history", ["sleep", "invoke_oneway"]])])
        w.ready()
        assert w.call("echo", "before") == "before"
        wait_until(lambda: any(wire[0] == MsgType.INVOKE for _, wire in seen), what="the first call")
        del seen[:]
        bad_values = [{1: "int key"}, {"ok": {(1, 2): "tuple key"}}, [{None: 1}], {2.5: "x"}, Money(decimal.Decimal(1), "EUR"), {1, 2}]
        # msgpack packs subclasses as their base: their keys are checked too
        bad_values += [collections.defaultdict(int, {1: 2}), {"c": collections.Counter([7])}, [collections.OrderedDict({3: 4})]]
        for value in bad_values:
            err = _agent_error(lambda v=value: w.call("echo", v))
            assert err.isa("EncodeError") and err.isa("TypeError"), err.desc
        assert _agent_error(lambda: w.call("sleep", {1: 2})).isa("EncodeError")  # oneway too
        assert _agent_error(lambda: w.subscribe({1: "reg"}, "t")).isa("EncodeError")
        assert _agent_error(lambda: w.request("publish", "0", {"x": Money(decimal.Decimal(1), "EUR")})).isa("EncodeError")
        assert "map keys must be str or bytes" in _agent_error(lambda: w.call("echo", {1: "x"})).desc["message"]
        # the follower stays connected and well: the next call is the first thing the
        # leader hears from it since
        assert w.call("echo", "after") == "after"
        assert [wire[3:5] for _, wire in seen] == [["echo", ["after"]]], seen
        assert all(pid == w.pid for pid, _ in seen)
        assert leader.history()["echo"] == 2


def test_transcode_carries_user_types_across_processes(port, spawn) -> None:
    with in_process_leader(port, secret=SECRET, transcode=TRANSCODE) as leader:
        (w,) = spawn([blast_spec(port, secret=SECRET, transcode=TRANSCODE)])
        w.ready()
        a, b = Money(decimal.Decimal("1.25"), "EUR"), Money(decimal.Decimal("2.50"), "EUR")
        # the real client in the leader receives the user's types, and they come back as such
        assert w.call("kinds", a, decimal.Decimal("0.1"), {"nested": [a]}) == ["Money", "Decimal", "dict"]
        total = w.call("total", a, b)
        assert type(total) is Money and total == Money(decimal.Decimal("3.75"), "EUR")
        assert w.call("echo", {"m": [a, decimal.Decimal("-0")]}) == {"m": [a, decimal.Decimal("-0")]}
        # subscription values too
        w.subscribe({"key": "price"}, "price")
        wait_until(lambda: "price" in leader.history()["subscribed"], what="the subscription on the leader")
        leader.send("price", {"seq": 1, "price": b})
        v, _ = w.wait_event("price", lambda v: v is not None and v["seq"] == 1)
        assert type(v["price"]) is Money and v["price"] == b
        # transcode does not lift the other rules: still raised in the caller
        assert _agent_error(lambda: w.call("echo", {1: a})).isa("EncodeError")
        assert _agent_error(lambda: w.call("echo", 1j)).isa("EncodeError")  # encode() refuses it
        assert w.call("echo", "still connected") == "still connected"


def test_values_that_cannot_be_encoded_raise_encode_error_in_process() -> None:
    # The same rule for the follower's own calls, with the exception object in hand.
    from connshare._protocol import Codec

    for codec in (Codec(), Codec(transcode=TRANSCODE)):
        for value in ({1: "x"}, [{b"ok": {3: 4}}], object(), {1, 2}):
            with pytest.raises(EncodeError):
                codec.pack([MsgType.INVOKE, 1, 1, "echo", [value], {}, 0, None])
        nested: list = []
        nested.append(nested)
        with pytest.raises(EncodeError, match="nests too deeply"):
            codec.pack([MsgType.RESULT, 1, nested])


def test_no_app_code_runs_on_a_strangers_handshake_bytes(port) -> None:
    # transcode's decode is the app's code: it sees what peers that proved the
    # secret send, never a stranger's bytes.
    decoded: list[int] = []

    def decode(code: int, data: bytes) -> Any:
        decoded.append(code)
        return TRANSCODE.decode(code, data)

    with in_process_leader(port, transcode=connshare.Transcode(TRANSCODE.encode, decode)):
        with RawPeer(port) as p:
            p.send([MsgType.HELLO, MAGIC, PROTOCOL_VERSION, os.getpid(), msgpack.ExtType(1, b"1.5")])
            p.wait_closed()
        with RawPeer(port) as p:
            p.hello()
            p.send([MsgType.AUTH, msgpack.ExtType(1, b"1.5"), MAX_FRAME])
            p.wait_closed()
    assert decoded == []
