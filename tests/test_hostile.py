"""Hostile input: garbage, floods and slow readers from connected peers. The leader
drops the offender with a logged reason and keeps serving everyone else, with no
exception in the app, no dead thread, and bounded memory."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest.mock import ANY

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import connshare
from connshare import FrameTooLargeError, LimitExceededError, NotReadyError, ProtocolError
from connshare._loop import get_loop
from connshare._protocol import MESSAGES, ONEWAY, Codec, ErrorCode, FrameDecoder, MessageDecoder, MsgType, check_shape, to_message
from tests.conftest import pick_port
from tests.harness import AgentError, Worker, blast_until_subscribed, wait_until
from tests.hostile_clients import BlastClient, blast_spec, in_process_leader
from tests.rawpeer import HEADER, FakeLeader, FakeServer, LogCapture, RawPeer, frame, hs_pack, pack

SECRET = "hostile tests' shared secret ok!"
MAX_FRAME = 1 << 20
ARENA_OPTIONS: dict[str, Any] = {
    "secret": SECRET,
    "max_frame_size": MAX_FRAME,
    "max_inflight_per_follower": 8,
    "max_subscriptions_per_follower": 3,
    "max_buffered_bytes": 256 << 10,  # less than max_frame_size, on purpose
}
#: What hostile peers may call: nothing that blocks a worker thread for long.
SAFE_METHODS = ["echo", "aecho", "whoami", "history", "kinds"]
ARENA_DELEGATES = [*SAFE_METHODS, "sleep", "asleep", "big", "send"]

# -- strategies ---------------------------------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
)
#: Values a well-behaved follower could send (str/bytes map keys).
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6), kids, max_size=3),
    max_leaves=8,
)
#: Any msgpack value at all: other key types, ext types.
any_values = st.recursive(
    scalars | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=6)),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(ints | st.text(max_size=4) | st.booleans(), kids, max_size=3),
    max_leaves=8,
)

#: A value of the right type for each field shape of the message classes.
FIELDS = {
    (int,): st.integers(min_value=0, max_value=2**63),
    (str,): st.text(max_size=10),
    (bytes,): st.binary(max_size=32),
    (list,): st.lists(values, max_size=3),
    (dict,): st.dictionaries(st.text(max_size=5), values, max_size=2),
    (object,): values,
    (int, float, type(None)): st.none() | st.integers(0, 100) | st.floats(0, 100),
}


def well_shaped(t: int) -> st.SearchStrategy[list]:
    return st.tuples(*(FIELDS[shape] for shape in MESSAGES[t].SHAPE)).map(lambda fields: [t, *fields])


def requests(ch: int, first_rid: int) -> st.SearchStrategy[list]:
    """Valid requests of a follower on channel ``ch``, ids and tokens from ``first_rid``."""
    rid = st.integers(first_rid, first_rid + 998)
    return st.one_of(
        st.builds(
            lambda r, m, a: [MsgType.INVOKE, r, ch, m, a, {}, 0, None], rid, st.sampled_from(SAFE_METHODS), st.lists(values, max_size=2)
        ),
        st.builds(lambda a: [MsgType.INVOKE, 0, ch, "echo", [a], {}, ONEWAY, None], values),
        st.builds(lambda r: [MsgType.PING, r], rid),
        st.builds(lambda r, k: [MsgType.SUBSCRIBE, r, ch, "subscribe", {"key": k}], rid, st.text(max_size=4)),
        st.builds(lambda k: [MsgType.UNSUBSCRIBE, k], st.integers(0, 50)),
        st.builds(lambda r: [MsgType.REGISTER, r, "b", "BlastClient"], rid),
        st.builds(lambda r: [MsgType.CANCEL, r], rid),
    )


def leader_refuses(data: bytes) -> bool:
    """The model: does a leader drop the peer that sends ``data`` (after the
    handshake)? A message too large, bytes that are not a well-shaped message, or a
    message only a leader or a handshake may send."""
    try:
        wires = MessageDecoder(MAX_FRAME).feed(data)
    except ProtocolError:
        return True
    return any(wire[0] not in FOLLOWER_TYPES for wire in wires)


FOLLOWER_TYPES = {
    MsgType.INVOKE,
    MsgType.PING,
    MsgType.PONG,
    MsgType.SUBSCRIBE,
    MsgType.UNSUBSCRIBE,
    MsgType.PUBLISH,
    MsgType.REGISTER,
    MsgType.CANCEL,
}
LEADER_ONLY = sorted(set(MESSAGES) - FOLLOWER_TYPES)
bad_rids = st.one_of(
    st.integers(min_value=-(2**63), max_value=-1), st.booleans(), st.floats(), st.text(max_size=3), st.none(), st.binary(max_size=3)
)


def _mutate(wire: list, i: int, value: Any, how: int) -> list:
    wire = list(wire)
    if how == 0:
        wire[i % len(wire)] = value  # a field (or the type) of another type
    elif how == 1:
        wire.append(value)  # one field too many
    else:
        wire.pop()  # one too few
    return wire


def poison(ch: int) -> st.SearchStrategy[bytes]:
    """Bytes, arriving after the handshake, that must get the peer dropped."""
    return st.one_of(
        # a container announcing more items than max_frame_size: refused from its header alone
        st.builds(
            lambda c, n, tail: c + HEADER.pack(n) + tail,
            st.sampled_from([b"\xdd", b"\xdf"]),
            st.integers(MAX_FRAME + 1, 2**32 - 1),
            st.binary(max_size=32),
        ),
        # not msgpack (0xc1 is never valid)
        st.builds(lambda b: b"\xc1" + b, st.binary(max_size=32)),
        # valid msgpack of the wrong shape
        any_values.map(msgpack.packb),
        st.builds(_mutate, requests(ch, 1), st.integers(0, 7), any_values, st.integers(0, 2)).map(pack),
        # unknown message types
        st.builds(
            lambda t, rest: pack([t, *rest]), st.integers(-(2**31), 2**32).filter(lambda t: t not in MESSAGES), st.lists(values, max_size=3)
        ),
        # messages only a leader, or a handshake, may send
        st.sampled_from(LEADER_ONLY).flatmap(well_shaped).map(pack),
        # invalid request ids
        st.builds(lambda r: pack([MsgType.INVOKE, r, ch, "echo", [1], {}, 0, None]), bad_rids),
        st.builds(lambda r: pack([MsgType.REGISTER, r, "b", "BlastClient"]), bad_rids),
        st.builds(lambda r: pack([MsgType.SUBSCRIBE, r, ch, "subscribe", {"key": "k"}]), bad_rids),
        # map keys other than str/bytes, and strings that are not UTF-8
        st.builds(lambda k: pack([MsgType.INVOKE, 1, ch, "echo", [{k: 1}], {}, 0, None]), ints | st.booleans() | st.none() | st.floats()),
        st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0"]).map(lambda s: b"\x93\x0a\x01" + bytes([0xA0 | len(s)]) + s),
    ).filter(leader_refuses)


# -- the decoders and the codec, without sockets ----------------------------------------


@settings(max_examples=150, deadline=None, database=None)
@given(bodies=st.lists(st.binary(max_size=300), max_size=8), cuts=st.lists(st.integers(0, 3000), max_size=12))
def test_decoder_reassembles_frames_however_the_stream_is_split(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(b) for b in bodies)
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    dec = FrameDecoder(1000)
    out = []
    for a, b in itertools.pairwise(points):
        out += dec.feed(stream[a:b])
        assert dec.buffered < 4 + 1000
    assert out == bodies and dec.buffered == 0


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=8), limit=st.integers(1, 600))
def test_decoder_on_random_bytes_gives_frames_or_frame_too_large_only(data: bytes, cuts: list[int], limit: int) -> None:
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    dec = FrameDecoder(limit)
    for a, b in itertools.pairwise(points):
        try:
            bodies = dec.feed(data[a:b])
        except FrameTooLargeError:
            return  # the leader drops the peer here
        assert all(len(body) <= limit for body in bodies)
        assert dec.buffered < 4 + limit  # memory stays bounded by the limit


@settings(max_examples=50, deadline=None, database=None)
@given(n=st.integers(min_value=1001, max_value=2**32 - 1), split=st.integers(1, 3))
def test_decoder_refuses_an_oversized_frame_from_its_header_alone(n: int, split: int) -> None:
    dec = FrameDecoder(1000)
    header = HEADER.pack(n)
    assert dec.feed(header[:split]) == []
    with pytest.raises(FrameTooLargeError):
        dec.feed(header[split:])


def _split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=150, deadline=None, database=None)
@given(
    wires=st.lists(requests(1, 1) | st.sampled_from(sorted(MESSAGES)).flatmap(well_shaped), max_size=8),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
)
def test_message_decoder_reassembles_messages_however_the_stream_is_split(wires: list[list], cuts: list[int]) -> None:
    stream = b"".join(msgpack.packb(w) for w in wires)
    dec = MessageDecoder(1000)
    out = []
    for piece in _split_at(stream, cuts):
        out += dec.feed(piece)
        assert dec.buffered <= 1000
    assert [msgpack.packb(w) for w in out] == [msgpack.packb(w) for w in wires]  # (bytes: NaN != NaN)
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=8), limit=st.integers(1, 600))
def test_message_decoder_on_random_bytes_gives_messages_or_protocol_error_only(data: bytes, cuts: list[int], limit: int) -> None:
    dec = MessageDecoder(limit)
    for piece in _split_at(data, cuts):
        try:
            wires = dec.feed(piece)
        except ProtocolError:
            return  # the leader drops the peer here (FrameTooLargeError is one)
        for wire in wires:
            check_shape(wire)
        assert dec.buffered <= limit  # memory stays bounded by the limit


@settings(max_examples=100, deadline=None, database=None)
@given(
    item=st.sampled_from([None, 1, "abc", [1, 2]]),
    piece=st.integers(1, 700),
    whole_ok=st.booleans(),
)
def test_message_decoder_refuses_a_message_over_the_limit_once_that_much_arrived(item: Any, piece: int, whole_ok: bool) -> None:
    # Many small items: the unpacker parses them as they come, so only counting
    # the message's bytes can refuse it.
    big = msgpack.packb([MsgType.INVOKE, 1, 1, "echo", [item] * 600, {}, 0, None])
    assert len(big) > 600
    limit = len(big) if whole_ok else 500
    dec = MessageDecoder(limit)
    fed = 0
    try:
        for i in range(0, len(big), piece):
            dec.feed(big[i : i + piece])
            fed += len(big[i : i + piece])
    except FrameTooLargeError as exc:
        assert not whole_ok and f"max_frame_size={limit}" in str(exc)
        assert fed <= limit  # refused before more than the limit plus one piece was held
    else:
        assert whole_ok and dec.buffered == 0


@pytest.mark.parametrize("head", [b"\xdd", b"\xdf"])  # array 32, map 32
def test_message_decoder_refuses_a_container_announcing_too_many_items_from_its_header(head: bytes) -> None:
    dec = MessageDecoder(1000)
    with pytest.raises(FrameTooLargeError, match="max_frame_size=1000"):
        dec.feed(b"\x98" + head + HEADER.pack(5000))


def test_message_decoder_takes_one_read_of_many_small_messages_larger_than_the_limit() -> None:
    ping = msgpack.packb([MsgType.PING, 7])
    dec = MessageDecoder(100)
    data = ping * 1000 + ping[:2]
    assert len(dec.feed(data)) == 1000 and dec.buffered == 2
    assert dec.feed(ping[2:]) == [[MsgType.PING, 7]]


@settings(max_examples=300, deadline=None, database=None)
@given(body=st.one_of(st.binary(max_size=64), any_values.map(msgpack.packb), requests(1, 1).map(msgpack.packb)))
def test_any_body_unpacks_to_a_well_shaped_message_or_protocol_error(body: bytes) -> None:
    codec = Codec()
    try:
        wire = codec.unpack(body)
    except ProtocolError:
        return
    check_shape(wire)
    assert msgpack.packb(to_message(wire).to_wire()) == msgpack.packb(wire)


@settings(max_examples=150, deadline=None, database=None)
@given(wire=requests(1, 1) | st.sampled_from(sorted(MESSAGES)).flatmap(well_shaped), data=st.data())
def test_truncated_and_wrong_shaped_messages_are_protocol_errors(wire: list, data: st.DataObject) -> None:
    codec = Codec()
    body = msgpack.packb(wire)
    assert msgpack.packb(codec.unpack(body)) == body  # (bytes: NaN != NaN)
    cut = data.draw(st.integers(0, len(body) - 1), label="cut")
    with pytest.raises(ProtocolError):
        codec.unpack(body[:cut])
    # one field more, one less, or the message type replaced by something else
    for bad in (
        [*wire, 0],
        wire[:-1],
        [data.draw(st.one_of(st.text(max_size=3), st.integers(100, 300), st.none()), label="type"), *wire[1:]],
    ):
        with pytest.raises(ProtocolError):
            codec.unpack(msgpack.packb(bad))


# -- a leader, a well-behaved follower, and hostile peers over real sockets --------------------


class Arena:
    """An in-process leader (so its logs, loop and peers can be watched) and one
    well-behaved follower in another process."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.port = pick_port()
        self.logs = stack.enter_context(LogCapture())
        self.leader = stack.enter_context(in_process_leader(self.port, delegates=ARENA_DELEGATES, **ARENA_OPTIONS))
        self.node = self.leader._node
        self.mark = 0
        self.app_errors: list[BaseException] = []
        self.leader.on("error", self.app_errors.append)
        self.loop_errors: list[dict] = []
        loop = get_loop()
        old_handler = loop.get_exception_handler()
        loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        stack.callback(loop.set_exception_handler, old_handler)
        self.good = Worker([blast_spec(self.port, **ARENA_OPTIONS)])
        stack.callback(self.good.stop)
        self.good.wait_started()
        assert not self.good.ready()["is_leader"]
        with self.peer() as p:
            self.ch = p.register("b")

    def begin(self) -> None:
        """A test starts: judge only what happens from now on."""
        self.mark = self.logs.mark()
        self.app_errors.clear()
        self.loop_errors.clear()

    @contextlib.contextmanager
    def peer(self) -> Iterator[RawPeer]:
        """A raw peer that has passed the handshake."""
        mark = self.logs.mark()
        with RawPeer(self.port) as p:
            p.log_mark = mark
            p.handshake(SECRET)
            yield p

    @contextlib.contextmanager
    def good_follower_calling(self, name: str = "bg") -> Iterator[None]:
        """The well-behaved follower calls in a loop meanwhile; none may fail."""
        self.good.request("start_calls", "0", "echo", ["x" * 100], name)
        try:
            yield
        finally:
            stats = self.good.request("stop_calls", name)
        assert stats["errors"] == {} and stats["ok"] > 0 and not stats["alive"], stats

    def calls_so_far(self, name: str = "bg") -> int:
        return self.calls_so_far_stats(name)["ok"]

    def calls_so_far_stats(self, name: str = "bg") -> dict:
        return self.good.request("calls_so_far", name)

    def dropped(self, p: RawPeer, why: str = "") -> list[str]:
        """The leader's log lines about dropping raw peer ``p``."""
        return [m for m in self.logs.about(p.addr, p.log_mark) if "dropping peer" in m and why in m]

    def assert_healthy(self) -> None:
        """Everyone but the good follower is gone, the leader still serves, and
        nothing escaped into the app, the loop or the logs."""
        assert self.good.call("echo", "still there?") == "still there?"
        with self.peer() as p:
            assert p.invoke(p.register("b"), "echo", 1)[2] == 1
        wait_until(lambda: len(self.node.peers) == 1, what="every hostile peer released")
        assert not self.app_errors, self.app_errors
        assert not self.loop_errors, self.loop_errors
        assert self.logs.messages(logging.ERROR, self.mark) == []
        assert any(t.name == "connshare-loop" and t.is_alive() for t in threading.enumerate())


