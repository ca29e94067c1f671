"""The sans-I/O protocol, without sockets."""

from __future__ import annotations

import attrs
import msgpack
import pytest

from connshare import EncodeError, FrameTooLargeError, ProtocolError, Transcode, _protocol
from connshare._errors import AuthenticationError, ProtocolVersionError
from connshare._protocol import (
    HEADER,
    MESSAGES,
    PROTOCOL_VERSION,
    Auth,
    Cancel,
    Challenge,
    ChannelError,
    Codec,
    Error,
    ErrorCode,
    Event,
    FollowerHandshake,
    FrameDecoder,
    Goodbye,
    HandshakeState,
    Hello,
    Invoke,
    LeaderHandshake,
    MessageDecoder,
    MsgType,
    Ping,
    Pong,
    Publish,
    Register,
    Result,
    SubError,
    Subscribe,
    Unsubscribe,
    Welcome,
    to_message,
)

EXAMPLES = [
    Hello("connshare", 1, 123, b"n" * 16),
    Challenge("connshare", 1, 7, b"m" * 16, b"p" * 32),
    Auth(b"p" * 32, 1024),
    Welcome(1024),
    Register(3, "registry", "RegistryClient"),
    Subscribe(4, 1, "subscribe", {"service": "users", "tags": ["a", 1]}),
    Unsubscribe(9),
    Event(9, {"v": [1, 2.5, None, True, b"\x00"]}),
    Publish(1, "publish", {"service": "me", "addr": "10.0.0.5:80"}),
    Invoke(5, 1, "get_data", ["k", 2], {"flag": True}, 0, 10.0),
    Invoke(6, 1, "notify", [], {}, 1, None),
    Result(5, ["value", {"nested": {"x": 1}}]),
    Error(5, ErrorCode.RAISED, "builtins:KeyError", "'k'", ["k"], "Traceback ..."),
    Ping(1),
    Pong(1),
    Goodbye(),
    ChannelError(1, "builtins:OSError", "upstream down"),
    SubError(9, "builtins:ValueError", "no such key"),
    Cancel(7),
]


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGES.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    codec = Codec()
    frame = codec.encode(msg)  # type: ignore[arg-type]
    (n,) = HEADER.unpack(frame[:4])
    assert n == len(frame) - 4
    bodies = FrameDecoder().feed(frame)
    assert len(bodies) == 1
    assert to_message(codec.unpack(bodies[0])) == msg


def test_decoder_handles_any_split() -> None:
    codec = Codec()
    stream = b"".join(codec.encode(m) for m in EXAMPLES)  # type: ignore[arg-type]
    for step in (1, 2, 3, 5, 7, 64, 1000):
        dec = FrameDecoder()
        out = []
        for i in range(0, len(stream), step):
            out += dec.feed(stream[i : i + step])
        assert [to_message(codec.unpack(b)) for b in out] == EXAMPLES
        assert dec.buffered == 0
        dec = FrameDecoder()
        out = _feed_as_a_connection(dec, stream, step)
        assert [to_message(codec.unpack(b)) for b in out] == EXAMPLES
        assert dec.buffered == 0


def _feed_as_a_connection(dec: FrameDecoder | MessageDecoder, stream: bytes, step: int) -> list:
    """Feed ``stream`` as a connection does: views of one read buffer of ``step``
    bytes, overwritten by the next read (nothing decoded may point into it)."""
    out = []
    scratch = bytearray(step)
    for i in range(0, len(stream), step):
        chunk = stream[i : i + step]
        scratch[: len(chunk)] = chunk
        out += dec.feed(memoryview(scratch)[: len(chunk)])
        scratch[:] = b"\xff" * len(scratch)
    return out


def test_messages_of_an_open_connection_round_trip_however_split() -> None:
    codec = Codec()
    stream = b"".join(codec.pack(m.to_wire()) for m in EXAMPLES)  # type: ignore[attr-defined]
    assert stream == b"".join(msgpack.packb(m.to_wire()) for m in EXAMPLES)  # type: ignore[attr-defined]  # no length prefix
    for step in (1, 2, 3, 5, 7, 64, 1000):
        dec = codec.decoder()
        out = _feed_as_a_connection(dec, stream, step)
        assert [to_message(w) for w in out] == EXAMPLES
        assert dec.buffered == 0


