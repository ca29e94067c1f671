"""The connshare workloads (one run each; :mod:`benchmarks.run` repeats and records).

Every function starts its own upstream server (:class:`UpstreamServer`, which counts
connections), picks a free port and a random secret, spawns its worker processes
(:class:`benchmarks._agent.AgentSet`, multiprocessing ``spawn``) and reaps them all
before it returns, even on error. Every wait is bounded.

Each returns a flat dict of numbers (what :func:`summarize_all` summarizes) plus a
few non-numeric extras (``dist`` quantile curves for the plots, error strings).
"""

from __future__ import annotations

import array
import contextlib
import importlib.util
import math
import os
import py_compile
import secrets
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from benchmarks._agent import Agent, AgentSet, gather
from benchmarks._common import UpstreamServer, free_port, percentiles

KEY = "bench"
JOIN_TIMEOUT = 60.0
MIB = 1024 * 1024

#: quantiles stored for the latency plots (fractions)
DIST_Q = [i / 100 for i in range(1, 100)] + [0.995, 0.999]


def _samples(raw: bytes) -> list[int]:
    return array.array("q", raw).tolist()


def _dist(samples_ns: list[int]) -> list[float]:
    """The ``DIST_Q`` quantiles in µs (nearest rank), for plotting."""
    v = sorted(samples_ns)
    if not v:
        return []
    return [round(v[max(0, min(len(v) - 1, math.ceil(q * len(v)) - 1))] / 1000.0, 3) for q in DIST_Q]


def _put(out: dict[str, Any], prefix: str, samples_ns: list[int]) -> None:
    p = percentiles(samples_ns)
    for k in ("p50_us", "p99_us", "mean_us"):
        out[f"{prefix}_{k}"] = p[k]


def _tcp_sockets(pids: list[int]) -> dict[str, int]:
    """TCP sockets the given processes hold (psutil), split by kind."""
    total = listen = loopback_peer = 0
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            total += 1
            if c.status == psutil.CONN_LISTEN:
                listen += 1
    return {"total": total, "listen": listen, "other": total - listen - loopback_peer}


_LOOPS: set[str] = set()  # event loop implementations seen in leaders (asyncio / uvloop)


def loops_seen() -> list[str]:
    return sorted(_LOOPS)


def _secret() -> str:
    return secrets.token_hex(16)


def _leader_and_followers(
    s: AgentSet, n_followers: int, up: UpstreamServer, port: int, secret: str, **join_kw: Any
) -> tuple[Agent, list[Agent]]:
    """Spawn the leader, make it lead, then the followers (all joined and ready)."""
    agents = s.spawn(1 + n_followers)
    leader, followers = agents[0], agents[1:]
    info = leader.call("join", JOIN_TIMEOUT, port=port, secret=secret, upstream_port=up.port, **join_kw)
    _LOOPS.add(info.get("loop", "?"))
    if not info["is_leader"]:
        raise RuntimeError(f"the first agent did not become the leader: {info}")
    if followers:
        infos = gather(followers, "join", JOIN_TIMEOUT, port=port, secret=secret, upstream_port=up.port, **join_kw)
        if any(i["is_leader"] for i in infos):
            raise RuntimeError("a follower became the leader")
    return leader, followers


# =========================================================================== 1. connections


