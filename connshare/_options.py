"""Options of a cluster client: one frozen attrs class, validated at construction."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs

from ._errors import ConfigurationError
from ._protocol import DEFAULT_MAX_FRAME_SIZE, Transcode

#: Used when neither ``port=`` nor ``CONNSHARE_PORT`` is given. Below Linux's
#: ephemeral range (32768+), and not a port any common server claims.
DEFAULT_PORT = 26437


def _env_port() -> int:
    raw = os.environ.get("CONNSHARE_PORT")
    if not raw:
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"CONNSHARE_PORT must be a port number, not {raw!r}") from None


def _env_flag(name: str) -> Callable[[], bool]:
    """A default read from the environment variable ``name`` ("1", "true", "yes", "on")."""

    def read() -> bool:
        return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")

    return read


def _check(cond: bool, name: str, what: str, value: Any) -> None:
    if not cond:
        raise ConfigurationError(f"option {name!r} must be {what}, not {value!r}")


#: Longest time any option may set (about 115 days): a wait of infinite or
#: astronomical length overflows the platform's timeouts (threading.TIMEOUT_MAX).
MAX_SECONDS = 10_000_000


def _positive(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= MAX_SECONDS
    _check(ok, a.name, f"a positive number of seconds, at most {MAX_SECONDS:,}", v)


def _positive_or_none(inst: Any, a: attrs.Attribute, v: Any) -> None:
    if v is not None:
        _positive(inst, a, v)


def _positive_int(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, a.name, "a positive int", v)


#: Smallest max_frame_size: room for the handshake, a REGISTER with a
#: 200-character name and class, and small calls.
MIN_FRAME_SIZE = 4096


def _frame_size(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= MIN_FRAME_SIZE
    _check(ok, a.name, f"an int of at least {MIN_FRAME_SIZE} (bytes)", v)


def _port(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    _check(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536, a.name, "a port number 1-65535", v)


def _name(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    _check(v is None or (isinstance(v, str) and 0 < len(v) <= 200), a.name, "a non-empty str of at most 200 characters", v)


def _opt_bool(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    _check(v is None or isinstance(v, bool), a.name, "True, False or None", v)


def _bool(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    _check(isinstance(v, bool), a.name, "True or False", v)


def _nice(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    _check(v is None or (isinstance(v, int) and not isinstance(v, bool) and -20 <= v <= 19), a.name, "None or an int -20..19", v)


def _seconds_up_to(limit: float) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, a: attrs.Attribute, v: Any) -> None:
        ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= limit)
        _check(ok, a.name, f"None or a number of seconds from 0 to {limit}", v)

    return check


def _secret(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    _check(v is None or (isinstance(v, (str, bytes)) and len(v) >= 16), a.name, "None or a str/bytes of 16+ characters", v)


def _transcode(_inst: Any, a: attrs.Attribute, v: Any) -> None:
    _check(v is None or isinstance(v, Transcode), a.name, "None or a connshare.Transcode", v)


@attrs.frozen(kw_only=True)
class Options:
    """Every option of :func:`connshare.cluster`. Times are in seconds.

    A bad value raises :class:`ConfigurationError` naming the option.
    """

    #: Channel name; several names share one port. Default: the client class's name.
    name: str | None = attrs.field(default=None, validator=_name)
    #: Local TCP port the processes compete for (127.0.0.1). Env ``CONNSHARE_PORT``.
    port: int = attrs.field(factory=_env_port, validator=_port)
    #: ``True``/``False`` forces the role; ``None`` lets the election decide.
    is_leader: bool | None = attrs.field(default=None, validator=_opt_bool)
    #: How long to wait for a leader (election, forced follower, calls during failover).
    max_wait_time: float = attrs.field(default=30.0, validator=_positive)
    #: Timeout of every call a follower forwards; raises CallTimeoutError.
    response_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Bound on connecting to the port and finishing the handshake.
    connect_timeout: float = attrs.field(default=5.0, validator=_positive)
    #: Report an error if a subscription gets no first value in this time.
    subscribe_timeout: float | None = attrs.field(default=None, validator=_positive_or_none)
    #: Heartbeat period both ways; a peer silent for 3 periods is unresponsive.
    heartbeat_interval: float | None = attrs.field(default=1.0, validator=_positive_or_none)
    #: Push each value to every subscribed process (True) or to one of them (False).
    is_broadcast: bool = attrs.field(default=True, validator=_bool)
    #: No port, no peers: every client of a name in this process shares one real
    #: client. Default: env ``CONNSHARE_SINGLE_MODE``.
    single_mode: bool = attrs.field(factory=_env_flag("CONNSHARE_SINGLE_MODE"), validator=_bool)
    #: Delegate subscribe/unsubscribe/publish/close and every public method.
    auto_generate: bool = attrs.field(default=False, validator=_bool)
    #: Shared secret; ``None``: a random key in a 0600 per-user file, keyed by port.
    secret: str | bytes | None = attrs.field(default=None, validator=_secret, repr=False)
    #: User types on the wire (msgpack ext types); everything else is plain msgpack.
    transcode: Transcode | None = attrs.field(default=None, validator=_transcode)
    #: Pass the leader's own calls (and single mode's) through the wire as a
    #: follower's are: their arguments, results, errors and event values are
    #: encoded and decoded, so a value a follower cannot send fails here too, a
    #: tuple arrives as a list, and an exception is rebuilt from its type's name
    #: and arguments. For tests and development: it costs an encode and a decode
    #: per value. Default: env ``CONNSHARE_ENCODE_LOCALLY``.
    encode_locally: bool = attrs.field(factory=_env_flag("CONNSHARE_ENCODE_LOCALLY"), validator=_bool)
    #: Largest frame either side sends or accepts.
    max_frame_size: int = attrs.field(default=DEFAULT_MAX_FRAME_SIZE, validator=_frame_size)
    #: Calls one follower may have in flight on the leader.
    max_inflight_per_follower: int = attrs.field(default=10_000, validator=_positive_int)
    #: Distinct keys one follower may subscribe.
    max_subscriptions_per_follower: int = attrs.field(default=10_000, validator=_positive_int)
    #: Followers one leader serves.
    max_followers: int = attrs.field(default=1024, validator=_positive_int)
    #: Bytes the leader queues for one follower before it drops that (slow) follower.
    max_buffered_bytes: int = attrs.field(default=32 * 1024 * 1024, validator=_positive_int)
    #: Threads the leader runs blocking methods in.
    worker_threads: int = attrs.field(default=16, validator=_positive_int)
    #: While this process leads, run connshare's loop thread (and the threads it
    #: starts) at this nice value, e.g. ``-5``: the leader serves every process,
    #: and under CPU load the kernel's fair share starves it. Linux; a negative
    #: value needs CAP_SYS_NICE or RLIMIT_NICE, else a warning. ``None``: untouched.
    leader_nice: int | None = attrs.field(default=None, validator=_nice)
    #: An awaited call whose event loop has nothing else to run (no callback ready,
    #: no timer due, no other call in flight) waits up to this long for its answer
    #: on the loop's thread before yielding to the loop: an answer that comes in
    #: time then costs no pass of the loop. The loop still runs at least every 16
    #: such calls, and a wait that ends with no answer turns waiting off for a
    #: while. asyncio's own loops only. ``None`` or ``0``: every call yields.
    wait_in_place: float | None = attrs.field(default=0.0002, validator=_seconds_up_to(0.005))
    #: A follower's caller that reads its own answer (a blocking caller, or an
    #: awaited call waiting in place) polls the socket up to this long before it
    #: sleeps, e.g. ``0.0001``: an answer that comes meanwhile is read without the
    #: thread's wake-up, at the cost of a busy core while it polls. A poll that
    #: ends with no answer turns polling off for a while. At most 1 ms. Where a
    #: caller reads its own answer: Linux. ``None`` or ``0``: never poll.
    spin_wait: float | None = attrs.field(default=None, validator=_seconds_up_to(0.001))
    #: While this process leads, connshare's loop polls for the next message up to
    #: this long before it sleeps, e.g. ``0.0001``: a follower's request that comes
    #: meanwhile is read without the loop thread's wake-up (about 6 µs off every
    #: sequential call here), at the cost of a busy core while it polls, and of the
    #: GIL for the leader's other threads until the poll ends. A poll that ends with
    #: nothing read turns polling off for a while. At most 1 ms. asyncio's loop only
    #: (under uvloop: a warning, once). ``None`` or ``0``: never poll.
    leader_spin_wait: float | None = attrs.field(default=None, validator=_seconds_up_to(0.001))

    def secret_bytes(self) -> bytes | None:
        """``secret`` as bytes (a str is UTF-8 encoded); None when not set."""
        s = self.secret
        return s.encode() if isinstance(s, str) else s
