"""The whole benchmark suite: ``python -m benchmarks`` / ``python benchmarks/run.py``.

Runs the Python baselines and every connshare workload, each ``--runs`` times (3 by
default), prints the comparison table (with the stored Node.js cluster-client
figures; ``--reference`` re-runs Node.js too), merges everything into
``results/latest.json`` and draws ``results/*.png`` (when matplotlib, the ``bench``
extra, is installed).

``--quick`` runs small sizes in under a minute and writes ``results/quick.json`` and
``results/quick/*.png`` instead, so a smoke run never overwrites the full results.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import baselines, connshare_bench, reference
from benchmarks._agent import reap_all
from benchmarks._common import LATEST_JSON, QUICK_JSON, RESULTS_DIR, record_workload, summarize_all

# name -> (function, full kwargs, quick kwargs)
# (quick None: not run by --quick)
CONNSHARE: dict[str, tuple[Callable[..., dict[str, Any]], dict[str, Any], dict[str, Any] | None]] = {
    "connshare_connections": (connshare_bench.connections, {"ws": (1, 2, 4, 8, 16, 32)}, {"ws": (1, 4)}),
    "connshare_call": (connshare_bench.call_latency, {"n": 20000, "warmup": 1000}, {"n": 1000, "warmup": 200}),
    "connshare_throughput": (
        connshare_bench.throughput,
        {"per_follower": 50000, "inflight": 100, "threads": 8, "per_thread": 2000},
        {"per_follower": 2000, "inflight": 100, "threads": 8, "per_thread": 100, "warmup": 100},
    ),
    "connshare_fanout": (
        connshare_bench.fanout,
        {"subscribers": 4, "events": 1000, "leader_nice": -5},
        {"subscribers": 4, "events": 50},  # --quick stays under a minute
    ),
    "connshare_fanout_16": (connshare_bench.fanout, {"subscribers": 16, "events": 1000}, None),
    "connshare_fanout_32": (connshare_bench.fanout, {"subscribers": 32, "events": 1000}, None),
    "connshare_failover": (connshare_bench.failover, {"trials": 20, "graceful_trials": 5}, {"trials": 1, "graceful_trials": 1}),
    "connshare_memory": (connshare_bench.memory, {"calls": 1_000_000, "chunks": 10}, {"calls": 9_000, "chunks": 3}),
}
GROUPS = {
    "baselines": list(baselines.WORKLOADS),
    "reference": ["reference"],
    "connections": ["connshare_connections"],
    "call": ["connshare_call"],
    "throughput": ["connshare_throughput"],
    "fanout": ["connshare_fanout", "connshare_fanout_16", "connshare_fanout_32"],
    "failover": ["connshare_failover"],
    "memory": ["connshare_memory"],
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _brief(result: dict[str, Any]) -> str:
    keys = [k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={result[k]}" for k in keys[:14])


def connshare_state() -> dict[str, Any]:
    """What was measured: the commit, whether connshare/ had local changes, the loop."""
    import hashlib
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    info: dict[str, Any] = {}
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "connshare"], cwd=root, capture_output=True, text=True, timeout=10).stdout
        info["connshare_dirty"] = bool(diff)
        info["connshare_diff_sha1"] = hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import uvloop  # noqa: F401

        info["uvloop_installed"] = True
    except ImportError:
        info["uvloop_installed"] = False
    info["CONNSHARE_LOOP"] = os.environ.get("CONNSHARE_LOOP")
    return info


def _run_one(name: str, fn: Callable[..., dict[str, Any]], kw: dict[str, Any], runs: int, path: Path, quick: bool, source: str) -> None:
    collected: list[dict[str, Any]] = []
    connshare_bench._LOOPS.clear()
    for r in range(runs):
        t0 = time.monotonic()
        try:
            res = fn(**kw)
        except Exception as exc:  # record the failure and go on with the suite
            _log(f"[{name} run {r + 1}/{runs}] FAILED: {exc!r}\n{traceback.format_exc(limit=6)}")
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res["elapsed_s"] = round(time.monotonic() - t0, 3)
        collected.append(res)
        _log(f"[{name} run {r + 1}/{runs}] {res['elapsed_s']:.1f} s: {_brief(res)}")
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    params.update({"quick": quick, "payload": "x*100", "runs": runs})
    record_workload(
        name,
        collected,
        params=params,
        extra={"source": source, "connshare_state": {**connshare_state(), "leader_event_loops": connshare_bench.loops_seen()}},
        path=path,
    )


def run_reference(runs: int, quick: bool, path: Path) -> None:
    clock = reference.check_node_clock()
    got: list[dict[str, Any]] = []
    for r in range(runs):
        t0 = time.monotonic()
        res = reference.run_node_reference(quick=quick)
        if res is None:
            _log("reference: Node.js run unavailable; keeping the stored figures")
            return
        _log(f"[reference run {r + 1}/{runs}] {time.monotonic() - t0:.1f} s")
        got.append(res)
    meta = {k: got[0][k] for k in ("node", "cluster_client_version", "sdk_base_version", "config")}
    for phase, name in reference.WORKLOAD_NAMES.items():
        phase_runs = [reference._flatten(r[phase]) for r in got]
        extra = {"source": "benchmarks.reference", "reference": meta, "node_clock_check": clock}
        record_workload(name, phase_runs, params={"quick": quick, "payload": "x*100", "runs": runs}, extra=extra, path=path)


def _copy_stored(names: list[str], path: Path) -> None:
    """For a quick run: bring the stored full-run entries of ``names`` into ``path``."""
    if path == LATEST_JSON or not LATEST_JSON.exists():
        return
    stored = json.loads(LATEST_JSON.read_text()).get("workloads", {})
    data = json.loads(path.read_text()) if path.exists() else {"workloads": {}}
    for n in names:
        if n in stored:
            data.setdefault("workloads", {})[n] = stored[n]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# =========================================================================== the table


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, (int, float)):
        if float(x).is_integer() and abs(x) < 1000:
            return str(int(x))
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"
    return str(x)


def _stat(w: dict[str, Any], name: str, key: str) -> dict[str, Any] | None:
    s = w.get(name, {}).get("summary", {}).get(key)
    if not s or not s.get("n"):
        return None
    return s


def _med(w: dict[str, Any], name: str, key: str) -> float | None:
    s = _stat(w, name, key)
    return None if s is None else s["median"]


def _cell(w: dict[str, Any], name: str, keys: list[str]) -> str:
    """'p50 / p99 (min..max / min..max)' style: median (min..max) for each key."""
    parts = []
    for k in keys:
        s = _stat(w, name, k)
        parts.append("n/a" if s is None else f"{_fmt(s['median'])} ({_fmt(s['min'])}..{_fmt(s['max'])})")
    return " / ".join(parts)


def _plain(w: dict[str, Any], name: str, keys: list[str]) -> str:
    vals = [_med(w, name, k) for k in keys]
    return " / ".join(_fmt(v) for v in vals)


def _polling_rows() -> list[tuple[str, tuple[str, list[str]], Any, Any, str, Any]]:
    """The call workload's pairs with the opt-in polling options, and CPU per call."""
    polls = (("spin", "spin_wait=0.1 ms"), ("lspin", "leader_spin_wait=0.1 ms"), ("bspin", "both 0.1 ms"))
    callers = (("blocking caller", "sync_aecho"), ("asyncio caller", "async_aecho"))
    shown: list[tuple[str, list[str]]] = []
    for prefix, what in polls:
        for caller, v in callers:
            shown.append((f"Call µs p50 / p99, {what}: {caller}, coroutine echo", [f"{prefix}_{v}_p50_us", f"{prefix}_{v}_p99_us"]))
        blocking = [f"{prefix}_sync_echo_p50_us", f"{prefix}_async_echo_p50_us"]
        shown.append((f"Call µs p50, {what}: blocking caller, blocking echo / asyncio caller, blocking echo", blocking))
    heads = "default / spin_wait / leader_spin_wait / both"
    for whose, suffix in (("Caller's", "cpu_us"), ("Leader process's", "leader_cpu_us")):
        for caller, v in callers:
            keys = [f"{v}_{suffix}"] + [f"{prefix}_{v}_{suffix}" for prefix, _ in polls]
            shown.append((f"{whose} CPU µs per call, {caller}, coroutine echo: {heads}", keys))
    return [(label, ("connshare_call", keys), None, None, "", None) for label, keys in shown]