@pytest.fixture(scope="module")
def shared_arena() -> Iterator[Arena]:
    with contextlib.ExitStack() as stack:
        yield Arena(stack)


@pytest.fixture
def arena(shared_arena: Arena) -> Arena:
    shared_arena.begin()
    return shared_arena


def test_fuzz_a_peer_that_breaks_the_protocol_after_auth_is_dropped_others_are_served(arena: Arena) -> None:
    ch = arena.ch
    checks = {"examples": 0, "calls": 0}

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        before=st.lists(requests(ch, 1), max_size=3),
        bad=poison(ch),
        after=st.lists(requests(ch, 1000), min_size=1, max_size=3),
        split=st.integers(0, 64),
    )
    def fuzz(before: list[list], bad: bytes, after: list[list], split: int) -> None:
        with arena.peer() as p:
            assert p.register("b") == ch
            data = b"".join(pack(w) for w in before) + bad + b"".join(pack(w) for w in after)
            cut = min(split, len(data))
            p.send_raw(data[:cut])
            p.send_raw(data[cut:])
            got = p.wait_closed(10)  # the leader hangs up
            # nothing after the bad bytes was answered
            assert not [m for m in got if m[0] in (MsgType.RESULT, MsgType.ERROR, MsgType.PONG) and m[1] >= 1000], got
            assert arena.dropped(p), arena.logs.about(p.addr, p.log_mark)  # logged, with its address
        checks["examples"] += 1
        if checks["examples"] % 15 == 0:  # the good follower's calls go on meanwhile
            now = arena.calls_so_far()
            assert now > checks["calls"]
            checks["calls"] = now

    with arena.good_follower_calling():
        fuzz()
    arena.assert_healthy()


