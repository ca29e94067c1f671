"""A Redis configuration watcher shared by the processes of a host; see README.md."""

from .client import (
    DEFAULT_CLIENT_NAME,
    DEFAULT_PREFIX,
    DEFAULT_URL,
    AsyncConfigClient,
    AsyncRedisConfigClient,
    ConfigClient,
    RedisConfigClient,
    app_connections,
    aset_config,
    set_config,
)

__all__ = [
    "DEFAULT_CLIENT_NAME",
    "DEFAULT_PREFIX",
    "DEFAULT_URL",
    "AsyncConfigClient",
    "AsyncRedisConfigClient",
    "ConfigClient",
    "RedisConfigClient",
    "app_connections",
    "aset_config",
    "set_config",
]