# (label, ours (workload, keys), node (workload, keys) | None, basemanager | None, target text, check)
ROWS: list[tuple[str, tuple[str, list[str]], Any, Any, str, Any]] = [
    (
        "Call µs p50 / p99: blocking caller, coroutine echo",
        ("connshare_call", ["sync_aecho_p50_us", "sync_aecho_p99_us"]),
        ("cluster_client_call", ["p50_us", "p99_us"]),
        ("basemanager_echo", ["p50_us", "p99_us"]),
        "<= 45 / 90",
        ("le", [45, 90]),
    ),
    (
        "Call µs p50 / p99: asyncio caller, coroutine echo",
        ("connshare_call", ["async_aecho_p50_us", "async_aecho_p99_us"]),
        ("cluster_client_call", ["p50_us", "p99_us"]),
        None,
        "<= 45 / 90",
        ("le", [45, 90]),
    ),
    (
        "Call µs p50 / p99: blocking caller, blocking echo",
        ("connshare_call", ["sync_echo_p50_us", "sync_echo_p99_us"]),
        None,
        ("basemanager_echo", ["p50_us", "p99_us"]),
        "<= 70 / 140",
        ("le", [70, 140]),
    ),
    (
        "Call µs p50 / p99: asyncio caller, blocking echo",
        ("connshare_call", ["async_echo_p50_us", "async_echo_p99_us"]),
        None,
        None,
        "<= 70 / 140",
        ("le", [70, 140]),
    ),
    *_polling_rows(),
    (
        "Call µs p50 / p99: leader's own call, blocking echo",
        ("connshare_call", ["leader_echo_p50_us", "leader_echo_p99_us"]),
        ("cluster_client_call", ["leader_local_p50_us", "leader_local_p99_us"]),
        None,
        "",
        None,
    ),
    (
        "Call µs p50 / p99: leader's own call, coroutine echo",
        ("connshare_call", ["leader_aecho_p50_us", "leader_aecho_p99_us"]),
        ("cluster_client_call", ["leader_local_p50_us", "leader_local_p99_us"]),
        None,
        "",
        None,
    ),
    (
        "Call µs p50 / p99: leader's own call, coroutine echo, asyncio caller on the app's loop",
        ("connshare_call", ["leader_async_aecho_p50_us", "leader_async_aecho_p99_us"]),
        None,
        None,
        "",
        None,
    ),
    ("Call µs p50 / p99: direct method call (in-process)", ("direct_call", ["p50_us", "p99_us"]), None, None, "", None),
    (
        "Raw floor µs p50 / p99: blocking socket ping-pong",
        ("raw_pingpong", ["p50_us", "p99_us"]),
        ("node_raw_pingpong", ["p50_us", "p99_us"]),
        None,
        "",
        None,
    ),
    (
        "Minimal pair µs p50 / p99: asyncio server answering inline, caller reads its own answer (no connshare)",
        ("asyncio_pair", ["inline_p50_us", "inline_p99_us"]),
        None,
        None,
        "",
        None,
    ),
    (
        "Minimal pair µs p50 / p99: the same, answering from a Task per call (coroutine echo)",
        ("asyncio_pair", ["task_p50_us", "task_p99_us"]),
        None,
        None,
        "",
        None,
    ),
    (
        "Throughput calls/s: 3 followers x 100 in flight",
        ("connshare_throughput", ["async_calls_per_s"]),
        ("cluster_client_throughput", ["calls_per_s"]),
        None,
        ">= 100,000",
        ("ge", [100000]),
    ),
    (
        "Throughput calls/s: 3 followers x 100 in flight, leader_nice=-5",
        ("connshare_throughput", ["nice_async_calls_per_s"]),
        None,
        None,
        "",
        None,
    ),
    (
        "Throughput calls/s: 3 followers x 8 threads, blocking",
        ("connshare_throughput", ["threads_calls_per_s"]),
        None,
        ("basemanager_throughput", ["calls_per_s"]),
        "",
        None,
    ),
    (
        "Fan-out µs p50 / p99, 4 subscribed (3 followers)",
        ("connshare_fanout", ["p50_us", "p99_us"]),
        ("cluster_client_fanout", ["p50_us", "p99_us"]),
        None,
        "<= 150 / 600",
        ("le", [150, 600]),
    ),
    (
        "Fan-out µs p50 / p99, 4 subscribed, leader_nice=-5",
        ("connshare_fanout", ["nice_p50_us", "nice_p99_us"]),
        None,
        None,
        "",
        None,
    ),
    (
        "Fan-out: the leader preempted, per event: default / leader_nice=-5",
        ("connshare_fanout", ["leader_preempted_per_event", "nice_leader_preempted_per_event"]),
        None,
        None,
        "",
        None,
    ),
    (
        "Fan-out floor µs p50 / p99: 100 bytes to 3 idle processes in turn (no connshare)",
        ("fanout_floor", ["p50_us", "p99_us"]),
        None,
        None,
        "",
        None,
    ),
    ("Fan-out lost events, 4 subscribed", ("connshare_fanout", ["lost"]), ("cluster_client_fanout", ["lost"]), None, "0", ("le", [0])),
    ("Fan-out µs p50 / p99, 16 subscribed", ("connshare_fanout_16", ["p50_us", "p99_us"]), None, None, "", None),
    ("Fan-out lost events, 16 subscribed", ("connshare_fanout_16", ["lost"]), None, None, "0", ("le", [0])),
    ("Fan-out µs p50 / p99, 32 subscribed", ("connshare_fanout_32", ["p50_us", "p99_us"]), None, None, "", None),
    ("Fan-out lost events, 32 subscribed", ("connshare_fanout_32", ["lost"]), None, None, "0", ("le", [0])),
    (
        "Failover ms, SIGKILL to first success: median / max",
        ("connshare_failover", ["kill_first_success_median_ms", "kill_first_success_max_ms"]),
        None,
        None,
        "<= 10 / 20",
        ("le", [10, 20]),
    ),
    (
        "Failover floor ms: SIGKILL of a 30 MB process to its port free, median / max (no connshare)",
        ("failover_floor", ["port_free_median_ms", "port_free_max_ms"]),
        None,
        None,
        "",
        None,
    ),
    ("Failover: failed calls per kill (max over trials)", ("connshare_failover", ["kill_failed_calls_max"]), None, None, "", None),
    (
        "Failover: trials where every survivor kept receiving",
        ("connshare_failover", ["kill_subs_ok", "kill_n"]),
        None,
        None,
        "all",
        ("all", []),
    ),
    (
        "Graceful handoff: failed calls (total over trials)",
        ("connshare_failover", ["graceful_failed_calls_total"]),
        None,
        None,
        "0",
        ("le", [0]),
    ),
    (
        "Graceful handoff ms, close to first success: median / max",
        ("connshare_failover", ["graceful_first_success_median_ms", "graceful_first_success_max_ms"]),
        None,
        None,
        "",
        None,
    ),
    (
        "Upstream connections, 32 workers: connshare / direct",
        ("connshare_connections", ["w32_connshare_upstream", "w32_direct_upstream"]),
        None,
        None,
        "1 / 32",
        None,
    ),
    (
        "TCP sockets held, 32 workers: connshare / direct",
        ("connshare_connections", ["w32_connshare_tcp_sockets", "w32_direct_tcp_sockets"]),
        None,
        None,
        "",
        None,
    ),
    (
        "RSS added to a worker, MB (import + follower + 100 subs)",
        ("connshare_memory", ["worker_added_mb"]),
        None,
        None,
        "<= 12",
        ("le", [12]),
    ),
    (
        "RSS added to a worker, MB, importing from source (no bytecode)",
        ("connshare_memory", ["worker_added_mb_from_source"]),
        None,
        None,
        "",
        None,
    ),
    ("Leader RSS growth over 1,000,000 calls, %", ("connshare_memory", ["leader_rss_growth_pct"]), None, None, "<= 5", ("le", [5])),
]