def test_fuzz_random_streams_after_auth_never_hurt_the_leader(arena: Arena) -> None:
    ch = arena.ch
    chunk = st.one_of(
        requests(ch, 1).map(pack),
        poison(ch),
        st.binary(max_size=48),
        st.builds(lambda w, cut: pack(w)[: max(1, cut)], requests(ch, 1), st.integers(1, 30)),  # truncated
        st.sampled_from(sorted(MESSAGES)).flatmap(well_shaped).map(pack),
    )

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(chunks=st.lists(chunk, min_size=1, max_size=6), fin=st.booleans())
    def fuzz(chunks: list[bytes], fin: bool) -> None:
        with arena.peer() as p:
            p.register("b")
            for c in chunks:
                if not p.send_raw(c):
                    break
            if fin:
                # whatever state it left the leader in, half a frame included, the
                # leader closes its side once ours is closed
                with contextlib.suppress(OSError):
                    p.sock.shutdown(1)
                p.wait_closed(10)

    with arena.good_follower_calling():
        fuzz()
    arena.assert_healthy()


def test_an_oversized_frame_drops_only_its_sender(arena: Arena, spawn) -> None:
    with arena.good_follower_calling():
        with arena.peer() as p:
            p.register("b")
            p.send_raw(b"\xdd" + HEADER.pack(MAX_FRAME + 1))  # an array announcing that many items: its header is enough
            assert p.wait_closed(5) == []
            assert arena.dropped(p, f"max_frame_size={MAX_FRAME}")
        # A connshare follower configured with a larger max_frame_size than the
        # leader's learns the leader's in the handshake, and sends nothing larger.
        (big,) = spawn([blast_spec(arena.port, **{**ARENA_OPTIONS, "max_frame_size": 4 * MAX_FRAME})])
        big.ready()
        conn = big.request("conn_id", "0")
        err = _agent_error(lambda: big.call("echo", b"x" * (MAX_FRAME + 10)))
        assert err.isa("FrameTooLargeError") and f"the leader's max_frame_size={MAX_FRAME}" in err.desc["message"], err.desc
        assert big.call("echo", "small") == "small"
        assert big.request("conn_id", "0") == conn
        big.stop()
    arena.assert_healthy()


