"""The test side of tests.agent: start worker processes, talk to them, reap them."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from tests.agent import agent_main

CTX = multiprocessing.get_context("spawn")


class AgentError(Exception):
    def __init__(self, desc: dict) -> None:
        self.desc = desc
        super().__init__(f"{desc['type']}: {desc['message']}")

    @property
    def type(self) -> str:
        return self.desc["type"]

    def isa(self, name: str) -> bool:
        return name in self.desc["mro"]


class Worker:
    def __init__(self, specs: list[dict]) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=agent_main, args=(child, specs), daemon=True)
        self.proc.start()
        child.close()
        self._ids = itertools.count(1)
        self._replies: dict[int, Any] = {}
        self.events: list[tuple[str, Any, dict]] = []
        self.cond = threading.Condition()
        self.started: Any = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid  # type: ignore[return-value]

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                with self.cond:
                    self.started = self.started or ("dead", None)
                    self.cond.notify_all()
                return
            with self.cond:
                if msg[0] == "reply":
                    self._replies[msg[1]] = (msg[2], msg[3])
                elif msg[0] == "event":
                    self.events.append((msg[1], msg[2], msg[3]))
                else:
                    self.started = msg
                self.cond.notify_all()

    def wait_started(self, timeout: float = 60) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.started is not None, timeout)
        if self.started is None:
            raise TimeoutError("worker did not start")
        if self.started[0] == "fatal":
            raise AgentError(self.started[1])
        if self.started[0] == "dead":
            raise RuntimeError("worker died while starting")

    def request(self, op: str, *args: Any, timeout: float = 60) -> Any:
        cid = next(self._ids)
        self.conn.send((cid, op, args))
        with self.cond:
            ok = self.cond.wait_for(lambda: cid in self._replies or not self.proc.is_alive(), timeout)
            if cid not in self._replies:
                raise TimeoutError(
                    f"worker {self.pid}: no reply to {op}{args} in {timeout} s" if ok else f"worker {self.pid}: {op} timed out"
                )
            success, value = self._replies.pop(cid)
        if not success:
            raise AgentError(value)
        return value

    def call(self, method: str, *args: Any, cid: str = "0", timeout: float = 60) -> Any:
        return self.request("call", cid, method, list(args), timeout=timeout)

    def ready(self, cid: str = "0", timeout: float = 30) -> dict:
        return self.request("ready", cid, timeout, timeout=timeout + 10)

    def role(self, cid: str = "0") -> dict:
        return self.request("role", cid)

    def subscribe(self, reg: Any, tag: str, cid: str = "0", in_loop: bool | str = False) -> None:
        self.request("subscribe", cid, reg, tag, in_loop)

    def values(self, tag: str) -> list:
        with self.cond:
            return [v for t, v, _ in self.events if t == tag]

    def wait_event(self, tag: str, pred: Any = lambda v: True, timeout: float = 20) -> tuple[Any, dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, v, meta in self.events:
                    if t == tag and pred(v):
                        return v, meta
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"worker {self.pid}: no event {tag!r} matching; got {[e for e in self.events if e[0] == tag][-5:]}")
                self.cond.wait(left)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.proc.is_alive():
            self.kill(signal.SIGCONT)
            self.kill(signal.SIGKILL)
        self.proc.join(10)
        # The reader ends on the pipe's EOF; closing the pipe under it instead
        # could make its recv() raise in a thread (or read a reused fd).
        self._reader.join(10)
        self.conn.close()


def blast_until_subscribed(leader: Worker, followers: list[Worker], key: str = "k", timeout: float = 30) -> int:
    """Have a BlastClient leader emit one value at a time on ``key`` until every
    follower has received one, and return the last one's sequence number, which
    every follower receives. A follower's ``subscribe()`` returns before the leader
    has the subscription, and a BlastClient keeps no last value to hand it later."""
    last = [0]

    def all_subscribed() -> bool:
        last[0] = leader.call("blast", key, 1, 8)
        return all(f.values(key) for f in followers)

    wait_until(all_subscribed, timeout, what=f"every follower's subscription to {key!r} live")
    return last[0]


def wait_until(pred: Any, timeout: float = 20, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll ``pred`` until it is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
