"""Real servers for the integration tests: redis-server, and the example apps under
gunicorn and uvicorn. Each runs in its own process group (session), on a free port,
and is killed, group and all, by :meth:`stop`."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import redis

REPO = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    from tests.conftest import pick_port  # one allocator for every test of a run

    return pick_port()


def deadline_loop(timeout: float, what: str, interval: float = 0.02) -> Any:
    """Yield until the deadline, then fail naming ``what`` (poll; never sleep for luck)."""
    end = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def wait_until(pred: Callable[[], Any], timeout: float, what: Any) -> Any:
    for _ in deadline_loop(timeout, what):
        v = pred()
        if v:
            return v
    return None  # unreachable


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (its session: start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNSHARE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        assert REDIS_SERVER is not None
        self.workdir = workdir
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None
        for _ in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--protected-mode", "no", "--dir", str(workdir), "--logfile", str(self.log), "--daemonize", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            self.client = redis.Redis(port=self.port, socket_timeout=5)
            try:
                if self._wait_up():
                    return
            except BaseException:
                self.stop()
                raise
            kill_group(self.proc)
        raise RuntimeError(f"redis-server did not start:\n{_tail(self.log)}")

    def _wait_up(self) -> bool:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                return False  # port taken meanwhile, most likely
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                time.sleep(0.02)
        return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def connections(self, name: str) -> int:
        return len(self.connection_ids(name))

    def connection_ids(self, name: str) -> set[str]:
        """Redis's ids of the connections named ``name`` (CLIENT LIST)."""
        return {c["id"] for c in self.client.client_list() if c.get("name") == name}

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None:
            kill_group(self.proc)


def _gunicorn_has(flag: str) -> bool:
    import gunicorn.config

    return any(flag in (s.cli or ()) for s in gunicorn.config.KNOWN_SETTINGS)


class AppServer:
    """One of the example apps under gunicorn (WSGI) or uvicorn (ASGI)."""

    def __init__(
        self,
        kind: str,
        workers: int,
        workdir: Path,
        env: dict[str, str],
        *,
        preload: bool = False,
        conf: str | None = None,
        app: str | None = None,
    ) -> None:
        self.kind = kind
        self.workers = workers
        self.log = workdir / f"{kind}-{workers}w-{time.monotonic_ns()}.log"
        self.pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="http")
        self.proc: subprocess.Popen | None = None
        #: every answer a sweep got
        self.answers: list[dict] = []
        for _ in range(3):
            self.port = free_port()
            if kind == "gunicorn":
                cmd = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind", f"127.0.0.1:{self.port}",
                       "--worker-class", "sync", "--graceful-timeout", "5", "--log-level", "warning"]  # fmt: skip
                if _gunicorn_has("--no-control-socket"):
                    cmd.append("--no-control-socket")  # gunicorn 24+: else every server shares ~/.gunicorn/gunicorn.ctl
                if preload:
                    cmd.append("--preload")
                if conf:
                    cmd += ["-c", conf]
                cmd.append(app or "examples.redis_config.wsgi_app:create_app()")
            else:
                cmd = [sys.executable, "-m", "uvicorn", "examples.redis_config.asgi_app:app", "--workers", str(workers),
                       "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--lifespan", "on"]  # fmt: skip
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                if self._wait_serving():
                    return
            except BaseException:
                self.stop()
                raise
            kill_group(self.proc)  # most likely the port was taken meanwhile: again, on another
        self.pool.shutdown(wait=False)
        raise RuntimeError(f"{kind} did not start:\n{_tail(self.log)}")

    def _wait_serving(self) -> bool:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                r = self.get()
            except OSError:
                time.sleep(0.05)
                continue
            return "pid" in r
        return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, hold_ms: int = 0, timeout: float = 10) -> dict:
        with urllib.request.urlopen(f"{self.url}/?hold_ms={hold_ms}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def put(self, key: str, value: str) -> dict:
        req = urllib.request.Request(f"{self.url}/config/{key}", data=value.encode(), method="PUT")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def worker_pids(self) -> set[int]:
        """The live workers: children of the master that are not multiprocessing's
        resource tracker (uvicorn spawns one) and not dead yet. ``uvicorn --workers 1``
        has no supervisor: the one process serves."""
        assert self.proc is not None
        if self.kind == "uvicorn" and self.workers == 1:
            return {self.proc.pid} if self.proc.poll() is None else set()  # no supervisor: it serves itself
        pids = set()
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return set()
        for c in children:
            try:
                if c.status() == psutil.STATUS_ZOMBIE or any("resource_tracker" in part for part in c.cmdline()):
                    continue
            except psutil.Error:
                continue
            pids.add(c.pid)
        return pids

    def sweep(self, n: int = 8, hold_ms: int = 30) -> list[dict | Exception]:
        """``n`` concurrent requests; each keeps its worker busy ``hold_ms``, so the
        others get some. Exceptions are returned, not raised."""

        def one() -> dict | Exception:
            try:
                return self.get(hold_ms)
            except Exception as exc:
                return exc

        got = list(self.pool.map(lambda _: one(), range(n)))
        self.answers.extend(r for r in got if not isinstance(r, Exception))
        return got

    def wait_all(self, pred: Callable[[dict], bool], what: str, timeout: float = 45) -> tuple[dict[int, dict], list[Exception]]:
        """Poll over HTTP until every one of the ``workers`` live worker pids has
        answered with a response that satisfies ``pred``. Returns those responses
        (by pid) and every failed request meanwhile."""
        latest: dict[int, dict] = {}
        failures: list[Exception] = []
        end = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            for r in self.sweep():
                if isinstance(r, Exception):
                    failures.append(r)
                elif pred(r):
                    latest[r["pid"]] = r
                else:
                    latest.pop(r["pid"], None)
            if len(pids) == self.workers and pids <= latest.keys():
                return {p: latest[p] for p in pids}, failures
            if time.monotonic() > end:
                raise AssertionError(
                    f"{self.kind}: timed out after {timeout} s waiting for {what}; live workers {sorted(pids)}, "
                    f"satisfied {sorted(latest)}, failures {failures[-3:]}\n--- log:\n{_tail(self.log)}"
                )

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
        self.pool.shutdown(wait=False, cancel_futures=True)


def run_in_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout (or anything else) kill its group."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)  # also reaps anything it left behind in its group
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
