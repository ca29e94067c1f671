"""What a call costs in instructions: repeatable where timings on this host are not.

``python -m benchmarks.instructions [--calls 1000,5000] [--opcodes]`` needs valgrind
(Debian's ``valgrind``). It counts the user-space instructions (callgrind's ``Ir``)
that one process spends per call under the throughput workload, 100 calls in
flight per follower, the coroutine echo of the 100-character payload:

* ``leader``: connshare's leader serving 3 followers;
* ``follower``: one connshare follower (its leader runs natively);
* ``minimal server`` / ``minimal client``: the same pair with no connshare code, an
  asyncio ``Protocol`` answering inline and an asyncio client with a future per call
  (the prototype the issue's 100,000 calls/s hint was drawn from).

``--sequential`` counts the same processes under the latency workload instead: one
follower, a blocking caller making one call at a time (``invoke("aecho")``),
beside the minimal server and a blocking client that reads its own answer. Here
every call finds the processes idle, so each one pays a full turn of the event
loop; this is the count that tracks sequential latency.

Each figure is the difference between two runs, ``--calls`` apart, divided by the
calls between them, so start-up and import cancel out. The leader's count repeats
to about 0.1 % run to run; a follower's to a few percent, as the size of its
batches varies. Under valgrind a process runs some 50 times slower, so its peers
keep it busy: this is the cost per call of a loaded process, not of an idle one.

``--opcodes`` also counts the Python opcodes each function runs per request, on the
leader's loop thread and on a follower's calling thread (``sys.settrace``): a
profile with no timing noise. Opcodes are a guide, instructions the judge: a
check written with fewer opcodes measured more instructions once.

Writes ``results/instructions.json``. Not part of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from benchmarks._common import HEADER, free_port, host_info, recv_frame, send_frame, write_results

PAYLOAD = "x" * 100
INFLIGHT = 100


# -- the processes (run as ``python -m benchmarks.instructions _role ...``) -----------------


def _echo_client(port: int) -> Any:
    from connshare import Base, cluster

    class Echo(Base):
        def __init__(self) -> None:
            super().__init__()
            self.ready(True)

        async def aecho(self, p: Any) -> Any:
            return p

    c = cluster(Echo, name="echo", port=port, response_timeout=120).delegate("aecho").create()
    c.wait_ready(60)
    return c


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


def _join(workdir: Path) -> None:
    """Tell the driver this process is connected; wait until every one is."""
    (workdir / f"joined.{os.getpid()}").touch()
    _wait_for(workdir / "go")


def _opcode_tracer() -> tuple[collections.Counter, Any]:
    counts: collections.Counter = collections.Counter()

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            counts[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
        return local

    def call(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    return counts, call


def _save_opcodes(counts: collections.Counter, workdir: Path, requests: int) -> None:
    (workdir / "opcodes.json").write_text(json.dumps({k: v / requests for k, v in counts.items()}))


def _role_leader(port: int, workdir: Path, opcodes: bool, calls: int) -> None:
    from connshare import _loop

    c = _echo_client(port)
    assert c.is_leader, "another process holds the port"
    (workdir / "ready").touch()
    counts, tracer = _opcode_tracer()
    if opcodes:
        _wait_for(workdir / "go")
        asyncio.run_coroutine_threadsafe(_call(sys.settrace, tracer), _loop.get_loop()).result()
    _wait_for(workdir / "stop", 600)
    if opcodes:
        asyncio.run_coroutine_threadsafe(_call(sys.settrace, None), _loop.get_loop()).result()
        _save_opcodes(counts, workdir, calls)
    os._exit(0)  # as a killed leader would: the followers are gone already


async def _call(fn: Any, *args: Any) -> None:
    fn(*args)


async def _in_flight(call: Any, calls: int) -> None:
    async def one() -> None:
        for _ in range(calls // INFLIGHT):
            await call(PAYLOAD)

    await asyncio.gather(*[one() for _ in range(INFLIGHT)])


def _role_follower(port: int, workdir: Path, calls: int, opcodes: bool, sequential: bool = False) -> None:
    c = _echo_client(port)
    assert not c.is_leader
    if sequential:
        _join(workdir)
        for _ in range(calls):
            c.invoke("aecho", PAYLOAD)
        c.close()
        return
    counts, tracer = _opcode_tracer()
    if opcodes:
        asyncio.run(_in_flight(c.aecho, 2000))  # warm: opcodes of first calls differ
        sys.settrace(tracer)
    else:
        _join(workdir)
    asyncio.run(_in_flight(c.aecho, calls))
    sys.settrace(None)
    if opcodes:
        _save_opcodes(counts, workdir, calls)
    c.close()


def _frames(buf: bytearray) -> list[Any]:
    out, i, n = [], 0, len(buf)
    while n - i >= 4:
        (size,) = HEADER.unpack_from(buf, i)
        if n - i - 4 < size:
            break
        out.append(msgpack.unpackb(buf[i + 4 : i + 4 + size]))
        i += 4 + size
    del buf[:i]
    return out


def _role_minimal_server(workdir: Path, clients: int) -> None:
    gone = 0

    class Server(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.buf = bytearray()
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            out = []
            for w in _frames(self.buf):
                body = msgpack.packb([16, w[1], w[4][0]])
                out.append(HEADER.pack(len(body)) + body)
            self.t.write(b"".join(out))

        def connection_lost(self, exc: Any) -> None:
            nonlocal gone
            gone += 1
            if gone == clients:
                os._exit(0)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", 0)
        (workdir / "port.tmp").write_text(str(server.sockets[0].getsockname()[1]))
        (workdir / "port.tmp").rename(workdir / "port")
        await asyncio.Event().wait()

    asyncio.run(main())


def _role_minimal_client(port: int, workdir: Path, calls: int) -> None:
    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = bytearray()
            self.pending: dict[int, asyncio.Future] = {}
            self.rid = 0

        def connection_made(self, transport: Any) -> None:
            self.t = transport
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            for w in _frames(self.buf):
                self.pending.pop(w[1]).set_result(w[2])

        def call(self, p: Any) -> asyncio.Future:
            self.rid += 1
            fut = asyncio.get_running_loop().create_future()
            self.pending[self.rid] = fut
            body = msgpack.packb([15, self.rid, 1, "aecho", [p], {}, 0, None])
            self.t.write(HEADER.pack(len(body)) + body)
            return fut

    async def main() -> None:
        transport, client = await asyncio.get_running_loop().create_connection(Client, "127.0.0.1", port)
        (workdir / f"joined.{os.getpid()}").touch()
        while not (workdir / "go").exists():
            await asyncio.sleep(0.01)
        await _in_flight(client.call, calls)
        transport.close()

    asyncio.run(main())


def _role_minimal_blocking_client(port: int, workdir: Path, calls: int) -> None:
    """One call at a time; the caller reads its own answer from a blocking socket."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _join(workdir)
    for rid in range(1, calls + 1):
        send_frame(sock, [15, rid, 1, "aecho", [PAYLOAD], {}, 0, None])
        recv_frame(sock)
    sock.close()


