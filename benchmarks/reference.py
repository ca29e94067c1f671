"""The Node.js reference: cluster-client 3.7.0 on the same workloads as connshare.

:func:`run_node_reference` installs the pinned npm packages in ``reference_node/`` if
``node_modules`` is missing, runs ``bench.js`` under a timeout (killing its whole
process group if it overruns) and returns its JSON, or ``None`` with a printed reason
when Node.js/npm is unavailable or the run fails.

    python -m benchmarks.reference            # full sizes, 3 runs
    python -m benchmarks.reference --quick    # small sizes, for a smoke run

Results go to ``benchmarks/results/latest.json`` as the workloads
``cluster_client_call``, ``cluster_client_throughput``, ``cluster_client_fanout`` and
``node_raw_pingpong`` (a control: plain Node.js TCP ping-pong, no cluster-client).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import LATEST_JSON, QUICK_JSON, print_summary, record_workload, summarize_all

NODE_DIR = Path(__file__).resolve().parent / "reference_node"
INSTALL_TIMEOUT = 300.0
QUICK_TIMEOUT = 90.0
FULL_TIMEOUT = 240.0
PHASES = ("raw", "call", "throughput", "fanout")
WORKLOAD_NAMES = {
    "raw": "node_raw_pingpong",  # control: plain Node.js TCP, no cluster-client
    "call": "cluster_client_call",
    "throughput": "cluster_client_throughput",
    "fanout": "cluster_client_fanout",
}
SHOWN = {
    "raw": ["p50_us", "p99_us"],
    "call": ["p50_us", "p99_us", "leader_local_p50_us"],
    "throughput": ["calls_per_s", "errors"],
    "fanout": ["p50_us", "p99_us", "lost", "duplicates", "leader_local_p50_us"],
}


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        # TimeoutExpired, KeyboardInterrupt, ...: nothing of that group may survive
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    finally:
        # bench.js reaps its children; this is the belt to those braces
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_installed() -> str | None:
    """Install node_modules if missing. Returns a reason string on failure."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node and/or npm not found on PATH"
    if (NODE_DIR / "node_modules" / "cluster-client" / "package.json").exists():
        return None
    locked = (NODE_DIR / "package-lock.json").exists()
    cmd = [npm, "ci" if locked else "install", "--no-audit", "--no-fund", "--loglevel=error"]
    print(f"reference: installing npm packages ({' '.join(cmd[1:])}) in {NODE_DIR}", file=sys.stderr)
    try:
        res = _run(cmd, NODE_DIR, INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"npm install timed out after {INSTALL_TIMEOUT:.0f} s"
    if res.returncode != 0:
        return f"npm failed with exit code {res.returncode}:\n{_tail(res.stderr)}"
    return None


def run_node_reference(quick: bool = False, phases: tuple[str, ...] = PHASES) -> dict[str, Any] | None:
    """Run ``reference_node/bench.js`` once and return its JSON (``None`` on failure)."""
    reason = ensure_installed()
    if reason is not None:
        print(f"reference: skipped: {reason}")
        return None
    node = shutil.which("node")
    assert node is not None
    timeout = QUICK_TIMEOUT if quick else FULL_TIMEOUT
    cmd = [node, "bench.js", "--phases", ",".join(phases), "--timeout-s", str(int(timeout))]
    if quick:
        cmd.append("--quick")
    try:
        # bench.js has its own overall timeout; ours is a little longer
        res = _run(cmd, NODE_DIR, timeout + 15)
    except subprocess.TimeoutExpired:
        print(f"reference: skipped: bench.js did not finish within {timeout + 15:.0f} s")
        return None
    if res.returncode != 0:
        print(f"reference: skipped: bench.js exited {res.returncode}:\n{_tail(res.stderr)}")
        return None
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        print(f"reference: skipped: bench.js printed no JSON:\n{_tail(res.stdout)}\n{_tail(res.stderr)}")
        return None
    return result


def check_node_clock(rounds: int = 5) -> dict[str, Any] | None:
    """Is Node's ``process.hrtime.bigint()`` the same clock as ``time.monotonic_ns()``?

    Both should be CLOCK_MONOTONIC on Linux; a node reading taken between two Python
    readings must fall between them.
    """
    node = shutil.which("node")
    if node is None:
        return None
    ok = 0
    for _ in range(rounds):
        before = time.monotonic_ns()
        out = subprocess.run(
            [node, "-e", "process.stdout.write(process.hrtime.bigint().toString())"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        after = time.monotonic_ns()
        ok += before <= int(out) <= after
    return {"rounds": rounds, "within_python_monotonic": ok}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run); writes results/quick.json")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--phases", default=",".join(PHASES), help="subset of " + ",".join(PHASES))
    parser.add_argument("--no-write", action="store_true", help="do not touch results/latest.json")
    args = parser.parse_args(argv)
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    for p in phases:
        if p not in PHASES:
            parser.error(f"unknown phase {p!r}")

    clock = check_node_clock()
    runs: list[dict[str, Any]] = []
    for r in range(max(1, args.runs)):
        t0 = time.monotonic()
        res = run_node_reference(quick=args.quick, phases=phases)
        if res is None:
            return 0 if not runs else 1  # skipped (reason printed) or broke mid-way
        print(f"[run {r + 1}] bench.js took {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        runs.append(res)

    meta = {k: runs[0][k] for k in ("node", "cluster_client_version", "sdk_base_version", "config")}
    print(
        f"cluster-client {meta['cluster_client_version']} on node {meta['node']} "
        f"({'quick' if args.quick else 'full'}, {len(runs)} runs): median (min .. max)"
    )
    for phase in phases:
        name = WORKLOAD_NAMES[phase]
        phase_runs = [_flatten(r[phase]) for r in runs]
        extra = {"source": "benchmarks.reference", "reference": meta, "node_clock_check": clock}
        params = {"quick": args.quick, "payload": "x*100"}
        out = QUICK_JSON if args.quick else LATEST_JSON
        if args.no_write:
            entry = {"summary": summarize_all(phase_runs)}
        else:
            entry = record_workload(name, phase_runs, params=params, extra=extra, path=out)
        summary = entry["summary"]
        print_summary(name, summary, SHOWN[phase])
    return 0


if __name__ == "__main__":
    sys.exit(main())
