"""A configuration watcher on Redis, shared by every process of a host through connshare.

Two data clients talk to Redis and know nothing of processes:

* :class:`RedisConfigClient`: blocking ``redis-py``; a reader thread owns the pub/sub
  connection.
* :class:`AsyncRedisConfigClient`: ``redis.asyncio``; a reader task on the loop that
  built it (connshare's loop, in the leader).

Both store key ``k`` at ``<prefix>k`` and announce each change on the pub/sub channel
of the same name: :func:`set_config` does SET and PUBLISH in one MULTI/EXEC.
``subscribe(k, listener)`` SUBSCRIBEs that channel; when Redis confirms the
subscription, and on every message, the reader GETs the key and delivers what it holds
(a message only says "changed"). So no change after the SUBSCRIBE is lost, and a
listener never gets a value older than one it already has; a value equal to the last
one is not delivered again.

:class:`ConfigClient` (blocking data client) and :class:`AsyncConfigClient` (asyncio
data client) are the API clients an app uses: one connshare cluster client underneath,
a local cache fed by the subscriptions, and typed accessors that read the cache.
Either API client serves blocking and async callers alike (``set``/``aset``,
``fetch``/``afetch``); pick the one whose Redis library you prefer in the leader.
"""

from __future__ import annotations

import asyncio

# Imported now, before any thread: a thread's first connection to a host name
# imports this codec, and a fork() in the middle of that import leaves the child
# unable to finish it ("unknown encoding: idna", or a hang). See get_config() in
# wsgi_app.py for the rest of what --preload needs.
import encodings.idna  # noqa: F401
import functools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Container, Iterable
from typing import Any, ClassVar, TypeVar, cast

import redis
import redis.asyncio as aioredis

from connshare import APIClientBase, Base

log = logging.getLogger("examples.redis_config")

T = TypeVar("T")
Listener = Callable[[Any], Any]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "config:"
DEFAULT_CLIENT_NAME = "connshare-config"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def set_config(r: redis.Redis, key: str, value: Any, prefix: str = DEFAULT_PREFIX) -> None:
    """SET ``<prefix>key`` and PUBLISH the value on the channel of the same name, in
    one transaction. Any process can change a value this way, or ``redis-cli``:
    ``SET config:k v`` then ``PUBLISH config:k v`` (the watchers GET the key when told)."""
    name = prefix + key
    with r.pipeline(transaction=True) as pipe:
        pipe.set(name, _text(value))
        pipe.publish(name, _text(value))
        pipe.execute()


async def aset_config(r: aioredis.Redis, key: str, value: Any, prefix: str = DEFAULT_PREFIX) -> None:
    """The ``redis.asyncio`` twin of :func:`set_config`."""
    name = prefix + key
    async with r.pipeline(transaction=True) as pipe:
        pipe.set(name, _text(value))
        pipe.publish(name, _text(value))
        await pipe.execute()


def app_connections(r: redis.Redis, client_name: str) -> int:
    """How many connections Redis has from clients named ``client_name``
    (``CLIENT LIST``; the data clients set their name with ``CLIENT SETNAME``)."""
    return sum(1 for c in r.client_list() if c.get("name") == client_name)


