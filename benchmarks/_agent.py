"""Worker processes for the connshare benchmarks, and the handle the driver holds.

:class:`Agent` spawns (multiprocessing ``spawn``) a process running
:func:`agent_main`, which answers commands sent over a pipe, one at a time. Every
request has a timeout; :class:`AgentSet` reaps (exit, terminate, SIGKILL) every
process it started, whatever happens.

This module imports only the standard library at the top: a fresh agent holds no
connshare until a command needs it (the memory benchmark measures exactly that).
"""

from __future__ import annotations

import array
import gc
import itertools
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

CTX = mp.get_context("spawn")
PAYLOAD = "x" * 100
AGENT_LIFETIME_S = 1200.0  # an agent never outlives this, whatever the driver does


class AgentError(RuntimeError):
    """A command failed inside the agent (the message holds its traceback)."""


# =========================================================================== driver side


class Agent:
    """One spawned worker process."""

    _all: set[Agent] = set()  # every live agent, for the last-resort reaper

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=agent_main, args=(child, os.getpid()), daemon=True, name=f"bench-agent-{tag}")
        self.proc.start()
        child.close()
        self._ids = itertools.count(1)
        self._waiting: int | None = None
        Agent._all.add(self)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)  # type: ignore[arg-type]

    def post(self, cmd: str, **kw: Any) -> None:
        """Send a command without waiting (collect it with :meth:`result`)."""
        if self._waiting is not None:
            raise RuntimeError(f"agent {self.tag}: a command is still outstanding")
        rid = next(self._ids)
        self._waiting = rid
        self.conn.send((rid, cmd, kw))

    def result(self, timeout: float) -> Any:
        rid = self._waiting
        if rid is None:
            raise RuntimeError("nothing posted")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"agent {self.tag} (pid {self.pid}): no answer within {timeout:.1f} s")
            try:
                ready = self.conn.poll(min(left, 0.5))
            except (OSError, EOFError) as exc:
                raise AgentError(f"agent {self.tag} (pid {self.pid}) pipe broke: {exc!r}") from None
            if ready:
                try:
                    got, ok, value = self.conn.recv()
                except (OSError, EOFError) as exc:
                    raise AgentError(f"agent {self.tag} (pid {self.pid}) died (exit {self.proc.exitcode}): {exc!r}") from None
                if got != rid:
                    continue  # the late answer of a command that timed out
                self._waiting = None
                if not ok:
                    raise AgentError(f"agent {self.tag} (pid {self.pid}): {value}")
                return value
            if not self.proc.is_alive():
                raise AgentError(f"agent {self.tag} (pid {self.pid}) died (exit {self.proc.exitcode})")

    def call(self, cmd: str, wait: float = 60.0, **kw: Any) -> Any:
        """Send ``cmd`` and wait up to ``wait`` s for its answer."""
        self.post(cmd, **kw)
        try:
            return self.result(wait)
        finally:
            self._waiting = None

    def kill(self) -> None:
        if self.proc.is_alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.join(5.0)
        self._dispose()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the agent to exit; terminate, then SIGKILL it if it will not."""
        if self.proc.is_alive():
            try:
                self.conn.send((0, "exit", {}))
            except (OSError, ValueError):
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.kill()
        self._dispose()

    def _dispose(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        Agent._all.discard(self)


class AgentSet:
    """Agents started together and reaped together (use as a context manager)."""

    def __init__(self) -> None:
        self.agents: list[Agent] = []

    def spawn(self, n: int, tag: str = "w", ping_timeout: float = 60.0) -> list[Agent]:
        new = [Agent(f"{tag}{len(self.agents) + i}") for i in range(n)]
        self.agents.extend(new)
        gather(new, "ping", ping_timeout)
        return new

    def discard(self, agent: Agent) -> None:
        if agent in self.agents:
            self.agents.remove(agent)

    def __enter__(self) -> AgentSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        agents, self.agents = self.agents, []
        for a in agents:  # everyone at once: exit without handoff dances
            if a.proc.is_alive():
                try:
                    a.conn.send((0, "exit", {}))
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 5.0
        for a in agents:
            a.proc.join(max(0.05, deadline - time.monotonic()))
        for a in agents:
            a.stop(0.5)


def gather(agents: Iterable[Agent], cmd: str, wait: float, **kw: Any) -> list[Any]:
    """Post ``cmd`` to every agent at once, then collect every answer."""
    agents = list(agents)
    for a in agents:
        a.post(cmd, **kw)
    deadline = time.monotonic() + wait
    out = []
    errors = []
    for a in agents:
        try:
            out.append(a.result(max(0.1, deadline - time.monotonic())))
        except Exception as exc:
            a._waiting = None
            errors.append(exc)
            out.append(None)
    if errors:
        raise errors[0]
    return out


def reap_all() -> None:
    """Last resort (atexit / signal): kill every agent still alive."""
    for a in list(Agent._all):
        try:
            a.kill()
        except Exception:
            pass


# =========================================================================== agent side


class _State:
    def __init__(self) -> None:
        self.client: Any = None
        self.direct: Any = None
        self.lock = threading.Lock()
        # subscription bookkeeping (the listener runs on connshare's loop thread)
        self.live = threading.Event()
        self.fan_on = False
        self.fan_lat: dict[int, int] = {}
        self.fan_dups = 0
        self.by_pid: dict[int, list[int]] = {}  # pid -> [count, first_ns, last_ns]
        self.keys_seen: set[str] = set()
        self.keys_live = threading.Event()
        self.keys_wanted = 0
        # the failover caller
        self.caller: threading.Thread | None = None
        self.caller_stop = threading.Event()
        self.calls: list[tuple[int, int, bool, Any]] = []


S = _State()


def _samples(values: list[int]) -> bytes:
    return array.array("q", values).tobytes()


def _on_event(value: Any) -> None:
    t = time.monotonic_ns()
    pid = value["pid"]
    st = S.by_pid.get(pid)
    if st is None:
        S.by_pid[pid] = [1, t, t]
    else:
        st[0] += 1
        st[2] = t
    seq = value["seq"]
    if S.fan_on and seq >= 0:
        if seq in S.fan_lat:
            S.fan_dups += 1
        else:
            S.fan_lat[seq] = t - int(value["t_us"] * 1000.0)
    S.live.set()


def _h_ping() -> dict[str, Any]:
    return {"pid": os.getpid(), "connshare_loaded": "connshare" in sys.modules, "msgpack_loaded": "msgpack" in sys.modules}


def _h_gc() -> dict[str, Any]:
    gc.collect()
    return _h_ping()


def _h_preload(modules: list[str]) -> dict[str, Any]:
    """Import what an application would have loaded anyway (before a baseline)."""
    for m in modules:
        __import__(m)
    gc.collect()
    return _h_ping()


def _h_import() -> dict[str, Any]:
    import benchmarks._dataclient  # noqa: F401
    import connshare  # noqa: F401

    gc.collect()
    return _h_ping()


def _h_join(
    port: int, secret: str, upstream_port: int, ready_timeout: float = 30.0, dc_kwargs: dict | None = None, options: dict | None = None
) -> dict[str, Any]:
    from benchmarks._dataclient import build_cluster_client

    t0 = time.monotonic_ns()
    S.client = build_cluster_client(port, secret, upstream_port, dc_kwargs=dc_kwargs, **(options or {}))
    S.client.wait_ready(ready_timeout)
    t1 = time.monotonic_ns()
    from connshare._loop import get_loop

    loop = type(get_loop()).__module__.split(".")[0]
    return {
        "pid": os.getpid(),
        "is_leader": S.client.is_leader,
        "role": S.client.role,
        "ready_ms": (t1 - t0) / 1e6,
        "t_ready_ns": t1,
        "loop": loop,
    }


def _h_loop_nice() -> int:
    """The nice value of connshare's loop thread here."""
    from connshare import _loop

    _loop.get_loop()
    return os.getpriority(os.PRIO_PROCESS, _loop._thread.native_id)  # type: ignore[union-attr]


