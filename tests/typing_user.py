"""Code as a user writes it against connshare's public API, for mypy to check
(``tests/test_typing.py``): it must type-check clean. Never run."""

from __future__ import annotations

from typing import Any

import connshare
from connshare import APIClientBase, Base, CallTimeoutError, ConnshareError, LeaderLostError, Options, cluster


class Registry(Base):
    """A data client: talks upstream, knows nothing of processes."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.ready(True)

    def get(self, key: str) -> str | None:
        return None

    async def aget(self, key: str) -> str | None:
        return None

    def subscribe(self, reg: dict[str, Any], listener: Any) -> None:
        pass

    def publish(self, reg: dict[str, Any]) -> None:
        pass


class AsyncRegistry(Base):
    async def close(self) -> None:  # an async close is allowed
        pass


class Config(APIClientBase):
    DataClient = Registry
    delegates = {"get": "invoke"}
    cluster_options = {"name": "config", "port": 7777}

    def value(self, key: str) -> str | None:
        return self._client.get(key)


def blocking() -> None:
    client = cluster(Registry, name="registry", port=7777, response_timeout=2.0).delegate("get").create("redis://")
    client.wait_ready(10)
    client.wait_ready()
    leader: bool = client.is_leader
    pid: int | None = client.leader_pid
    value = client.get("key")  # a delegated method: Any to a type checker
    client.subscribe({"key": "a"}, lambda v: print(v, value, leader, pid))
    client.unsubscribe({"key": "a"})
    client.publish({"key": "a", "value": 1})
    try:
        client.invoke("get", "key")
    except CallTimeoutError as exc:
        print(exc)
    except LeaderLostError:
        pass
    except ConnshareError:
        raise
    client.on("error", print)
    client.close()
    with Config() as cfg:
        print(cfg.value("key"), cfg.is_leader)
    options = Options(name="registry", port=connshare.DEFAULT_PORT)
    print(options.port, connshare.PROTOCOL_VERSION, connshare.__version__)


async def awaited() -> None:
    client = cluster(Registry).create("redis://")
    await client.ready()
    print(await client.aget("key"), await client.ainvoke("get", "key"))
    await client.aclose()
    await AsyncRegistry().aclose()
    async with Config() as cfg:
        print(cfg)
