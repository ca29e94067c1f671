"""Threads that run the real client's blocking methods for followers, so the
leader's loop keeps serving. Lighter than ThreadPoolExecutor on the hot path: no
Future per call; each job finishes by writing its own answer."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("connshare.workers")


class WorkerPool:
    """Up to ``size`` daemon threads, started as the load needs them."""

    def __init__(self, size: int, name: str = "connshare-worker") -> None:
        self._size = size
        self._name = name
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Run ``job(*args)`` on a worker thread; it must not raise."""
        with self._lock:
            # Claim an idle thread for this job, or start one: a burst must not
            # queue behind the one thread that happened to be idle.
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self._size and not self._closed:
                t = threading.Thread(target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        self._q.put((job, args))

    def _run(self) -> None:
        get = self._q.get
        while True:
            item = get()
            if item is None:
                return
            job, args = item
            try:
                job(*args)
            except Exception:
                log.exception("connshare worker job failed")
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._q.put(None)
