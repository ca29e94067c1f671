"""The exceptions connshare raises. One tree, one root::

    ConnshareError
    ├── ConfigurationError (ValueError)      a bad option, named in the message
    ├── ConcurrencyError (RuntimeError)      a blocking call on connshare's own thread
    ├── ClientClosedError (RuntimeError)     the client was closed
    ├── NotReadyError                        the client could not become ready
    │   └── ChannelDownError                 its real client is being started again
    ├── ElectionError                        no leader could be found or become one
    │   ├── PortInUseError (OSError)         a foreign program holds the port
    │   └── LeaderNotFoundError              forced follower: no leader in max_wait_time
    ├── ProtocolError                        a peer broke the wire protocol
    │   ├── FrameTooLargeError
    │   └── ProtocolVersionError             the peer speaks another protocol version
    ├── AuthenticationError                  the peer does not know the secret
    ├── ChannelNotFoundError                 the leader hosts no such channel
    ├── EncodeError (TypeError)              a value cannot go on the wire
    ├── CallError                            a call failed in connshare, not in the client
    │   ├── CallTimeoutError (TimeoutError)  no answer within its timeout
    │   ├── LeaderLostError                  the leader died with the call in flight
    │   ├── LeaderUnresponsiveError          the leader stopped answering heartbeats
    │   ├── LimitExceededError               a configured limit was hit
    │   └── MethodNotAllowedError            the method is not delegated
    └── RemoteError                          the real client raised a type unknown here

An exception raised by the real client reaches the caller as its own class when that
class is loaded in the caller; its ``__cause__`` is a :class:`RemoteTraceback` holding
the traceback text from the process that ran it.
"""

from __future__ import annotations


class ConnshareError(Exception):
    """Root of every exception connshare raises itself."""


class ConfigurationError(ConnshareError, ValueError):
    """An option or argument is invalid; the message names it."""


class ConcurrencyError(ConnshareError, RuntimeError):
    """A blocking call was made on connshare's own thread, where it would deadlock."""


class ClientClosedError(ConnshareError, RuntimeError):
    """The client (or its process-wide node) is closed."""


class NotReadyError(ConnshareError):
    """The client did not become ready: its ``__cause__`` says why."""


class ChannelDownError(NotReadyError):
    """The channel served, but its real client is not serving for now: a new leader
    is building it again (its upstream may be down). Calls raise it at once until
    the real client starts; its ``__cause__`` says why the last attempt failed."""


class ElectionError(ConnshareError):
    """No leader could be found on the port, and this process could not become one."""


class PortInUseError(ElectionError, OSError):
    """The port is held by a program that is not a connshare leader."""

    def __init__(self, port: int, detail: str, owner: str | None = None) -> None:
        self.port = port
        self.owner = owner
        msg = f"port 127.0.0.1:{port} is held by a program that is not a connshare leader: {detail}"
        if owner:
            msg += f" (owner: {owner})"
        super().__init__(msg)


class LeaderNotFoundError(ElectionError):
    """A forced follower found no leader within ``max_wait_time``."""


class ProtocolError(ConnshareError):
    """A peer sent bytes that break the connshare wire protocol."""


class FrameTooLargeError(ProtocolError):
    """A frame is larger than ``max_frame_size``."""


class ProtocolVersionError(ProtocolError):
    """The peer is a connshare of another protocol version."""


class AuthenticationError(ConnshareError):
    """The peer failed the HMAC challenge: it does not know the shared secret."""


class ChannelNotFoundError(ConnshareError):
    """The leader hosts no channel of that name (it never created that client)."""


class EncodeError(ConnshareError, TypeError):
    """A value cannot be encoded for the wire (msgpack, plus the ``transcode`` option)."""


class CallError(ConnshareError):
    """A call failed inside connshare, not inside the real client."""


class CallTimeoutError(CallError, TimeoutError):
    """No answer came within the call's timeout."""


class LeaderLostError(CallError):
    """The leader went away while the call was in flight: it may or may not have run."""


class NotSentError(LeaderLostError):
    """The connection was lost before the request was (wholly) sent: the leader
    cannot have run it, so it is safe to send again to the next leader."""


class LeaderUnresponsiveError(CallError):
    """The leader process stopped answering heartbeats. Calls that were waiting for
    it fail with this at once; like :class:`LeaderLostError`, such a call may or may
    not have run (a stalled leader may still run it once it wakes)."""

    def __init__(self, pid: int | None, detail: str = "") -> None:
        self.pid = pid
        msg = f"the leader (pid {pid}) stopped answering"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class LimitExceededError(CallError):
    """A configured limit (in-flight calls, subscriptions, followers) was hit."""


class MethodNotAllowedError(CallError, AttributeError):
    """The method is not delegated on the leader, so followers may not call it."""


class RemoteError(ConnshareError):
    """The real client raised an exception whose class is not loaded in the caller."""

    def __init__(self, type_name: str, message: str, args: tuple = ()) -> None:
        self.type_name = type_name
        self.message = message
        self.remote_args = args
        super().__init__(f"{type_name}: {message}")


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in another process."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return "\n\n" + self.text


def raised_again(exc: BaseException) -> BaseException:
    """A new instance of ``exc`` (its class, message, attributes and cause) for one
    more caller to raise. Raising one stored instance from every call would add
    each raise's frames to its traceback, and each caller's exception as its
    context: without bound, and under every thread that holds it."""
    cls = type(exc)
    try:
        new = cls.__new__(cls, *exc.args)  # not __init__: its signature is the class's own
        new.args = exc.args
        new.__dict__.update(exc.__dict__)
    except Exception:
        return exc.with_traceback(None)
    if exc.__cause__ is not None:
        new.__cause__ = exc.__cause__
    return new


def awaitable(exc: BaseException) -> BaseException:
    """``exc`` as an awaited call raises it. An asyncio future refuses
    ``StopIteration`` (it would end the awaiting coroutine as a return); a
    coroutine that lets one out raises ``RuntimeError`` instead (PEP 479), and
    so does an awaited call whose method raised one, with it as the cause."""
    if not isinstance(exc, StopIteration):
        return exc
    new = RuntimeError(f"the method raised StopIteration{f': {exc}' if str(exc) else ''}")
    new.__cause__ = exc
    return new