def _h_join_direct(upstream_port: int) -> dict[str, Any]:
    from benchmarks._dataclient import BenchDataClient

    t0 = time.monotonic_ns()
    S.direct = BenchDataClient(upstream_port)
    return {"pid": os.getpid(), "ready_ms": (time.monotonic_ns() - t0) / 1e6}


def _h_close_direct() -> bool:
    if S.direct is not None:
        S.direct.close()
        S.direct = None
    return True


def _h_role() -> dict[str, Any]:
    c = S.client
    return {"pid": os.getpid(), "is_leader": c.is_leader, "role": c.role, "leader_pid": c.leader_pid}


def _h_invoke(method: str, args: list | None = None, timeout: float = 30.0) -> Any:
    return S.client.invoke(method, *(args or []))


def _h_lat_sync(mode: str, n: int, warmup: int) -> dict[str, Any]:
    """Sequential blocking calls. mode: "proxy" (client.echo, a blocking method),
    "invoke_coro" (client.invoke("aecho")), "proxy_local_coro" (same, named for the leader)."""
    c = S.client
    if mode == "proxy":
        fn: Callable[[Any], Any] = c.echo
    elif mode == "invoke_coro":

        def fn(p: Any) -> Any:
            return c.invoke("aecho", p)

    else:
        raise ValueError(mode)
    for _ in range(warmup):
        fn(PAYLOAD)
    clock = time.perf_counter_ns
    out = [0] * n
    bad = 0
    cpu0 = time.thread_time_ns()
    for i in range(n):
        t0 = clock()
        r = fn(PAYLOAD)
        out[i] = clock() - t0
        bad += r != PAYLOAD
    return {"samples": _samples(out), "mismatches": bad, "cpu_ns": time.thread_time_ns() - cpu0}


