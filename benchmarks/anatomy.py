"""Where a follower call's time goes: minimal echo pairs, side by side.

``python -m benchmarks.anatomy [--runs N] [--n CALLS]`` times sequential calls of
the 100-character payload through hand-written pairs that each add one piece of
what a connshare follower call needs, and writes ``results/anatomy.json``:

* server: an event loop (asyncio, and uvloop where installed) reading the socket
  with ``add_reader`` and answering msgpack frames either inline or from a Task
  (what a coroutine method costs on Python 3.11, where tasks cannot start eagerly);
* client: a blocking socket that reads its own answer, or a caller that writes
  under a lock while a reader thread reads and wakes it through a lock.

It also times the floor of an event's delivery (``connshare_fanout``): 100 bytes
pushed every 10 ms to an idle process blocked in ``recv``, received either by that
thread or handed on to a second one (a reader thread, then a listener's loop).
Between events every CPU of the receiver idles, and an idle vCPU is slow to wake.
The same push sent to 3 receivers in turn, stamped once, is the floor of a fan-out
to 3 followers.

Last, the floor under ``connshare_failover``: how long the kernel takes to end a
SIGKILLed process of a leader's size (30 MB, a few threads) before a peer reads
EOF, and before its port can be bound again. No follower can notice sooner.

No connshare code runs here: these are the floors connshare's own figures
(``connshare_call``) compare with. Each figure is the median of ``--runs`` runs,
the variants interleaved run by run so that machine noise hits all of them alike.
"""

from __future__ import annotations

import _thread
import argparse
import multiprocessing as mp
import os
import signal
import socket
import statistics
import threading
import time
from typing import Any

import msgpack

from benchmarks._common import HEADER, host_info, write_results

PAYLOAD = "x" * 100


def _frames(data: bytes) -> list[Any]:
    """The messages in one read (small frames on loopback: a read holds whole ones)."""
    out = []
    i = 0
    while i + 4 <= len(data):
        (size,) = HEADER.unpack_from(data, i)
        out.append(msgpack.unpackb(data[i + 4 : i + 4 + size]))
        i += 4 + size
    return out


def _server(port_q: Any, loop_kind: str, task: bool) -> None:
    import asyncio

    if loop_kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    listener = socket.create_server(("127.0.0.1", 0))
    port_q.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(65536)
    packer = msgpack.Packer()
    tasks: set[Any] = set()

    async def echo(p: Any) -> Any:
        return p

    async def answer(rid: int, coro: Any) -> None:
        body = packer.pack([9, rid, await coro])
        conn.send(HEADER.pack(len(body)) + body)

    def readable() -> None:
        n = conn.recv_into(buf)
        if not n:
            loop.stop()
            return
        for wire in _frames(bytes(buf[:n])):
            if task:
                t = loop.create_task(answer(wire[1], echo(wire[4][0])))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            else:
                body = packer.pack([9, wire[1], wire[4][0]])
                conn.send(HEADER.pack(len(body)) + body)

    loop.add_reader(conn.fileno(), readable)
    loop.run_forever()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def _client_direct(sock: socket.socket, n: int) -> list[int]:
    packer = msgpack.Packer()
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        body = packer.pack([8, i, 1, "echo", [PAYLOAD], {}, 0, 30.0])
        sock.sendall(HEADER.pack(len(body)) + body)
        (size,) = HEADER.unpack(_recv_exact(sock, 4))
        msgpack.unpackb(_recv_exact(sock, size))
        out.append(clock() - t0)
    return out


def _client_reader_thread(sock: socket.socket, n: int) -> list[int]:
    packer = msgpack.Packer()
    pending: dict[int, list] = {}

    def reader() -> None:
        buf = bytearray(65536)
        while True:
            try:
                k = sock.recv_into(buf)
            except OSError:  # the caller closed the socket when it was done
                return
            if not k:
                return
            for wire in _frames(bytes(buf[:k])):
                box = pending.pop(wire[1])
                box[1] = wire[2]
                box[0].release()

    threading.Thread(target=reader, daemon=True).start()
    send_lock = threading.Lock()
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        body = packer.pack([8, i, 1, "echo", [PAYLOAD], {}, 0, 30.0])
        lock = _thread.allocate_lock()
        lock.acquire()
        pending[i] = [lock, None]
        with send_lock:
            sock.send(HEADER.pack(len(body)) + body)
        lock.acquire()
        out.append(clock() - t0)
    return out