class _Watches:
    """Listeners per key and the last value delivered for each (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, list[Listener]] = {}
        self._last: dict[str, Any] = {}

    def add(self, key: str, listener: Listener) -> tuple[bool, bool, Any]:
        """(new key?, has a value?, the value)."""
        with self._lock:
            new = key not in self._listeners
            self._listeners.setdefault(key, []).append(listener)
            return new, key in self._last, self._last.get(key)

    def remove(self, key: str, listener: Listener | None) -> bool:
        """True when ``key`` has no listener left."""
        with self._lock:
            ls = self._listeners.get(key)
            if ls is None:
                return False
            if listener is None:
                ls.clear()
            else:
                ls[:] = [f for f in ls if f != listener]
            if ls:
                return False
            del self._listeners[key]
            self._last.pop(key, None)
            return True

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._listeners)

    def deliver(self, key: str, value: Any) -> None:
        with self._lock:
            ls = self._listeners.get(key)
            if ls is None or (key in self._last and self._last[key] == value):
                return
            self._last[key] = value
            ls = list(ls)
        for fn in ls:
            try:
                fn(value)
            except Exception:
                log.exception("config listener %r for %r raised", fn, key)


class RedisConfigClient(Base):
    """Blocking ``redis-py`` data client.

    Connections (named ``client_name`` in ``CLIENT LIST``): one pub/sub connection
    while anything is watched, plus ``max_connections`` command connections at most
    (default 1: config traffic is light, and calls take turns on it). So one data
    client holds 2 connections. It is ready at once (the first PING opens the command
    connection) and reconnects by itself; failures are emitted as ``"error"``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        prefix: str = DEFAULT_PREFIX,
        client_name: str = DEFAULT_CLIENT_NAME,
        max_connections: int = 1,
        poll_interval: float = 0.1,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        # +1: the pub/sub connection comes from the same pool.
        self._pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections + 1, timeout=10, decode_responses=True, client_name=client_name
        )
        self._redis = redis.Redis(connection_pool=self._pool)
        self._watches = _Watches()
        self._poll = poll_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-config-pubsub", daemon=True)
        self._thread.start()
        self.ready(True)

    # -- the data API (delegated by the cluster client) --------------------------------

    def get(self, key: str) -> str | None:
        return cast("str | None", self._redis.get(self.prefix + key))  # decode_responses

    def set(self, key: str, value: Any) -> None:
        set_config(self._redis, key, value, self.prefix)

    def subscribe(self, key: str, listener: Listener) -> None:
        """``listener(value)`` with the current value (None if unset), then each new one."""
        new, has, value = self._watches.add(key, listener)
        if new:
            self._wake.set()
        elif has:
            listener(value)

    def unsubscribe(self, key: str, listener: Listener | None = None) -> None:
        if self._watches.remove(key, listener):
            self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(self._poll + 2)

    # -- the reader thread ----------------------------------------------------------------

    def _run(self) -> None:
        ps: Any = None
        subscribed: set[str] = set()
        backoff = 0.1
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            log.warning("redis not reachable yet: %r", exc)
        while not self._stop.is_set():
            try:
                self._wake.clear()
                wanted = self._watches.keys()
                if not wanted:
                    if ps is not None:
                        ps.close()
                        ps, subscribed = None, set()
                    self._wake.wait()
                    continue
                if ps is None:
                    ps, subscribed = self._redis.pubsub(), set()
                if wanted - subscribed:
                    ps.subscribe(*(self.prefix + k for k in wanted - subscribed))
                if subscribed - wanted:
                    ps.unsubscribe(*(self.prefix + k for k in subscribed - wanted))
                subscribed = wanted
                msg = ps.get_message(timeout=self._poll)
                if msg is not None:
                    self._handle(msg, subscribed)
                backoff = 0.1
            except (redis.RedisError, OSError) as exc:
                if self._stop.is_set():
                    break
                log.warning("redis pub/sub failed (retrying in %.1f s): %r", backoff, exc)
                self.emit("error", exc)
                if ps is not None:
                    try:
                        ps.close()
                    except Exception:
                        pass
                ps, subscribed = None, set()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        try:
            if ps is not None:
                ps.close()
        finally:
            self._pool.disconnect()

    def _handle(self, msg: dict, subscribed: Container[str]) -> None:
        channel = msg.get("channel")
        if not isinstance(channel, str) or not channel.startswith(self.prefix):
            return
        key = channel[len(self.prefix) :]
        if key in subscribed and msg["type"] in ("subscribe", "message"):
            # Subscribed (or again, after a reconnect), or told of a change: deliver
            # what Redis holds now. Each GET comes after the previous one, so a
            # listener never gets a value older than one it already has.
            self._watches.deliver(key, self._redis.get(channel))