def _h_lat_async(mode: str, n: int, warmup: int) -> dict[str, Any]:
    """Sequential awaited calls from an asyncio loop of this thread. mode: "proxy"
    (await client.aecho, a coroutine method), "ainvoke_blocking" (await
    client.ainvoke("echo"))."""
    import asyncio

    c = S.client

    async def run() -> dict[str, Any]:
        if mode == "proxy":
            fn = c.aecho
        elif mode == "ainvoke_blocking":

            def fn(p: Any) -> Any:
                return c.ainvoke("echo", p)

        else:
            raise ValueError(mode)
        for _ in range(warmup):
            await fn(PAYLOAD)
        clock = time.perf_counter_ns
        out = [0] * n
        bad = 0
        cpu0 = time.thread_time_ns()
        for i in range(n):
            t0 = clock()
            r = await fn(PAYLOAD)
            out[i] = clock() - t0
            bad += r != PAYLOAD
        return {"samples": _samples(out), "mismatches": bad, "cpu_ns": time.thread_time_ns() - cpu0}

    return asyncio.run(run())


def _sleep_until(t_ns: int) -> None:
    while True:
        left = (t_ns - time.monotonic_ns()) / 1e9
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _h_tp_async(total: int, inflight: int, warmup: int, start_at_ns: int, mix: bool = False, time_limit: float = 120.0) -> dict[str, Any]:
    """Keep ``inflight`` awaitable calls outstanding until ``total`` have completed.
    ``mix``: every other slot calls the blocking echo through ainvoke."""
    import asyncio

    c = S.client

    async def run() -> dict[str, Any]:
        async def blocking_echo(p: Any) -> Any:
            return await c.ainvoke("echo", p)

        for _ in range(warmup):
            await c.aecho(PAYLOAD)
        _sleep_until(start_at_ns)
        issued = 0
        done = 0
        errors = 0
        first_error = None
        stop_at = time.monotonic() + time_limit

        async def slot(k: int) -> None:
            nonlocal issued, done, errors, first_error
            fn = blocking_echo if (mix and k % 2) else c.aecho
            while issued < total and time.monotonic() < stop_at:
                issued += 1
                try:
                    r = await fn(PAYLOAD)
                    if r == PAYLOAD:
                        done += 1
                    else:
                        errors += 1
                except Exception as exc:
                    errors += 1
                    first_error = first_error or repr(exc)

        t0 = time.monotonic_ns()
        await asyncio.gather(*(slot(k) for k in range(inflight)))
        t1 = time.monotonic_ns()
        return {"start_ns": t0, "end_ns": t1, "completed": done, "errors": errors, "first_error": first_error}

    return asyncio.run(run())