def one(loop_kind: str, task: bool, client: str, n: int, warmup: int) -> float:
    """p50 in µs of one pair."""
    samples = pair_samples(loop_kind, task, client, n, warmup)
    return samples[len(samples) // 2] / 1000


def pair_samples(loop_kind: str, task: bool, client: str, n: int, warmup: int) -> list[int]:
    """The sorted round trips in ns of ``n`` sequential calls through one minimal pair."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_server, args=(q, loop_kind, task), daemon=True)
    proc.start()
    try:
        sock = socket.create_connection(("127.0.0.1", q.get(timeout=30)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        run = _client_direct if client == "direct" else _client_reader_thread
        samples = sorted(run(sock, n + warmup)[warmup:])
        sock.shutdown(socket.SHUT_RDWR)  # wakes a reader thread blocked in recv
        sock.close()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return samples


def _push_receiver(port: int, handoff: bool, out: Any) -> None:
    import queue

    sock = socket.create_connection(("127.0.0.1", port))
    clock = time.monotonic_ns  # system-wide on Linux: valid across processes
    lat: list[int] = []
    q: queue.SimpleQueue = queue.SimpleQueue()

    def consume() -> None:
        while (t := q.get()) is not None:
            lat.append(clock() - t)

    th = threading.Thread(target=consume)
    if handoff:
        th.start()
    while (data := _recv_exact(sock, 100)) and data[:1] != b"q":
        t = int(data[:20])
        if handoff:
            q.put(t)
        else:
            lat.append(clock() - t)
    if handoff:
        q.put(None)
        th.join()
    out.put(lat)


def idle_push(handoff: bool, n: int = 300, interval_s: float = 0.01, receivers: int = 1) -> tuple[float, float]:
    """p50 and p99 in µs of one push to idle receivers: each event is stamped once,
    then sent to every receiver in turn (as a leader fans out), over all of them."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    procs = [ctx.Process(target=_push_receiver, args=(port, handoff, q), daemon=True) for _ in range(receivers)]
    conns: list[socket.socket] = []
    try:
        for proc in procs:
            proc.start()
        for _ in procs:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append(conn)
        time.sleep(0.3)
        for _ in range(n):
            msg = str(time.monotonic_ns()).rjust(20).encode() + b"x" * 80
            for conn in conns:
                conn.sendall(msg)
            time.sleep(interval_s)
        for conn in conns:
            conn.sendall(b"q" * 100)
        lat = sorted(x for _ in procs for x in q.get(timeout=30)[10:])
    finally:
        for conn in conns:
            conn.close()
        listener.close()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000


def _doomed(port: int, mb: int, threads: int, ready: Any) -> None:
    """A stand-in leader: listens on ``port``, accepts, holds ``mb`` of touched
    memory and ``threads`` idle threads, and waits to be killed."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(64)
    ballast = bytearray(mb * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    for _ in range(threads):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    ready.put(True)
    conns = []
    while True:
        conns.append(ls.accept()[0])


def kill_floor(trials: int = 10, mb: int = 30, threads: int = 3) -> dict[str, float]:
    """What the kernel takes to end a SIGKILLed process of ``mb`` MB (a leader's
    size here) before anyone can notice: ms from the kill to its peer reading EOF,
    and to the port being free to bind again. Medians and maxima over ``trials``."""
    ctx = mp.get_context("spawn")
    eof: list[float] = []
    free: list[float] = []
    for _ in range(trials):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        ready = ctx.Queue()
        proc = ctx.Process(target=_doomed, args=(port, mb, threads, ready), daemon=True)
        proc.start()
        try:
            ready.get(timeout=30)
            peer = socket.create_connection(("127.0.0.1", port))
            time.sleep(0.05)
            t0 = time.monotonic_ns()
            os.kill(proc.pid, signal.SIGKILL)
            peer.recv(1)
            eof.append((time.monotonic_ns() - t0) / 1e6)
            while True:  # no sleep: the time it becomes free is what is measured
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                    s.listen(1)
                    free.append((time.monotonic_ns() - t0) / 1e6)
                    break
                except OSError:
                    pass
                finally:
                    s.close()
            peer.close()
        finally:
            proc.join(10)
            if proc.is_alive():  # it never got its kill (a failure before it)
                proc.kill()
                proc.join(5)
    return {
        "eof_median_ms": round(statistics.median(eof), 2),
        "eof_max_ms": round(max(eof), 2),
        "port_free_median_ms": round(statistics.median(free), 2),
        "port_free_max_ms": round(max(free), 2),
    }


def variants() -> list[tuple[str, bool, str]]:
    loops = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        loops.append("uvloop")
    except ImportError:
        pass
    return [(lk, task, client) for lk in loops for task in (False, True) for client in ("direct", "reader-thread")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    runs: dict[str, list[float]] = {}
    for _ in range(args.runs):
        for lk, task, client in variants():
            name = f"{lk}, {'task' if task else 'inline'} answer, {client} client"
            runs.setdefault(name, []).append(round(one(lk, task, client, args.n, args.warmup), 1))
        for handoff, receivers in ((False, 1), (True, 1), (False, 3)):
            p50, p99 = idle_push(handoff, receivers=receivers)
            name = f"idle push, {'handed to a second thread' if handoff else 'read by the waiting thread'}"
            if receivers > 1:
                name = f"idle push to {receivers} receivers in turn, read by the waiting thread"
            runs.setdefault(name + ", p50", []).append(round(p50, 1))
            runs.setdefault(name + ", p99", []).append(round(p99, 1))
        for name, v in kill_floor().items():
            runs.setdefault(f"SIGKILL of a 30 MB process, {name}", []).append(v)
    print("| pair | µs, p50 unless named (ms where named): median (min..max) |\n| --- | --- |")
    out: dict[str, Any] = {"host": host_info(), "n": args.n, "runs": args.runs, "p50_us": {}}
    for name, v in runs.items():
        out["p50_us"][name] = {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
        print(f"| {name} | {statistics.median(v):.1f} ({min(v):.1f}..{max(v):.1f}) |")
    if not args.no_write:
        write_results("anatomy.json", out)


if __name__ == "__main__":
    main()