def test_the_message_decoder_reads_lone_and_grouped_messages_alike() -> None:
    # A read that ends on a message boundary returns as soon as it gets there;
    # reads of one, several and parts of messages, in any order, give the same
    # messages and leave nothing buffered.
    codec = Codec()
    wires = [m.to_wire() for m in EXAMPLES] * 3  # type: ignore[attr-defined]
    bodies = [codec.pack(w) for w in wires]
    for groups in ([1, 1, 3, 1, 2, 1], [2, 1, 1], [1], [4, 1, 1, 1]):
        dec = codec.decoder()
        out: list = []
        i = 0
        while i < len(bodies):
            for g in groups:
                chunk = b"".join(bodies[i : i + g])
                if g == 2 and chunk:  # a message split across two reads
                    out += dec.feed(chunk[:7])
                    chunk = chunk[7:]
                out += dec.feed(chunk)
                i += g
        assert out == wires
        assert dec.buffered == 0


def test_a_whole_message_over_the_limit_is_refused_in_any_read() -> None:
    small, big = msgpack.packb([MsgType.PING, 1]), msgpack.packb([MsgType.RESULT, 1, "x" * 200])
    for data in (big, big + small, small + big):
        with pytest.raises(FrameTooLargeError, match="max_frame_size=100"):
            MessageDecoder(100).feed(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"a": 1}), "non-empty array"),
        (msgpack.packb([99, 1]), "unknown message type"),
        (msgpack.packb([MsgType.INVOKE, -1, 1, "m", [], {}, 0, None]), "non-negative"),
        (msgpack.packb([MsgType.EVENT, 1, {1: "int key"}]), "not valid msgpack"),
        (msgpack.packb([MsgType.PING, 1]) + b"\xc1", "not valid msgpack"),
    ],
)
def test_malformed_messages_of_an_open_connection_raise_protocol_error(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        Codec().decoder().feed(data)


def test_the_message_decoder_takes_its_limit_from_the_codec() -> None:
    big = Codec().pack(Result(1, "x" * 100).to_wire())
    assert Codec(max_frame_size=1000).decoder().feed(big) == [Result(1, "x" * 100).to_wire()]
    with pytest.raises(FrameTooLargeError, match="max_frame_size=50"):
        Codec(max_frame_size=50).decoder().feed(big)
    with pytest.raises(FrameTooLargeError, match="max_frame_size=50"):
        Codec(max_frame_size=50).pack(Result(1, "x" * 100).to_wire())


def test_the_message_decoder_gives_back_a_large_message_s_buffer() -> None:
    # The unpacker's buffer never shrinks: one 4 MB value would stay held per
    # connection for its life.
    import tracemalloc

    dec = Codec().decoder()
    big = msgpack.packb([MsgType.RESULT, 1, b"x" * (4 << 20)])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(big), 256 << 10):  # as the reads bring it
            got = dec.feed(big[i : i + (256 << 10)])
        assert len(got) == 1 and len(got[0][2]) == 4 << 20
        del got
        assert dec.feed(msgpack.packb([MsgType.PING, 1])) == [[MsgType.PING, 1]]
        # (a fresh unpacker allocates 1 MiB, of which the untouched pages stay out of RSS)
        assert tracemalloc.get_traced_memory()[0] - before < 2 << 20
    finally:
        tracemalloc.stop()


