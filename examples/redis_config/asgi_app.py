"""A Starlette app under uvicorn; every worker holds the config, one of them the Redis
connections.

    REDIS_URL=redis://127.0.0.1:6379/0 CONNSHARE_PORT=26438 \\
        uvicorn examples.redis_config.asgi_app:app --workers 4 --host 127.0.0.1 --port 8001

uvicorn starts its workers with the ``spawn`` method: each imports this module anew.
The client is created in the lifespan's startup, inside each worker's event loop
(which serves only once the client is ready and holds the first values), and
closed at its shutdown (a clean exit hands the leadership on at once). The leader runs
:class:`AsyncRedisConfigClient` (``redis.asyncio``) on connshare's own loop; the
subscription listeners run on the worker's loop, since they were registered from it.

``GET /`` answers which worker pid answered, whether it leads, and the config it
holds; ``PUT /config/{key}`` (body: the value) sets a value through the leader.
``?hold_ms=N`` blocks the worker's loop for N ms (at most 200) on purpose, so that
concurrent requests spread over the workers (the integration tests use it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .client import AsyncConfigClient
from .report import describe, hold_seconds


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    config = AsyncConfigClient.from_env()
    app.state.config = config
    try:
        # Serve once the values are in: a worker that answers before would
        # answer None for a key that holds a value (a new worker, on a recycle).
        await config.asettle(10.0)
        yield
    finally:
        await config.aclose()


async def index(request: Request) -> JSONResponse:
    time.sleep(hold_seconds(request.query_params.get("hold_ms")))  # blocks this worker: see the docstring
    return JSONResponse(describe(request.app.state.config))


async def put_config(request: Request) -> JSONResponse:
    key = request.path_params["key"]
    await request.app.state.config.aset(key, (await request.body()).decode())
    return JSONResponse({"pid": os.getpid(), "key": key, "ok": True})


app = Starlette(
    routes=[Route("/", index), Route("/config/{key}", put_config, methods=["PUT"])],
    lifespan=lifespan,
)