def _agent_error(fn: Any) -> AgentError:
    with pytest.raises(AgentError) as info:
        fn()
    return info.value


def test_a_flood_of_calls_gets_limit_errors_past_max_inflight(arena: Arena) -> None:
    limit = ARENA_OPTIONS["max_inflight_per_follower"]
    with arena.good_follower_calling(), arena.peer() as p:
        ch = p.register("b")
        p.send_raw(b"".join(pack([MsgType.INVOKE, 100 + i, ch, "sleep", [0.3], {}, 0, None]) for i in range(3 * limit)))
        answers = [p.recv() for _ in range(3 * limit)]
        refused = [m for m in answers if m[0] == MsgType.ERROR]
        assert all(m[2] == ErrorCode.LIMIT and "max_inflight_per_follower" in m[4] for m in refused)
        assert len(refused) == 2 * limit and answers[: 2 * limit] == refused  # at once, before any result
        assert sorted(m[1] for m in answers if m[0] == MsgType.RESULT) == list(range(100, 100 + limit))
        # once answered, the slots are free again
        assert p.invoke(ch, "sleep", 0)[0] == MsgType.RESULT
        assert [m for m in arena.logs.about(p.addr, p.log_mark) if "refusing more" in m]
    # a connshare follower with more calls in flight than that gets LimitExceededError
    # for the extra ones, and the others run
    names = [f"burst-{i}" for i in range(limit + 4)]
    for name in names:
        arena.good.request("start_calls", "0", "sleep", [0.05], name)

    def tried() -> int:
        return sum(s["ok"] + sum(s["errors"].values()) for s in map(arena.calls_so_far_stats, names))

    wait_until(lambda: tried() >= 3 * len(names), what="calls over the limit")
    stats = [arena.good.request("stop_calls", name) for name in names]
    assert set().union(*(s["errors"] for s in stats)) == {"LimitExceededError"}, stats
    assert sum(s["ok"] for s in stats) >= limit
    arena.assert_healthy()