# -- the driver ----------------------------------------------------------------------------


def _python(*args: Any) -> list[str]:
    return [sys.executable, "-m", "benchmarks.instructions", *map(str, args)]


def _callgrind(cmd: list[str], workdir: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir / 'callgrind.out'}", f"--log-file={workdir / 'vg.log'}", *cmd]


def _ir(workdir: Path) -> int:
    m = re.search(r"Collected : (\d+)", (workdir / "vg.log").read_text())
    if m is None:
        raise RuntimeError(f"no instruction count in {workdir / 'vg.log'}")
    return int(m.group(1))


def _env() -> dict[str, str]:
    # Same hashes and the same event loop in every run: the counts compare.
    return {**os.environ, "PYTHONHASHSEED": "0", "CONNSHARE_LOOP": "asyncio"}


def _reap(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(30)


def _start_all(procs: list[subprocess.Popen], workdir: Path, joined: int) -> None:
    deadline = time.monotonic() + 300
    while len(list(workdir.glob("joined.*"))) < joined:
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a process failed to start")
        time.sleep(0.02)
    (workdir / "go").touch()


def run_connshare(traced: str, calls: int, followers: int, opcodes: bool = False, sequential: bool = False) -> Any:
    """One run; ``traced`` is "leader" or "follower". Returns its instruction count
    (Ir), or with ``opcodes`` its Python opcodes per request by function;
    ``sequential``: the follower makes blocking calls one at a time."""
    workdir = Path(tempfile.mkdtemp(prefix="connshare-ir-"))
    port = free_port()
    env = _env()
    procs: list[subprocess.Popen] = []
    try:
        cmd = _python("_leader", port, workdir, int(opcodes and traced == "leader"), calls * followers)
        if traced == "leader" and not opcodes:
            cmd = _callgrind(cmd, workdir)
        procs.append(subprocess.Popen(cmd, env=env))
        _wait_for(workdir / "ready", 300)
        for _ in range(followers):
            cmd = _python("_follower", port, workdir, calls, int(opcodes and traced == "follower"), int(sequential))
            if traced == "follower" and not opcodes:
                cmd = _callgrind(cmd, workdir)
            procs.append(subprocess.Popen(cmd, env=env))
        if not (opcodes and traced == "follower"):
            _start_all(procs, workdir, followers)
        for p in procs[1:]:
            if p.wait(900) != 0:
                raise RuntimeError(f"a follower failed ({p.args})")
        (workdir / "stop").touch()
        if procs[0].wait(120) != 0:
            raise RuntimeError("the leader failed")
        return json.loads((workdir / "opcodes.json").read_text()) if opcodes else _ir(workdir)
    finally:
        _reap(procs)
        shutil.rmtree(workdir, ignore_errors=True)


def run_minimal(traced: str, calls: int, clients: int, sequential: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="connshare-ir-"))
    procs: list[subprocess.Popen] = []
    try:
        cmd = _python("_minimal_server", workdir, clients)
        procs.append(subprocess.Popen(_callgrind(cmd, workdir) if traced == "server" else cmd, env=_env()))
        _wait_for(workdir / "port", 300)
        port = int((workdir / "port").read_text())
        for _ in range(clients):
            cmd = _python("_minimal_blocking_client" if sequential else "_minimal_client", port, workdir, calls)
            procs.append(subprocess.Popen(_callgrind(cmd, workdir) if traced == "client" else cmd, env=_env()))
        _start_all(procs, workdir, clients)
        for p in procs:
            if p.wait(900) != 0:
                raise RuntimeError(f"a process failed ({p.args})")
        return _ir(workdir)
    finally:
        _reap(procs)
        shutil.rmtree(workdir, ignore_errors=True)


