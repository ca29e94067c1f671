"""Helpers shared by the whole benchmark suite.

* :func:`percentiles` turns per-call timings (ns) into p50/p99/mean in microseconds.
* :func:`summarize_runs` / :func:`summarize_all` give median/min/max over repeated runs.
* :func:`record_workload` writes or merges one workload into ``results/latest.json``.
* :class:`UpstreamServer` is a tiny threaded echo server speaking length-prefixed
  msgpack frames, which stands in for "the upstream" in connection-sharing benchmarks.
* :func:`free_port`, :func:`send_frame` / :func:`recv_frame` for the same wire format.

All clocks used across processes are ``CLOCK_MONOTONIC`` (``time.monotonic_ns`` in
Python, ``process.hrtime.bigint`` in Node.js on Linux), which is system-wide.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import struct
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST_JSON = RESULTS_DIR / "latest.json"
#: where ``--quick`` runs write, so that a smoke run never replaces the full results
QUICK_JSON = RESULTS_DIR / "quick.json"

HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024

__all__ = [
    "HEADER",
    "LATEST_JSON",
    "QUICK_JSON",
    "UpstreamServer",
    "free_port",
    "host_info",
    "percentiles",
    "print_summary",
    "record_workload",
    "recv_exact",
    "recv_frame",
    "send_frame",
    "summarize_all",
    "summarize_runs",
    "write_results",
]


# --------------------------------------------------------------------------- statistics


def _rank(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of already sorted values."""
    idx = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def percentiles(samples_ns: Iterable[int | float]) -> dict[str, float]:
    """p50/p99/mean of per-call timings given in ns, reported in microseconds."""
    values = sorted(samples_ns)
    n = len(values)
    if n == 0:
        return {"p50_us": math.nan, "p99_us": math.nan, "mean_us": math.nan, "n": 0}
    return {
        "p50_us": round(_rank(values, 0.50) / 1000.0, 3),
        "p99_us": round(_rank(values, 0.99) / 1000.0, 3),
        "mean_us": round(math.fsum(values) / n / 1000.0, 3),
        "n": n,
    }


def summarize_runs(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, float]:
    """Median, min and max of ``run[key]`` over runs (runs lacking a number are skipped)."""
    values = [
        float(r[key])
        for r in runs
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and not math.isnan(float(r[key]))
    ]
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize_all(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """:func:`summarize_runs` for every numeric key found in any run."""
    keys: list[str] = []
    for r in runs:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    return {k: summarize_runs(runs, k) for k in keys}


def _fmt(x: float) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.2f}" if abs(x) >= 10 else f"{x:.3f}"


def print_summary(name: str, summary: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> None:
    """One line per key: median (min..max) over runs, to stdout."""
    for k in keys:
        s = summary.get(k)
        if s is None or not s.get("n"):
            continue
        print(f"  {name:<34} {k:<24} {_fmt(s['median']):>12}  ({_fmt(s['min'])} .. {_fmt(s['max'])}, runs={s['n']})")


# --------------------------------------------------------------------------- results file


def host_info() -> dict[str, Any]:
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover - non-Unix
        load = []
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg": [round(x, 2) for x in load],
    }


def _json_safe(value: Any) -> Any:
    """NaN/inf become None so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def record_workload(
    name: str,
    runs: Sequence[Mapping[str, Any]],
    *,
    params: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    path: Path = LATEST_JSON,
) -> dict[str, Any]:
    """Merge one workload (its runs plus their summary) into the results JSON file.

    Other workloads already in the file are kept; an entry of the same name is
    replaced. The file is written atomically (``*.tmp`` then rename).
    """
    entry: dict[str, Any] = {
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "params": dict(params or {}),
        "host": host_info(),
        "summary": summarize_all(runs),
        "runs": [dict(r) for r in runs],
    }
    if extra:
        entry.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
    workloads = data.setdefault("workloads", {})
    workloads[name] = _json_safe(entry)
    data["updated"] = entry["updated"]
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return entry


def write_results(filename: str, data: Mapping[str, Any]) -> Path:
    """Write a tool's own results file (``results/<filename>``) in one piece."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / filename
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------- sockets


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (racy by nature: bind it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes; raise ``ConnectionError`` on EOF."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    sock.sendall(HEADER.pack(len(body)) + body)


def recv_frame(sock: socket.socket) -> Any:
    (length,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    if length > MAX_FRAME:
        raise ConnectionError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return msgpack.unpackb(recv_exact(sock, length), raw=False)


class UpstreamServer:
    """Threaded TCP echo server on 127.0.0.1 that counts its connections.

    Protocol: frames of a 4-byte big-endian length plus msgpack. A request
    ``[id, "echo", payload]`` is answered ``[id, payload]``; any other method gets
    ``[id, None, "unknown method ..."]``. ``connections_current`` and
    ``connections_total`` count accepted connections (open now / ever).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._requested_port = port
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self.connections_total = 0
        self.requests_total = 0
        self.address: tuple[str, int] = (host, port)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def connections_current(self) -> int:
        with self._lock:
            return len(self._conns)

    def start(self) -> UpstreamServer:
        if self._listener is not None:
            raise RuntimeError("already started")
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((self._host, self._requested_port))
        lst.listen(128)
        lst.settimeout(0.1)  # so the accept loop notices stop() promptly
        self._listener = lst
        self.address = lst.getsockname()[:2]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="upstream-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and join all threads."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in conns:
            thread.join(timeout)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(sock,), name="upstream-conn", daemon=True)
            with self._lock:
                self._conns[sock] = thread
                self.connections_total += 1
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    req = recv_frame(sock)
                except (ConnectionError, OSError, ValueError):
                    break
                if isinstance(req, list) and len(req) == 3 and req[1] == "echo":
                    reply: list[Any] = [req[0], req[2]]
                else:
                    rid = req[0] if isinstance(req, list) and req else None
                    reply = [rid, None, f"unknown method {req!r:.60}"]
                with self._lock:
                    self.requests_total += 1
                try:
                    send_frame(sock, reply)
                except OSError:
                    break
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            sock.close()