def test_a_calls_timeout_ends_it_on_the_leader_and_an_odd_one_is_ignored(arena: Arena) -> None:
    with arena.peer() as p:
        ch = p.register("b")
        answer = p.request([MsgType.INVOKE, 0, ch, "asleep", [600], {}, 0, 0.1])
        assert answer[0] == MsgType.ERROR and answer[3].endswith("CallTimeoutError"), answer
        for odd in (float("nan"), float("inf"), -1.0, 1e300):  # no timer for these, not a broken one
            assert p.request([MsgType.INVOKE, 0, ch, "asleep", [0.01], {}, 0, odd]) == [MsgType.RESULT, ANY, 0.01]
    arena.assert_healthy()


def test_a_flood_that_never_reads_its_answers_is_dropped(arena: Arena) -> None:
    with arena.good_follower_calling(), arena.peer() as p:
        ch = p.register("b")
        request = pack([MsgType.INVOKE, 1, ch, "echo", [b"f" * (64 << 10)], {}, 0, None])
        deadline = time.monotonic() + 20
        sent = 0
        while not arena.dropped(p) and time.monotonic() < deadline:
            if not p.send_raw(request):
                break
            sent += 1
        wait_until(lambda: arena.dropped(p, "not reading"), what="the flooder dropped")
        assert sent * len(request) < 64 << 20
    arena.assert_healthy()


def test_registering_unknown_names_counts_against_the_limit_and_ends_with_the_peer(arena: Arena) -> None:
    limit = ARENA_OPTIONS["max_inflight_per_follower"]
    with arena.peer() as p:
        for i in range(3 * limit):
            p.send([MsgType.REGISTER, 100 + i, f"nobody-hosts-{i}", "BlastClient"])  # each waits for its channel
        refused = [p.recv() for _ in range(2 * limit)]
        assert all(m[0] == MsgType.ERROR and m[2] == ErrorCode.LIMIT for m in refused), refused
        (peer,) = [q for q in arena.node.peers if q.addr == p.addr]
        pending = list(peer._tasks)
        assert len(pending) == limit
    # the peer is gone: so are its waiting registrations
    wait_until(lambda: all(t.done() for t in pending), timeout=5, what="pending registrations ended")
    arena.assert_healthy()


def test_results_that_cannot_be_sent_fail_fast_in_the_caller(arena: Arena) -> None:
    # Larger than max_frame_size: the caller gets FrameTooLargeError, not a timeout.
    t0 = time.monotonic()
    err = _agent_error(lambda: arena.good.call("big", MAX_FRAME + 1))
    assert err.type == "FrameTooLargeError" and "max_frame_size" in err.desc["message"]
    assert "the call ran on the leader" in err.desc["message"]  # so the caller knows not to retry blindly
    assert time.monotonic() - t0 < 3
    # nested deeper than msgpack allows: EncodeError back, not silence
    with arena.peer() as p:
        ch = p.register("b")
        deep: Any = 1
        for _ in range(1015):  # within what msgpack decodes (1024 levels in all)
            deep = [deep]
        answer = p.request([MsgType.INVOKE, 0, ch, "echo", [deep], {}, 0, None])
        assert answer[0] == MsgType.ERROR and "EncodeError" in answer[3], answer[:5]
        assert "the call ran on the leader" in answer[4], answer[:5]
    arena.assert_healthy()


def test_one_frame_larger_than_max_buffered_bytes_reaches_a_reading_follower(arena: Arena) -> None:
    size = 3 * ARENA_OPTIONS["max_buffered_bytes"]
    assert size < MAX_FRAME
    for _ in range(5):
        assert len(arena.good.call("big", size)) == size
    assert not [m for m in arena.logs.messages(since=arena.mark) if "dropping peer" in m]
    arena.assert_healthy()


def test_max_subscriptions_per_follower(arena: Arena) -> None:
    w = arena.good
    limit = ARENA_OPTIONS["max_subscriptions_per_follower"]
    keys = [f"sub-{i}" for i in range(limit + 1)]
    for k in keys:
        w.subscribe({"key": k}, k)
    errors = wait_until(lambda: w.request("errors", "0"), what="an error event")
    wait_until(lambda: set(arena.leader.history()["subscribed"]) >= set(keys[:limit]), what="the subscriptions on the leader")
    assert errors[-1]["type"] == "LimitExceededError" and "max_subscriptions_per_follower" in errors[-1]["message"]
    for k in keys:
        arena.leader.send(k, {"seq": 1, "key": k})
    for k in keys[:limit]:
        w.wait_event(k, lambda v: v["seq"] == 1)
    assert not w.values(keys[-1])
    # an unsubscribe frees a slot
    w.request("unsubscribe", "0", {"key": keys[0]})
    # longer than the 4 characters of the keys the fuzz tests' raw peers subscribe
    # to on this shared leader, so that "subscribed" cannot have seen it already
    w.subscribe({"key": "late-sub"}, "late-sub")
    wait_until(lambda: "late-sub" in arena.leader.history()["subscribed"], what="the late subscription")
    arena.leader.send("late-sub", {"seq": 2})
    w.wait_event("late-sub", lambda v: v["seq"] == 2)
    # the same for a raw peer: the leader answers LIMIT
    with arena.peer() as p:
        answers = [p.request([MsgType.SUBSCRIBE, 0, p.register("b"), "subscribe", {"key": f"raw-{i}"}]) for i in range(limit + 1)]
        assert [a[0] for a in answers] == [MsgType.RESULT] * limit + [MsgType.ERROR]
        assert answers[-1][2] == ErrorCode.LIMIT
    for k in [*keys[1:], "late-sub"]:
        w.request("unsubscribe", "0", {"key": k})
    arena.assert_healthy()


