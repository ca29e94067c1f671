"""``encode_locally``: the leader's own calls get what a follower's would.

A follower's arguments, results, errors and event values cross the wire: a tuple
arrives as a list, a value msgpack (with ``transcode``) cannot encode fails, and an
exception arrives rebuilt from its type's name and arguments. The leader's own calls
and single mode skip the wire, for speed. With ``encode_locally`` they pass through
the same codec, so that an app tested in one process meets what its followers will.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import EncodeError, FrameTooLargeError
from ._protocol import T_INVOKE, T_RESULT, Codec
from ._remote import code_for, error_message, exception_from, unsendable_result

if TYPE_CHECKING:
    from ._host import KeyState


class Mirror:
    """One node's wire, for the calls and values that do not cross it."""

    __slots__ = ("codec",)

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def args(self, method: str, args: tuple, kwargs: dict, timeout: float) -> tuple[list, dict]:
        """A call's arguments as the leader would get them. Raises as a follower's
        caller would, before the call runs."""
        wire = self.decode(self.codec.pack([T_INVOKE, 0, 0, method, args, kwargs, 0, float(timeout)]))
        return wire[4], wire[5]

    def subscription(self, body: bytes) -> Any:
        """The ``reg`` of a SUBSCRIBE message this codec packed."""
        return self.decode(body)[4]

    def publication(self, body: bytes) -> Any:
        """The ``reg`` of a PUBLISH message this codec packed."""
        return self.decode(body)[3]

    def result(self, value: Any) -> Any:
        try:
            return self.decode(self.codec.pack([T_RESULT, 0, value]))[2]
        except (EncodeError, FrameTooLargeError) as exc:
            remote = self.error(unsendable_result(exc))
        raise remote from remote.__cause__

    def decode(self, body: bytes) -> list:
        """The wire array of a message this codec packed, as the peer would decode
        it. What the peer would fail to decode (a ``transcode.decode`` that raises)
        raises EncodeError here, as the sender's error."""
        try:
            return self.codec.loads(body)
        except Exception as exc:
            raise EncodeError(f"the wire would not decode this value: {exc!r}") from exc

    def error(self, exc: Exception) -> Exception:
        """``exc`` as a follower's caller would get it: rebuilt, its traceback
        (as text) in ``__cause__``. Raise it ``from`` that cause."""
        return exception_from(error_message(0, exc, code_for(exc)), os.getpid())

    def event(self, ks: KeyState) -> tuple[bool, Any]:
        """The key's last value as a follower gets it; (False, None) when it cannot
        be sent (the channel reports that to every process)."""
        frame = ks.event_frame(self.codec)
        if frame is None:
            return False, None
        return True, self.decode(frame)[2]

    def wrap(self, fn: Callable[..., Any], is_coro: bool) -> Callable[..., Any]:
        """``fn`` with its result and its exceptions passed through the wire."""
        if is_coro:

            @functools.wraps(fn)
            async def acall(*args: Any, **kwargs: Any) -> Any:
                try:
                    value = await fn(*args, **kwargs)
                except Exception as exc:
                    remote = self.error(exc)
                else:
                    return self.result(value)
                raise remote from remote.__cause__  # outside the except: no __context__

            return acall

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                value = fn(*args, **kwargs)
            except Exception as exc:
                remote = self.error(exc)
            else:
                return self.result(value)
            raise remote from remote.__cause__  # outside the except: no __context__

        return call
