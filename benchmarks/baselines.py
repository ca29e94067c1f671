"""Baselines that connshare's figures should be read against.

* ``raw_pingpong``: the floor, a blocking TCP ping-pong of 100 bytes between two
  processes on 127.0.0.1 (no framing, no serialization).
* ``basemanager_echo`` / ``basemanager_throughput``: the standard library's
  ``multiprocessing.managers.BaseManager``, the obvious "share an object between
  processes" alternative.
* ``direct_call``: a plain in-process method call, i.e. what the leader's own calls
  could cost at best.
* ``asyncio_pair``: the call targets' design at its smallest, with no connshare code: an
  asyncio loop answering msgpack echo calls, inline or from a Task running a
  coroutine echo, and a blocking client that reads its own answers (the minimal
  pairs of ``benchmarks.anatomy``, framed as protocol 1 framed its messages).
* ``fanout_floor``: 100 bytes stamped once and sent to 3 idle processes in turn,
  each blocked in ``recv``: what a leader's fan-out to 3 followers costs at best
  (from ``benchmarks.anatomy``).
* ``failover_floor``: SIGKILL of a 30 MB process with a few threads (a leader's
  size) until its peer reads EOF and its port can be bound again: the time no
  follower can beat (from ``benchmarks.anatomy``).

Run all of them, several times, and merge the results into
``benchmarks/results/latest.json``::

    python -m benchmarks.baselines            # full sizes, 3 runs each
    python -m benchmarks.baselines --quick    # small sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.managers import BaseManager
from typing import Any

from benchmarks._common import (
    LATEST_JSON,
    QUICK_JSON,
    percentiles,
    print_summary,
    record_workload,
    recv_exact,
    summarize_all,
)
from benchmarks.anatomy import idle_push, kill_floor, pair_samples

PAYLOAD = "x" * 100
PAYLOAD_BYTES = PAYLOAD.encode()
CHILD_START_TIMEOUT = 30.0  # seconds for a spawned child to come up
RUN_TIMEOUT = 300.0  # seconds for any single measurement to finish

_SPAWN = mp.get_context("spawn")


def _reap(proc: Any, timeout: float = 5.0) -> None:
    """Join a child process; terminate, then kill it if it will not go."""
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)


# --------------------------------------------------------------------------- raw TCP


def _echo_server_child(conn: Connection) -> None:
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        lst.settimeout(CHILD_START_TIMEOUT)
        conn.send(lst.getsockname()[1])
        sock, _ = lst.accept()
    finally:
        lst.close()
    with sock:
        sock.settimeout(RUN_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)


def raw_pingpong(n: int = 20000, warmup: int = 1000) -> dict[str, Any]:
    """Blocking ping-pong of 100 bytes with a spawned echo process over TCP."""
    parent_end, child_end = _SPAWN.Pipe()
    proc = _SPAWN.Process(target=_echo_server_child, args=(child_end,), daemon=True)
    proc.start()
    try:
        if not parent_end.poll(CHILD_START_TIMEOUT):
            raise TimeoutError("echo server child did not report its port")
        port = parent_end.recv()
        with socket.create_connection(("127.0.0.1", port), timeout=CHILD_START_TIMEOUT) as sock:
            sock.settimeout(RUN_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            size = len(PAYLOAD_BYTES)
            for _ in range(warmup):
                sock.sendall(PAYLOAD_BYTES)
                recv_exact(sock, size)
            samples = [0] * n
            clock = time.perf_counter_ns
            for i in range(n):
                t0 = clock()
                sock.sendall(PAYLOAD_BYTES)
                reply = recv_exact(sock, size)
                samples[i] = clock() - t0
            if reply != PAYLOAD_BYTES:
                raise AssertionError("echo mismatch")
    finally:
        parent_end.close()
        child_end.close()
        _reap(proc)
    return {**percentiles(samples), "payload_bytes": size}


# --------------------------------------------------------------------------- BaseManager


class Echo:
    def echo(self, p: Any) -> Any:
        return p


class EchoManager(BaseManager):
    pass


EchoManager.register("Echo", Echo)


def _start_manager(authkey: bytes) -> EchoManager:
    mgr = EchoManager(address=("127.0.0.1", 0), authkey=authkey, ctx=_SPAWN)
    mgr.start()
    return mgr


def basemanager_echo(n: int = 20000, warmup: int = 1000) -> dict[str, Any]:
    """Sequential ``proxy.echo(p)`` calls to a BaseManager server process."""
    mgr = _start_manager(os.urandom(16))
    try:
        proxy = mgr.Echo()  # type: ignore[attr-defined]
        for _ in range(warmup):
            proxy.echo(PAYLOAD)
        samples = [0] * n
        clock = time.perf_counter_ns
        for i in range(n):
            t0 = clock()
            reply = proxy.echo(PAYLOAD)
            samples[i] = clock() - t0
        if reply != PAYLOAD:
            raise AssertionError("echo mismatch")
        del proxy
    finally:
        mgr.shutdown()
    return percentiles(samples)


def _throughput_client(
    address: tuple[str, int],
    authkey: bytes,
    threads: int,
    per_thread: int,
    warmup: int,
    start: Any,
    results: Any,
) -> None:
    """One client process: ``threads`` threads making blocking calls, one proxy each."""
    try:
        mgr = EchoManager(address=address, authkey=authkey)
        mgr.connect()
        proxies = [mgr.Echo() for _ in range(threads)]  # type: ignore[attr-defined]
        errors: list[str] = []
        done = [0] * threads

        def work(idx: int) -> None:
            proxy = proxies[idx]
            try:
                for _ in range(warmup):
                    proxy.echo(PAYLOAD)
                barrier.wait(timeout=CHILD_START_TIMEOUT)
                for _ in range(per_thread):
                    proxy.echo(PAYLOAD)
                    done[idx] += 1
            except Exception as exc:  # reported to the parent, not raised
                errors.append(repr(exc))
                barrier.abort()

        # the last party to arrive is this main thread: it waits for the parent's go
        barrier = threading.Barrier(threads + 1)
        pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
        for t in pool:
            t.start()
        results.put(("ready", os.getpid()))
        if not start.wait(CHILD_START_TIMEOUT):
            raise TimeoutError("no start signal")
        t0 = time.monotonic_ns()
        barrier.wait(timeout=CHILD_START_TIMEOUT)
        for t in pool:
            t.join(RUN_TIMEOUT)
        t1 = time.monotonic_ns()
        results.put(("done", {"start_ns": t0, "end_ns": t1, "calls": sum(done), "errors": errors}))
    except Exception as exc:  # reported to the parent, not raised
        results.put(("error", repr(exc)))


def basemanager_throughput(followers: int = 3, threads: int = 8, calls: int = 24000) -> dict[str, Any]:
    """Aggregate calls/s of ``followers`` processes x ``threads`` threads (``calls`` in total)."""
    per_thread = max(1, calls // (followers * threads))
    authkey = os.urandom(16)
    mgr = _start_manager(authkey)
    start = _SPAWN.Event()
    results = _SPAWN.Queue()
    procs = [
        _SPAWN.Process(
            target=_throughput_client,
            args=(mgr.address, authkey, threads, per_thread, 20, start, results),
            daemon=True,
        )
        for _ in range(followers)
    ]
    try:
        for p in procs:
            p.start()

        def collect(kind: str, count: int, timeout: float) -> list[Any]:
            out = []
            deadline = time.monotonic() + timeout
            while len(out) < count:
                try:
                    tag, value = results.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(f"waiting for {count} {kind!r} messages, got {len(out)}") from None
                if tag == "error":
                    raise RuntimeError(f"throughput client failed: {value}")
                if tag == kind:
                    out.append(value)
            return out

        collect("ready", followers, CHILD_START_TIMEOUT * 2)
        start.set()
        done = collect("done", followers, RUN_TIMEOUT)
    finally:
        for p in procs:
            _reap(p)
        results.close()
        results.join_thread()
        mgr.shutdown()
    errors = [e for d in done for e in d["errors"]]
    if errors:
        raise RuntimeError(f"throughput clients reported errors: {errors[:3]}")
    total = sum(d["calls"] for d in done)
    wall = (max(d["end_ns"] for d in done) - min(d["start_ns"] for d in done)) / 1e9
    return {
        "calls_per_s": round(total / wall, 1),
        "calls": total,
        "wall_s": round(wall, 3),
        "followers": followers,
        "threads": threads,
    }


# --------------------------------------------------------------------------- in-process


def direct_call(n: int = 200000) -> dict[str, Any]:
    """A plain method call ``obj.echo(p)``, timed per call and as one batch.

    Per-call timing is dominated by ``perf_counter_ns`` itself, so the cost of a
    back-to-back pair of clock reads (``timer_overhead_p50_us``) and the batch mean
    (``batch_mean_us``, one clock read around the whole loop) are reported too.
    """
    obj = Echo()
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t0 = clock()
        obj.echo(PAYLOAD)
        samples[i] = clock() - t0
    empty = [0] * n
    for i in range(n):
        t0 = clock()
        empty[i] = clock() - t0
    t0 = clock()
    for _ in range(n):
        obj.echo(PAYLOAD)
    batch_ns = clock() - t0
    overhead = percentiles(empty)
    return {
        **percentiles(samples),
        "timer_overhead_p50_us": overhead["p50_us"],
        "batch_mean_us": round(batch_ns / n / 1000.0, 4),
    }


def asyncio_pair(n: int = 20000, warmup: int = 1000) -> dict[str, Any]:
    """Sequential call µs p50 / p99 through a minimal asyncio server: ``inline_*``
    answers in its reader callback, ``task_*`` from a Task per call."""
    out: dict[str, Any] = {}
    for name, task in (("inline", False), ("task", True)):
        for key, value in percentiles(pair_samples("asyncio", task, "direct", n, warmup)).items():
            out[f"{name}_{key}"] = value
    return out


def fanout_floor(receivers: int = 3, events: int = 1000, interval_ms: float = 10.0) -> dict[str, Any]:
    """Delivery µs p50 / p99 of one event to ``receivers`` idle processes in turn."""
    p50, p99 = idle_push(False, n=events, interval_s=interval_ms / 1000.0, receivers=receivers)
    return {"receivers": receivers, "events": events, "p50_us": round(p50, 1), "p99_us": round(p99, 1)}


def failover_floor(trials: int = 10, mb: int = 30, threads: int = 3) -> dict[str, Any]:
    """ms from SIGKILL of an ``mb`` MB process to its peer's EOF and to its port being free."""
    return {"trials": trials, "mb": mb, **kill_floor(trials, mb, threads)}


