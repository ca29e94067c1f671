"""A Flask app under gunicorn; every worker holds the config, one of them the Redis
connections.

    REDIS_URL=redis://127.0.0.1:6379/0 CONNSHARE_PORT=26437 \\
        gunicorn --workers 4 --bind 127.0.0.1:8000 'examples.redis_config.wsgi_app:create_app()'

``create_app()`` is the app factory: gunicorn calls it in each worker, after the fork,
so each worker creates its own client and the first one to bind ``CONNSHARE_PORT``
leads. With ``--preload`` gunicorn calls it once in the master, before forking: that
is safe too (connshare notices the fork, and each worker joins the cluster again on its
own); the master, having created the client first, is then the leader.

To keep the master out of it with ``--preload``, create the client in gunicorn's
``post_fork`` hook instead (see ``gunicorn_conf.py``) and let the factory leave it to
the hook: ``'examples.redis_config.wsgi_app:create_app(eager=False)'``.

``GET /`` answers which worker pid answered, whether it leads, and the config it
holds; ``PUT /config/<key>`` (body: the value) sets a value through the leader.
``?hold_ms=N`` keeps the worker busy for N ms (at most 200), so that concurrent
requests spread over the workers (the integration tests use it).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any

from flask import Flask, jsonify, request

from .client import ConfigClient
from .report import describe, hold_seconds

_config: ConfigClient | None = None
_lock = threading.Lock()


def get_config() -> ConfigClient:
    """This process's client, created on the first call (from ``ConfigClient.from_env()``).

    It returns once the client is ready and holds its first values (or after 10 s):
    with ``--preload`` this runs in the master, and the threads the client starts
    there (connshare's, and the Redis reader if the master leads) must be done with
    their start-up before gunicorn forks the workers. A fork while another thread
    imports a module breaks that module in the child."""
    global _config
    with _lock:
        if _config is None:
            _config = ConfigClient.from_env()
            atexit.register(_config.close)  # a clean exit hands the leadership on at once
            _config.settle(10.0)
        return _config


def create_app(config: ConfigClient | None = None, *, eager: bool = True) -> Flask:
    """The app factory. ``eager``: create this process's client now (else on the first
    request, or in gunicorn's ``post_fork`` hook)."""
    if config is None and eager:
        config = get_config()
    app = Flask(__name__)

    def current() -> ConfigClient:
        return config if config is not None else get_config()

    @app.get("/")
    def index() -> Any:
        time.sleep(hold_seconds(request.args.get("hold_ms")))
        return jsonify(describe(current()))

    @app.put("/config/<key>")
    def put_config(key: str) -> Any:
        current().set(key, request.get_data(as_text=True))  # a blocking call: fine in a sync worker
        return jsonify({"pid": os.getpid(), "key": key, "ok": True})

    return app
