"""pylm: clusters of microservers over ZeroMQ.

Servers are classes whose public methods take and return bytes; see
:mod:`pylm.standalone` for request/reply servers and their clients.
"""

from pylm.errors import (
    InstanceLost,
    InvalidName,
    NoInstance,
    NoWiring,
    PayloadTooLarge,
    ProtocolError,
    PylmError,
    RegistryError,
    RegistryUnavailable,
    RemoteError,
    RequestTimeout,
    ServerCrashed,
    UnknownFunction,
    UnknownKey,
    UnknownServer,
)

__version__ = "0.1.0"

__all__ = [
    "InstanceLost",
    "InvalidName",
    "NoInstance",
    "NoWiring",
    "PayloadTooLarge",
    "ProtocolError",
    "PylmError",
    "RegistryError",
    "RegistryUnavailable",
    "RemoteError",
    "RequestTimeout",
    "ServerCrashed",
    "UnknownFunction",
    "UnknownKey",
    "UnknownServer",
    "__version__",
]
