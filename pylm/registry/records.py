"""What the registry stores, and where.

Key layout, under the cluster's prefix ``/pylm/<cluster>/``::

    instances/<name>/<instance-id>   InstanceRecord as JSON, under a lease
    config/<name>                    the desired wiring, JSON {"next": ...}, no lease
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["InstanceRecord", "config_key", "instance_key", "instances_prefix"]


def instances_prefix(prefix: str, name: str | None = None) -> str:
    """The prefix of every instance key, or of those of server ``name``."""
    return f"{prefix}instances/" + (f"{name}/" if name is not None else "")


def instance_key(prefix: str, name: str, instance: str) -> str:
    return f"{instances_prefix(prefix, name)}{instance}"


def config_key(prefix: str, name: str) -> str:
    return f"{prefix}config/{name}"


@dataclass
class InstanceRecord:
    """One running server instance, as it registers itself."""

    name: str
    kind: str
    endpoints: dict[str, str]
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    next: str | None = None
    branches: list[str] = field(default_factory=list)  # more next calls (handle_stream)
    tee: list[str] = field(default_factory=list)  # calls that get a copy of every result
    functions: list[str] = field(default_factory=list)
    metrics: str | None = None
    curve: str | None = None  # the server's CURVE public key (Z85), when it requires CURVE
    version: str = ""
    started: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> InstanceRecord:
        """Parse a record; ``ValueError`` saying what is wrong if it is not one."""
        try:
            data: Any = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc}): {raw[:120]!r}") from None
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object: {raw[:120]!r}")
        try:
            record = cls(**data)
        except TypeError as exc:
            raise ValueError(f"not an instance record ({exc}): {raw[:120]!r}") from None
        if not isinstance(record.name, str) or not isinstance(record.endpoints, dict):
            raise ValueError(f"record without a name or endpoints: {raw[:120]!r}")
        return record
