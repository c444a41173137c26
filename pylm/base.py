"""What every pylm server shares: name, logger, lifecycle and dispatch.

A server's serving loop runs in one thread, which owns the server's sockets.
:meth:`BaseServer.start` runs that loop in the calling thread (the 2016
behaviour: it blocks) or, with ``background=True``, in a thread the server
owns; :meth:`BaseServer.stop` ends it from any thread.

Only the public methods that the user's own classes define can be called
remotely: nothing starting with ``_``, nothing the framework classes define,
nothing inherited from ``object``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
import uuid
import warnings
from bisect import bisect_left as _bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter as _perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import zmq

from pylm import protocol
from pylm.errors import (
    InterfaceMismatch,
    PayloadTooLarge,
    PylmError,
    RegistryError,
    RemoteError,
    ServerCrashed,
    UnknownFunction,
    UnknownServer,
)
from pylm.handshakes import watch
from pylm.logs import PushLogHandler, RateLimiter, server_logger
from pylm.names import check_name
from pylm.protocol import DEFAULT_MAX_PAYLOAD
from pylm.security import Curve
from pylm.telemetry.counting import (
    BUCKETS as _BUCKETS,
)
from pylm.telemetry.counting import (
    UNKNOWN_FUNCTION,
    FunctionStats,
    ServerStats,
    metrics_enabled,
)
from pylm.telemetry.exporter import exporter
from pylm.telemetry.exposition import publish, withdraw
from pylm.transport import bind, default_context, public_host

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, Registration, Registry

_FIRST_BOUND = _BUCKETS[0]  # most calls are faster: no search for them

__all__ = ["BaseServer", "Options2016", "ServerOptions", "exposed_functions"]

Function = Callable[[bytes], Any]


class ServerOptions(TypedDict, total=False):
    """The keyword options every server takes (see :class:`BaseServer`)."""

    log_stdout: bool
    max_payload: int
    context: zmq.Context | None
    registry: Registry | str | None
    host: str | None
    ttl: float | None
    metrics: bool | None
    curve: Curve | None
    rolling: bool


@dataclass(frozen=True)
class Options2016:
    """The options a 2016 pylm server took positionally after its addresses.
    Every server still takes them there, in this order (docs/migrating.md),
    and hands them to :class:`BaseServer` as one object. ``messages``: serve
    that many requests, then stop. ``perf_address`` and ``ping_address``
    (standalone and chained servers only) are accepted and ignored, with a
    DeprecationWarning for each one given."""

    log_address: str | None = None
    perf_address: str | None = None
    ping_address: str | None = None
    log_level: int = logging.INFO
    messages: int = sys.maxsize


def exposed_functions(cls: type) -> list[str]:
    """Names of the functions a server class exposes, sorted.

    A framework class marks itself with ``_pylm_framework = True`` in its own
    body; everything those classes define is off limits, and so is every name
    starting with ``_``.
    """
    reserved: set[str] = set(dir(object))
    user_classes = []
    for klass in cls.__mro__:
        if klass is object:
            continue
        if klass.__dict__.get("_pylm_framework", False):
            reserved.update(klass.__dict__)
        else:
            user_classes.append(klass)
    names = set()
    for klass in user_classes:
        for name, value in klass.__dict__.items():
            if name.startswith("_") or name in reserved:
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if callable(value) and not isinstance(value, type):
                names.add(name)
    return sorted(names)


class BaseServer:
    """Base of every server pattern. Subclasses implement :meth:`_open`,
    :meth:`_serve` and :meth:`_close`, all called in the serving thread."""

    _pylm_framework = True
    kind: ClassVar[str] = "base"
    sends_to: ClassVar[str] = "client"  # where results go: "client", or "next" (stage)

    def __init__(
        self,
        name: str,
        *,
        options2016: Options2016 | None = None,
        log_stdout: bool = True,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        context: zmq.Context | None = None,
        registry: Registry | str | None = None,
        host: str | None = None,
        ttl: float | None = None,
        metrics: bool | None = None,
        curve: Curve | None = None,
        rolling: bool = False,
    ) -> None:
        """``options2016``: the options every server takes positionally
        (:class:`Options2016`; default: none given). ``registry`` (a
        :class:`~pylm.registry.Registry` or an ``etcd://`` address; default
        ``PYLM_REGISTRY``), ``host`` (the interface name-only servers bind;
        default ``PYLM_HOST`` or 127.0.0.1) and ``ttl`` (the lease of the
        registration) matter to servers that register themselves. ``metrics``
        (default: on unless ``PYLM_METRICS=0``): count what the server does
        and serve it, with the process's other servers, at ``/metrics``.
        ``rolling``: this is a new version rolling out, whose functions may
        differ from those of the live instances of its name (without it,
        such a server is refused at start: :class:`InterfaceMismatch`)."""
        check_name(name)
        if not isinstance(max_payload, int) or max_payload <= 0:
            raise ValueError(f"max_payload must be a positive int, got {max_payload!r}")
        old = options2016 or Options2016()
        messages = old.messages
        if not isinstance(messages, int) or messages < 0:
            raise ValueError(f"messages must be a non-negative int, got {messages!r}")
        ignored = {"perf_address": old.perf_address, "ping_address": old.ping_address}
        for option, value in ignored.items():
            if value is not None:
                warnings.warn(
                    f"{option}={value!r} is ignored: pylm servers answer pings in the protocol"
                    " (Client.ping) and export metrics to Prometheus",
                    DeprecationWarning,
                    stacklevel=3,
                )
        self.name = name
        # CURVE (pylm.security): given, or from PYLM_CURVE_KEYS; None: plain TCP.
        self.curve = curve if curve is not None else Curve.from_env()
        self.host = host or os.environ.get("PYLM_HOST", "127.0.0.1")
        self.registry_option = registry
        self.rolling = bool(rolling)
        self._public_host: str | None = None  # what a wildcard bind is advertised as
        self.ttl = ttl
        self.registry: Registry | None = None  # set while registered
        self.registration: Registration | None = None
        self._listening: dict[str, str] = {}  # role -> bound address, for the start line
        self._owns_registry = False
        self.messages = messages
        self.served = 0
        self.max_payload = max_payload
        self.context = default_context(context)
        self.logger = server_logger(name, old.log_level, log_stdout)
        self._log_handler: PushLogHandler | None = None
        if old.log_address is not None:
            self._log_handler = PushLogHandler(old.log_address, self.context)
            self.logger.addHandler(self._log_handler)

        self.functions: tuple[str, ...] = tuple(exposed_functions(type(self)))
        prefix = name.encode("utf-8") + b"."
        # Log lines about what peers and functions do wrong, at most one a
        # second per cause (_log_limited): a flood of either must not flood the log.
        self._limiters: dict[str, RateLimiter] = {}
        # Metrics: plain counters written by the serving thread (pylm.telemetry.counting).
        self.stats: ServerStats | None = None
        self.metrics_url: str | None = None  # where this process serves /metrics, once started
        if metrics_enabled(metrics):
            from pylm import __version__

            self.stats = ServerStats(name, self.kind, self.functions, __version__, self.sends_to)
        # One lookup per call finds a function and where its calls are counted.
        self._table: dict[bytes, tuple[Function, FunctionStats | None]] = {
            prefix + fn.encode("utf-8"): (
                getattr(self, fn),
                None if self.stats is None else self.stats.functions[fn],
            )
            for fn in self.functions
        }

        # Lifecycle. The control address and token let stop() wake the
        # serving loop from another thread without sharing a socket.
        self._control_address = f"inproc://pylm-control-{uuid.uuid4().hex}"
        self._control_token = b"pylm-stop-" + os.urandom(16)
        self._lock = threading.Lock()
        self._started = False
        self._ready = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._settled = threading.Event()  # set once ready, or once done
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, background: bool = False, timeout: float = 10.0) -> None:
        """Serve. Blocks until :meth:`stop`, Ctrl-C (KeyboardInterrupt) or the
        ``messages`` limit, unless ``background`` is true; then it returns once
        the server is ready, raising whatever kept it from getting ready within
        ``timeout``."""
        with self._lock:
            if self._started:
                raise RuntimeError(f"server {self.name!r} was already started; create a new one")
            if self._stopping:  # it would bind, then serve nothing: its loop sees the stop
                raise RuntimeError(f"server {self.name!r} was stopped; create a new one")
            self._started = True
            self._done.clear()
        if not background:
            try:
                self._run()
            except KeyboardInterrupt:
                # Ctrl-C is how a server in the foreground is stopped: _run has
                # deregistered it, closed its sockets and said so; start() returns.
                pass
            return
        self._thread = threading.Thread(
            target=self._run, name=f"pylm-server-{self.name}", daemon=True
        )
        self._thread.start()
        if not self._wait_ready_or_done(timeout):
            self.stop()
            raise TimeoutError(f"server {self.name!r} not ready after {timeout} s")
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the sockets; callable from any thread.

        Raises :class:`ServerCrashed` when the serving thread had died of an
        unexpected exception.
        """
        with self._lock:
            started = self._started
            self._stopping = True
        if started and not self._done.is_set():
            self._wake()
            if threading.current_thread() is not self._thread:
                if not self._done.wait(timeout):
                    raise TimeoutError(f"server {self.name!r} did not stop within {timeout} s")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._log_handler is not None:
            self.logger.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        failure = self._failure
        if failure is not None and self._thread is not None:
            self._failure = None
            raise ServerCrashed(f"server {self.name!r} crashed: {failure!r}") from failure

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the server has bound its sockets; False on timeout."""
        return self._ready.wait(timeout)

    @property
    def running(self) -> bool:
        return self._ready.is_set() and not self._done.is_set()

    def __enter__(self) -> BaseServer:
        self.start(background=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready_or_done(self, timeout: float) -> bool:
        return self._settled.wait(timeout)

    def _run(self) -> None:
        endpoint = None
        announced = False  # whether the serving line may be out: the stopped line follows it
        try:
            if self.stats is not None:
                publish(self.stats)
                endpoint = exporter(self.host)
                self.metrics_url = self._advertised(endpoint.acquire())
            self._open()
            if self.stats is not None:
                self.stats.ready = True
            # Logged before start(background=True) returns, so that it is
            # always the first line of a server's life.
            announced = True  # (not _ready: a Ctrl-C between the two skipped the stopped line)
            self.logger.info("%s", self._started_line())
            self._ready.set()
            self._settled.set()
            if not self._stopping:
                self._serve()
        except BaseException as exc:
            if self._thread is not None:
                self._failure = exc
                if self._ready.is_set():  # else start() raises it to its caller
                    self.logger.exception("server %s stopped by an unexpected error", self.name)
            else:
                raise
        finally:
            if self.stats is not None:
                self.stats.ready = False
            try:
                self._deregister()  # first, so that clients stop picking this instance
                self._close()
            finally:
                if self.stats is not None:
                    withdraw(self.stats)
                if endpoint is not None:
                    endpoint.release()
                if announced:  # it said it serves: say it no longer does
                    self.logger.info(
                        "%s (%s) stopped after serving %d message(s)",
                        self.name,
                        self.kind,
                        self.served,
                    )
                self._done.set()
                self._settled.set()

    def _wake(self) -> None:
        socket = self.context.socket(zmq.DEALER)
        try:
            socket.setsockopt(zmq.LINGER, 1000)
            if self.curve is not None:  # the loop's socket takes CURVE clients only
                self.curve.connect(socket, self.curve.keys.public)
            socket.connect(self._control_address)
            # The empty delimiter lets REP and ROUTER receivers alike read it.
            socket.send_multipart([b"", self._control_token], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the loop is gone already; nothing to wake
        finally:
            socket.close()

    def _is_control(self, body: bytes) -> bool:
        return body == self._control_token

    # ------------------------------------------------------------------ registry

    def _register(
        self,
        endpoints: dict[str, str],
        required: bool,
        next: str | None = None,
        branches: list[str] | None = None,
        tee: list[str] | None = None,
    ) -> None:
        """Register this instance, in the serving thread once bound. A server
        started with only a name needs the registry (``required``) and fails
        at once without it; one with explicit addresses registers only when
        given a ``registry``.

        One name, one interface: unless :attr:`rolling`, a server whose
        functions no live instance of its name has is refused
        (:class:`InterfaceMismatch`). Checked before registering, and again
        after, against the instances registered meanwhile: of two such
        servers starting at the same moment, the later to register always
        sees the earlier and is refused (both are, if each sees the other)."""
        from pylm import __version__
        from pylm.registry import DEFAULT_TTL, InstanceRecord
        from pylm.registry.records import MalformedRecord

        self._listening = dict(endpoints)
        if self.registry_option is None and not required:
            return
        try:
            registry = self._registry_client()
            self._check_interface(registry.instances(self.name), None)
            record = InstanceRecord(
                self.name,
                self.kind,
                {role: self._advertised(address) for role, address in endpoints.items()},
                next=next,
                branches=branches or [],
                tee=tee or [],
                functions=list(self.functions),
                metrics=self.metrics_url,
                curve=None if self.curve is None else self.curve.public_key,
                version=__version__,
            )
            self.registration = registry.register(record, self.ttl or DEFAULT_TTL)
            try:
                self._check_interface(registry.instances(self.name), record.instance)
            except InterfaceMismatch:
                registration, self.registration = self.registration, None
                try:
                    registration.close()
                except RegistryError:
                    pass  # it expires with its lease
                raise
            if self.stats is not None:
                self.stats.instance = record.instance
                self.stats.registration = self.registration
                self.stats.registry = registry
        except InterfaceMismatch:
            raise
        except MalformedRecord as exc:  # a record every reader would skip
            message = f"server {self.name!r} cannot register: its record's {exc}"
            raise RegistryError(message) from exc
        except RegistryError as exc:
            raise type(exc)(  # the same kind of error: unavailable, access denied...
                f"server {self.name!r} cannot register: {exc}"
                + (
                    " (it was started with only a name, so it needs the registry)"
                    if required
                    else ""
                )
            ) from exc
        self.logger.debug("%s registered as %s", self.name, self.registration.key)

    def _connects_to(self) -> list[str]:
        """What the start line says this server connects to, besides the
        addresses it listens on: ``["next step2.bar at tcp://..."]``."""
        return []

    def _started_line(self) -> str:
        """The one line a server logs when it starts serving: its name and
        kind, where it listens and connects, its registry, its metrics."""
        where = [f"{role} {address}" for role, address in self._listening.items()]
        where += self._connects_to()
        registry = self.registry
        if self.registration is not None and registry is not None:
            registered = f"cluster {registry.config.cluster!r} at {registry.config.url}"
        else:
            registered = "not registered"
        return (
            f"{self.name} ({self.kind}) serving: {', '.join(where) or 'no address'};"
            f" {registered}; metrics {self.metrics_url or 'off'}"
        )

    def _check_interface(self, records: list[InstanceRecord], own: str | None) -> None:
        """Raise :class:`InterfaceMismatch` unless :attr:`rolling`, or some
        instance in ``records`` (other than ``own``) has this server's
        functions, or there is none. Matching one is enough: more instances
        of a version already rolling out need no flag, nor do instances of
        the old version restarting meanwhile."""
        others = [record for record in records if record.instance != own]
        mine = sorted(set(self.functions))
        if self.rolling or not others:
            return
        live = {record.instance: list(record.functions) for record in others}
        kinds = sorted({record.kind for record in others} - {self.kind})
        if kinds:
            raise InterfaceMismatch(
                f"server {self.name!r} is a {self.kind} server, but the live instances of"
                f" {self.name!r} are {' and '.join(kinds)}: their clients and senders speak to"
                " that kind only. Give it another name, or, if it replaces them on purpose,"
                " start it with rolling=True (pylm run --rolling)",
                functions=mine,
                live=live,
            )
        versions: dict[tuple[str, ...], list[InstanceRecord]] = {}
        for record in others:
            versions.setdefault(tuple(sorted(set(record.functions))), []).append(record)
        if tuple(mine) in versions:
            return

        def where(group: list[InstanceRecord]) -> str:
            shown = [f"{r.instance} on {r.host} pid {r.pid}" for r in group[:3]]
            more = f" and {len(group) - 3} more" if len(group) > 3 else ""
            return ", ".join(shown) + more

        shown = "; ".join(
            f"[{', '.join(functions)}] (instance {where(group)})"
            for functions, group in sorted(versions.items())
        )
        raise InterfaceMismatch(
            f"server {self.name!r} has functions [{', '.join(mine)}], but the live instances"
            f" of {self.name!r} have {shown}: by-name clients would share their calls among"
            " programs that cannot answer all of them. Give it another name, or, if it is a"
            " new version rolling out, start it with rolling=True (pylm run --rolling)",
            functions=mine,
            live=live,
        )

    def _registry_client(self) -> Registry:
        """The registry this server uses: the one it was given, or one it
        opens (from ``PYLM_REGISTRY``) and closes when it stops."""
        from pylm.registry import Registry

        if self.registry is None:
            option = self.registry_option
            if isinstance(option, Registry):
                self.registry = option
            else:
                self.registry = Registry(option)
                self._owns_registry = True
        return self.registry

    def _advertised(self, address: str) -> str:
        """The address others reach a bound ``address`` (``tcp://...``, or
        the ``http://...`` URL of the metrics) at: a wildcard host is
        replaced by this host's name."""
        scheme, _, rest = address.partition("://")
        host, colon, _ = rest.partition("/")[0].rpartition(":")
        if colon and host in ("0.0.0.0", "*", "[::]"):
            if self._public_host is None:
                self._public_host = public_host(self._registry_endpoints())
            return f"{scheme}://{self._public_host}:{rest[len(host) + 1 :]}"
        return address

    def _registry_endpoints(self) -> tuple[tuple[str, int], ...]:
        """The etcd endpoints this server registers at, none if it has no registry."""
        from pylm.registry import Registry, RegistryConfig

        option = self.registry if self.registry is not None else self.registry_option
        try:
            if isinstance(option, Registry):
                return option.config.endpoints
            if option is None:
                return RegistryConfig.from_env().endpoints
            return RegistryConfig.parse(option).endpoints
        except (RegistryError, ValueError):
            return ()

    def _listen(self, socket: zmq.Socket, address: str) -> str:
        """Bind ``socket`` (see :func:`pylm.transport.bind`) and count the
        connections to it that fail their handshake (:mod:`pylm.handshakes`)."""
        bound = bind(socket, address)
        if self.stats is not None:
            watch(socket, self.stats)
        return bound

    def _secure(self, socket: zmq.Socket) -> zmq.Socket:
        """Make ``socket`` (about to bind) a CURVE server, when CURVE is on."""
        if self.curve is not None:
            self.curve.serve(socket)
        return socket

    def _deregister(self) -> None:
        registration, self.registration = self.registration, None
        registry, self.registry = self.registry, None
        try:
            if registration is not None:
                registration.close()
        except RegistryError as exc:
            self.logger.warning(
                "%s: record not removed (it expires with its lease): %s", self.name, exc
            )
        finally:
            if registry is not None and self._owns_registry:
                registry.close()
                self._owns_registry = False

    # Subclass hooks, called in the serving thread.
    def _open(self) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ dispatch

    def _call(self, target: bytes, payload: bytes, timed: bool = True) -> bytes:
        """Run the function ``target`` names on ``payload``; raise a
        :class:`PylmError` subclass that describes any failure. The call is
        counted (when the server counts); ``timed=False``: without reading
        its duration (the clock is most of the counting's cost)."""
        entry = self._table.get(target)
        if entry is None:
            if self.stats is not None:
                self.stats.functions[UNKNOWN_FUNCTION].failed(0.0, len(payload))
            raise self._dispatch_error(target)
        function, stats = entry
        size = len(payload)
        if size > self.max_payload:
            if stats is not None:
                stats.failed(0.0, size)
            raise self._too_large(target, payload)
        if stats is None or not timed:  # no clock: not counting, or counting only
            try:
                result = function(payload)
            except Exception as exc:
                if stats is not None:
                    stats.failed(None, size)
                raise self._remote_error(target, exc) from None
            if type(result) is not bytes:
                try:
                    result = self._result_bytes(target, result)
                except PylmError:
                    if stats is not None:
                        stats.failed(None, size)
                    raise
            if stats is not None:
                stats.untimed += 1
                stats.bytes_in += size
                stats.bytes_out += len(result)
            return result
        start = _perf_counter()
        try:
            result = function(payload)
        except Exception as exc:
            stats.failed(_perf_counter() - start, size)
            raise self._remote_error(target, exc) from None
        if type(result) is not bytes:
            try:
                result = self._result_bytes(target, result)
            except PylmError:
                stats.failed(_perf_counter() - start, size)
                raise
        # stats.done(...), inline: this runs for every message
        took = _perf_counter() - start
        stats.seconds += took
        stats.buckets[0 if took <= _FIRST_BOUND else _bisect_left(_BUCKETS, took)] += 1
        stats.bytes_in += size
        stats.bytes_out += len(result)
        return result

    def _too_large(self, target: bytes, payload: bytes) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"payload of {len(payload)} bytes for {target.decode('utf-8', 'replace')!r}"
            f" is larger than the limit of server {self.name!r}, {self.max_payload} bytes",
            size=len(payload),
            limit=self.max_payload,
        )

    def _result_bytes(self, target: bytes, result: object) -> bytes:
        """A function's result that is not ``bytes``: as bytes if it is
        bytes-like, else the error to send back."""
        if isinstance(result, (bytearray, memoryview)):
            return bytes(result)
        _, function_name = protocol.split_target(target)
        raise RemoteError(
            f"function {function_name!r} on server {self.name!r} returned"
            f" {type(result).__name__}, expected bytes",
            remote_type="TypeError",
            remote_message=f"returned {type(result).__name__}, expected bytes",
            server=self.name,
            function=function_name,
        )

    def _dispatch_error(self, target: bytes) -> PylmError:
        server, function = protocol.split_target(target)  # ProtocolError if malformed
        if server != self.name:
            return UnknownServer(
                f"request for server {server!r} (function {function!r})"
                f" reached server {self.name!r}",
                server=server,
                function=function,
            )
        return UnknownFunction(
            f"unknown function {function!r} on server {self.name!r};"
            f" it has {', '.join(self.functions) or 'no functions'}",
            server=self.name,
            function=function,
        )

    def _remote_error(self, target: bytes, exc: Exception) -> RemoteError:
        _, function = protocol.split_target(target)
        # Skip the framework's own frame: the caller wants the user's code.
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        self._log_limited(
            f"raised-{function}",
            logging.ERROR,
            "function %r raised %s: %s",
            function,
            type(exc).__name__,
            exc,
        )
        return RemoteError(
            f"function {function!r} on server {self.name!r} raised {type(exc).__name__}: {exc}",
            remote_type=type(exc).__name__,
            remote_message=str(exc),
            remote_traceback=text,
            server=self.name,
            function=function,
        )

    def _pong(self) -> bytes:
        from pylm import __version__

        info = {
            "name": self.name,
            "kind": self.kind,
            "functions": list(self.functions),
            "pid": os.getpid(),
            "version": __version__,
        }
        return json.dumps(info).encode("utf-8")

    def _drop(self, reason: str, detail: str, frames: list[bytes]) -> None:
        """Count a message that is dropped or refused for not following the
        protocol, under ``reason`` (one of :data:`pylm.telemetry.counting.MALFORMED_REASONS`),
        and log ``detail``, at most once a second per reason."""
        if self.stats is not None:
            self.stats.malformed += 1
            self.stats.malformed_by[reason] += 1
        first = bytes(frames[-1][:40]) if frames else b""
        self._log_limited(
            f"malformed-{reason}",
            logging.WARNING,
            "dropped a malformed message (%s) of %d frame(s): %s; last frame starts %r",
            reason,
            len(frames),
            detail,
            first,
        )

    def _log_limited(
        self, cause: str, level: int, message: str, *args: object, burst: int = 1
    ) -> None:
        """Log at most ``burst`` lines a second for ``cause``; a line tells how
        many were held back since the previous one."""
        limiter = self._limiters.get(cause)
        if limiter is None:
            if len(self._limiters) >= len(self.functions) + 64:  # a fixed set, and functions
                self._limiters.clear()
            limiter = self._limiters[cause] = RateLimiter(burst=burst)
        if limiter.allow():
            held = limiter.take_suppressed()
            extra = f" ({held} more like it since the last report)" if held else ""
            self.logger.log(level, message + "%s", *args, extra)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} functions={list(self.functions)}>"
