"""``cluster(cls, **options)``: the builder, and the client it creates.

The created client mirrors the real class: a delegated coroutine method becomes an
awaitable proxy, a plain method a blocking one. Wherever the real client lives (this
process, if it won the port; another, if not), the call reaches it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import keyword
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ._base import _UNSET, Base
from ._errors import ClientClosedError, ConfigurationError
from ._loop import forbid_loop_thread, on_loop_thread
from ._node import Node, Role, node_for
from ._options import Options
from ._spec import KINDS, ChannelState, MethodSpec, method_spec
from ._subs import LocalSub

log = logging.getLogger("connshare.cluster")

#: Names of the client's own API, which a delegate may not shadow.
RESERVED = frozenset(
    {
        "ready",
        "wait_ready",
        "on",
        "off",
        "emit",
        "close",
        "aclose",
        "is_ready",
        "closed",
        "is_leader",
        "leader_pid",
        "role",
        "invoke",
        "ainvoke",
        "options",
        "channel",
    }
)
#: Delegated by default when the class has them, as cluster-client does.
DEFAULT_DELEGATES = {"subscribe": "subscribe", "unsubscribe": "unsubscribe", "publish": "publish", "close": "close"}


class ClusterClient(Base):
    """A client whose real instance lives in the leader process of its port."""

    _proxy_specs: ClassVar[dict[str, MethodSpec]] = {}

    if TYPE_CHECKING:
        # The delegated methods are made per real class at create(): to a type
        # checker, an attribute the client does not define is one of them.
        def __getattr__(self, name: str) -> Any: ...

    else:

        def __getattr__(self, name: str) -> Any:
            # Only on a miss: a method of the real class that was not delegated
            # says how to delegate it, rather than just "no attribute".
            cls = self.__dict__.get("_cls")
            if cls is not None and not name.startswith("_") and callable(getattr(cls, name, None)):
                raise AttributeError(
                    f"{type(self).__name__} has no attribute {name!r}: {cls.__qualname__}.{name} is not delegated "
                    f"(add .delegate({name!r}) to the cluster() builder, or pass auto_generate=True)"
                )
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __init__(self, cls: type, options: Options, spec: dict[str, MethodSpec], args: tuple, kwargs: dict) -> None:
        super().__init__()
        self._cls = cls
        self.options = options
        self.channel = options.name or cls.__name__
        self._spec = spec
        #: what invoke() and ainvoke() take, looked up once per call
        self._invokable = {name: m for name, m in spec.items() if m.to in ("invoke", "invoke_oneway")}
        self._args = args
        self._kwargs = kwargs
        self._timeout = options.response_timeout
        self._node: Node | None = None
        self._state: ChannelState | None = None
        self._join()

    def _join(self) -> Node:
        while True:
            node = node_for(self.options)
            state = ChannelState(self.channel, self._cls, self._args, self._kwargs, self._spec, self.options)
            try:
                self._state = node.attach(self, state)
            except ClientClosedError:
                continue  # that node is on its way out; node_for makes a new one
            self._node = node
            return node

    def _live_node(self) -> Node:
        node = self._node
        if node is None:
            if self.closed:
                raise ClientClosedError(f"{type(self).__name__} is closed")
            node = self._join()  # first use after a fork
        return node

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's node; keep subscriptions and
        publications, and join the election at once."""
        old = self._state
        self._node = None
        self._state = None
        self._reset_ready()
        if old is None or self.closed:
            return
        node = self._join()
        new = self._state
        assert new is not None
        for key, sub in old.subs.items():
            copy = LocalSub(sub.method, sub.reg, sub.canon)
            for ls in sub.listeners:
                ls.loop = None  # the parent's loops do not run here
                copy.listeners.append(ls)
            new.subs[key] = copy
            node.loop.call_soon_threadsafe(node._sub_route, new, copy)
        new.publications.update(old.publications)
        new.publishers.update(old.publishers)

    # -- role --------------------------------------------------------------------

    @property
    def role(self) -> str:
        """``"leader"``, ``"follower"``, ``"single"``, ``"electing"`` or ``"closed"``."""
        node = self._node
        if node is not None:
            return node.role.value
        return Role.CLOSED.value if self.closed else Role.ELECTING.value

    @property
    def is_leader(self) -> bool:
        """True in exactly one process per port (always, in single mode)."""
        node = self._node
        return node is not None and node.role in (Role.LEADER, Role.LOCAL)

    @property
    def leader_pid(self) -> int | None:
        """The pid of the leading process, as last seen here (None before any is found)."""
        node = self._node
        return node.leader_pid if node is not None else None

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ready; raise ``NotReadyError`` (its ``__cause__`` says why:
        a start-up failure, or ``ClientClosedError`` if closed first), or
        ``TimeoutError``. On connshare's own thread, where it would wait forever,
        it raises ``ConcurrencyError`` unless the client is ready or failed."""
        if self._ready_state is _UNSET and on_loop_thread():
            forbid_loop_thread("wait_ready() on a client that is not ready")
        super().wait_ready(timeout)

    # -- the generic front doors ----------------------------------------------

    def _method(self, name: str) -> MethodSpec:
        spec = self._invokable.get(name)
        if spec is None:
            raise AttributeError(f"{name!r} is not delegated on {type(self).__name__}")
        return spec

    # invoke() and ainvoke() run per call: like the delegated methods, they call
    # no helper but on_loop_thread() on the usual path (a call after a wait meets
    # cold caches, where each Python frame costs a fraction of a microsecond).
    def invoke(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call delegated ``method`` and block for its result, whatever its kind."""
        if on_loop_thread():
            forbid_loop_thread("a blocking connshare call")
        spec = self._invokable.get(method) or self._method(method)  # the latter raises
        node = self._node or self._live_node()
        return node.invoke_sync(self._state, spec, args, kwargs, self._timeout)  # type: ignore[arg-type]

    async def ainvoke(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call delegated ``method`` and await its result, whatever its kind."""
        spec = self._invokable.get(method) or self._method(method)  # the latter raises
        node = self._node or self._live_node()
        return await node.invoke_async(self._state, spec, args, kwargs, self._timeout)  # type: ignore[arg-type]

    def subscribe(self, reg: Any, listener: Callable[[Any], Any]) -> None:
        """Call ``listener(value)`` on every value of ``reg``; the last value at once."""
        self._subscribe("subscribe", reg, listener)

    def _subscribe(self, method: str, reg: Any, listener: Callable[[Any], Any]) -> None:
        if not callable(listener):
            raise TypeError(f"listener must be callable, not {listener!r}")
        from ._subs import Listener

        self._live_node().subscribe(self._state, method, reg, Listener(listener, self))  # type: ignore[arg-type]

    def unsubscribe(self, reg: Any, listener: Callable[[Any], Any] | None = None) -> None:
        """Stop calling ``listener`` (every listener this client added, if None) for ``reg``."""
        self._live_node().unsubscribe(self._state, reg, listener, self)  # type: ignore[arg-type]

    def publish(self, reg: Any) -> None:
        """Publish ``reg`` upstream; it is published again on every new leader."""
        self._publish("publish", reg)

    def _publish(self, method: str, reg: Any) -> None:
        self._live_node().publish(self._state, method, reg, self)  # type: ignore[arg-type]

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Leave the cluster. The process's last client closes its node: a leader
        hands off to the next one, answers what is in flight, then closes the real
        client. Idempotent."""
        fut = self._detach()
        if fut is not None and not on_loop_thread():
            try:
                fut.result(self.options.response_timeout + 5)
            except concurrent.futures.TimeoutError:
                log.warning("closing %s took too long; going on", self.channel)

    async def aclose(self) -> None:
        """Awaitable :meth:`close`."""
        fut = self._detach()
        if fut is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), self.options.response_timeout + 5)
            except asyncio.TimeoutError:
                log.warning("closing %s took too long; going on", self.channel)

    def _detach(self) -> concurrent.futures.Future | None:
        # Whoever waits for readiness would otherwise wait for a node that is gone.
        self._settle_ready(ClientClosedError(f"{self.channel!r} was closed before it was ready"), first=True)
        node, state = self._node, self._state
        self._node = None
        if node is None or state is None:
            return None
        return node.detach(self, state)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} channel={self.channel!r} port={self.options.port} role={self.role}>"