# --------------------------------------------------------------------------- driver

FULL: dict[str, dict[str, int]] = {
    "raw_pingpong": {"n": 20000, "warmup": 1000},
    "basemanager_echo": {"n": 20000, "warmup": 1000},
    "basemanager_throughput": {"followers": 3, "threads": 8, "calls": 24000},
    "direct_call": {"n": 200000},
    "asyncio_pair": {"n": 20000, "warmup": 1000},
    "fanout_floor": {"receivers": 3, "events": 1000},
    "failover_floor": {"trials": 10},
}
QUICK: dict[str, dict[str, int]] = {
    "raw_pingpong": {"n": 5000, "warmup": 500},
    "basemanager_echo": {"n": 3000, "warmup": 300},
    "basemanager_throughput": {"followers": 3, "threads": 8, "calls": 4800},
    "direct_call": {"n": 50000},
    "asyncio_pair": {"n": 3000, "warmup": 300},
    "fanout_floor": {"receivers": 3, "events": 50},
    "failover_floor": {"trials": 3},
}
WORKLOADS: dict[str, Callable[..., dict[str, Any]]] = {
    "raw_pingpong": raw_pingpong,
    "basemanager_echo": basemanager_echo,
    "basemanager_throughput": basemanager_throughput,
    "direct_call": direct_call,
    "asyncio_pair": asyncio_pair,
    "fanout_floor": fanout_floor,
    "failover_floor": failover_floor,
}
SHOWN = {
    "raw_pingpong": ["p50_us", "p99_us"],
    "basemanager_echo": ["p50_us", "p99_us"],
    "basemanager_throughput": ["calls_per_s"],
    "direct_call": ["p50_us", "p99_us", "batch_mean_us"],
    "asyncio_pair": ["inline_p50_us", "inline_p99_us", "task_p50_us", "task_p99_us"],
    "fanout_floor": ["p50_us", "p99_us"],
    "failover_floor": ["eof_median_ms", "port_free_median_ms", "port_free_max_ms"],
}