def connections(ws: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> dict[str, Any]:
    """W workers started at once: upstream connections and TCP sockets, with connshare
    and with every worker connecting directly."""
    out: dict[str, Any] = {"ws": list(ws)}
    for w in ws:
        with UpstreamServer() as up, AgentSet() as s:
            agents = s.spawn(w, tag=f"c{w}-")
            pids = [a.pid for a in agents]
            # direct: each worker builds its own DataClient
            base = up.connections_total
            gather(agents, "join_direct", JOIN_TIMEOUT, upstream_port=up.port)
            out[f"w{w}_direct_upstream"] = up.connections_total - base
            out[f"w{w}_direct_tcp_sockets"] = _tcp_sockets(pids)["total"]
            gather(agents, "close_direct", 30.0)
            # connshare: the same workers all join one port at once
            port, secret = free_port(), _secret()
            base = up.connections_total
            t0 = time.monotonic_ns()
            infos = gather(agents, "join", JOIN_TIMEOUT, port=port, secret=secret, upstream_port=up.port)
            out[f"w{w}_all_ready_ms"] = round((max(i["t_ready_ns"] for i in infos) - t0) / 1e6, 2)
            out[f"w{w}_leaders"] = sum(1 for i in infos if i["is_leader"])
            _LOOPS.update(i.get("loop", "?") for i in infos if i["is_leader"])
            time.sleep(0.05)
            out[f"w{w}_connshare_upstream"] = up.connections_total - base
            socks = _tcp_sockets(pids)
            out[f"w{w}_connshare_tcp_sockets"] = socks["total"]
            out[f"w{w}_connshare_listen_sockets"] = socks["listen"]
    return out


# =========================================================================== 2. call latency

LATENCY_VARIANTS = {
    # name: (agent command, mode, which process)
    "sync_echo": ("lat_sync", "proxy", "follower"),  # blocking caller, blocking echo
    "sync_aecho": ("lat_sync", "invoke_coro", "follower"),  # blocking caller, coroutine echo
    "async_aecho": ("lat_async", "proxy", "follower"),  # asyncio caller, coroutine echo
    "async_echo": ("lat_async", "ainvoke_blocking", "follower"),  # asyncio caller, blocking echo
    "leader_echo": ("lat_sync", "proxy", "leader"),  # the leader's own call, blocking echo
    "leader_aecho": ("lat_sync", "invoke_coro", "leader"),  # the leader's own call, coroutine echo
    # the leader's own awaited call from an app loop (not connshare's), as under uvicorn
    "leader_async_aecho": ("lat_async", "proxy", "leader"),
}


#: the follower's variants again on fresh pairs built with the opt-in polling
#: options, beside the default in the same run: ``spin_*`` the follower's callers
#: poll for their answers (spin_wait), ``lspin_*`` the leader's loop polls for the
#: next request (leader_spin_wait), ``bspin_*`` both
SPIN_WAIT = 0.0001
POLLING: dict[str, dict[str, float]] = {
    "spin": {"spin_wait": SPIN_WAIT},
    "lspin": {"leader_spin_wait": SPIN_WAIT},
    "bspin": {"spin_wait": SPIN_WAIT, "leader_spin_wait": SPIN_WAIT},
}
SPIN_VARIANTS = ("sync_aecho", "async_aecho", "sync_echo", "async_echo")


def call_latency(n: int = 20000, warmup: int = 1000, polling: bool = True) -> dict[str, Any]:
    """One leader, one follower (separate processes); sequential calls timed one by
    one, with the caller's and the leader process's CPU time per call (``*_cpu_us``,
    ``*_leader_cpu_us``). With ``polling``, the follower's variants again on a fresh
    pair for each of :data:`POLLING`."""
    out: dict[str, Any] = {"n": n, "warmup": warmup, "dist": {}}
    with UpstreamServer() as up, AgentSet() as s:
        leader, (follower,) = _leader_and_followers(s, 1, up, free_port(), _secret())
        for name, (cmd, mode, who) in LATENCY_VARIANTS.items():
            agent = follower if who == "follower" else leader
            _latency(out, name, leader, agent, cmd, mode, n, warmup)
        out["upstream_connections"] = up.connections_total
    if polling:
        out["spin_wait"] = SPIN_WAIT
        for prefix, options in POLLING.items():
            with UpstreamServer() as up, AgentSet() as s:
                leader, (follower,) = _leader_and_followers(s, 1, up, free_port(), _secret(), options=options)
                for name in SPIN_VARIANTS:
                    cmd, mode, _ = LATENCY_VARIANTS[name]
                    _latency(out, f"{prefix}_{name}", leader, follower, cmd, mode, n, warmup)
    return out


def _latency(out: dict[str, Any], name: str, leader: Agent, caller: Agent, cmd: str, mode: str, n: int, warmup: int) -> None:
    lp = psutil.Process(leader.pid)
    before = lp.cpu_times()
    r = caller.call(cmd, 300.0, mode=mode, n=n, warmup=warmup)
    after = lp.cpu_times()
    samples = _samples(r["samples"])
    _put(out, name, samples)
    out[f"{name}_mismatches"] = r["mismatches"]
    out[f"{name}_cpu_us"] = round(r["cpu_ns"] / n / 1000, 2)
    # the whole leader process, warm-up calls included (a clock tick is 10 ms)
    leader_s = after.user + after.system - before.user - before.system
    out[f"{name}_leader_cpu_us"] = round(leader_s * 1e6 / (n + warmup), 2)
    out["dist"][name] = _dist(samples)


# =========================================================================== 3. throughput


def throughput(
    followers: int = 3,
    inflight: int = 100,
    per_follower: int = 50000,
    threads: int = 8,
    per_thread: int = 2000,
    warmup: int = 1000,
    leader_nice: int | None = -5,
) -> dict[str, Any]:
    """Leader + followers: each keeps ``inflight`` awaitable calls outstanding until it
    completed ``per_follower``; then each runs ``threads`` threads of blocking calls.
    Then, with ``leader_nice`` (not None), the awaitable part again with a fresh
    leader and followers built with that option (``nice_*``), side by side."""
    out: dict[str, Any] = {
        "followers": followers,
        "inflight": inflight,
        "per_follower": per_follower,
        "threads": threads,
        "per_thread": per_thread,
    }
    with UpstreamServer() as up, AgentSet() as s:
        _, fs = _leader_and_followers(s, followers, up, free_port(), _secret())
        _tp_async(out, "async", fs, per_follower, inflight, warmup)
        start = time.monotonic_ns() + int(0.3e9)
        res = gather(fs, "tp_threads", 300.0, threads=threads, per_thread=per_thread, warmup=50, start_at_ns=start)
        _tp(out, "threads", res)
    if leader_nice is not None:
        with UpstreamServer() as up, AgentSet() as s:
            leader, fs = _leader_and_followers(s, followers, up, free_port(), _secret(), options={"leader_nice": leader_nice})
            out["nice_leader_nice"] = leader_nice
            # what the leader's loop thread runs at: the option is refused without CAP_SYS_NICE
            out["nice_applied"] = leader.call("loop_nice")
            _tp_async(out, "nice_async", fs, per_follower, inflight, warmup)
    return out


def _tp_async(out: dict[str, Any], prefix: str, fs: list[Agent], per_follower: int, inflight: int, warmup: int) -> None:
    start = time.monotonic_ns() + int(0.3e9)
    res = gather(fs, "tp_async", 300.0, total=per_follower, inflight=inflight, warmup=warmup, start_at_ns=start)
    _tp(out, prefix, res)


def _tp(out: dict[str, Any], prefix: str, res: list[dict[str, Any]]) -> None:
    calls = sum(r["completed"] for r in res)
    wall = (max(r["end_ns"] for r in res) - min(r["start_ns"] for r in res)) / 1e9
    out[f"{prefix}_calls_per_s"] = round(calls / wall, 1)
    out[f"{prefix}_calls"] = calls
    out[f"{prefix}_wall_s"] = round(wall, 3)
    out[f"{prefix}_errors"] = sum(r["errors"] for r in res)
    errs = [r["first_error"] for r in res if r["first_error"]]
    if errs:
        out[f"{prefix}_first_error"] = errs[0]


# =========================================================================== 4. fan-out


def fanout(subscribers: int = 4, events: int = 1000, interval_ms: float = 10.0, leader_nice: int | None = None) -> dict[str, Any]:
    """``subscribers`` processes (the leader among them) subscribed to one key; the
    leader's DataClient emits ``events`` events ``interval_ms`` apart. With
    ``leader_nice`` (not None), the same again with a fresh leader and followers
    built with that option (``nice_*``), side by side."""
    out: dict[str, Any] = {"subscribers": subscribers, "events": events, "interval_ms": interval_ms}
    _fanout_once(out, "", subscribers, events, interval_ms, {})
    if leader_nice is not None:
        out["nice_leader_nice"] = leader_nice
        _fanout_once(out, "nice_", subscribers, events, interval_ms, {"leader_nice": leader_nice})
    return out


def _involuntary_switches(pid: int) -> int | None:
    """Involuntary context switches of every thread of ``pid`` (Linux; else None).
    psutil's count reads /proc/PID/status, which is the main thread's alone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:  # a thread that ended meanwhile
            continue
    return total


def _fanout_once(out: dict[str, Any], prefix: str, subscribers: int, events: int, interval_ms: float, options: dict[str, Any]) -> None:
    with UpstreamServer() as up, AgentSet() as s:
        leader, fs = _leader_and_followers(s, subscribers - 1, up, free_port(), _secret(), options=options)
        every = [leader, *fs]
        if options.get("leader_nice") is not None:
            # what the leader's loop thread runs at: the option is refused without CAP_SYS_NICE
            out[f"{prefix}applied"] = leader.call("loop_nice")
        # prime: a ticker (seq -1) until every subscription is seen to be live
        leader.call("invoke", method="start_ticker", args=[KEY, 20.0, -1])
        gather(every, "subscribe", 60.0, key=KEY, live_timeout=30.0)
        leader.call("invoke", method="stop_ticker")
        time.sleep(0.1)
        gather(every, "fan_start", 30.0)
        # Involuntary context switches of the leader process over the burst: a
        # follower woken by the leader's send can preempt it mid-fan-out.
        switched = _involuntary_switches(leader.pid)
        leader.call("invoke", method="start_burst", args=[KEY, events, interval_ms, 200.0])
        time.sleep(events * interval_ms / 1000.0 + 0.2)
        deadline = time.monotonic() + 30.0 + events * interval_ms / 1000.0
        burst = None
        while burst is None and time.monotonic() < deadline:
            burst = leader.call("invoke", method="burst_report")
            if burst is None:
                time.sleep(0.05)
        if burst is None:
            raise TimeoutError("the leader's burst did not finish")
        time.sleep(0.3)  # the last deliveries
        if switched is not None:
            after = _involuntary_switches(leader.pid)
            if after is not None:
                out[f"{prefix}leader_preempted_per_event"] = round((after - switched) / events, 3)
        reports = gather(every, "fan_report", 60.0, count=events)
    lead, rest = reports[0], reports[1:]
    lat = [x for r in rest for x in _samples(r["samples"])]
    _put(out, f"{prefix}f", lat)
    for q in ("p50", "p99", "mean"):
        out[f"{prefix}{q}_us"] = out.pop(f"{prefix}f_{q}_us")
    out[f"{prefix}max_us"] = round(max(lat) / 1000.0, 3) if lat else math.nan
    out[f"{prefix}lost"] = sum(r["lost"] for r in rest)
    out[f"{prefix}duplicates"] = sum(r["duplicates"] for r in rest)
    out[f"{prefix}n"] = len(lat)
    _put(out, f"{prefix}leader_local", _samples(lead["samples"]))
    out[f"{prefix}leader_local_lost"] = lead["lost"]
    out[f"{prefix}emit_duration_ms"] = burst["duration_ms"]
    out[f"{prefix}emit_max_late_ms"] = burst["max_late_ms"]
    _put(out, f"{prefix}leader_push_sync", burst["push_ns"])
    out[f"{prefix}dist"] = _dist(lat)


# =========================================================================== 5. failover


def failover(
    trials: int = 20, graceful_trials: int = 5, processes: int = 4, emit_every_ms: float = 10.0, trial_timeout: float = 10.0
) -> dict[str, Any]:
    """``processes`` workers, all subscribed, the real DataClient ticking every 10 ms;
    one follower calls in a loop; SIGKILL the leader (then: the leader closes).

    Per trial: kill-to-first-success (a call answered by another pid, ended after the
    kill, in the calling follower, against the shared monotonic clock), calls failed,
    and whether every survivor received an event from the new leader."""
    out: dict[str, Any] = {"trials": trials, "graceful_trials": graceful_trials, "processes": processes}
    port, secret = free_port(), _secret()
    join_kw = {
        "port": port,
        "secret": secret,
        "dc_kwargs": {"emit_every_ms": emit_every_ms, "key": KEY},
        "options": {"response_timeout": 5.0, "max_wait_time": 15.0},
    }
    kill_rows: list[dict[str, Any]] = []
    grace_rows: list[dict[str, Any]] = []
    with UpstreamServer() as up, AgentSet() as s:
        join_kw["upstream_port"] = up.port
        members: list[Agent] = []

        def add(n: int) -> None:
            new = s.spawn(n, tag="f")
            infos = gather(new, "join", JOIN_TIMEOUT, **join_kw)
            _LOOPS.update(i.get("loop", "?") for i in infos if i["is_leader"])
            gather(new, "subscribe", 30.0, key=KEY, live_timeout=15.0)
            members.extend(new)

        add(processes)
        for i in range(trials + graceful_trials):
            graceful = i >= trials
            rows = grace_rows if graceful else kill_rows
            row: dict[str, Any] = {"trial": i}
            try:
                roles = gather(members, "role", 15.0)
                leaders = [a for a, r in zip(members, roles, strict=False) if r["is_leader"]]
                if len(leaders) != 1:
                    raise RuntimeError(f"{len(leaders)} leaders before the trial")
                old = leaders[0]
                caller = next(a for a in members if a is not old)
                caller.call("caller_start", 10.0, method="echo_pid")
                time.sleep(0.2)
                if graceful:
                    t_ref = old.call("close_client", 10.0, background=True)["t_close_ns"]
                else:
                    t_ref = time.monotonic_ns()
                    os.kill(old.pid, signal.SIGKILL)
                res = caller.call("caller_result", trial_timeout + 20.0, old_pid=old.pid, t_ref_ns=t_ref, timeout=trial_timeout)
                row.update(res)
                members.remove(old)
                if graceful:
                    old.stop(10.0)
                else:
                    old.kill()
                s.discard(old)
                new_pid = res["new_pid"]
                if new_pid is None:
                    roles = gather(members, "role", 15.0)
                    new_pid = next((r["pid"] for r in roles if r["is_leader"]), None)
                if new_pid is not None:
                    subs = gather(members, "sub_wait", trial_timeout + 5.0, pid=new_pid, t_ref_ns=t_ref, timeout=trial_timeout)
                    row["subs_ok"] = all(x["ok"] for x in subs)
                    firsts = [x["first_ms"] for x in subs if x["first_ms"] is not None]
                    row["resubscribed_ms"] = max(firsts) if firsts and row["subs_ok"] else None
                else:
                    row["subs_ok"] = False
                row["leaders_after"] = sum(1 for r in gather(members, "role", 15.0) if r["is_leader"])
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                # start over from a clean group so later trials still mean something
                for a in members:
                    a.kill()
                    s.discard(a)
                members.clear()
                port = free_port()
                join_kw["port"] = port
            rows.append(row)
            missing = processes - len(members)
            if missing > 0:
                try:
                    add(missing)
                except Exception as exc:
                    row.setdefault("error", f"refill: {type(exc).__name__}: {str(exc)[:300]}")
                    break
    _fail_summary(out, "kill", kill_rows)
    _fail_summary(out, "graceful", grace_rows)
    out["kill_trials"] = kill_rows
    out["graceful_trials_detail"] = grace_rows
    return out


def _fail_summary(out: dict[str, Any], prefix: str, rows: list[dict[str, Any]]) -> None:
    times = [r["first_success_ms"] for r in rows if r.get("first_success_ms") is not None]
    out[f"{prefix}_n"] = len(rows)
    out[f"{prefix}_recovered"] = len(times)
    out[f"{prefix}_first_success_median_ms"] = round(statistics.median(times), 3) if times else math.nan
    out[f"{prefix}_first_success_max_ms"] = round(max(times), 3) if times else math.nan
    out[f"{prefix}_failed_calls_total"] = sum(r.get("failed", 0) for r in rows)
    out[f"{prefix}_failed_calls_max"] = max((r.get("failed", 0) for r in rows), default=0)
    out[f"{prefix}_subs_ok"] = sum(1 for r in rows if r.get("subs_ok"))
    resub = [r["resubscribed_ms"] for r in rows if r.get("resubscribed_ms") is not None]
    out[f"{prefix}_resubscribed_median_ms"] = round(statistics.median(resub), 3) if resub else math.nan
    out[f"{prefix}_resubscribed_max_ms"] = round(max(resub), 3) if resub else math.nan
    out[f"{prefix}_errors"] = sum(1 for r in rows if r.get("error"))
    out[f"{prefix}_split_brain"] = sum(1 for r in rows if r.get("leaders_after", 1) != 1)
    errs = sorted({e for r in rows for e in r.get("errors", [])})
    if errs:
        out[f"{prefix}_call_error_types"] = errs


# =========================================================================== 6. memory


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@contextlib.contextmanager
def _bytecode() -> Iterator[None]:
    """Compile connshare and the bench DataClient into ``__pycache__`` (as an installed
    package has it) while a worker starts; remove what this wrote afterwards, so that
    runs importing from source stay that way."""
    root = Path(__file__).resolve().parent.parent
    written = []
    try:
        for src in [*sorted((root / "connshare").glob("*.py")), root / "benchmarks" / "_dataclient.py"]:
            cfile = importlib.util.cache_from_source(str(src))
            if not os.path.exists(cfile):
                py_compile.compile(str(src), cfile=cfile, doraise=True)
                written.append(cfile)
        yield
    finally:
        for cfile in written:
            with contextlib.suppress(OSError):
                os.remove(cfile)


def _measure_worker(
    w: Agent, out: dict[str, Any], suffix: str, preload: list[str], port: int, secret: str, upstream_port: int, subscriptions: int
) -> None:
    before = w.call("preload", modules=preload) if preload else w.call("gc")
    if before["connshare_loaded"] or before["msgpack_loaded"]:
        raise RuntimeError(f"the fresh worker has connshare/msgpack loaded already: {before}")
    rss0 = _rss(w.pid)
    w.call("import")
    rss1 = _rss(w.pid)
    info = w.call("join", JOIN_TIMEOUT, port=port, secret=secret, upstream_port=upstream_port)
    if info["is_leader"]:
        raise RuntimeError("the memory worker became the leader")
    rss2 = _rss(w.pid)
    subs = w.call("sub_many", 60.0, n=subscriptions, timeout=30.0)
    time.sleep(0.2)
    rss3 = _rss(w.pid)
    out[f"worker_added_mb{suffix}"] = round((rss3 - rss0) / MIB, 2)
    out[f"worker_import_mb{suffix}"] = round((rss1 - rss0) / MIB, 2)
    out[f"worker_join_mb{suffix}"] = round((rss2 - rss1) / MIB, 2)
    out[f"worker_subs_mb{suffix}"] = round((rss3 - rss2) / MIB, 2)
    out[f"worker_rss_baseline_mb{suffix}"] = round(rss0 / MIB, 2)
    out[f"worker_subs_live{suffix}"] = subs["keys_seen"]
    w.stop()


def memory(subscriptions: int = 100, calls: int = 1_000_000, chunks: int = 10, followers: int = 3, inflight: int = 100) -> dict[str, Any]:
    """RSS a worker adds by importing connshare and holding a follower client with
    ``subscriptions`` subscriptions; the leader's RSS over ``calls`` calls."""
    out: dict[str, Any] = {"subscriptions": subscriptions, "calls": calls, "chunks": chunks}
    port, secret = free_port(), _secret()
    with UpstreamServer() as up, AgentSet() as s:
        leader, fs = _leader_and_followers(s, followers, up, port, secret)
        leader.call("invoke", method="start_ticker", args=[None, 20.0, -1])  # every subscribed key
        # --- a fresh worker: nothing of connshare loaded yet, connshare's bytecode
        # compiled, as a pip install leaves it; the same importing from source (the
        # editable tree, no bytecode written: compiling costs RSS too); one with
        # asyncio loaded already
        for suffix, preload, compiled in (("", [], True), ("_from_source", [], False), ("_asyncio_preloaded", ["asyncio"], True)):
            with _bytecode() if compiled else contextlib.nullcontext():
                (w,) = s.spawn(1, tag="mem")
                _measure_worker(w, out, suffix, preload, port, secret, up.port, subscriptions)
            s.discard(w)
        leader.call("invoke", method="stop_ticker")
        # --- the leader under 1,000,000 calls (coroutine and blocking echo mixed)
        per = max(1, calls // chunks // followers)
        samples = [_rss(leader.pid)]
        done = 0
        errors = 0
        for _ in range(chunks):
            start = time.monotonic_ns() + int(0.05e9)
            res = gather(fs, "tp_async", 300.0, total=per, inflight=inflight, warmup=0, start_at_ns=start, mix=True)
            done += sum(r["completed"] for r in res)
            errors += sum(r["errors"] for r in res)
            samples.append(_rss(leader.pid))
        out["leader_calls"] = done
        out["leader_call_errors"] = errors
        out["leader_rss_start_mb"] = round(samples[0] / MIB, 2)
        out["leader_rss_warm_mb"] = round(samples[1] / MIB, 2)
        out["leader_rss_end_mb"] = round(samples[-1] / MIB, 2)
        out["leader_rss_growth_pct"] = round((samples[-1] - samples[1]) / samples[1] * 100.0, 2)
        out["leader_rss_mb_by_chunk"] = [round(x / MIB, 2) for x in samples]
    return out
