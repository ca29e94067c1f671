"""Data clients and wire helpers for the hostile-input tests. Imported by every process
(tests.agent builds a class from here when a spec says ``"module": "tests.hostile_clients"``)."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import os
import time
from collections.abc import Iterator
from typing import Any

import attrs
import msgpack

from connshare import Base, Transcode, cluster


class BlastClient(Base):
    """No upstream: subscriptions are kept here, and ``blast`` makes this (real)
    client emit large values to them, as a busy upstream would."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: dict[str, list[Any]] = {}
        self.seq = 0
        self.calls = 0
        self.subscribed: list[str] = []
        self.ready(True)

    def subscribe(self, reg: dict, listener: Any) -> None:
        self.listeners.setdefault(reg["key"], []).append(listener)
        self.subscribed.append(reg["key"])

    def history(self) -> dict:
        """What reached this real client: echo() calls and keys subscribed."""
        return {"echo": self.calls, "subscribed": list(self.subscribed)}

    def listening(self) -> list[str]:
        """The keys this real client has listeners for now."""
        return sorted(self.listeners)

    def unsubscribe(self, reg: dict, listener: Any = None) -> None:
        self.listeners.pop(reg["key"], None)

    async def blast(self, key: str, n: int, size: int) -> int:
        """Emit ``n`` values of ``size`` bytes on ``key``, on the leader's loop, with
        no pause between them; returns the last sequence number."""
        for _ in range(n):
            self.seq += 1
            value = {"seq": self.seq, "data": os.urandom(size)}
            for fn in list(self.listeners.get(key, ())):
                fn(value)
        return self.seq

    def send(self, key: str, value: Any) -> None:
        """Emit one value on ``key``."""
        for fn in list(self.listeners.get(key, ())):
            fn(value)

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    async def asleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    def big(self, n: int) -> bytes:
        """A result of ``n`` bytes (maybe more than max_frame_size)."""
        return b"z" * n

    def echo(self, value: Any) -> Any:
        self.calls += 1
        return value

    def kinds(self, *values: Any) -> list[str]:
        """The type names the real client received."""
        return [type(v).__name__ for v in values]

    def total(self, *amounts: Money) -> Money:
        assert all(type(a) is Money for a in amounts), [type(a) for a in amounts]
        return Money(sum((a.amount for a in amounts), decimal.Decimal(0)), amounts[0].currency)

    def whoami(self) -> int:
        return os.getpid()

    async def aecho(self, value: Any) -> Any:
        await asyncio.sleep(0)
        return value


# -- transcode: user types on the wire --------------------------------------------------


@attrs.frozen
class Money:
    amount: decimal.Decimal
    currency: str


DECIMAL_EXT = 1
MONEY_EXT = 2


def encode(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return msgpack.ExtType(DECIMAL_EXT, str(value).encode())
    if isinstance(value, Money):
        return msgpack.ExtType(MONEY_EXT, f"{value.amount}|{value.currency}".encode())
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(code: int, data: bytes) -> Any:
    if code == DECIMAL_EXT:
        return decimal.Decimal(data.decode())
    if code == MONEY_EXT:
        amount, currency = data.decode().split("|")
        return Money(decimal.Decimal(amount), currency)
    return msgpack.ExtType(code, data)


TRANSCODE = Transcode(encode=encode, decode=decode)


DELEGATES = ["echo", "aecho", "whoami", "history", "kinds", "total", "send", "sleep", "big", "blast"]


def blast_spec(port: int, cid: str = "0", delegates: list | None = None, **options: Any) -> dict:
    """A tests.agent spec for a BlastClient on ``port`` (channel ``"b"``)."""
    return {
        "id": cid,
        "module": "tests.hostile_clients",
        "cls": "BlastClient",
        "options": {"port": port, "name": "b", **options},
        "delegates": DELEGATES if delegates is None else delegates,
    }


@contextlib.contextmanager
def in_process_leader(port: int, delegates: list[str] | None = None, **options: Any) -> Iterator[Any]:
    """A BlastClient cluster client in this process that leads ``port``; raw peers
    and spawned followers talk to it, and the test can look inside it."""
    builder = cluster(BlastClient, port=port, name="b", **options)
    for name in DELEGATES if delegates is None else delegates:
        builder.delegate(name)
    client = builder.create()
    try:
        client.wait_ready(10)
        assert client.is_leader, client.role
        yield client
    finally:
        client.close()