def test_one_followers_slow_calls_do_not_delay_anothers(port) -> None:
    with in_process_leader(port, secret=SECRET, max_inflight_per_follower=8) as leader, RawPeer(port) as a, RawPeer(port) as b:
        a.handshake(SECRET)
        b.handshake(SECRET)
        cha, chb = a.register("b"), b.register("b")
        assert b.invoke(chb, "sleep", 0)[0] == MsgType.RESULT  # the leader has one worker thread, idle
        a.send_raw(b"".join(pack([MsgType.INVOKE, 10 + i, cha, "sleep", [0.2], {}, 0, None]) for i in range(8)))
        wait_until(lambda: leader._node.inflight >= 8, what="a's calls running")
        t0 = time.monotonic()
        assert b.invoke(chb, "sleep", 0)[0] == MsgType.RESULT
        took = time.monotonic() - t0
        assert sorted(a.recv()[1] for _ in range(8)) == list(range(10, 18))
        assert took < 0.15, f"b waited {took:.2f} s behind a's calls"


def test_a_cancel_stops_a_coroutine_call_and_nothing_answers_it(port) -> None:
    # CANCEL: the follower's caller gave up. A coroutine call goes, whether it waits
    # (in a task of its own by then) or has not started (its INVOKE came in the same
    # read), and its place among the calls in flight with it; nothing answers it. A
    # blocking method's call cannot be stopped: it runs on and is answered. A CANCEL
    # of a request that is not running changes nothing.
    with in_process_leader(port, ARENA_DELEGATES, secret=SECRET, max_inflight_per_follower=2) as leader, RawPeer(port) as p:
        p.handshake(SECRET)
        ch = p.register("b")
        node = leader._node
        p.send_raw(b"".join(pack([MsgType.INVOKE, rid, ch, "asleep", [600], {}, 0, None]) for rid in (9, 10)))
        wait_until(lambda: node.inflight == 2, what="the calls to run")
        # its place is free for the next request of the same read: the usual retry
        p.send_raw(pack([MsgType.CANCEL, 10]) + pack([MsgType.INVOKE, 15, ch, "aecho", ["next"], {}, 0, None]))
        answer, seen = p.recv_until(lambda m: m[1] == 15)
        assert answer == [MsgType.RESULT, 15, "next"]
        p.send([MsgType.CANCEL, 9])
        wait_until(lambda: node.inflight == 0, what="the waiting calls to be cancelled")
        p.send_raw(pack([MsgType.INVOKE, 11, ch, "asleep", [600], {}, 0, None]) + pack([MsgType.CANCEL, 11]) + pack([MsgType.PING, 2]))
        _, more = p.recv_until(lambda m: m == [MsgType.PONG, 2])
        seen += more
        wait_until(lambda: node.inflight == 0, what="the call not started to be dropped")
        p.send_raw(pack([MsgType.INVOKE, 12, ch, "sleep", [0.1], {}, 0, None]) + pack([MsgType.CANCEL, 12]) + pack([MsgType.CANCEL, 999]))
        answer, before = p.recv_until(lambda m: m[0] in (MsgType.RESULT, MsgType.ERROR) and m[1] == 12)
        assert answer == [MsgType.RESULT, 12, 0.1]
        wait_until(lambda: node.inflight == 0, what="the blocking call's place to be free")
        p.send([MsgType.PING, 1])
        _, more = p.recv_until(lambda m: m == [MsgType.PONG, 1])
        assert seen + before + more == [], "nothing answers a cancelled call"
        # both places free: two calls at once
        calls = [[MsgType.INVOKE, 13, ch, "asleep", [0.01], {}, 0, None], [MsgType.INVOKE, 14, ch, "aecho", ["ok"], {}, 0, None]]
        p.send_raw(b"".join(map(pack, calls)))
        answers = [p.recv(), p.recv()]
        assert sorted(answers) == [[MsgType.RESULT, 13, 0.01], [MsgType.RESULT, 14, "ok"]]


# -- limits that need a leader of their own ----------------------------------------------------


def test_strangers_that_never_prove_the_secret_take_no_follower_place(port, spawn) -> None:
    (leader,) = spawn([blast_spec(port, secret=SECRET, max_followers=2)])
    assert leader.ready()["is_leader"]
    strangers = [RawPeer(port) for _ in range(3)]  # connected, silent
    try:
        (follower,) = spawn([blast_spec(port, secret=SECRET, max_followers=2)])
        assert follower.ready()["is_leader"] is False
        assert follower.call("whoami") == leader.pid
    finally:
        for p in strangers:
            p.close()


