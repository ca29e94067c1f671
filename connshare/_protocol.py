"""The connshare wire protocol, with no I/O: bytes in, messages out, and back.

A message is a msgpack array whose first item is a :class:`MsgType` and whose other
items are the message's fields, in the order its class declares them.

A connection starts with a handshake (see :class:`FollowerHandshake` and
:class:`LeaderHandshake`): HELLO and CHALLENGE carry a magic value and the protocol
version, then both sides prove with HMAC-SHA256 over fresh nonces that they know the
shared secret. Only after WELCOME may either side send anything else.

During the handshake each message travels as a *frame*: a 4-byte big-endian length,
then that many bytes of msgpack (:class:`FrameDecoder`). A peer of another protocol
version, or a program that is not connshare, is then told apart by a bounded read.
Once the connection is open, messages follow each other with no length: a msgpack
value says where it ends, and one ``msgpack.Unpacker`` splits and decodes a whole
read in C (:class:`MessageDecoder`): a third less per message than splitting frames
in Python and unpacking each one.

No pickle, ever: values are msgpack types, plus whatever the ``transcode`` option
turns into msgpack ``ExtType`` values. Map keys must be ``str`` or ``bytes``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import attrs
import msgpack

from ._errors import (
    AuthenticationError,
    EncodeError,
    FrameTooLargeError,
    LimitExceededError,
    ProtocolError,
    ProtocolVersionError,
)

MAGIC = "connshare"
#: 2: messages of an open connection carry no length prefix; 3: REGISTER names
#: the follower's data class; 4: AUTH and WELCOME carry each side's max_frame_size;
#: 5: SUB_ERROR; 6: CANCEL
PROTOCOL_VERSION = 6
HEADER = struct.Struct(">I")
NONCE_SIZE = 16
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
#: Largest frame a leader reads before the handshake is done (HELLO, AUTH: ~50 bytes).
MAX_HANDSHAKE_FRAME = 1024


class MsgType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    REGISTER = 10
    SUBSCRIBE = 11
    UNSUBSCRIBE = 12
    EVENT = 13
    PUBLISH = 14
    INVOKE = 15
    RESULT = 16
    ERROR = 17
    PING = 18
    PONG = 19
    GOODBYE = 20
    CHANNEL_ERROR = 21
    SUB_ERROR = 22
    CANCEL = 23


class ErrorCode(enum.IntEnum):
    """Why an ERROR message was sent; ``RAISED`` means the real client raised."""

    RAISED = 0
    PROTOCOL = 1
    VERSION = 2
    AUTH = 3
    NO_CHANNEL = 4
    NOT_ALLOWED = 5
    LIMIT = 6
    TIMEOUT = 7
    NOT_READY = 8
    SHUTTING_DOWN = 9


# Invoke flags.
ONEWAY = 1

# Plain ints for the hot paths: comparing with an IntEnum member costs more.
T_INVOKE, T_RESULT, T_EVENT = int(MsgType.INVOKE), int(MsgType.RESULT), int(MsgType.EVENT)

_INT = (int,)
_STR = (str,)
_BYTES = (bytes,)
_LIST = (list,)
_DICT = (dict,)
_ANY = (object,)
_NUM_OR_NONE = (int, float, type(None))
_STR_OR_NONE = (str, type(None))

MESSAGES: dict[int, type[Message]] = {}
#: per message type: the indexes of its wire array that may hold maps
USER_FIELDS: dict[int, tuple[int, ...]] = {}


_M = TypeVar("_M", bound="type[Message]")


def _message(type_: MsgType, *shape: tuple[type, ...]) -> Callable[[_M], _M]:
    """Register a message class (an ``attrs.frozen`` one: applied by hand, so that
    type checkers see its fields) for ``type_`` whose fields have the given types."""

    def wrap(cls: _M) -> _M:
        cls.TYPE = type_
        cls.SHAPE = shape
        assert len(attrs.fields(cls)) == len(shape), cls  # type: ignore[arg-type]
        MESSAGES[type_] = cls
        # Where a map may hide: the fields that carry the app's values.
        USER_FIELDS[type_] = tuple(i for i, types in enumerate(shape, 1) if types in (_ANY, _LIST, _DICT))
        return cls

    return wrap


class Message:
    """Base of every message class; ``to_wire()`` gives the msgpack array."""

    TYPE: ClassVar[MsgType]
    SHAPE: ClassVar[tuple[tuple[type, ...], ...]]
    __slots__ = ()

    def to_wire(self) -> list[Any]:
        return [self.TYPE, *attrs.astuple(self, recurse=False)]  # type: ignore[arg-type]


@_message(MsgType.HELLO, _STR, _INT, _INT, _BYTES)
@attrs.frozen
class Hello(Message):
    magic: str
    version: int
    pid: int
    nonce: bytes


@_message(MsgType.CHALLENGE, _STR, _INT, _INT, _BYTES, _BYTES)
@attrs.frozen
class Challenge(Message):
    magic: str
    version: int
    pid: int
    nonce: bytes
    proof: bytes


@_message(MsgType.AUTH, _BYTES, _INT)
@attrs.frozen
class Auth(Message):
    proof: bytes
    #: the largest message the follower takes: the leader sends it none larger
    max_frame_size: int


@_message(MsgType.WELCOME, _INT)
@attrs.frozen
class Welcome(Message):
    #: the largest message the leader takes: the follower sends it none larger
    max_frame_size: int


@_message(MsgType.REGISTER, _INT, _STR, _STR)
@attrs.frozen
class Register(Message):
    rid: int
    name: str
    #: the follower's data class (``__qualname__``): the leader's must be the same
    cls: str


@_message(MsgType.SUBSCRIBE, _INT, _INT, _STR, _ANY)
@attrs.frozen
class Subscribe(Message):
    rid: int
    channel: int
    method: str
    reg: Any


@_message(MsgType.UNSUBSCRIBE, _INT)
@attrs.frozen
class Unsubscribe(Message):
    key: int


@_message(MsgType.EVENT, _INT, _ANY)
@attrs.frozen
class Event(Message):
    key: int
    value: Any


@_message(MsgType.PUBLISH, _INT, _STR, _ANY)
@attrs.frozen
class Publish(Message):
    channel: int
    method: str
    reg: Any


@_message(MsgType.INVOKE, _INT, _INT, _STR, _LIST, _DICT, _INT, _NUM_OR_NONE)
@attrs.frozen
class Invoke(Message):
    rid: int
    channel: int
    method: str
    args: list
    kwargs: dict
    flags: int
    timeout: float | None


@_message(MsgType.RESULT, _INT, _ANY)
@attrs.frozen
class Result(Message):
    rid: int
    value: Any


@_message(MsgType.ERROR, _INT, _INT, _STR, _STR, _LIST, _STR)
@attrs.frozen
class Error(Message):
    """An error answer to request ``rid`` (0: about the connection itself).

    ``type_name`` is ``module:qualname`` of the exception class.
    """

    rid: int
    code: int
    type_name: str
    message: str
    args: list
    traceback: str


@_message(MsgType.PING, _INT)
@attrs.frozen
class Ping(Message):
    token: int


@_message(MsgType.PONG, _INT)
@attrs.frozen
class Pong(Message):
    token: int


@_message(MsgType.GOODBYE)
@attrs.frozen
class Goodbye(Message):
    """The leader is leaving: elect the next one, finish calls already sent."""


@_message(MsgType.CHANNEL_ERROR, _INT, _STR, _STR)
@attrs.frozen
class ChannelError(Message):
    """The real client of ``channel`` emitted an error event."""

    channel: int
    type_name: str
    message: str


@_message(MsgType.SUB_ERROR, _INT, _STR, _STR)
@attrs.frozen
class SubError(Message):
    """The real client refused subscription ``key`` after the leader had answered
    it (a coroutine subscribe that failed): the follower drops it."""

    key: int
    type_name: str
    message: str


@_message(MsgType.CANCEL, _INT)
@attrs.frozen
class Cancel(Message):
    """The follower's caller of request ``rid`` gave up on it (its task was
    cancelled): the leader cancels the call if it is a coroutine one still
    running, and answers nothing."""

    rid: int


def check_keys(value: Any) -> None:
    """Raise :class:`EncodeError` where a map key is not ``str`` or ``bytes``."""
    # msgpack packs subclasses (defaultdict, Counter, namedtuple, StrEnum) as their
    # base: a map key they hide would otherwise reach the peer, which drops the
    # connection it came on. The exact types go first: they are nearly all.
    t = type(value)
    if t is dict or (t is not list and t is not tuple and isinstance(value, dict)):
        for k, v in value.items():
            if type(k) is not str and type(k) is not bytes and not isinstance(k, (str, bytes)):
                raise EncodeError(f"map keys must be str or bytes, not {type(k).__name__}: {k!r}")
            if type(v) not in SCALARS:
                check_keys(v)
    elif t is list or t is tuple or isinstance(value, (list, tuple)):
        for v in value:
            if type(v) not in SCALARS:  # a call per leaf would cost more than the check
                check_keys(v)


SCALARS = frozenset({str, bytes, int, float, bool, type(None)})


@attrs.frozen
class Transcode:
    """How user types cross the wire: ``encode`` turns a value msgpack cannot pack
    into an ``msgpack.ExtType`` (or a packable value); ``decode(code, data)`` turns an
    ``ExtType`` back into the user's value."""

    encode: Callable[[Any], Any]
    decode: Callable[[int, bytes], Any]


