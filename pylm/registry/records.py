"""What the registry stores, and where; and the schema every read of it
goes through.

Key layout, under the cluster's prefix ``/pylm/<cluster>/``::

    instances/<name>/<instance-id>   InstanceRecord as JSON, under a lease
    config/<name>                    StageConfig (the wiring) as JSON, no lease

Anyone with write access to etcd can put anything under those keys, and
every process of the cluster acts on what it reads there (connects to the
endpoints, scrapes the metrics URL, trusts the CURVE key). So a record is
parsed, never just loaded: :meth:`InstanceRecord.from_json` and
:meth:`StageConfig.from_json` check every field's presence, type and range,
that the record names the key it was read from, and that endpoints are
addresses a remote peer may legitimately advertise. What fails raises
:class:`MalformedRecord`, naming the field, the offending value and one of
:data:`REASONS` (the label it is counted under). Fields a newer pylm may add
are ignored, so that mixed versions can share a cluster.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pylm.errors import RegistryError
from pylm.names import MAX_NAME, NAME_RULE, InvalidName, check_name

__all__ = [
    "ENDPOINT_SCHEMES",
    "MAX_RECORD_BYTES",
    "REASONS",
    "InstanceRecord",
    "MalformedRecord",
    "StageConfig",
    "check_call",
    "config_key",
    "instance_key",
    "instances_prefix",
    "parse_key",
]

# Why a record was refused: the ``reason`` label of
# ``pylm_registry_records_malformed_total``, a small fixed set.
REASONS = ("size", "json", "missing", "type", "value", "endpoint", "key")

MAX_RECORD_BYTES = 64 * 1024  # a real record is well under 2 KiB
MAX_TEXT = 255  # characters of a host name, a version, an ipc path...
MAX_URL = 512
MAX_ENDPOINTS = 16
MAX_FUNCTIONS = 1024
MAX_CALLS = 64  # branches, tees
# What a remote peer may advertise: TCP, and IPC for servers of one host.
# Not inproc (it names a socket inside the reader's own process), nor
# transports this libzmq build may lack (ws, pgm...).
ENDPOINT_SCHEMES = ("tcp", "ipc")

_SHOWN = 80  # characters of an offending value an error message shows
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BLANK_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # also endpoint roles
_INSTANCE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_MAX_STARTED = 2.0**33  # seconds since the epoch: the year 2242


def instances_prefix(prefix: str, name: str | None = None) -> str:
    """The prefix of every instance key, or of those of server ``name``
    (whole names only: a valid name has no ``/``, so none is the prefix of
    another's keys; :class:`InvalidName` otherwise)."""
    return f"{prefix}instances/" + (f"{check_name(name)}/" if name is not None else "")


def instance_key(prefix: str, name: str, instance: str) -> str:
    return f"{instances_prefix(prefix, name)}{instance}"


def config_key(prefix: str, name: str) -> str:
    return f"{prefix}config/{name}"


class MalformedRecord(RegistryError, ValueError):
    """A registry record (or config) that does not follow the schema.
    ``reason`` is one of :data:`REASONS`, ``field`` the field at fault
    (``""`` for the record as a whole), ``value`` what was there."""

    def __init__(self, reason: str, field: str, value: object, problem: str) -> None:
        self.reason = reason
        self.field = field
        self.value = value
        where = f"field {field!r}" if field else "record"
        super().__init__(f"{where} {problem}, got {_shown(value)}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text)} characters)"


def parse_key(key: str | bytes) -> tuple[str, str, str]:
    """(section, name, instance) of a registry key, full
    (``/pylm/<cluster>/instances/a/1``) or relative to the cluster's prefix
    (``instances/a/1``); section is ``instances`` or ``config``, instance
    ``""`` for a config key. :class:`MalformedRecord` for any other key."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    rest = text
    if text.startswith("/"):  # /pylm/<cluster>/...: cluster names have no '/'
        parts = text.split("/", 3)
        rest = parts[3] if len(parts) == 4 and parts[1] == "pylm" else ""
    section, _, rest = rest.partition("/")
    if section == "config" and rest:
        return section, rest, ""
    if section == "instances":
        name, slash, instance = rest.rpartition("/")
        if slash and name and instance:
            return section, name, instance
    raise MalformedRecord(
        "key", "", text, "is under a key that is not instances/NAME/ID or config/NAME"
    )


# ---------------------------------------------------------------------- fields


def _require(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise MalformedRecord("missing", name, None, "is missing")
    return data[name]


def _string(value: object, field: str, limit: int = MAX_TEXT, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise MalformedRecord("type", field, value, "must be a string")
    if len(value) > limit or (not value and not empty):
        raise MalformedRecord("value", field, value, f"must be 1 to {limit} characters")
    if _CONTROL.search(value):
        raise MalformedRecord("value", field, value, "must not hold control characters")
    return value


def _server_name(value: object, field: str) -> str:
    name = _string(value, field, MAX_NAME)
    try:
        return check_name(name, field)
    except InvalidName:
        raise MalformedRecord("value", field, value, f"must be {NAME_RULE}") from None


def _function_name(value: object, field: str) -> str:
    name = _string(value, field, 128)
    if not name.isidentifier():
        raise MalformedRecord("value", field, value, "must be a Python identifier")
    return name


def check_call(value: object, field: str = "next") -> str:
    """A next call, ``server.function``; :class:`MalformedRecord` if not."""
    call = _string(value, field, MAX_NAME + 129)
    server, dot, function = call.rpartition(".")
    if not dot or not server or not function:
        raise MalformedRecord("value", field, value, "must be of the form 'server.function'")
    _server_name(server, field)
    _function_name(function, field)
    return call


def _list(value: object, field: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedRecord("type", field, value, "must be a list")
    if len(value) > limit:
        raise MalformedRecord("value", field, value, f"must have at most {limit} items")
    return value


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRecord("type", field, value, "must be a number")
    if not math.isfinite(value) or not 0 <= value < _MAX_STARTED:
        raise MalformedRecord("value", field, value, "must be a time in seconds since 1970")
    return float(value)


def _pid(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedRecord("type", field, value, "must be an integer")
    if not 0 < value < 2**31:
        raise MalformedRecord("value", field, value, "must be a process id, 1 to 2**31-1")
    return value


def _host(text: str) -> bool:
    """Whether ``text`` is a host name, an IPv4 address or a bracketed IPv6 one."""
    if text.startswith("[") and text.endswith("]"):
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            return False
        return True
    labels = text.split(".")
    return len(text) <= 253 and all(_LABEL.match(label) for label in labels)


def _host_port(text: str, default_port: bool = False) -> bool:
    host, colon, port = text.rpartition(":")
    if not colon or (host.startswith("[") != host.endswith("]")):
        return default_port and _host(text)
    return _host(host) and bool(_PORT.match(port)) and 0 < int(port) < 65536


def _endpoint(value: object, field: str) -> str:
    address = _string(value, field, MAX_URL)
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ENDPOINT_SCHEMES:
        raise MalformedRecord(
            "endpoint", field, value, f"must be a {' or '.join(ENDPOINT_SCHEMES)}:// address"
        )
    if scheme == "tcp" and not _host_port(rest):
        raise MalformedRecord("endpoint", field, value, "must be tcp://HOST:PORT, port 1-65535")
    if scheme == "ipc" and not 0 < len(rest.encode("utf-8")) <= 100:
        raise MalformedRecord("endpoint", field, value, "must be ipc://PATH of 1 to 100 bytes")
    return address


def _metrics_url(value: object, field: str) -> str | None:
    if value is None:
        return None
    url = _string(value, field, MAX_URL)
    if _BLANK_OR_CONTROL.search(url):
        raise MalformedRecord("endpoint", field, value, "must not hold blanks")
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or "@" in parts.netloc
        or not _host_port(parts.netloc, default_port=True)
    ):
        raise MalformedRecord("endpoint", field, value, "must be an http(s)://HOST[:PORT]/... URL")
    return url


def _curve(value: object, field: str) -> str | None:
    if value is None:
        return None
    key = _string(value, field, 40)
    if not _Z85.match(key):
        raise MalformedRecord("value", field, value, "must be a 40-character Z85 CURVE key")
    return key


def _object(raw: bytes, what: str) -> dict[str, Any]:
    if not isinstance(raw, (bytes, bytearray)):
        raise MalformedRecord("type", "", raw, f"must be the bytes of a {what}")
    if len(raw) > MAX_RECORD_BYTES:
        raise MalformedRecord("size", "", raw, f"must be at most {MAX_RECORD_BYTES} bytes")
    try:
        data: Any = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedRecord("json", "", raw, f"must be JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MalformedRecord("json", "", raw, f"must be a JSON object ({what})")
    return data


# ---------------------------------------------------------------------- records


@dataclass
class InstanceRecord:
    """One running server instance, as it registers itself. The defaults
    describe the process creating a record; a parsed record has them all
    from its JSON (:meth:`from_json`)."""

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
    idempotent: list[str] = field(default_factory=list)  # functions safe to call again
    metrics: str | None = None
    curve: str | None = None  # the server's CURVE public key (Z85), when it requires CURVE
    version: str = ""
    started: float = field(default_factory=time.time)
    master: str | None = None  # a worker's: the master it takes jobs from

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, key: str | bytes) -> InstanceRecord:
        """Parse the record read from ``key`` (see :func:`parse_key`);
        :class:`MalformedRecord` naming the field and value at fault if it
        does not follow the schema. Every field is required, but
        ``idempotent`` and ``master`` (records of servers older than them
        have none)."""
        section, key_name, key_instance = parse_key(key)
        if section != "instances":
            raise MalformedRecord("key", "", key, "is not an instances/NAME/ID key")
        data = _object(raw, "instance record")
        name = _server_name(_require(data, "name"), "name")
        if name != key_name:
            raise MalformedRecord("key", "name", name, f"must be {key_name!r}, the name in its key")
        instance = _require(data, "instance")
        if not isinstance(instance, str):
            raise MalformedRecord("type", "instance", instance, "must be a string")
        if not _INSTANCE.match(instance):
            raise MalformedRecord(
                "value", "instance", instance, "must be 1 to 64 of A-Z a-z 0-9 _ . -"
            )
        if instance != key_instance:
            raise MalformedRecord(
                "key", "instance", instance, f"must be {key_instance!r}, the id in its key"
            )
        kind = _string(_require(data, "kind"), "kind", 32)
        if not _KIND.match(kind):
            raise MalformedRecord(
                "value", "kind", kind, "must be a lower-case word such as 'chained'"
            )
        endpoints = _require(data, "endpoints")
        if not isinstance(endpoints, dict):
            raise MalformedRecord(
                "type", "endpoints", endpoints, "must be an object role -> address"
            )
        if len(endpoints) > MAX_ENDPOINTS:
            raise MalformedRecord(
                "value", "endpoints", endpoints, f"must have at most {MAX_ENDPOINTS} entries"
            )
        for role, address in endpoints.items():
            if not _KIND.match(role):
                raise MalformedRecord("value", "endpoints", role, "roles must be lower-case words")
            _endpoint(address, f"endpoints.{role}")
        host = _string(_require(data, "host"), "host")
        if _BLANK_OR_CONTROL.search(host):
            raise MalformedRecord("value", "host", host, "must not hold blanks")
        next_call = _require(data, "next")
        functions = _list(_require(data, "functions"), "functions", MAX_FUNCTIONS)
        return cls(
            name=name,
            kind=kind,
            endpoints=dict(endpoints),
            instance=instance,
            host=host,
            pid=_pid(_require(data, "pid"), "pid"),
            next=None if next_call is None else check_call(next_call, "next"),
            branches=[
                check_call(call, "branches")
                for call in _list(_require(data, "branches"), "branches", MAX_CALLS)
            ],
            tee=[
                check_call(call, "tee") for call in _list(_require(data, "tee"), "tee", MAX_CALLS)
            ],
            functions=[_function_name(function, "functions") for function in functions],
            idempotent=[
                _function_name(function, "idempotent")
                for function in _list(data.get("idempotent", []), "idempotent", MAX_FUNCTIONS)
            ],
            metrics=_metrics_url(_require(data, "metrics"), "metrics"),
            curve=_curve(_require(data, "curve"), "curve"),
            version=_string(_require(data, "version"), "version", 64, empty=True),
            started=_number(_require(data, "started"), "started"),
            master=None if data.get("master") is None else _server_name(data["master"], "master"),
        )


@dataclass(frozen=True)
class StageConfig:
    """The wiring of stage ``name`` (key ``config/<name>``): where its
    results go, ``next`` (``server.function``). Written by ``pylm topology
    set/apply`` and put back by a running stage that read it (after an etcd
    data loss)."""

    name: str
    next: str

    def __post_init__(self) -> None:
        _server_name(self.name, "name")
        check_call(self.next, "next")

    def to_dict(self) -> dict[str, Any]:
        """The fields stored, as ``Registry.get_config`` returns them."""
        return {"next": self.next}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, key: str | bytes) -> StageConfig:
        """Parse the config read from ``key`` (``config/<name>``);
        :class:`MalformedRecord` if it does not follow the schema."""
        section, name, _ = parse_key(key)
        if section != "config":
            raise MalformedRecord("key", "", key, "is not a config/NAME key")
        data = _object(raw, "stage config")
        return cls(_server_name(name, "name"), check_call(_require(data, "next"), "next"))