def run_all(quick: bool = False, runs: int = 3, only: list[str] | None = None, write: bool = True) -> dict[str, Any]:
    """Run each selected workload ``runs`` times, interleaved, and record the results."""
    sizes = QUICK if quick else FULL
    names = only or list(WORKLOADS)
    collected: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(runs):
        for name in names:
            t0 = time.monotonic()
            result = WORKLOADS[name](**sizes[name])
            result["elapsed_s"] = round(time.monotonic() - t0, 3)
            collected[name].append(result)
            print(f"[run {r + 1}/{runs}] {name}: {result}", file=sys.stderr, flush=True)
    out = {}
    print(f"baselines ({'quick' if quick else 'full'}, {runs} runs): median (min .. max)")
    for name in names:
        params = {**sizes[name], "quick": quick, "payload": "x*100"}
        if write:
            entry = record_workload(
                name, collected[name], params=params, extra={"source": "benchmarks.baselines"}, path=QUICK_JSON if quick else LATEST_JSON
            )
        else:
            entry = {"summary": summarize_all(collected[name]), "runs": collected[name]}
        print_summary(name, entry["summary"], SHOWN[name])
        out[name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run); writes results/quick.json")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each workload (default 3)")
    parser.add_argument("--only", help="comma-separated workloads: " + ",".join(WORKLOADS))
    parser.add_argument("--no-write", action="store_true", help="do not touch results/latest.json")
    args = parser.parse_args(argv)
    only = [w.strip() for w in args.only.split(",")] if args.only else None
    for w in only or []:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}")
    run_all(quick=args.quick, runs=max(1, args.runs), only=only, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