def _h_tp_threads(threads: int, per_thread: int, warmup: int, start_at_ns: int) -> dict[str, Any]:
    c = S.client
    done = [0] * threads
    errs: list[str] = []
    barrier = threading.Barrier(threads + 1, timeout=60)

    def work(i: int) -> None:
        try:
            for _ in range(warmup):
                c.echo(PAYLOAD)
            barrier.wait()
            for _ in range(per_thread):
                if c.echo(PAYLOAD) == PAYLOAD:
                    done[i] += 1
        except Exception as exc:
            errs.append(repr(exc))
            barrier.abort()

    pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    _sleep_until(start_at_ns)
    t0 = time.monotonic_ns()
    barrier.wait()
    for t in pool:
        t.join(120)
    t1 = time.monotonic_ns()
    return {"start_ns": t0, "end_ns": t1, "completed": sum(done), "errors": len(errs), "first_error": errs[0] if errs else None}


def _h_subscribe(key: str = "bench", live_timeout: float | None = 10.0) -> dict[str, Any]:
    S.live.clear()
    t0 = time.monotonic_ns()
    S.client.subscribe({"key": key}, _on_event)
    if live_timeout is not None and not S.live.wait(live_timeout):
        raise TimeoutError(f"no event within {live_timeout} s of subscribing {key!r}")
    return {"live_ms": (time.monotonic_ns() - t0) / 1e6}


def _h_sub_many(n: int, timeout: float = 20.0) -> dict[str, Any]:
    """Subscribe ``n`` keys; wait until each has delivered a value."""
    S.keys_wanted = n
    S.keys_seen = set()
    S.keys_live.clear()
    lock = threading.Lock()

    def make(key: str) -> Callable[[Any], None]:
        def listener(_v: Any) -> None:
            with lock:
                if key not in S.keys_seen:
                    S.keys_seen.add(key)
                    if len(S.keys_seen) >= S.keys_wanted:
                        S.keys_live.set()

        return listener

    for i in range(n):
        key = f"k{i}"
        S.client.subscribe({"key": key}, make(key))
    ok = S.keys_live.wait(timeout)
    gc.collect()
    return {"live": ok, "keys_seen": len(S.keys_seen)}


def _h_fan_start() -> bool:
    S.fan_lat = {}
    S.fan_dups = 0
    S.fan_on = True
    return True


def _h_fan_report(count: int) -> dict[str, Any]:
    S.fan_on = False
    lat = [S.fan_lat[s] for s in range(count) if s in S.fan_lat]
    extra = sum(1 for s in S.fan_lat if s >= count)
    return {"samples": _samples(lat), "received": len(lat), "lost": count - len(lat), "duplicates": S.fan_dups, "foreign": extra}


def _h_pid_stats() -> dict[int, list[int]]:
    return {int(k): list(v) for k, v in S.by_pid.items()}


def _caller_loop(method: str) -> None:
    c = S.client
    clock = time.monotonic_ns
    calls = S.calls
    stop = S.caller_stop
    deadline = time.monotonic() + 60.0
    while not stop.is_set() and time.monotonic() < deadline:
        t0 = clock()
        try:
            r = c.invoke(method, PAYLOAD)
            calls.append((t0, clock(), True, r[0]))
        except Exception as exc:
            calls.append((t0, clock(), False, type(exc).__name__))
            time.sleep(0.0005)  # an error is instant; do not spin on it
        if len(calls) > 200_000:
            del calls[:100_000]