def test_the_message_decoder_renews_its_unpacker_inside_a_large_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # A read larger than the limit is fed in pieces; a piece that ends a large
    # message renews the unpacker, and the next pieces must go to the new one.
    monkeypatch.setattr(_protocol, "_RENEW_AFTER", 100)
    big = msgpack.packb([MsgType.RESULT, 1, b"x" * 300])
    ping, ping5 = msgpack.packb([MsgType.PING, 7]), msgpack.packb([MsgType.PING, 300])
    for pad in range(3):  # moves where the pieces end
        for n in range(150, 400):
            dec = MessageDecoder(500)
            assert dec.feed(big[:200]) == []
            got = dec.feed(big[200:] + ping5 * pad + ping * n)
            assert got == [[MsgType.RESULT, 1, b"x" * 300]] + [[MsgType.PING, 300]] * pad + [[MsgType.PING, 7]] * n
            assert dec.buffered == 0


def test_oversized_frame_is_refused_from_its_header() -> None:
    dec = FrameDecoder(max_frame_size=100)
    with pytest.raises(FrameTooLargeError, match="101 bytes"):
        dec.feed(HEADER.pack(101))


def test_oversized_frame_is_refused_when_sending() -> None:
    with pytest.raises(FrameTooLargeError):
        Codec(max_frame_size=50).encode(Result(1, "x" * 100))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"a": 1}), "non-empty array"),
        (msgpack.packb([]), "non-empty array"),
        (msgpack.packb([99, 1]), "unknown message type"),
        (msgpack.packb(["INVOKE"]), "unknown message type"),
        (msgpack.packb([MsgType.RESULT]), "takes 2 fields"),
        (msgpack.packb([MsgType.INVOKE, "x", 1, "m", [], {}, 0, None]), "field 1"),
        (msgpack.packb([MsgType.INVOKE, -1, 1, "m", [], {}, 0, None]), "non-negative"),
        (msgpack.packb([MsgType.INVOKE, True, 1, "m", [], {}, 0, None]), "non-negative"),
        (msgpack.packb([MsgType.INVOKE, 1, 1, "m", {}, {}, 0, None]), "field 4"),
        (msgpack.packb([MsgType.EVENT, 1, {1: "int key"}]), "not valid msgpack"),
        (msgpack.packb([MsgType.PING, "t"]), "field 1"),
    ],
)
def test_malformed_bodies_raise_protocol_error(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        Codec().unpack(body)


def _mutations(wire: list) -> list[list]:
    """``wire``, and copies with one field swapped for a value of another type,
    one item more or less, and another message type."""
    odd = [None, True, False, -1, 0, 7, 2.5, -0.5, "s", b"b", [], [1], {}, {"k": 1}, (1 << 64) - 1, -(1 << 63)]
    out = [list(wire), wire[:-1], [*wire, 0]]
    for i in range(len(wire)):
        for v in odd:
            w = list(wire)
            w[i] = v
            out.append(w)
    out += [[t, *wire[1:]] for t in MsgType]
    return out


@pytest.mark.parametrize(
    "wire",
    [
        [MsgType.INVOKE, 5, 1, "get", ["k"], {"a": 1}, 0, 10.0],
        [MsgType.INVOKE, 6, 2, "notify", [], {}, 1, None],
        [MsgType.INVOKE, 6, 2, "m", [], {}, 0, 3],
        [MsgType.RESULT, 5, {"x": [1]}],
        [MsgType.EVENT, 9, None],
    ],
)
def test_the_fast_shape_checks_agree_with_the_general_one(wire: list) -> None:
    """The hot messages have a quicker check; it must accept and refuse exactly
    what the check every message type gets does."""
    from connshare._protocol import _check_shape, check_shape

    for w in _mutations(wire):
        w = msgpack.unpackb(msgpack.packb(w))  # the types a peer's frame decodes to
        try:
            _check_shape(w)
        except ProtocolError:
            with pytest.raises(ProtocolError):
                check_shape(w)
        else:
            check_shape(w)


def test_every_field_that_carries_app_values_is_checked_for_map_keys() -> None:
    """A bad key anywhere the app's values go is refused before sending; the
    fields connshare fills itself are not searched."""
    from connshare._protocol import _ANY, _DICT, _LIST

    codec = Codec()
    bad = {1: "int key"}
    for example in EXAMPLES:
        wire = example.to_wire()
        for i, types in enumerate(type(example).SHAPE, 1):
            if types not in (_ANY, _LIST, _DICT):
                continue
            w = list(wire)
            w[i] = bad if types is _DICT else [bad]
            with pytest.raises(EncodeError, match="map keys"):
                codec.pack(w)
        codec.pack(wire)


def test_values_that_cannot_be_encoded_raise_before_sending() -> None:
    codec = Codec()
    with pytest.raises(EncodeError, match="map keys"):
        codec.encode(Invoke(1, 1, "m", [{1: "x"}], {}, 0, None))
    with pytest.raises(EncodeError):
        codec.encode(Invoke(1, 1, "m", [object()], {}, 0, None))
    assert isinstance(EncodeError("x"), TypeError)


def test_transcode_carries_user_types() -> None:
    import decimal

    def enc(v: object) -> msgpack.ExtType:
        if isinstance(v, decimal.Decimal):
            return msgpack.ExtType(1, str(v).encode())
        raise TypeError(f"cannot encode {type(v).__name__}")

    codec = Codec(transcode=Transcode(encode=enc, decode=lambda code, data: decimal.Decimal(data.decode())))
    body = codec.pack(Result(1, [decimal.Decimal("1.25")]).to_wire())
    assert to_message(codec.loads(body)) == Result(1, [decimal.Decimal("1.25")])
    # on an open connection
    (wire,) = codec.decoder().feed(codec.pack(Result(2, [decimal.Decimal("2.5")]).to_wire()))
    assert to_message(wire) == Result(2, [decimal.Decimal("2.5")])
    # never in a handshake frame, where the bytes may be a stranger's
    assert to_message(codec.unpack(body)) == Result(1, [msgpack.ExtType(1, b"1.25")])


def test_no_pickle_anywhere_in_the_package() -> None:
    import pathlib

    import connshare

    for path in pathlib.Path(connshare.__file__).parent.glob("*.py"):
        text = path.read_text()
        for needle in ("import pickle", "from pickle", "cPickle", "pickle.load", "pickle.dump"):
            assert needle not in text, (path, needle)


def _run_handshake(follower: FollowerHandshake, leader: LeaderHandshake) -> None:
    msgs = [follower.start()]
    side_is_leader = True
    while msgs:
        replies = []
        for m in msgs:
            replies += (leader if side_is_leader else follower).receive(m)
        msgs = replies
        side_is_leader = not side_is_leader


def test_handshake_succeeds_with_the_same_secret() -> None:
    f, ld = FollowerHandshake(b"s" * 32, pid=1), LeaderHandshake(b"s" * 32, pid=2)
    _run_handshake(f, ld)
    assert f.state is HandshakeState.OPEN and ld.state is HandshakeState.OPEN
    assert f.peer_pid == 2 and ld.peer_pid == 1


def test_each_side_learns_the_largest_message_the_other_takes() -> None:
    f, ld = FollowerHandshake(b"s" * 32, 4096), LeaderHandshake(b"s" * 32, 1 << 20)
    _run_handshake(f, ld)
    assert f.peer_max_frame_size == 1 << 20 and ld.peer_max_frame_size == 4096


def test_a_follower_that_takes_no_message_at_all_fails_the_handshake() -> None:
    f, ld = FollowerHandshake(b"s" * 32), LeaderHandshake(b"s" * 32)
    (auth,) = f.receive(ld.receive(f.start())[0])
    with pytest.raises(ProtocolError, match="at most 0 bytes"):
        ld.receive(Auth(auth.proof, 0))
    assert ld.state is HandshakeState.FAILED


def test_follower_refuses_a_leader_without_the_secret() -> None:
    f, ld = FollowerHandshake(b"a" * 32), LeaderHandshake(b"b" * 32)
    with pytest.raises(AuthenticationError, match="leader"):
        _run_handshake(f, ld)


def test_leader_refuses_a_follower_without_the_secret() -> None:
    f, ld = FollowerHandshake(b"a" * 32), LeaderHandshake(b"b" * 32)
    challenge = ld.receive(f.start())[0]
    # a follower that skips checking the leader and guesses a proof
    with pytest.raises(AuthenticationError, match="follower"):
        ld.receive(Auth(b"\x00" * 32, 1024))
    assert isinstance(challenge, Challenge)
    assert LeaderHandshake.reply_for(AuthenticationError("x")).code == ErrorCode.AUTH


def test_a_recorded_proof_cannot_be_replayed() -> None:
    secret = b"k" * 32
    f1, l1 = FollowerHandshake(secret), LeaderHandshake(secret)
    ch = l1.receive(f1.start())[0]
    (auth,) = f1.receive(ch)
    l2 = LeaderHandshake(secret)  # a fresh leader nonce
    l2.receive(Hello("connshare", PROTOCOL_VERSION, 1, f1.nonce))
    with pytest.raises(AuthenticationError):
        l2.receive(auth)


def test_version_mismatch_is_its_own_error() -> None:
    ld = LeaderHandshake(b"s" * 32)
    with pytest.raises(ProtocolVersionError):
        ld.receive(Hello("connshare", PROTOCOL_VERSION + 1, 1, b"n" * 16))
    f = FollowerHandshake(b"s" * 32)
    f.start()
    with pytest.raises(ProtocolVersionError):
        f.receive(Challenge("connshare", PROTOCOL_VERSION + 1, 1, b"n" * 16, b"p" * 32))


def test_messages_are_frozen_values() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Ping(1).token = 2  # type: ignore[misc]


def test_loads_gives_what_a_peer_decodes() -> None:
    codec = Codec(max_frame_size=64)
    sent = [int(MsgType.RESULT), 1, (1, (2, "x"), {"k": b"\x00"})]
    assert codec.loads(codec.pack(sent)) == [int(MsgType.RESULT), 1, [1, [2, "x"], {"k": b"\x00"}]]
    with pytest.raises(EncodeError):
        codec.loads(codec.pack([int(MsgType.RESULT), 1, {1, 2}]))
    with pytest.raises(EncodeError):
        codec.loads(codec.pack([int(MsgType.RESULT), 1, {1: "int keys"}]))
    with pytest.raises(FrameTooLargeError):
        codec.loads(codec.pack([int(MsgType.RESULT), 1, "x" * 100]))


def test_an_error_message_that_names_a_class_it_cannot_build_becomes_a_remote_error() -> None:
    from connshare import RemoteError
    from connshare._errors import PortInUseError
    from connshare._protocol import Error, ErrorCode
    from connshare._remote import exception_from

    # A connshare class whose constructor wants more than a message (a foreign
    # program or a broken peer can name any class).
    msg = Error(1, 99, "connshare._errors:PortInUseError", "boom", [], "")
    assert PortInUseError.__init__ is not Exception.__init__
    exc = exception_from(msg)
    assert isinstance(exc, RemoteError) and "PortInUseError" in str(exc)
    # A class that refuses to be built from the args that came.
    exc = exception_from(Error(2, ErrorCode.RAISED, "builtins:UnicodeDecodeError", "x", ["only one"], "tb"))
    assert isinstance(exc, RemoteError) and exc.remote_traceback == "tb"  # type: ignore[attr-defined]


def test_a_message_one_byte_over_the_limit_is_refused_however_it_arrives() -> None:
    def message(size: int) -> bytes:
        body = msgpack.packb([MsgType.RESULT, 1, ""])
        data = msgpack.packb([MsgType.RESULT, 1, "x" * (size - len(body) - 2)])
        assert len(data) == size
        return data

    limit = 1000
    ping = msgpack.packb([MsgType.PING, 1])
    for split in (None, 1, 500, 999):
        exact, over = message(limit), message(limit + 1)
        for data, ok in ((exact, True), (over, False)):
            dec = MessageDecoder(limit)
            pieces = [data + ping] if split is None else [data[:split], data[split:] + ping]
            if ok:
                assert [m for p in pieces for m in dec.feed(p)] == [msgpack.unpackb(exact), [MsgType.PING, 1]]
            else:
                with pytest.raises(FrameTooLargeError, match="max_frame_size=1000"):
                    for p in pieces:
                        dec.feed(p)