def test_a_refusal_said_before_the_secret_is_proven_is_not_believed(port) -> None:
    # A stranger on the port answers HELLO with connshare's "too many followers":
    # the follower tries again rather than give up, and leads once the port is free.
    refuse = hs_pack([MsgType.ERROR, 0, ErrorCode.LIMIT, "LimitExceededError", "max_followers", [], ""])
    server = FakeServer(port, lambda _: refuse)
    client = connshare.cluster(BlastClient, port=port, name="b", secret=SECRET, connect_timeout=1).delegate("whoami").create()
    try:
        wait_until(lambda: len(server.frames()) >= 2, what="the follower to ask again")
        assert not client.is_ready
        server.close()
        client.wait_ready(10)
        assert client.is_leader and client.whoami() == os.getpid()
    finally:
        client.close()
        server.close()


def test_a_leader_that_drops_every_follower_at_once_is_not_reconnected_to_in_a_tight_loop(port) -> None:
    server = FakeLeader(port, SECRET.encode())
    client = connshare.cluster(BlastClient, port=port, name="b", secret=SECRET).delegate("whoami").create()
    try:
        wait_until(lambda: len(server.opened) >= 7, timeout=20, what="seven connections")
        # The third connection in a row that ends at once is followed by a wait of
        # 0.05 s, then 0.1, 0.2, 0.4: at least that long from the third to the seventh.
        # Without it they come milliseconds apart.
        assert server.opened[6] - server.opened[2] >= 0.75 * 0.99, server.opened
        server.close()
        client.wait_ready(10)  # and when the port is free, it leads
        assert client.is_leader
    finally:
        client.close()
        server.close()


def test_a_leader_that_dies_mid_handshake_is_not_taken_for_a_stranger(port) -> None:
    # It proved the secret in its challenge, then went: the next election leads.
    server = FakeLeader(port, SECRET.encode(), exits_mid_handshake=True)
    client = connshare.cluster(BlastClient, port=port, name="b", secret=SECRET).delegate("whoami").create()
    try:
        client.wait_ready(10)
        assert client.is_leader and server.opened == []
    finally:
        client.close()
        server.close()


def _scripted_leader(on: int, bad: Callable[[list], bytes], stop_reading: threading.Event | None = None) -> Callable[[Any, bytes], None]:
    """A fake leader's script: it registers every channel as id 1 and answers
    pings, and answers each message of type ``on`` with ``bad(message)``. With
    ``stop_reading``: once it has registered a channel, it reads nothing more
    until that is set."""

    def serve(conn: Any, rest: bytes) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(rest)
        while True:
            for msg in unpacker:
                if msg[0] == MsgType.REGISTER:
                    conn.sendall(pack([MsgType.RESULT, msg[1], 1]))
                    if stop_reading is not None:
                        stop_reading.wait(60)
                        return
                elif msg[0] == MsgType.PING:
                    conn.sendall(pack([MsgType.PONG, msg[1]]))
                elif msg[0] == on:
                    conn.sendall(bad(msg))
            data = conn.recv(65536)
            if not data:
                return
            unpacker.feed(data)

    return serve


_BAD_ANSWERS = {
    "not msgpack": lambda m: b"\xc1",
    "an unknown message type": lambda m: pack([77, m[1], None]),
    "a result missing its value": lambda m: pack([MsgType.RESULT, m[1]]),
    "an array announcing more items than max_frame_size": lambda m: b"\xdd" + HEADER.pack(MAX_FRAME + 1),
    "an error that ends the connection": lambda m: pack([MsgType.ERROR, 0, ErrorCode.PROTOCOL, "x", "bye", [], ""]),
}


def test_a_request_to_a_leader_that_stopped_reading_holds_its_sender_a_second(port) -> None:
    # Too large for the socket's buffers, it waits for room for 1 s, whatever the
    # call's response_timeout, and the connection is dropped as unresponsive. The
    # send holds the connection's send lock, which every other caller, the
    # heartbeat and the reader's PONGs need: it waited the whole timeout before.
    stop = threading.Event()
    server = FakeLeader(port, SECRET.encode(), _scripted_leader(MsgType.INVOKE, lambda m: b"", stop_reading=stop))
    client = connshare.cluster(BlastClient, port=port, name="b", secret=SECRET, response_timeout=8).delegate("echo").create()
    try:
        client.wait_ready(10)
        assert not client.is_leader
        t0 = time.monotonic()
        with pytest.raises(connshare.LeaderUnresponsiveError, match="stopped reading"):
            client.echo(b"x" * (15 << 20))
        took = time.monotonic() - t0
        assert took < 4, f"the sender waited {took:.1f} s"
    finally:
        stop.set()
        client.close()
        server.close()


@pytest.mark.parametrize("bad", list(_BAD_ANSWERS))
def test_a_leader_that_breaks_the_protocol_fails_the_call_and_is_left(port, bad: str) -> None:
    server = FakeLeader(port, SECRET.encode(), _scripted_leader(MsgType.INVOKE, _BAD_ANSWERS[bad]))
    client = connshare.cluster(BlastClient, port=port, name="b", secret=SECRET, max_frame_size=MAX_FRAME).delegate("whoami").create()
    try:
        client.wait_ready(10)
        assert not client.is_leader
        with LogCapture() as logs:
            # the connection ends: the call may or may not have run, and says so
            with pytest.raises(connshare.LeaderLostError):
                client.whoami()
            assert any("broke the protocol" in m or "closed the connection" in m for m in logs.messages()), logs.messages()
        server.close()
        wait_until(lambda: client.is_leader, what="the follower to lead once the port is free")
        assert client.whoami() == os.getpid()
    finally:
        client.close()
        server.close()


