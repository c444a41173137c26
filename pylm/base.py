"""What every pylm server shares: its lifecycle, and the parts it is made of.

A server's serving loop runs in one thread, which owns the server's sockets.
:meth:`BaseServer.start` runs that loop in the calling thread (the 2016
behaviour: it blocks) or, with ``background=True``, in a thread the server
owns; :meth:`BaseServer.stop` ends it from any thread.

The parts, each with its own module: :class:`~pylm.exposed.Exposed` (the
user's functions and calling them), :class:`~pylm.registrar.Registrar`
(registration), :class:`~pylm.telemetry.exporter.Exposure` (the server's
metrics on the process's endpoint), :class:`~pylm.control.Control` (how
:meth:`~BaseServer.stop` wakes the loop) and :class:`~pylm.logs.LimitedLog`
(rate-limited lines about misbehaving peers and functions). The protected
methods the server kinds call (``_call``, ``_register``, ``_drop``...) hand
on to them.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, TypedDict

import zmq

from pylm import protocol
from pylm.control import Control
from pylm.errors import PayloadTooLarge, PylmError, RemoteError, ServerCrashed
from pylm.exposed import Exposed, Function, exposed_functions
from pylm.handshakes import watch
from pylm.lifecycle import DRAIN_MAX, DRAIN_QUIET
from pylm.logs import LimitedLog, PushLogHandler, server_logger
from pylm.names import check_name
from pylm.protocol import DEFAULT_MAX_PAYLOAD, read_id_deadline
from pylm.registrar import Registrar
from pylm.running import ASYNC_CONCURRENCY
from pylm.security import Curve
from pylm.telemetry.counting import FunctionStats, ServerStats, metrics_enabled
from pylm.telemetry.exporter import Exposure
from pylm.transport import bind, default_context, read_envelope, recv_message

if TYPE_CHECKING:
    from collections.abc import Callable

    from pylm.registry import Registration, Registry

__all__ = [
    "ASYNC_CONCURRENCY",
    "MAX_CONCURRENCY",
    "BaseServer",
    "Options2016",
    "ServerOptions",
    "exposed_functions",
]

MAX_CONCURRENCY = 10_000


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
    concurrency: int | None


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


class BaseServer:
    """Base of every server pattern. Subclasses implement :meth:`_open`,
    :meth:`_serve` and :meth:`_close`, all called in the serving thread."""

    _pylm_framework = True
    kind: ClassVar[str] = "base"
    sends_to: ClassVar[str] = "client"  # where results go: "client", or "next" (stage)
    serves_concurrently: ClassVar[bool] = False  # takes concurrency and async def functions

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
        concurrency: int | None = None,
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
        such a server is refused at start: :class:`InterfaceMismatch`).
        ``concurrency``: at most this many calls in progress at once (every
        server but a hub, whose workers run its jobs: ``serves_concurrently``):
        ``async def`` functions run on the server's event loop, blocking ones
        on a pool of this many threads. Default: blocking functions one at a time,
        ``async def`` ones up to :data:`ASYNC_CONCURRENCY` at once."""
        check_name(name)
        if concurrency is not None and (
            not isinstance(concurrency, int)
            or isinstance(concurrency, bool)
            or not 1 <= concurrency <= MAX_CONCURRENCY
        ):
            raise ValueError(
                f"concurrency must be an int from 1 to {MAX_CONCURRENCY}, got {concurrency!r}"
            )
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
        self._listening: dict[str, str] = {}  # role -> bound address, for the start line
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
        # Metrics: plain counters written by the serving thread (pylm.telemetry.counting).
        self.stats: ServerStats | None = None
        if metrics_enabled(metrics):
            from pylm import __version__

            self.stats = ServerStats(name, self.kind, self.functions, __version__, self.sends_to)
        self.metrics_url: str | None = None  # where this process serves /metrics, once started

        # The parts. A fixed set of causes, and one per function, for the log.
        self._limited_log = LimitedLog(self.logger, len(self.functions) + 64)
        self._exposed = Exposed(
            self,
            name,
            self.kind,
            self.functions,
            self.stats,
            max_payload,
            self._limited_log,
            result_bytes=self._result_bytes,
            unknown=self._dispatch_error,
        )
        self._call = self._exposed.call  # bound once: the hot path takes no extra hop
        self.concurrency = concurrency
        generators = [f for f in self.functions if inspect.isasyncgenfunction(getattr(self, f))]
        if generators:
            raise ValueError(
                f"{type(self).__name__} {name!r}: async generator functions are not served"
                f" ({', '.join(generators)}); a streaming function of a worker is a plain generator"
            )
        if (self._exposed.coroutines or (concurrency or 1) > 1) and not self.serves_concurrently:
            raise ValueError(
                f"{type(self).__name__} {name!r}: async def functions and concurrency > 1 are"
                f" not served by a {self.kind} server (its workers run its jobs: give them"
                " concurrency)"
            )
        self._registrar = Registrar(
            name,
            self.kind,
            self.functions,
            self.logger,
            idempotent=self._exposed.idempotent,
            registry=registry,
            ttl=ttl,
            rolling=bool(rolling),
            curve=self.curve,
            stats=self.stats,
        )
        self._exposure = Exposure(self.stats, self.host)
        self._wakeup = Control(self.context, self.curve)
        self._control_address = self._wakeup.address  # the loop binds it
        self._is_control = self._wakeup.is_control

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
            self._wakeup.wake()
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
        """Expose the metrics, open (bind, and register: the server kinds
        call :meth:`_register` once bound), serve; then, in reverse,
        deregister, close, withdraw the metrics."""
        announced = False  # whether the serving line may be out: the stopped line follows it
        try:
            self.metrics_url = self._exposure.open(self._registrar.advertised)
            self._open()
            self._exposure.ready = True
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
            self._exposure.ready = False
            try:
                self._deregister()  # first, so that clients stop picking this instance
                self._close()
            finally:
                self._exposure.close()
                if announced:  # it said it serves: say it no longer does
                    self.logger.info(
                        "%s (%s) stopped after serving %d message(s)",
                        self.name,
                        self.kind,
                        self.served,
                    )
                self._done.set()
                self._settled.set()

    def _started_line(self) -> str:
        """The one line a server logs when it starts serving: its name and
        kind, where it listens and connects, its registry, its metrics."""
        where = [f"{role} {address}" for role, address in self._listening.items()]
        where += self._connects_to()
        return (
            f"{self.name} ({self.kind}) serving: {', '.join(where) or 'no address'};"
            f" {self._registrar.describe()}; metrics {self.metrics_url or 'off'}"
        )

    # Subclass hooks, called in the serving thread.
    def _open(self) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _connects_to(self) -> list[str]:
        """What the start line says this server connects to, besides the
        addresses it listens on: ``["next step2.bar at tcp://..."]``."""
        return []

    # ------------------------------------------------------------------ sockets

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

    # ------------------------------------------------------------------ registration

    @property
    def registry(self) -> Registry | None:
        """The registry, while registered."""
        return self._registrar.registry

    @property
    def registration(self) -> Registration | None:
        return self._registrar.registration

    @property
    def registry_option(self) -> Registry | str | None:
        return self._registrar.option

    @property
    def ttl(self) -> float | None:
        return self._registrar.ttl

    @property
    def rolling(self) -> bool:
        return self._registrar.rolling

    def _register(
        self,
        endpoints: dict[str, str],
        required: bool,
        next: str | None = None,
        branches: list[str] | None = None,
        tee: list[str] | None = None,
        master: str | None = None,
    ) -> None:
        """Register this instance, in the serving thread once bound
        (:meth:`pylm.registrar.Registrar.register`); ``endpoints`` are also
        what the start line says the server listens on."""
        self._listening = dict(endpoints)
        self._registrar.register(
            endpoints,
            required,
            metrics=self.metrics_url,
            next=next,
            branches=branches,
            tee=tee,
            master=master,
        )

    def _registry_client(self) -> Registry:
        return self._registrar.client()

    def _deregister(self) -> None:
        self._registrar.close()

    # ------------------------------------------------------------------ dispatch

    @property
    def _table(self) -> dict[bytes, tuple[Function, FunctionStats | None]]:
        """Target -> (function, its stats): what :meth:`_call` looks up."""
        return self._exposed.table

    @_table.setter
    def _table(self, table: dict[bytes, tuple[Function, FunctionStats | None]]) -> None:
        self._exposed.set_table(table)

    def _too_large(self, target: bytes, payload: bytes) -> PayloadTooLarge:
        return self._exposed.too_large(target, payload)

    # _result_bytes and _dispatch_error are hooks: Exposed.call calls them, so
    # that a server kind may override them (a worker's generators, its master's name).
    def _result_bytes(self, target: bytes, result: object) -> bytes:
        """A function's result that is not ``bytes``: as bytes if it is
        bytes-like, else the error to send back."""
        return self._exposed.result_bytes(target, result)

    def _dispatch_error(self, target: bytes) -> PylmError:
        """The error for a target that names no function here."""
        return self._exposed.unknown(target)

    def _remote_error(self, target: bytes, exc: Exception) -> RemoteError:
        return self._exposed.remote_error(target, exc)

    def _pong(self) -> bytes:
        return self._exposed.pong()

    # ------------------------------------------------------------------ misbehaving peers

    def _drop(self, reason: str, detail: str, frames: list[bytes]) -> None:
        """Count a message that is dropped or refused for not following the
        protocol, under ``reason`` (one of :data:`pylm.telemetry.counting.MALFORMED_REASONS`),
        and log ``detail``, at most once a second per reason."""
        if self.stats is not None:
            self.stats.malformed += 1
            self.stats.malformed_by[reason] += 1
        first = bytes(frames[-1][:40]) if frames else b""
        self._limited_log.log(
            f"malformed-{reason}",
            logging.WARNING,
            "dropped a malformed message (%s) of %d frame(s): %s; last frame starts %r",
            reason,
            len(frames),
            detail,
            first,
        )

    def _let_last_answers_out(
        self,
        front: zmq.Socket | None,
        control: zmq.Socket | None,
        held: Callable[[], int] | None = None,
        *,
        stopped: bool = False,
    ) -> None:
        """Called at the messages limit, before closing: keep ``front`` (the
        ROUTER that answers clients) open until no message came on it for
        DRAIN_QUIET (DRAIN_MAX at most), or until stop() wakes ``control``.
        A client loses the answers it received and has not read yet when
        their connection drops (libzmq drops them with the connection of a
        socket set ZMQ_IMMEDIATE, as pylm's clients are), so a server that
        closed right after its last answer could lose it. ``held`` sends
        what the server holds for clients not reading and says how many it
        still holds: meanwhile the wait goes on (DRAIN_MAX at most). A
        request that comes meanwhile is not served (the limit holds): it is
        answered with an error that says so. ``stopped``: called after stop()
        too, for answers sent once the server read no more (its wake-up
        message then ends nothing)."""
        if front is None or control is None or (self._stopping and not stopped):
            return
        why = "is stopping" if stopped else f"reached its messages limit ({self.messages})"
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        now = time.monotonic()
        give_up, quiet = now + DRAIN_MAX, now + DRAIN_QUIET
        while True:
            holding = held() if held is not None else 0
            end = give_up if holding else min(give_up, quiet)
            if now >= end:
                break
            wait = max(1, round((end - now) * 1000))
            for socket in dict(poller.poll(min(wait, 10) if holding else wait)):
                try:
                    frames = recv_message(socket)
                except zmq.Again:
                    continue
                if len(frames) == 3 and not frames[1] and self._is_control(frames[2]):
                    if stopped:
                        continue
                    return  # stop()
                if socket is front:
                    quiet = time.monotonic() + DRAIN_QUIET
                    self._refuse_late(front, frames, why)
            now = time.monotonic()
        if holding:
            self.logger.warning(
                "%s: closing at its messages limit with %d answer(s) for clients not reading,"
                " not sent",
                self.name,
                holding,
            )

    def _refuse_late(self, front: zmq.Socket, frames: list[bytes], why: str) -> None:
        """Answer a message that came once the server served no more with an
        error (when it has an envelope and an id to answer), and log it."""
        self._limited_log.log(
            "ended", logging.WARNING, "%s: a message came as it %s: not served", self.name, why
        )
        parts = read_envelope(frames)
        msg_id = None if parts is None else protocol.salvage_msg_id(parts[1])
        if parts is None or msg_id is None:
            return
        refusal = PylmError(f"server {self.name!r} {why} and is closing: not served")
        try:
            front.send_multipart([*parts[0], *protocol.encode_error(msg_id, refusal)], zmq.NOBLOCK)
        except zmq.ZMQError:  # no room, or the client is gone: it times out
            pass

    def _expired(self, body: bytes) -> None:
        """Count a job or call dropped, not run: read past its deadline (the
        head starting ``body``), whose sender stopped waiting for it; log it
        at most once a second, with how late it was (a steady stream of
        them may mean the hosts' clocks disagree)."""
        if self.stats is not None:
            self.stats.expired += 1
        late = time.time() - read_id_deadline(body)[1]
        self._limited_log.log(
            "expired",
            logging.INFO,
            "%s: dropped work %.3f s past its deadline, not run (more may follow unlogged;"
            " pylm_messages_expired_total counts them all)",
            self.name,
            late,
        )

    def _log_limited(
        self, cause: str, level: int, message: str, *args: object, burst: int = 1
    ) -> None:
        """Log at most ``burst`` lines a second for ``cause`` (:class:`LimitedLog`)."""
        self._limited_log.log(cause, level, message, *args, burst=burst)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} functions={list(self.functions)}>"