class Codec:
    """Packs messages, and unpacks handshake frames into wire arrays.

    One codec per node, safe to share between threads; it holds no stream buffer
    (see :class:`FrameDecoder` and :class:`MessageDecoder`).
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, transcode: Transcode | None = None, whose: str = ""):
        self.max_frame_size = max_frame_size
        self.transcode = transcode
        #: whose limit max_frame_size is, for the error message ("": ours)
        self._whose = whose
        default = None
        if transcode is not None:
            encode = transcode.encode

            def default(value: Any) -> Any:
                out = encode(value)
                check_keys(out)  # what the user's encode returns obeys the key rule too
                return out

        self._default = default
        # A Packer keeps a buffer between calls; callers on several threads
        # (follower callers, leader workers) each get their own.
        self._local = threading.local()
        self._ext_hook = transcode.decode if transcode else msgpack.ExtType

    def limited(self, max_frame_size: int, whose: str) -> Codec:
        """This codec, or one like it that packs no message over ``max_frame_size``
        (``whose`` limit that is, for the error), if that is smaller."""
        if max_frame_size >= self.max_frame_size:
            return self
        return Codec(max_frame_size, self.transcode, whose)

    def _new_packer(self) -> msgpack.Packer:
        p = self._local.packer = msgpack.Packer(use_bin_type=True, default=self._default, autoreset=True)
        return p

    def pack(self, wire: list[Any]) -> bytes:
        """The message ``wire`` (a wire array) for an open connection. Raises
        :class:`EncodeError`, or FrameTooLargeError over ``max_frame_size``."""
        # With or without transcode: the receiving end refuses other keys
        # (strict_map_key), and would drop the whole connection for them.
        try:
            for i in USER_FIELDS[wire[0]]:
                item = wire[i]
                t = type(item)
                if t is tuple or t is list:  # a call's arguments: check_keys' loop, inline
                    for v in item:
                        if type(v) not in SCALARS:
                            check_keys(v)
                elif t not in SCALARS and (item or t is not dict):  # most calls' kwargs: {}
                    check_keys(item)
        except RecursionError:
            # A peer can send a value ~1000 deep for the leader to echo back.
            raise EncodeError("cannot encode for the wire: the value nests too deeply (or contains itself)") from None
        try:
            packer = self._local.packer
        except AttributeError:  # this thread's first frame
            packer = self._new_packer()
        try:
            body = packer.pack(wire)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise EncodeError(f"cannot encode for the wire: {exc}") from exc
        if len(body) > self.max_frame_size:
            raise FrameTooLargeError(f"a message of {len(body)} bytes exceeds {self._whose}max_frame_size={self.max_frame_size}")
        return body

    def encode(self, msg: Message) -> bytes:
        """A handshake frame of ``msg``: its length, then its msgpack."""
        body = self.pack(msg.to_wire())
        return HEADER.pack(len(body)) + body

    def decoder(self, max_size: int | None = None) -> MessageDecoder:
        """A decoder for the messages of one open connection (``max_size``: the
        largest message it takes; by default this codec's ``max_frame_size``)."""
        return MessageDecoder(max_size or self.max_frame_size, self._ext_hook)

    def loads(self, body: bytes) -> list[Any]:
        """The wire array of a message this codec packed, decoded as a peer would."""
        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=self._ext_hook)

    def unpack(self, body: bytes | memoryview) -> list[Any]:
        """The wire array of one handshake frame's body, its shape checked. Raises
        ProtocolError."""
        try:
            # No transcode: its decode is the app's code, and these bytes may be a
            # stranger's (handshake messages carry no user values).
            wire = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ProtocolError(f"frame is not valid msgpack: {exc}") from exc
        check_shape(wire)
        return wire