def _h_caller_start(method: str = "echo_pid") -> bool:
    S.calls = []
    S.caller_stop.clear()
    S.caller = threading.Thread(target=_caller_loop, args=(method,), daemon=True)
    S.caller.start()
    return True


def _h_caller_result(old_pid: int, t_ref_ns: int, timeout: float = 10.0) -> dict[str, Any]:
    """Wait for the first call answered by a pid other than ``old_pid`` that ended
    after ``t_ref_ns``; then stop the caller and report."""
    deadline = time.monotonic() + timeout
    first = None
    scanned = 0
    while time.monotonic() < deadline:
        calls = S.calls
        for i in range(scanned, len(calls)):
            _t0, t1, ok, who = calls[i]
            if ok and who != old_pid and t1 > t_ref_ns:
                first = calls[i]
                break
        scanned = len(calls)
        if first is not None or not (S.caller and S.caller.is_alive()):
            break
        time.sleep(0.001)
    S.caller_stop.set()
    if S.caller is not None:
        S.caller.join(15.0)
    calls = list(S.calls)
    after = [c for c in calls if c[1] > t_ref_ns]
    failed = [c for c in after if not c[2]]
    stale = [c for c in after if c[2] and c[3] == old_pid]
    return {
        "first_success_ms": None if first is None else (first[1] - t_ref_ns) / 1e6,
        "new_pid": None if first is None else first[3],
        "failed": len(failed),
        "errors": sorted({c[3] for c in failed}),
        "answered_by_old_after_ref": len(stale),
        "calls_before": sum(1 for c in calls if c[1] <= t_ref_ns),
        "calls_after": len(after),
        "caller_alive": bool(S.caller and S.caller.is_alive()),
    }


def _h_sub_wait(pid: int, t_ref_ns: int, timeout: float = 5.0) -> dict[str, Any]:
    """Wait for an event from ``pid`` received after ``t_ref_ns``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = S.by_pid.get(pid)
        if st is not None and st[2] > t_ref_ns:
            return {"ok": True, "first_ms": (max(st[1], t_ref_ns) - t_ref_ns) / 1e6, "count": st[0]}
        time.sleep(0.002)
    return {"ok": False, "first_ms": None, "count": 0}


def _h_close_client(background: bool = False) -> dict[str, Any]:
    c = S.client
    t0 = time.monotonic_ns()
    if background:
        threading.Thread(target=c.close, daemon=True).start()
        return {"t_close_ns": t0}
    c.close()
    return {"t_close_ns": t0, "close_ms": (time.monotonic_ns() - t0) / 1e6}


_trace: list[tuple[int, str]] = []


def _h_trace_on(level: int = 10) -> bool:
    """Record connshare's log records with monotonic timestamps (for tracing a run)."""
    import logging

    class Rec(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _trace.append((time.monotonic_ns(), f"{record.name} [{record.threadName}] {record.getMessage()}"))

    lg = logging.getLogger("connshare")
    lg.setLevel(level)
    lg.addHandler(Rec())
    return True


def _h_trace_dump() -> list[tuple[int, str]]:
    out = list(_trace)
    _trace.clear()
    return out


HANDLERS: dict[str, Callable[..., Any]] = {name[3:]: fn for name, fn in globals().items() if name.startswith("_h_") and callable(fn)}


def _watchdog(parent_pid: int) -> None:
    deadline = time.monotonic() + AGENT_LIFETIME_S
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid or time.monotonic() > deadline:
            os._exit(3)


def agent_main(conn: Any, parent_pid: int) -> None:
    """The agent's loop: ``(id, cmd, kwargs)`` in, ``(id, ok, value)`` out."""
    threading.Thread(target=_watchdog, args=(parent_pid,), daemon=True).start()
    while True:
        try:
            if not conn.poll(1.0):
                continue
            rid, cmd, kw = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if cmd == "exit":
            os._exit(0)  # no graceful handoff: the benchmark is over for this process
        try:
            value = HANDLERS[cmd](**kw)
            reply = (rid, True, value)
        except BaseException as exc:
            reply = (rid, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            os._exit(0)
