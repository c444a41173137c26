"""The service registry (etcd): records of running servers and their wiring."""

from pylm.registry.client import DEFAULT_TTL, Registration, Registry
from pylm.registry.config import RegistryConfig
from pylm.registry.local import LocalEtcd, LocalEtcdCluster
from pylm.registry.records import InstanceRecord, MalformedRecord, StageConfig

__all__ = [
    "DEFAULT_TTL",
    "InstanceRecord",
    "LocalEtcd",
    "LocalEtcdCluster",
    "MalformedRecord",
    "Registration",
    "Registry",
    "RegistryConfig",
    "StageConfig",
]