def _verdict(w: dict[str, Any], name: str, keys: list[str], check: Any) -> str:
    if check is None:
        return ""
    kind, limits = check
    vals = [_med(w, name, k) for k in keys]
    if any(v is None for v in vals):
        return "n/a"
    if kind == "all":
        return "met" if vals[0] == vals[1] else "MISSED"
    ok = (
        all(v <= lim for v, lim in zip(vals, limits, strict=False))
        if kind == "le"
        else all(v >= lim for v, lim in zip(vals, limits, strict=False))
    )
    return "met" if ok else "MISSED"


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    w = data.get("workloads", {})
    lines = [
        "| workload | connshare: median (min..max) | Node cluster-client 3.7.0 | BaseManager | target | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, (name, keys), node, bm, target, check in ROWS:
        ours = _cell(w, name, keys)
        node_s = _plain(w, *node) if node else ""
        bm_s = _plain(w, *bm) if bm else ""
        lines.append(f"| {label} | {ours} | {node_s} | {bm_s} | {target} | {_verdict(w, name, keys, check)} |")
    return "\n".join(lines)


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute; writes results/quick.json")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each workload (default 3)")
    parser.add_argument("--only", help="comma-separated groups: " + ",".join(GROUPS))
    parser.add_argument("--reference", action="store_true", help="run the Node.js reference too (~70 s); default: show its stored figures")
    parser.add_argument("--no-plots", action="store_true", help="do not draw results/*.png")
    parser.add_argument("--table-only", action="store_true", help="print the table of the stored results and exit")
    args = parser.parse_args(argv)
    path = QUICK_JSON if args.quick else LATEST_JSON
    if args.table_only:
        print(table(path))
        return 0
    groups = [g.strip() for g in args.only.split(",")] if args.only else list(GROUPS)
    for g in groups:
        if g not in GROUPS:
            parser.error(f"unknown group {g!r}; choose from {', '.join(GROUPS)}")
    run_ref = bool(args.reference)
    runs = max(1, args.runs)

    atexit.register(reap_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    if args.quick:
        _copy_stored([*list(reference.WORKLOAD_NAMES.values()), "basemanager_throughput"], path)
    try:
        for g in groups:
            for name in GROUPS[g]:
                if name == "reference":
                    if run_ref:
                        run_reference(runs, args.quick, path)
                elif name in baselines.WORKLOADS:
                    if args.quick and name == "basemanager_throughput":
                        continue  # 3 s a run; the stored full figure is shown
                    sizes = baselines.QUICK if args.quick else baselines.FULL
                    _run_one(name, baselines.WORKLOADS[name], sizes[name], runs, path, args.quick, "benchmarks.baselines")
                else:
                    fn, full, quick = CONNSHARE[name]
                    if args.quick and quick is None:
                        continue
                    _run_one(name, fn, quick if args.quick else full, runs, path, args.quick, "benchmarks.connshare_bench")
    finally:
        reap_all()
    _log(f"suite: {time.monotonic() - t_start:.0f} s")
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    print(f"\nconnshare benchmarks ({'quick' if args.quick else 'full'}, {runs} runs; results in {shown})")
    print(table(path))
    if not args.no_plots:
        try:
            from benchmarks import plots
        except ImportError as exc:
            print(f"plots: skipped ({exc}); pip install '.[bench]' for matplotlib")
        else:
            out_dir = RESULTS_DIR if not args.quick else RESULTS_DIR / "quick"
            for p in plots.draw_all(path, out_dir):
                print(f"plot: {p}")
    return 0


__all__ = ["main", "summarize_all", "table"]
