"""What both example apps answer about the worker that serves a request."""

from __future__ import annotations

import os
from typing import Any

from .client import ConfigClient


def primary_key() -> str:
    return os.environ.get("CONFIG_KEYS", "greeting").split(",")[0].strip()


def describe(config: ConfigClient) -> dict[str, Any]:
    """The worker's pid, its role, and the config values it holds (from its cache)."""
    snapshot = config.snapshot()
    key = primary_key()
    return {
        "pid": os.getpid(),
        "is_leader": config.is_leader,
        "leader_pid": config.leader_pid,
        "role": config.role,
        "ready": config.is_ready,
        "key": key,
        "value": snapshot.get(key),
        "config": snapshot,
    }


def hold_seconds(ms: str | None) -> float:
    """The ``?hold_ms=`` test hook: how long to keep the worker busy (at most 0.2 s)."""
    return min(max(float(ms), 0.0), 200.0) / 1000 if ms else 0.0