class AsyncRedisConfigClient(Base):
    """``redis.asyncio`` data client: the same API, with coroutine ``get``/``set``.

    Build it inside a running loop (connshare builds it on its own loop); its reader
    task and every listener call run on that loop. Same connections as
    :class:`RedisConfigClient`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        prefix: str = DEFAULT_PREFIX,
        client_name: str = DEFAULT_CLIENT_NAME,
        max_connections: int = 1,
        poll_interval: float = 0.1,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self._loop = asyncio.get_running_loop()
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections + 1, timeout=10, decode_responses=True, client_name=client_name
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._watches = _Watches()
        self._poll = poll_interval
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = self._loop.create_task(self._run())
        self.ready(True)

    # -- the data API ----------------------------------------------------------------------

    async def get(self, key: str) -> str | None:
        return cast("str | None", await self._redis.get(self.prefix + key))  # decode_responses

    async def set(self, key: str, value: Any) -> None:
        await aset_config(self._redis, key, value, self.prefix)

    def subscribe(self, key: str, listener: Listener) -> None:
        new, has, value = self._watches.add(key, listener)
        if new:
            self._poke()
        elif has:
            listener(value)

    def unsubscribe(self, key: str, listener: Listener | None = None) -> None:
        if self._watches.remove(key, listener):
            self._poke()

    async def close(self) -> None:
        self._stopping = True
        self._task.cancel()
        try:
            await self._task
        except BaseException:
            pass
        await self._redis.aclose()
        await self._pool.aclose()

    def _poke(self) -> None:
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    # -- the reader task -----------------------------------------------------------------

    async def _run(self) -> None:
        ps: Any = None
        subscribed: set[str] = set()
        backoff = 0.1
        try:
            while not self._stopping:
                try:
                    self._wake.clear()
                    wanted = self._watches.keys()
                    if not wanted:
                        if ps is not None:
                            await ps.aclose()
                            ps, subscribed = None, set()
                        await self._wake.wait()
                        continue
                    if ps is None:
                        ps, subscribed = self._redis.pubsub(), set()
                    if wanted - subscribed:
                        await ps.subscribe(*(self.prefix + k for k in wanted - subscribed))
                    if subscribed - wanted:
                        await ps.unsubscribe(*(self.prefix + k for k in subscribed - wanted))
                    subscribed = wanted
                    msg = await ps.get_message(timeout=self._poll)
                    if msg is not None:
                        await self._handle(msg, subscribed)
                    backoff = 0.1
                except (redis.RedisError, OSError) as exc:
                    log.warning("redis pub/sub failed (retrying in %.1f s): %r", backoff, exc)
                    self.emit("error", exc)
                    if ps is not None:
                        try:
                            await ps.aclose()
                        except Exception:
                            pass
                    ps, subscribed = None, set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            if ps is not None:
                try:
                    await ps.aclose()
                except Exception:
                    pass

    async def _handle(self, msg: dict, subscribed: Container[str]) -> None:
        channel = msg.get("channel")
        if not isinstance(channel, str) or not channel.startswith(self.prefix):
            return
        key = channel[len(self.prefix) :]
        if key in subscribed and msg["type"] in ("subscribe", "message"):
            self._watches.deliver(key, await self._redis.get(channel))


# -- the API clients the apps use ---------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

_instances: weakref.WeakSet = weakref.WeakSet()


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


class ConfigClient(APIClientBase):
    """Watched configuration values, cached in this process, over one shared
    :class:`RedisConfigClient` per host (per connshare port).

    ``keys`` are watched from the start, more with :meth:`watch`. The typed
    accessors (``get_str``, ``get_int``, ``get_float``, ``get_bool``, ``get_json``)
    read the local cache and never block; ``set``/``fetch`` (blocking) and
    ``aset``/``afetch`` (awaitable) go through the leader to Redis.
    """

    DataClient: ClassVar[type[Base]] = RedisConfigClient
    delegates = {"get": "invoke", "set": "invoke"}
    default_name = "redis-config"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        keys: Iterable[str] = (),
        *,
        prefix: str = DEFAULT_PREFIX,
        client_name: str = DEFAULT_CLIENT_NAME,
        name: str | None = None,
        port: int | None = None,
        **cluster_options: Any,
    ) -> None:
        opts: dict[str, Any] = {"name": name or self.default_name, **cluster_options}
        if port is not None:
            opts["port"] = port
        self.cluster_options = opts  # read by APIClientBase.__init__
        self._cache: dict[str, str | None] = {}
        self._watched: dict[str, Listener] = {}
        self._cond = threading.Condition()
        super().__init__(url, prefix=prefix, client_name=client_name)
        _instances.add(self)
        for key in keys:
            self.watch(key)

    @classmethod
    def from_env(cls, **kwargs: Any) -> ConfigClient:
        """Built from ``REDIS_URL``, ``CONFIG_KEYS`` (comma-separated) and
        ``CONFIG_CLIENT_NAME``; connshare itself reads ``CONNSHARE_PORT``."""
        keys = [k.strip() for k in os.environ.get("CONFIG_KEYS", "greeting").split(",") if k.strip()]
        return cls(
            os.environ.get("REDIS_URL", DEFAULT_URL),
            keys,
            client_name=os.environ.get("CONFIG_CLIENT_NAME", DEFAULT_CLIENT_NAME),
            **kwargs,
        )

    # -- who we are ------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> None:
        super().wait_ready(timeout)
        # In a child forked after this client was created, this object's own
        # readiness is still the parent's while the cluster client underneath
        # elects again: wait for that one too.
        self._client.wait_ready(timeout)

    @property
    def is_ready(self) -> bool:
        return super().is_ready and self._client.is_ready

    @property
    def role(self) -> str:
        return self._client.role

    @property
    def leader_pid(self) -> int | None:
        return self._client.leader_pid

    # -- watching and the cache --------------------------------------------------------

    def watch(self, key: str) -> None:
        """Keep ``key``'s value in the local cache from now on."""
        with self._cond:
            if key in self._watched:
                return
            listener = self._watched[key] = functools.partial(self._on_value, key)
        self._client.subscribe(key, listener)

    def _on_value(self, key: str, value: str | None) -> None:
        # Runs on connshare's thread (or on the loop the client was created on):
        # only touch the cache here, never make a blocking connshare call.
        with self._cond:
            self._cache[key] = value
            self._cond.notify_all()

    def on_change(self, key: str, listener: Listener) -> None:
        """Call ``listener(value)`` with the current value and on every change. It
        runs on connshare's thread (or on your loop, if registered from one)."""
        self.watch(key)
        self._client.subscribe(key, listener)

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until the client is ready and every watched key's first value
        has arrived; True if so. Before a fork, this lets the start-up work of the
        leader's threads finish first."""
        try:
            self.wait_ready(timeout)
        except Exception:  # TimeoutError, NotReadyError
            return False
        with self._cond:
            return self._cond.wait_for(self._settled, timeout)

    def _settled(self) -> bool:
        """Every watched key's first value has arrived (call with ``_cond`` held)."""
        return self._watched.keys() <= self._cache.keys()

    async def asettle(self, timeout: float = 10.0) -> bool:
        """:meth:`settle` for an event loop (an ASGI app's lifespan). Listeners
        registered from this loop run on it, so this waits without blocking it."""
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.ready(), timeout)
        except Exception:  # TimeoutError, NotReadyError
            return False
        while True:
            with self._cond:
                if self._settled():
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    def has(self, key: str) -> bool:
        """True once ``key``'s value (possibly None: unset) has arrived."""
        with self._cond:
            return key in self._cache

    def snapshot(self) -> dict[str, str | None]:
        with self._cond:
            return dict(self._cache)

    def wait_for(
        self, key: str, predicate: Callable[[str | None], bool] = lambda v: v is not None, timeout: float | None = None
    ) -> str | None:
        """Block until the cached value of ``key`` satisfies ``predicate``; return it.
        Not from a listener, nor from an event loop."""
        self.watch(key)
        with self._cond:
            ok = self._cond.wait_for(lambda: key in self._cache and predicate(self._cache[key]), timeout)
            if not ok:
                raise TimeoutError(f"config {key!r} still {self._cache.get(key)!r} after {timeout} s")
            return self._cache[key]

    # -- typed accessors (local, non-blocking) --------------------------------------------

    def typed(self, key: str, cast: Callable[[str], T], default: T) -> T:
        """The cached value of ``key`` through ``cast``; ``default`` when it is unset,
        not arrived yet, or does not parse (logged)."""
        with self._cond:
            raw = self._cache.get(key)
        if raw is None:
            return default
        try:
            return cast(raw)
        except (TypeError, ValueError) as exc:
            log.warning("config %r=%r is not a valid %s: %s", key, raw, getattr(cast, "__name__", cast), exc)
            return default

    def get_str(self, key: str, default: str | None = None) -> str | None:
        return self.typed(key, str, default)

    def get_int(self, key: str, default: int = 0) -> int:
        return self.typed(key, int, default)

    def get_float(self, key: str, default: float = 0.0) -> float:
        return self.typed(key, float, default)

    def get_bool(self, key: str, default: bool = False) -> bool:
        return self.typed(key, _parse_bool, default)

    def get_json(self, key: str, default: Any = None) -> Any:
        return self.typed(key, json.loads, default)

    # -- through the leader, to Redis ------------------------------------------------------

    def set(self, key: str, value: Any) -> None:
        """Store and announce ``value``; every process's cache gets it."""
        self._client.invoke("set", key, _text(value))

    async def aset(self, key: str, value: Any) -> None:
        await self._client.ainvoke("set", key, _text(value))

    def fetch(self, key: str) -> str | None:
        """Read ``key`` from Redis now (bypassing the cache)."""
        return self._client.invoke("get", key)

    async def afetch(self, key: str) -> str | None:
        return await self._client.ainvoke("get", key)


class AsyncConfigClient(ConfigClient):
    """:class:`ConfigClient` whose leader runs :class:`AsyncRedisConfigClient`
    (``redis.asyncio`` on connshare's loop). A different data class, so a different
    default channel name."""

    DataClient = AsyncRedisConfigClient
    default_name = "redis-config-async"


def _reinit_after_fork() -> None:
    # A listener may have held the cache's lock at the moment of fork().
    for inst in list(_instances):
        inst._cond = threading.Condition()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)
