"""PNG plots of a results file (needs matplotlib: ``pip install '.[bench]'``).

``python -m benchmarks.plots [results.json] [out_dir]`` redraws them from stored results.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks._common import LATEST_JSON, RESULTS_DIR

DIST_Q = [i / 100 for i in range(1, 100)] + [0.995, 0.999]


def _summary(w: dict[str, Any], name: str, key: str) -> dict[str, float] | None:
    s = w.get(name, {}).get("summary", {}).get(key)
    return s if s and s.get("n") else None


def _median_run(w: dict[str, Any], name: str, key: str) -> dict[str, Any] | None:
    """The run whose ``key`` is the median (so a plotted curve is a real run)."""
    runs = [r for r in w.get(name, {}).get("runs", []) if isinstance(r.get(key), (int, float))]
    if not runs:
        return None
    runs.sort(key=lambda r: r[key])
    return runs[len(runs) // 2]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def connections(w: dict[str, Any], out: Path) -> Path | None:
    name = "connshare_connections"
    runs = w.get(name, {}).get("runs", [])
    if not runs or "ws" not in runs[0]:
        return None
    ws = runs[0]["ws"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [
        ("direct_upstream", "upstream connections, each worker direct", "tab:red", "-"),
        ("connshare_upstream", "upstream connections, connshare", "tab:blue", "-"),
        ("direct_tcp_sockets", "TCP sockets held, direct", "tab:red", ":"),
        ("connshare_tcp_sockets", "TCP sockets held, connshare (incl. loopback)", "tab:blue", ":"),
    ]
    for key, label, color, style in series:
        ys = [(_summary(w, name, f"w{x}_{key}") or {}).get("median") for x in ws]
        ax.plot(ws, ys, style, marker="o", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ws, [str(x) for x in ws])
    ax.set_xlabel("worker processes W (started at once)")
    ax.set_ylabel("count (median of runs)")
    ax.set_title("Connections vs workers")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "connections.png")


LAT_LABELS = {
    "sync_echo": "follower: blocking caller, blocking echo",
    "sync_aecho": "follower: blocking caller, coroutine echo",
    "async_aecho": "follower: asyncio caller, coroutine echo",
    "async_echo": "follower: asyncio caller, blocking echo",
    "leader_aecho": "leader's own call, coroutine echo",
    "leader_async_aecho": "leader's own call, coroutine echo, asyncio caller",
    "leader_echo": "leader's own call, blocking echo",
    "spin_sync_aecho": "follower, spin_wait=0.1 ms: blocking caller, coroutine echo",
    "spin_async_aecho": "follower, spin_wait=0.1 ms: asyncio caller, coroutine echo",
    "bspin_sync_aecho": "follower, both polls 0.1 ms: blocking caller, coroutine echo",
    "bspin_async_aecho": "follower, both polls 0.1 ms: asyncio caller, coroutine echo",
}


def latency(w: dict[str, Any], out: Path) -> Path | None:
    name = "connshare_call"
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for v, label in LAT_LABELS.items():
        run = _median_run(w, name, f"{v}_p50_us")
        if run is None or not run.get("dist", {}).get(v):
            continue
        # the opt-in polling pairs dashed: the default's colours repeat after ten
        ax.plot(run["dist"][v], [q * 100 for q in DIST_Q], "--" if "spin_" in v else "-", label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    refs = [
        ("raw_pingpong", "raw socket floor p50", "black"),
        ("basemanager_echo", "BaseManager p50", "tab:gray"),
        ("cluster_client_call", "Node cluster-client p50", "tab:purple"),
    ]
    for ref, label, color in refs:
        s = _summary(w, ref, "p50_us")
        if s:
            ax.axvline(s["median"], color=color, linestyle="--", linewidth=1, label=f"{label} ({s['median']:.0f} µs)")
    for t, c in ((45, "tab:green"), (70, "tab:olive")):
        ax.axvline(t, color=c, linestyle=":", linewidth=1, label=f"target p50 {t} µs")
    ax.set_xscale("log")
    ax.set_xlabel("call latency, µs (log)")
    ax.set_ylabel("percentile")
    ax.set_title("Call latency distribution, 20,000 sequential calls (median run)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "latency.png")


def fanout(w: dict[str, Any], out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for name, label in (
        ("connshare_fanout", "4 subscribed"),
        ("connshare_fanout_16", "16 subscribed"),
        ("connshare_fanout_32", "32 subscribed"),
    ):
        run = _median_run(w, name, "p50_us")
        if run is None or not run.get("dist"):
            continue
        ax.plot(run["dist"], [q * 100 for q in DIST_Q], label=f"connshare, {label}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    s = _summary(w, "cluster_client_fanout", "p50_us")
    if s:
        ax.axvline(
            s["median"],
            color="tab:purple",
            linestyle="--",
            linewidth=1,
            label=f"Node cluster-client p50, 4 subscribed ({s['median']:.0f} µs)",
        )
    ax.axvline(150, color="tab:green", linestyle=":", linewidth=1, label="target p50 150 µs")
    ax.set_xscale("log")
    ax.set_xlabel("delivery latency in followers, µs (log)")
    ax.set_ylabel("percentile")
    ax.set_title("Fan-out: 1,000 events 10 ms apart (median run)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "fanout.png")


def throughput(w: dict[str, Any], out: Path) -> Path | None:
    bars = [
        ("connshare\n3 x 100 in flight", "connshare_throughput", "async_calls_per_s", "tab:blue"),
        ("connshare\nleader_nice=-5", "connshare_throughput", "nice_async_calls_per_s", "tab:green"),
        ("Node cluster-client\n3 x 100 in flight", "cluster_client_throughput", "calls_per_s", "tab:purple"),
        ("connshare\n3 x 8 threads", "connshare_throughput", "threads_calls_per_s", "tab:cyan"),
        ("BaseManager\n3 x 8 threads", "basemanager_throughput", "calls_per_s", "tab:gray"),
    ]
    labels, meds, lo, hi, colors = [], [], [], [], []
    for label, name, key, color in bars:
        s = _summary(w, name, key)
        if not s:
            continue
        labels.append(label)
        meds.append(s["median"])
        lo.append(s["median"] - s["min"])
        hi.append(s["max"] - s["median"])
        colors.append(color)
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    ax.bar(labels, meds, yerr=[lo, hi], color=colors, capsize=4)
    ax.axhline(100_000, color="tab:green", linestyle=":", label="target 100,000 calls/s")
    ax.set_ylabel("calls/s (median, min..max)")
    ax.set_title("Aggregate throughput, echo of 100 characters")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "throughput.png")


def failover(w: dict[str, Any], out: Path) -> Path | None:
    runs = w.get("connshare_failover", {}).get("runs", [])
    kill = [t["first_success_ms"] for r in runs for t in r.get("kill_trials", []) if t.get("first_success_ms") is not None]
    grace = [t["first_success_ms"] for r in runs for t in r.get("graceful_trials_detail", []) if t.get("first_success_ms") is not None]
    if not kill and not grace:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if kill:
        ax.plot(range(1, len(kill) + 1), kill, "o", color="tab:red", label=f"SIGKILL leader (median {statistics.median(kill):.1f} ms)")
    if grace:
        ax.plot(range(1, len(grace) + 1), grace, "s", color="tab:blue", label=f"leader closes (median {statistics.median(grace):.1f} ms)")
    ax.axhline(10, color="tab:green", linestyle=":", label="target median 10 ms")
    ax.axhline(20, color="tab:olive", linestyle=":", label="target max 20 ms")
    ax.set_xlabel("trial (all runs)")
    ax.set_ylabel("kill / close to first successful call, ms")
    ax.set_title("Failover, 4 processes, every one subscribed")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "failover.png")


def memory(w: dict[str, Any], out: Path) -> Path | None:
    runs = w.get("connshare_memory", {}).get("runs", [])
    runs = [r for r in runs if r.get("leader_rss_mb_by_chunk")]
    if not runs:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for i, r in enumerate(runs):
        ys = r["leader_rss_mb_by_chunk"]
        xs = [k * r["leader_calls"] / (len(ys) - 1) / 1000 for k in range(len(ys))]
        a1.plot(xs, ys, marker="o", label=f"run {i + 1}: {r['leader_rss_growth_pct']:+.2f}% after warm-up")
    a1.set_xlabel("calls served by the leader, thousands")
    a1.set_ylabel("leader RSS, MB")
    a1.set_title("Leader RSS under 1,000,000 calls")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    parts = [("import connshare", "worker_import_mb"), ("follower client", "worker_join_mb"), ("100 subscriptions", "worker_subs_mb")]
    vals = [(_summary(w, "connshare_memory", k) or {}).get("median", 0.0) for _, k in parts]
    bottom = 0.0
    for (label, _), v in zip(parts, vals, strict=False):
        a2.bar(["worker"], [v], bottom=bottom, label=f"{label}: {v:.1f} MB")
        bottom += v
    a2.axhline(12, color="tab:green", linestyle=":", label="target 12 MB")
    a2.set_ylabel("RSS added, MB (median)")
    a2.set_title("RSS added to a worker")
    a2.legend(fontsize=8)
    return _save(fig, out / "memory.png")


def draw_all(path: Path = LATEST_JSON, out_dir: Path = RESULTS_DIR) -> list[Path]:
    w = json.loads(path.read_text()).get("workloads", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = []
    for fn in (connections, latency, throughput, fanout, failover, memory):
        p = fn(w, out_dir)
        if p is not None:
            drawn.append(p)
    return drawn


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else LATEST_JSON
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else RESULTS_DIR
    for p in draw_all(src, dst):
        print(p)
