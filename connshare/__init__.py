"""connshare: the worker processes of one host share one upstream connection.

Every process calls ``cluster(MyDataClient, name=..., port=...).delegate("get").create(...)``;
the process that binds the port is the leader and builds the one real client, the
others forward their calls and subscriptions to it over msgpack on loopback TCP.
"""

from ._base import Base
from ._cluster import APIClientBase, ClusterBuilder, ClusterClient, cluster
from ._errors import (
    AuthenticationError,
    CallError,
    CallTimeoutError,
    ChannelDownError,
    ChannelNotFoundError,
    ClientClosedError,
    ConcurrencyError,
    ConfigurationError,
    ConnshareError,
    ElectionError,
    EncodeError,
    FrameTooLargeError,
    LeaderLostError,
    LeaderNotFoundError,
    LeaderUnresponsiveError,
    LimitExceededError,
    MethodNotAllowedError,
    NotReadyError,
    NotSentError,
    PortInUseError,
    ProtocolError,
    ProtocolVersionError,
    RemoteError,
    RemoteTraceback,
)
from ._options import DEFAULT_PORT, Options
from ._protocol import PROTOCOL_VERSION, Transcode

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PORT",
    "PROTOCOL_VERSION",
    "APIClientBase",
    "AuthenticationError",
    "Base",
    "CallError",
    "CallTimeoutError",
    "ChannelDownError",
    "ChannelNotFoundError",
    "ClientClosedError",
    "ClusterBuilder",
    "ClusterClient",
    "ConcurrencyError",
    "ConfigurationError",
    "ConnshareError",
    "ElectionError",
    "EncodeError",
    "FrameTooLargeError",
    "LeaderLostError",
    "LeaderNotFoundError",
    "LeaderUnresponsiveError",
    "LimitExceededError",
    "MethodNotAllowedError",
    "NotReadyError",
    "NotSentError",
    "Options",
    "PortInUseError",
    "ProtocolError",
    "ProtocolVersionError",
    "RemoteError",
    "RemoteTraceback",
    "Transcode",
    "__version__",
    "cluster",
]