def _proxy(spec: MethodSpec) -> Callable[..., Any]:
    name = spec.name
    if spec.to == "invoke" and spec.is_coro:

        async def acall(self: ClusterClient, *args: Any, **kwargs: Any) -> Any:
            node = self._node or self._live_node()
            return await node.invoke_async(self._state, spec, args, kwargs, self._timeout)  # type: ignore[arg-type]

        fn: Callable[..., Any] = acall
    elif spec.to == "invoke":

        def call(self: ClusterClient, *args: Any, **kwargs: Any) -> Any:
            if on_loop_thread():  # the message is built only for the error
                forbid_loop_thread(f"the blocking call {name}()")
            node = self._node or self._live_node()
            return node.invoke_sync(self._state, spec, args, kwargs, self._timeout)  # type: ignore[arg-type]

        fn = call
    elif spec.to == "invoke_oneway":

        def oneway(self: ClusterClient, *args: Any, **kwargs: Any) -> None:
            self._live_node().invoke_oneway(self._state, spec, args, kwargs)  # type: ignore[arg-type]

        fn = oneway
    elif spec.to == "subscribe":

        def subscribe(self: ClusterClient, reg: Any, listener: Callable[[Any], Any]) -> None:
            self._subscribe(name, reg, listener)

        fn = subscribe
    elif spec.to == "unsubscribe":

        def unsubscribe(self: ClusterClient, reg: Any, listener: Callable[[Any], Any] | None = None) -> None:
            ClusterClient.unsubscribe(self, reg, listener)

        fn = unsubscribe
    elif spec.to == "publish":

        def publish(self: ClusterClient, reg: Any) -> None:
            self._publish(name, reg)

        fn = publish
    else:  # close

        def close(self: ClusterClient) -> None:
            self.close()

        fn = close
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"Delegated to the real client's {name}() ({spec.to})."
    return fn


