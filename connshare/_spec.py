"""What a channel is: the client class, its create() arguments, and its delegates."""

from __future__ import annotations

import concurrent.futures
import inspect
import threading
from typing import Any

import attrs

from ._options import Options
from ._subs import LocalSub

#: What a delegated method can be delegated to.
KINDS = ("invoke", "invoke_oneway", "subscribe", "unsubscribe", "publish", "close")


class Avail(concurrent.futures.Future):
    """Done when a channel has a route; no waiter may cancel it for the others."""

    def cancel(self) -> bool:
        return False


@attrs.frozen
class MethodSpec:
    name: str
    to: str
    is_coro: bool
    idempotent: bool = False
    #: a blocking method that never blocks: the leader runs it on its loop
    inline: bool = False


def method_spec(cls: type, name: str, to: str, idempotent: bool = False, inline: bool = False) -> MethodSpec:
    fn = inspect.getattr_static(cls, name, None)
    if isinstance(fn, (staticmethod, classmethod)):
        fn = fn.__func__
    return MethodSpec(name, to, inspect.iscoroutinefunction(fn), idempotent, inline)


@attrs.define(eq=False)
class ChannelState:
    """A process's view of one channel (a name on a port), shared by every client of
    that name in the process: its local subscriptions and publications survive every
    change of leader."""

    name: str
    cls: type
    args: tuple
    kwargs: dict
    spec: dict[str, MethodSpec]
    options: Options
    subs: dict[tuple[str, bytes], LocalSub] = attrs.field(factory=dict)
    #: each publication: its reg, and a token of the publish() that made it
    publications: dict[tuple[str, bytes], tuple[Any, object]] = attrs.field(factory=dict)
    #: where each publication went last (a ChannelHost or a connection), with its
    #: token: a publish() queued before a new route's replay, which sent it, is
    #: not sent again
    pub_sent: dict[tuple[str, bytes], tuple[Any, object]] = attrs.field(factory=dict)
    #: the clients that published each of ``publications``
    publishers: dict[tuple[str, bytes], set[Any]] = attrs.field(factory=dict)
    clients: list[Any] = attrs.field(factory=list)
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    #: the leader's id for this channel on the current follower connection
    wire_id: int | None = None
    #: where calls go now: the ChannelHost (we lead), (connection, wire_id), or None
    route: Any = None
    #: done once ``route`` is set (replaced when it is cleared)
    avail: Avail = attrs.field(factory=Avail)
    #: why the channel cannot serve at all, if it cannot
    fatal: BaseException | None = None
    #: why the channel cannot serve for now: the real client is being started
    #: again, and calls raise this at once rather than wait
    down: BaseException | None = None
    #: whether the channel has served in this process (a route was set)
    served: bool = False

    def kind_method(self, to: str) -> str | None:
        for s in self.spec.values():
            if s.to == to:
                return s.name
        return None

    def emit_error(self, exc: BaseException) -> None:
        for c in list(self.clients):
            c.emit("error", exc)

    def drop_refused(self, sub: LocalSub, exc: BaseException) -> None:
        """Forget ``sub``, refused by the real client, so that subscribing again
        really asks again, and tell this process's clients why."""
        with self.lock:
            if self.subs.get((sub.method, sub.canon)) is sub:
                del self.subs[(sub.method, sub.canon)]
        self.emit_error(exc)