def test_a_malformed_answer_to_a_subscription_ends_the_connection_not_the_client(port) -> None:
    # The key id the follower keys its events by is not an int: the answer's hook
    # fails after the request was taken off the books, and must still settle it.
    bad = _scripted_leader(MsgType.SUBSCRIBE, lambda m: pack([MsgType.RESULT, m[1], [1]]))
    server = FakeLeader(port, SECRET.encode(), bad)
    client = connshare.cluster(BlastClient, port=port, name="b", secret=SECRET).delegate("history").create()
    try:
        client.wait_ready(10)
        with LogCapture() as logs:
            client.subscribe({"key": "k"}, lambda v: None)
            wait_until(lambda: any("malformed" in m for m in logs.messages()), what="the answer refused")
        opened = len(server.opened)
        wait_until(lambda: len(server.opened) > opened, what="a new connection")  # and the subscription is sent again
        server.close()
        wait_until(lambda: client.is_leader, what="the follower to lead once the port is free")
        wait_until(lambda: client.history()["subscribed"] == ["k"], what="the subscription kept, for the new leader")
    finally:
        client.close()
        server.close()


def test_max_followers(port, spawn) -> None:
    (leader,) = spawn([blast_spec(port, secret=SECRET, max_followers=1)])
    assert leader.ready()["is_leader"]

    def follower() -> Any:
        return connshare.cluster(BlastClient, port=port, name="b", secret=SECRET).delegate("whoami").create()

    with RawPeer(port) as p:
        p.handshake(SECRET)  # takes the one place
        extra = follower()
        try:
            with pytest.raises(NotReadyError) as info:
                extra.wait_ready(10)
            assert isinstance(info.value.__cause__, LimitExceededError) and "max_followers=1" in str(info.value.__cause__)
            with pytest.raises(LimitExceededError):
                extra.whoami()
        finally:
            extra.close()

    # the place is free again once that peer left (and the leader has seen it go)
    def joined() -> bool:
        late = follower()
        try:
            late.wait_ready(10)
            return not late.is_leader and late.whoami() == leader.pid
        except NotReadyError as exc:
            assert isinstance(exc.__cause__, LimitExceededError), repr(exc.__cause__)
            return False
        finally:
            late.close()

    wait_until(joined, timeout=10, what="a follower taking the freed place")


def test_a_follower_that_stops_reading_cannot_make_the_leader_buffer_without_bound(port, spawn) -> None:
    limit = 4 << 20
    opts = {"secret": SECRET, "heartbeat_interval": None, "max_buffered_bytes": limit}  # only the buffer limit drops it
    (leader,) = spawn([blast_spec(port, **opts)])
    assert leader.ready()["is_leader"]
    live, slow = spawn([blast_spec(port, **opts)], [blast_spec(port, **opts)])
    for w in (live, slow):
        w.ready()
        w.request("subscribe_summary", "0", {"key": "k"}, "k")
    blast_until_subscribed(leader, [live, slow])
    size, per_round, rounds = 512 << 10, 2, 100  # 100 MB in all
    last = leader.call("blast", "k", per_round, size)  # warm up, and both receive
    for w in (live, slow):
        w.wait_event("k", lambda v: v["seq"] == last)
    proc = psutil.Process(leader.pid)
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    exact = _reset_peak_rss(leader.pid)
    slow.kill(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        first = last + 1
        for _ in range(rounds):
            last = leader.call("blast", "k", per_round, size)
            live.wait_event("k", lambda v, n=last: v["seq"] == n)  # the live follower keeps up, round by round
        took = time.monotonic() - t0
        done.set()
        sampler.join()
        if exact:
            peak[0] = max(peak[0], _peak_rss(leader.pid))
        growth = peak[0] - base
        got = [v["seq"] for v in live.values("k") if v["seq"] >= first]
        assert got == list(range(first, last + 1))  # every value, in order: it never missed a beat
        assert growth < limit + (8 << 20), f"leader RSS grew {growth / 2**20:.1f} MB"  # 100 MB, were it unbounded
        print(
            f"\n100 MB pushed in {took:.2f} s; leader RSS {base / 2**20:.1f} MB -> peak {peak[0] / 2**20:.1f} MB (+{growth / 2**20:.1f} MB)"
        )
    finally:
        done.set()
        slow.kill(signal.SIGCONT)

    # awake again, it reconnects and resubscribes
    def woke() -> bool:
        n = leader.call("blast", "k", 1, 16)
        with contextlib.suppress(TimeoutError):
            slow.wait_event("k", lambda v: v["seq"] == n, timeout=0.5)
            return True
        return False

    wait_until(woke, timeout=20, what="the slow follower back")
    # it was cut off, not served from an ever-growing queue: it missed most values
    assert len([v for v in slow.values("k") if first <= v["seq"] <= last]) < rounds * per_round // 2
    assert live.role()["leader_pid"] == leader.pid


def _reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's record of the peak RSS of ``pid`` (Linux); False if we cannot."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
