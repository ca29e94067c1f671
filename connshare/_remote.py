"""Exceptions across the wire, both ways, without importing anything the wire names."""

from __future__ import annotations

import sys
import traceback
from typing import Any

from . import _errors
from ._errors import (
    CallTimeoutError,
    ChannelNotFoundError,
    ConnshareError,
    EncodeError,
    FrameTooLargeError,
    LimitExceededError,
    MethodNotAllowedError,
    NotReadyError,
    RemoteError,
    RemoteTraceback,
)
from ._protocol import SCALARS, Error, ErrorCode

_CODE_TYPES: dict[int, type[ConnshareError]] = {
    ErrorCode.NO_CHANNEL: ChannelNotFoundError,
    ErrorCode.NOT_ALLOWED: MethodNotAllowedError,
    ErrorCode.LIMIT: LimitExceededError,
    ErrorCode.TIMEOUT: CallTimeoutError,
    ErrorCode.NOT_READY: NotReadyError,
}


_EXC_CODES: list[tuple[type[Exception], int]] = [
    (ChannelNotFoundError, ErrorCode.NO_CHANNEL),
    (MethodNotAllowedError, ErrorCode.NOT_ALLOWED),
    (LimitExceededError, ErrorCode.LIMIT),
]


def code_for(exc: BaseException) -> int:
    """The ERROR code that carries ``exc``."""
    for cls, code in _EXC_CODES:
        if isinstance(exc, cls):
            return code
    return ErrorCode.RAISED


def unsendable_result(exc: EncodeError | FrameTooLargeError) -> EncodeError | FrameTooLargeError:
    """What the caller gets for a result that cannot cross the wire. Said plainly:
    unlike an argument that cannot be sent, the call ran, so sending it again runs
    it again."""
    return type(exc)(f"the call ran on the leader, but its result cannot be sent back: {exc}")


def _text(make: Any, cls: type) -> str:
    # An exception's __str__ or __repr__ is app code and may raise: its caller
    # must still get an answer.
    try:
        return str(make())
    except Exception:
        return f"<{cls.__qualname__}: str() or repr() failed>"


def _wire_args(args: tuple) -> list:
    # Only plain scalars cross: anything else becomes its repr, so encoding an
    # error can never fail.
    return [a if type(a) in SCALARS else _text(lambda a=a: repr(a), type(a)) for a in args]


def error_message(rid: int, exc: BaseException, code: int = ErrorCode.RAISED) -> Error:
    """The ERROR message that carries ``exc`` to the caller of request ``rid``."""
    cls = type(exc)
    tb = _text(lambda: "".join(traceback.format_exception(cls, exc, exc.__traceback__)), cls)
    args = exc.args if isinstance(exc.args, tuple) else ()
    return Error(rid, code, _type_name(cls), _text(lambda: str(exc), cls), _wire_args(args), tb)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def pushed_error(kind: int, about: int, exc: BaseException) -> list:
    """A CHANNEL_ERROR or SUB_ERROR (``kind``) about channel or key ``about``,
    carrying ``exc``'s type and message. Never raises, as error_message."""
    cls = type(exc)
    return [kind, about, _type_name(cls), _text(lambda: str(exc), cls)]


def exception_pushed(wire: list, pid: int | None) -> Exception:
    """The exception a CHANNEL_ERROR or SUB_ERROR carries, rebuilt as an ERROR's."""
    return exception_from(Error(0, ErrorCode.RAISED, wire[2], wire[3], [wire[3]], ""), pid)


def _lookup(type_name: str) -> type | None:
    module, _, qualname = type_name.partition(":")
    obj: Any = sys.modules.get(module)  # looked up, never imported
    for part in qualname.split("."):
        if obj is None or part.startswith("<"):
            return None
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def exception_from(msg: Error, pid: int | None = None) -> Exception:
    """The exception to raise in the caller for an ERROR message. Never raises:
    the wire names the class, and a class that cannot be rebuilt from what came
    (its constructor, or a frozen instance refusing ``__cause__``) is a
    :class:`RemoteError` instead."""
    if msg.code != ErrorCode.RAISED:
        cls = _CODE_TYPES.get(msg.code)
        if cls is None:
            cls = _lookup(msg.type_name) if msg.type_name.startswith("connshare.") else None
            cls = cls or _errors.ProtocolError
        exc = _build(cls, (msg.message,))
    else:
        cls = _lookup(msg.type_name)
        exc = _build(cls, tuple(msg.args)) if cls is not None else None
    if exc is None or not _annotate(exc, msg, pid):
        exc = RemoteError(msg.type_name.replace(":", "."), msg.message, tuple(msg.args))
        _annotate(exc, msg, pid)
    return exc


def _build(cls: type, args: tuple) -> Exception | None:
    try:
        exc = cls(*args)
    except Exception:
        return None
    return exc if isinstance(exc, Exception) else None


def _annotate(exc: Exception, msg: Error, pid: int | None) -> bool:
    """Attach the remote traceback; False if ``exc`` cannot hold it."""
    try:
        # object.__setattr__: past a frozen dataclass's or attrs class's refusal
        if msg.traceback:
            where = f"leader pid {pid}" if pid else "the leader"
            object.__setattr__(exc, "__cause__", RemoteTraceback(f"Traceback in {where}:\n{msg.traceback}"))
        object.__setattr__(exc, "remote_traceback", msg.traceback)
    except Exception:
        return False
    return True