class ClusterBuilder:
    """What :func:`cluster` returns: chain ``delegate()`` and ``override()``, then
    ``create()``."""

    def __init__(self, cls: type, options: Options) -> None:
        self._cls = cls
        self._options = options
        self._delegates: dict[str, tuple[str, bool, bool]] = {}
        self._overrides: dict[str, Any] = {}

    def delegate(self, name: str, to: str = "invoke", *, idempotent: bool = False, inline: bool = False) -> ClusterBuilder:
        """Make ``name`` reach the real client as ``to`` (one of invoke,
        invoke_oneway, subscribe, unsubscribe, publish, close).

        ``idempotent=True``: sent once more to the next leader if the leader dies
        mid-call. ``inline=True``: a blocking method that never blocks (a cache
        lookup) runs on the leader's loop thread instead of a worker thread, which
        saves a thread hop per call; one that does block stalls every follower."""
        if to not in KINDS:
            raise ConfigurationError(f"delegate({name!r}, to={to!r}): 'to' must be one of {', '.join(KINDS)}")
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ConfigurationError(f"delegate name must be a public method name, not {name!r}")
        if name in RESERVED - {"close"} or (name == "close" and to != "close"):
            raise ConfigurationError(f"{name!r} is part of the cluster client's own API and cannot be delegated as {to!r}")
        if not callable(getattr(self._cls, name, None)):
            raise ConfigurationError(f"{self._cls.__name__} has no method {name!r} to delegate")
        if _is_generator(getattr(self._cls, name)):
            raise ConfigurationError(
                f"{self._cls.__name__}.{name} is a generator: a generator cannot cross to another process; "
                "delegate a method that returns its values (a list)"
            )
        if inline and to not in ("invoke", "invoke_oneway"):
            raise ConfigurationError(f"delegate({name!r}, {to!r}): inline applies to invoke and invoke_oneway only")
        self._delegates[name] = (to, idempotent, inline)
        return self

    def override(self, name: str, value: Any) -> ClusterBuilder:
        """Set attribute ``name`` on the created client (a constant, a local helper)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(f"override name must be an identifier, not {name!r}")
        self._overrides[name] = value
        return self

    def _specs(self) -> dict[str, MethodSpec]:
        cls = self._cls
        wanted: dict[str, tuple[str, bool, bool]] = {}
        for name, to in DEFAULT_DELEGATES.items():
            if callable(getattr(cls, name, None)):
                wanted[name] = (to, False, False)
        if self._options.auto_generate:
            for name, _ in inspect.getmembers(cls):
                if name.startswith("_") or name in RESERVED or name in wanted:
                    continue
                if callable(inspect.getattr_static(cls, name, None)) or isinstance(
                    inspect.getattr_static(cls, name, None), (staticmethod, classmethod)
                ):
                    if name in dir(Base) or _is_generator(getattr(cls, name)):
                        continue  # a generator cannot cross to another process
                    wanted[name] = ("invoke", False, False)
        wanted.update(self._delegates)
        return {name: method_spec(cls, name, to, idem, inline) for name, (to, idem, inline) in wanted.items()}

    def create(self, *args: Any, **kwargs: Any) -> ClusterClient:
        """Join the port's cluster; the leader builds ``cls(*args, **kwargs)``.

        Returns at once; ``wait_ready()`` or ``await ready()`` for the client to
        serve (calls made before wait for it, up to ``max_wait_time``)."""
        specs = self._specs()
        methods = {}
        for name, spec in specs.items():
            if name in ("subscribe", "unsubscribe", "publish", "close") and spec.to == name:
                continue  # ClusterClient's own methods do exactly that
            methods[name] = _proxy(spec)
        proxy_cls = type(f"{self._cls.__name__}ClusterClient", (ClusterClient,), methods)
        client = proxy_cls(self._cls, self._options, specs, args, kwargs)
        for name, value in self._overrides.items():
            setattr(client, name, value)
        return client


def _is_generator(fn: Any) -> bool:
    return inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)


def cluster(cls: type, **options: Any) -> ClusterBuilder:
    """Share one ``cls`` client among the processes of this host.

    ``options`` are those of :class:`connshare.Options`; a bad one raises
    :class:`ConfigurationError` at once, naming it."""
    if not isinstance(cls, type):
        raise ConfigurationError(f"cluster() takes the client class, not {cls!r}")
    try:
        opts = Options(**options)
    except TypeError as exc:
        raise ConfigurationError(f"unknown option: {exc}") from None
    return ClusterBuilder(cls, opts)


class APIClientBase(Base):
    """Business logic over a shared data client.

    A subclass names ``DataClient`` (the class), ``delegates`` (``{name: kind}``) and
    ``cluster_options`` (a dict); it gets ``self._client`` (the cluster client) and
    becomes ready with it. Caches and typed accessors live in the subclass.
    """

    DataClient: ClassVar[type]
    delegates: ClassVar[dict[str, str]] = {}
    #: options for ``cluster()``; a subclass may set them per instance, before
    #: ``super().__init__()``
    cluster_options: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        builder = cluster(self.DataClient, **self.cluster_options)
        for name, to in self.delegates.items():
            builder.delegate(name, to)
        self._client = builder.create(*args, **kwargs)
        self._client.on("error", lambda exc: self.emit("error", exc))
        # The client's error events reach ours through the listener above, a
        # start-up failure included: settle without emitting it a second time.
        self._client.ready(lambda err: self._settle_ready(err if err is not None else True))

    @property
    def is_leader(self) -> bool:
        """Whether this process holds the real data client (see ``ClusterClient``)."""
        return self._client.is_leader

    # Readiness is the cluster client's: after a fork the child's client elects
    # anew, and a copy of the parent's flag would say "ready" too soon.
    @property
    def is_ready(self) -> bool:
        """Whether the shared data client is ready in this process."""
        return self._client.is_ready

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the shared data client is ready; raise why it is not, or TimeoutError."""
        self._client.wait_ready(timeout)

    def ready(self, flag: Any = _UNSET) -> Any:
        """As :meth:`Base.ready`; a callback gets the shared data client's state,
        which may have turned ready after a failure (a later election, a channel
        that came back)."""
        if callable(flag) and not isinstance(flag, BaseException):
            return self._client.ready(flag)
        return super().ready(flag)

    async def _await_ready(self) -> None:
        await self._client.ready()

    def close(self) -> None:
        """Close this process's cluster client (idempotent)."""
        self._client.close()

    async def aclose(self) -> None:
        """Close this process's cluster client, awaiting the end (idempotent). A
        subclass's own ``close()`` runs, as ``close()`` would run it."""
        if type(self).close is not APIClientBase.close:
            await super().aclose()
        elif not self._closing_started():
            await self._client.aclose()

    # Idempotent as it is: wrapped, it would mark the client closed before a
    # subclass's close() could run.
    aclose._connshare_once = True  # type: ignore[attr-defined]