def check_shape(wire: Any) -> None:
    """Raise :class:`ProtocolError` unless ``wire`` is a well-formed message array."""
    # The messages of every call and event first, with the exact types msgpack
    # decodes to: under half the general check's work. Anything else, or anything
    # odd about these, takes the general check.
    if type(wire) is list:
        n = len(wire)
        t = wire[0] if n else None
        if type(t) is int:
            if t == T_INVOKE and n == 8:
                _, rid, channel, method, args, kwargs, flags, timeout = wire
                if (
                    type(rid) is int
                    and type(channel) is int
                    and type(flags) is int
                    and rid >= 0
                    and channel >= 0
                    and flags >= 0
                    and type(method) is str
                    and type(args) is list
                    and type(kwargs) is dict
                    and (timeout is None or type(timeout) is float or type(timeout) is int)
                ):
                    return
            elif n == 3 and t in (T_RESULT, T_EVENT):  # (rid or key, any value)
                rid = wire[1]
                if type(rid) is int and rid >= 0:
                    return
    _check_shape(wire)


def _check_shape(wire: Any) -> None:
    if type(wire) is not list or not wire:
        raise ProtocolError(f"a message must be a non-empty array, not {type(wire).__name__}")
    cls = MESSAGES.get(wire[0]) if type(wire[0]) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {wire[0]!r}")
    shape = cls.SHAPE
    if len(wire) != len(shape) + 1:
        raise ProtocolError(f"{cls.__name__} takes {len(shape)} fields, got {len(wire) - 1}")
    for i, types in enumerate(shape, 1):
        v = wire[i]
        if types is not _ANY and not isinstance(v, types):
            raise ProtocolError(f"{cls.__name__} field {i} has type {type(v).__name__}")
        if types is _INT and (type(v) is bool or v < 0):
            raise ProtocolError(f"{cls.__name__} field {i} must be a non-negative int")


