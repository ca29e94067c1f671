"""gunicorn settings that create the config client in each worker right after the fork.

    REDIS_URL=redis://127.0.0.1:6379/0 CONNSHARE_PORT=26437 \\
        gunicorn -c examples/redis_config/gunicorn_conf.py --preload \\
        'examples.redis_config.wsgi_app:create_app(eager=False)'

With ``--preload`` the app is imported and built once in the master; ``eager=False``
keeps the factory from creating the client there, and ``post_fork`` creates it in
every worker. So the master holds no connshare client, and one of the workers leads.
Command-line options override the settings below.
"""

from __future__ import annotations

import os
from typing import Any

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))


def post_fork(server: Any, worker: Any) -> None:
    from examples.redis_config.wsgi_app import get_config

    get_config()