def per_call(measure: Any, low: int, high: int, calls_per_run: int) -> float:
    """Instructions per call: the difference of two runs over the calls between."""
    return (measure(high) - measure(low)) / (calls_per_run * (high - low))


def opcode_profile(traced: str, calls: int, followers: int) -> dict[str, float]:
    return run_connshare(traced, calls, followers, opcodes=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        role, args = sys.argv[1], sys.argv[2:]
        if role == "_leader":
            _role_leader(int(args[0]), Path(args[1]), bool(int(args[2])), int(args[3]))
        elif role == "_follower":
            _role_follower(int(args[0]), Path(args[1]), int(args[2]), bool(int(args[3])), bool(int(args[4])))
        elif role == "_minimal_server":
            _role_minimal_server(Path(args[0]), int(args[1]))
        elif role == "_minimal_client":
            _role_minimal_client(int(args[0]), Path(args[1]), int(args[2]))
        elif role == "_minimal_blocking_client":
            _role_minimal_blocking_client(int(args[0]), Path(args[1]), int(args[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", default="1000,5000", help="calls per follower in the two runs")
    ap.add_argument("--followers", type=int, default=3, help="followers served by the traced leader")
    ap.add_argument("--opcodes", action="store_true", help="also count Python opcodes per function")
    ap.add_argument("--sequential", action="store_true", help="one follower making blocking calls one at a time (the latency workload)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("benchmarks.instructions needs valgrind (apt-get install valgrind)")
    if args.opcodes and args.sequential:
        ap.error("--opcodes counts the throughput workload; leave out --sequential")
    low, high = (int(x) for x in args.calls.split(","))
    seq = args.sequential
    f = 1 if seq else args.followers
    ir = {
        "leader": per_call(lambda n: run_connshare("leader", n, f, sequential=seq), low, high, f),
        "minimal server": per_call(lambda n: run_minimal("server", n, f, sequential=seq), low, high, f),
        "follower": per_call(lambda n: run_connshare("follower", n, 1, sequential=seq), low, high, 1),
        "minimal client": per_call(lambda n: run_minimal("client", n, 1, sequential=seq), low, high, 1),
    }
    print("| process | instructions per call |\n| --- | --- |")
    for name, v in ir.items():
        print(f"| {name} | {v / 1000:.1f}k |")
    out: dict[str, Any] = {
        "host": host_info(),
        "workload": "sequential" if seq else "throughput",
        "calls": [low, high],
        "followers": f,
        "instructions_per_call": ir,
    }
    if args.opcodes:
        out["opcodes_per_request"] = {}
        for traced, n in (("leader", 3000), ("follower", 5000)):
            prof = opcode_profile(traced, n, f if traced == "leader" else 1)
            out["opcodes_per_request"][traced] = dict(sorted(prof.items(), key=lambda kv: -kv[1]))
            print(f"\n{traced}: {sum(prof.values()):.0f} Python opcodes per request; the most:")
            for name, v in sorted(prof.items(), key=lambda kv: -kv[1])[:15]:
                print(f"  {v:7.1f}  {name}")
    if not args.no_write:
        write_results("instructions_sequential.json" if seq else "instructions.json", out)


if __name__ == "__main__":
    main()