def to_message(wire: list[Any]) -> Message:
    """The message object of a shape-checked wire array."""
    return MESSAGES[wire[0]](*wire[1:])


class FrameDecoder:
    """Splits the handshake's byte stream into frame bodies; refuses frames over the
    size limit from their header alone. Once the handshake is done, :meth:`rest`
    hands over the bytes that follow it, for a :class:`MessageDecoder`."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE):
        self.max_frame_size = max_frame_size
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Bodies of every frame completed by ``data``. Raises FrameTooLargeError."""
        self.push(data)
        out = []
        while (body := self.next()) is not None:
            out.append(body)
        return out

    def push(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; take its frames with :meth:`next`."""
        self._buf += data

    def next(self) -> bytes | None:
        """The body of the next whole frame buffered, or None. Raises
        FrameTooLargeError."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (n,) = HEADER.unpack_from(buf)
        if n > self.max_frame_size:
            raise FrameTooLargeError(f"peer announced a frame of {n} bytes; max_frame_size={self.max_frame_size}")
        if len(buf) < 4 + n:
            return None
        body = bytes(buf[4 : 4 + n])
        del buf[: 4 + n]
        return body

    def rest(self) -> bytes:
        """The bytes buffered after the last frame taken, given up by this decoder."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)


#: a message that spans this many bytes of reads leaves the unpacker's buffer as
#: large: it is replaced at the next message boundary
_RENEW_AFTER = 1 << 20


class MessageDecoder:
    """Splits an open connection's byte stream into messages and decodes them, in C:
    a msgpack value says where it ends, so one ``msgpack.Unpacker`` takes each read
    whole.

    A message larger than ``max_size`` bytes is refused (FrameTooLargeError) once
    that many of its bytes have arrived (a container that announces more items than
    that, from its header alone).
    """

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME_SIZE, ext_hook: Callable[[int, bytes], Any] = msgpack.ExtType):
        self.max_size = max_size
        self._ext_hook = ext_hook
        self._unpacker = self._new_unpacker()
        self._fed = 0  # bytes fed in all
        self._end = 0  # where the last whole message ended
        self._grown = False  # the unpacker held a large message: replace it

    def _new_unpacker(self) -> msgpack.Unpacker:
        # max_buffer_size also caps each string's and container's announced length.
        return msgpack.Unpacker(raw=False, strict_map_key=True, ext_hook=self._ext_hook, max_buffer_size=self.max_size)

    def feed(self, data: bytes | bytearray | memoryview) -> list[list[Any]]:
        """The wire arrays, shape-checked, of every message completed by ``data``.
        Raises ProtocolError (FrameTooLargeError for a message over ``max_size``);
        the stream cannot be read on after that."""
        # One body for every read (no helper frame): most reads hold one message.
        unpacker = self._unpacker
        try:
            unpacker.feed(data)
        except msgpack.BufferFull:  # unparsed bytes would exceed max_size
            return self._feed_in_pieces(memoryview(data))
        fed = self._fed = self._fed + len(data)
        end = self._end
        limit = self.max_size
        out = []
        try:
            for wire in unpacker:
                # A message a read completed: its bytes, the partial ones before it too.
                at = unpacker.tell()
                if at - end > limit:
                    raise FrameTooLargeError(f"a message of {at - end} bytes exceeds max_frame_size={limit}")
                end = at
                check_shape(wire)
                out.append(wire)
                if end == fed:
                    # The usual read, whole messages: no StopIteration to raise,
                    # and nothing partial left to bound.
                    self._end = end
                    if self._grown:
                        self._renew()
                    return out
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack (or a transcode decode) raises many types
            if isinstance(exc, ValueError) and "exceeds max_" in str(exc):
                raise FrameTooLargeError(f"a message exceeds max_frame_size={self.max_size} ({exc})") from exc
            raise ProtocolError(f"a message is not valid msgpack: {exc}") from exc
        self._end = end
        partial = fed - end
        # The unpacker parses a message's first items before its last arrive:
        # only counting its bytes bounds one made of many small items.
        if partial > self.max_size:
            raise FrameTooLargeError(f"a message exceeds max_frame_size={self.max_size}")
        if partial > _RENEW_AFTER:
            self._grown = True
        elif not partial and self._grown:
            self._renew()
        return out

    def _renew(self) -> None:
        """At a message boundary, after a large message: the unpacker's buffer never
        shrinks, so a fresh one gives back what that message took."""
        self._unpacker = self._new_unpacker()
        self._fed = self._end = 0
        self._grown = False

    def _feed_in_pieces(self, view: memoryview) -> list[list[Any]]:
        """Feed no more than the unpacker may hold unparsed: one read may bring
        more than ``max_size`` bytes of small messages."""
        out: list[list[Any]] = []
        while view:
            # (each piece may end a large message, which renews the unpacker)
            room = self.max_size - (self._fed - self._unpacker.tell())
            if room <= 0:
                raise FrameTooLargeError(f"a message exceeds max_frame_size={self.max_size}")
            piece, view = view[:room], view[room:]
            self._unpacker.feed(piece)
            self._fed += len(piece)
            out += self.feed(b"")  # the messages that piece completed
        return out

    @property
    def buffered(self) -> int:
        """Bytes held of a message not yet whole."""
        return self._fed - self._end


# --- handshake ---------------------------------------------------------------------


def _proof(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, role + first + second, hashlib.sha256).digest()


def _bad_limit(n: int) -> ProtocolError:
    return ProtocolError(f"the peer says it takes messages of at most {n} bytes")


class HandshakeState(enum.IntEnum):
    START = 0
    SENT_HELLO = 1
    SENT_CHALLENGE = 2
    OPEN = 3
    FAILED = 4


@attrs.define
class FollowerHandshake:
    """The follower's side: HELLO, check the leader's proof, send ours.

    ``receive`` returns the messages to send next; it raises AuthenticationError,
    ProtocolVersionError or ProtocolError when the peer fails.
    """

    secret: bytes
    #: ours, sent in AUTH
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    pid: int = attrs.field(factory=os.getpid)
    nonce: bytes = attrs.field(factory=lambda: os.urandom(NONCE_SIZE))
    state: HandshakeState = HandshakeState.START
    peer_pid: int | None = None
    #: the leader's, from WELCOME
    peer_max_frame_size: int | None = None

    def start(self) -> Message:
        self.state = HandshakeState.SENT_HELLO
        return Hello(MAGIC, PROTOCOL_VERSION, self.pid, self.nonce)

    def receive(self, msg: Message) -> list[Message]:
        if self.state is HandshakeState.SENT_HELLO and isinstance(msg, Challenge):
            if msg.magic != MAGIC:
                raise self._fail(ProtocolError(f"peer answered with magic {msg.magic!r}"))
            if msg.version != PROTOCOL_VERSION:
                raise self._fail(ProtocolVersionError(f"leader speaks protocol {msg.version}, we speak {PROTOCOL_VERSION}"))
            expected = _proof(self.secret, b"L", self.nonce, msg.nonce)
            if len(msg.nonce) != NONCE_SIZE or not hmac.compare_digest(expected, msg.proof):
                raise self._fail(
                    AuthenticationError(
                        f"the leader (pid {msg.pid}) does not know our shared secret: it is another app, or this "
                        "process has another secret (set the same secret= everywhere, or run as the same user)"
                    )
                )
            self.peer_pid = msg.pid
            self.state = HandshakeState.SENT_CHALLENGE
            return [Auth(_proof(self.secret, b"F", msg.nonce, self.nonce), self.max_frame_size)]
        if self.state is HandshakeState.SENT_CHALLENGE and isinstance(msg, Welcome):
            if msg.max_frame_size <= 0:
                raise self._fail(_bad_limit(msg.max_frame_size))
            self.peer_max_frame_size = msg.max_frame_size
            self.state = HandshakeState.OPEN
            return []
        if isinstance(msg, Error):
            if msg.code == ErrorCode.VERSION:
                raise self._fail(ProtocolVersionError(msg.message))
            if msg.code == ErrorCode.AUTH:
                raise self._fail(AuthenticationError(msg.message))
            if msg.code == ErrorCode.LIMIT:
                raise self._fail(LimitExceededError(msg.message))
            raise self._fail(ProtocolError(f"leader refused the handshake: {msg.message}"))
        raise self._fail(ProtocolError(f"unexpected {type(msg).__name__} during the handshake"))

    def _fail(self, exc: Exception) -> Exception:
        self.state = HandshakeState.FAILED
        return exc


@attrs.define
class LeaderHandshake:
    """The leader's side: answer HELLO with a challenge and our proof, check theirs."""

    secret: bytes
    #: ours, sent in WELCOME
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    pid: int = attrs.field(factory=os.getpid)
    nonce: bytes = attrs.field(factory=lambda: os.urandom(NONCE_SIZE))
    state: HandshakeState = HandshakeState.START
    peer_pid: int | None = None
    #: the follower's, from AUTH
    peer_max_frame_size: int | None = None
    _peer_nonce: bytes = b""

    def receive(self, msg: Message) -> list[Message]:
        """Messages to send back. On failure raises; ``reply_for(exc)`` says why."""
        if self.state is HandshakeState.START and isinstance(msg, Hello):
            if msg.magic != MAGIC:
                raise self._fail(ProtocolError(f"peer said magic {msg.magic!r}"))
            if msg.version != PROTOCOL_VERSION:
                raise self._fail(ProtocolVersionError(f"leader speaks protocol {PROTOCOL_VERSION}, follower speaks {msg.version}"))
            if len(msg.nonce) != NONCE_SIZE:
                raise self._fail(ProtocolError("bad nonce size"))
            self.peer_pid = msg.pid
            self._peer_nonce = msg.nonce
            self.state = HandshakeState.SENT_CHALLENGE
            proof = _proof(self.secret, b"L", msg.nonce, self.nonce)
            return [Challenge(MAGIC, PROTOCOL_VERSION, self.pid, self.nonce, proof)]
        if self.state is HandshakeState.SENT_CHALLENGE and isinstance(msg, Auth):
            expected = _proof(self.secret, b"F", self.nonce, self._peer_nonce)
            if not hmac.compare_digest(expected, msg.proof):
                raise self._fail(AuthenticationError(f"follower pid {self.peer_pid} does not know the shared secret"))
            if msg.max_frame_size <= 0:
                raise self._fail(_bad_limit(msg.max_frame_size))
            self.peer_max_frame_size = msg.max_frame_size
            self.state = HandshakeState.OPEN
            return [Welcome(self.max_frame_size)]
        raise self._fail(ProtocolError(f"unexpected {type(msg).__name__} during the handshake"))

    def _fail(self, exc: Exception) -> Exception:
        self.state = HandshakeState.FAILED
        return exc

    @staticmethod
    def reply_for(exc: Exception) -> Error:
        """The ERROR to send a peer whose handshake failed with ``exc``."""
        if isinstance(exc, ProtocolVersionError):
            code = ErrorCode.VERSION
        elif isinstance(exc, AuthenticationError):
            code = ErrorCode.AUTH
        else:
            code = ErrorCode.PROTOCOL
        return Error(0, code, type(exc).__name__, str(exc), [], "")
