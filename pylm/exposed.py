"""The functions a server exposes, and calling them: the one lookup per call
that finds a function and where its calls are counted, the payload limit,
and the shape of every failure (:class:`PayloadTooLarge`,
:class:`UnknownFunction`, :class:`UnknownServer`, :class:`RemoteError`)
that goes back to the caller. Also the server's answer to a PING.

Only the public methods that the user's own classes define can be called
remotely: nothing starting with ``_``, nothing the framework classes define,
nothing inherited from ``object`` (:func:`exposed_functions`). A function
marked :func:`idempotent` is one its clients may call again when they cannot
tell whether a call ran (its instance died with the call in flight); the
mark travels in the registry record and in the answer to a PING.

:meth:`Exposed.call` is every server's hot path: it runs once per message,
so the counting is inline and the clock is read only when it counts.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import traceback
from bisect import bisect_left as _bisect_left
from collections.abc import Callable
from time import perf_counter as _perf_counter
from typing import Any, TypeVar

from pylm import protocol
from pylm.errors import PayloadTooLarge, PylmError, RemoteError, UnknownFunction, UnknownServer
from pylm.logs import LimitedLog
from pylm.telemetry.counting import BUCKETS as _BUCKETS
from pylm.telemetry.counting import UNKNOWN_FUNCTION, FunctionStats, ServerStats

__all__ = ["Exposed", "Function", "Ran", "exposed_functions", "idempotent", "run", "run_async"]

_FIRST_BOUND = _BUCKETS[0]  # most calls are faster: no search for them

Function = Callable[[bytes], Any]
F = TypeVar("F", bound=Callable[..., Any])

_IDEMPOTENT = "__pylm_idempotent__"

Ran = tuple[object, Exception | None, float]
"""How a call run elsewhere ended: its result, or the exception its function
raised, and the seconds it took (for :meth:`Exposed.settle`)."""


def _coroutines(table: dict[bytes, tuple[Function, FunctionStats | None]]) -> frozenset[bytes]:
    return frozenset(
        target for target, (function, _) in table.items() if inspect.iscoroutinefunction(function)
    )


def run(function: Function, payload: bytes) -> Ran:
    """Run a blocking function (in a thread of a server's pool)."""
    start = _perf_counter()
    try:
        return function(payload), None, _perf_counter() - start
    except BaseException as exc:  # SystemExit too: the call ends, as an error
        return None, _exception(exc), _perf_counter() - start


async def run_async(function: Function, payload: bytes) -> Ran:
    """Run an ``async def`` function (on a server's event loop)."""
    start = _perf_counter()
    try:
        return await function(payload), None, _perf_counter() - start
    except BaseException as exc:  # a CancelledError too: the call ends, as an error
        return None, _exception(exc), _perf_counter() - start


def _exception(exc: BaseException) -> Exception:
    """``exc`` as the Exception a caller is told of."""
    if isinstance(exc, Exception):
        return exc
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def idempotent(function: F) -> F:
    """Mark an exposed function as safe to run twice for one call: a client
    whose call was on an instance that died sends it again to another
    (without the mark, it gets :class:`~pylm.errors.InstanceLost`, saying
    the call may have run)::

        class Lookup(Server):
            @idempotent
            def get(self, key: bytes) -> bytes: ...
    """
    setattr(function, _IDEMPOTENT, True)
    return function


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


class Exposed:
    """The ``functions`` of ``server`` (named ``name``; see
    :func:`exposed_functions`) that clients call, as ``b"<name>.<function>"``
    targets. ``stats``: where calls are counted
    (None: not counted). ``log``: where a function that raises is reported.

    ``result_bytes`` and ``unknown`` replace :meth:`result_bytes` and
    :meth:`unknown` when given: a server kind may take other results (a
    worker's generators) or other targets (a worker's master's name)."""

    def __init__(
        self,
        server: object,
        name: str,
        kind: str,
        functions: tuple[str, ...],
        stats: ServerStats | None,
        max_payload: int,
        log: LimitedLog,
        *,
        result_bytes: Callable[[bytes, object], bytes] | None = None,
        unknown: Callable[[bytes], PylmError] | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.functions = functions
        # Those marked @idempotent: clients may send a call of them again.
        self.idempotent = tuple(
            fn for fn in functions if getattr(getattr(server, fn), _IDEMPOTENT, False) is True
        )
        self.stats = stats
        self.max_payload = max_payload
        self.log = log
        prefix = name.encode("utf-8") + b"."
        # One lookup per call finds a function and where its calls are counted.
        self.table: dict[bytes, tuple[Function, FunctionStats | None]] = {
            prefix + fn.encode("utf-8"): (
                getattr(server, fn),
                None if stats is None else stats.functions[fn],
            )
            for fn in self.functions
        }
        self._result_bytes = result_bytes or self.result_bytes
        self._unknown = unknown or self.unknown
        # The targets of ``async def`` functions: run on an event loop, not called.
        self.coroutines = _coroutines(self.table)

    def call(self, target: bytes, payload: bytes, timed: bool = True) -> bytes:
        """Run the function ``target`` names on ``payload``; raise a
        :class:`PylmError` subclass that describes any failure. The call is
        counted (when the server counts); ``timed=False``: without reading
        its duration (the clock is most of the counting's cost)."""
        entry = self.table.get(target)
        if entry is None:
            if self.stats is not None:
                self.stats.functions[UNKNOWN_FUNCTION].failed(0.0, len(payload))
            raise self._unknown(target)
        function, stats = entry
        size = len(payload)
        if size > self.max_payload:
            if stats is not None:
                stats.failed(0.0, size)
            raise self.too_large(target, payload)
        if stats is None or not timed:  # no clock: not counting, or counting only
            try:
                result = function(payload)
            except Exception as exc:
                if stats is not None:
                    stats.failed(None, size)
                raise self.remote_error(target, exc) from None
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
            raise self.remote_error(target, exc) from None
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

    def set_table(self, table: dict[bytes, tuple[Function, FunctionStats | None]]) -> None:
        """Call the functions by other targets (a worker's: its master's name)."""
        self.table = table
        self.coroutines = _coroutines(table)

    def lookup(self, target: bytes, payload: bytes) -> tuple[Function, FunctionStats | None]:
        """The function ``target`` names and where its calls are counted, for
        a call run elsewhere (a thread, an event loop) and then
        :meth:`settle`-d; raises (and counts) what :meth:`call` would for an
        unknown function or a payload over the limit."""
        entry = self.table.get(target)
        if entry is None:
            if self.stats is not None:
                self.stats.functions[UNKNOWN_FUNCTION].failed(0.0, len(payload))
            raise self._unknown(target)
        if len(payload) > self.max_payload:
            if entry[1] is not None:
                entry[1].failed(0.0, len(payload))
            raise self.too_large(target, payload)
        return entry

    def settle(self, target: bytes, size: int, stats: FunctionStats | None, ran: Ran) -> bytes:
        """The result of a call that ran elsewhere (:func:`run`), counted,
        in bytes; or the :class:`PylmError` to answer, as :meth:`call` raises."""
        result, error, seconds = ran
        if error is None and inspect.isawaitable(result):  # a sync function that returned one
            if inspect.iscoroutine(result):
                result.close()
            error = TypeError("returned an awaitable, not bytes: declare the function async def")
        if error is not None:
            if stats is not None:
                stats.failed(seconds, size)
            raise self.remote_error(target, error)
        if type(result) is not bytes:
            try:
                result = self._result_bytes(target, result)
            except PylmError:
                if stats is not None:
                    stats.failed(seconds, size)
                raise
        if stats is not None:
            stats.done(seconds, size, len(result))
        return result

    def too_large(self, target: bytes, payload: bytes) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"payload of {len(payload)} bytes for {target.decode('utf-8', 'replace')!r}"
            f" is larger than the limit of server {self.name!r}, {self.max_payload} bytes",
            size=len(payload),
            limit=self.max_payload,
        )

    def result_bytes(self, target: bytes, result: object) -> bytes:
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

    def unknown(self, target: bytes) -> PylmError:
        """The error for a ``target`` that names no function here."""
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

    def remote_error(self, target: bytes, exc: Exception) -> RemoteError:
        """The error for a function that raised ``exc``, logged (rate-limited)."""
        _, function = protocol.split_target(target)
        # Skip the framework's own frame: the caller wants the user's code.
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        kind, message = type(exc).__name__, str(exc)
        log_key = f"raised-{function}"
        self.log.log(log_key, logging.ERROR, "function %r raised %s: %s", function, kind, message)
        if self.stats is not None:
            self.stats.recent_errors.note(function, kind, message)
        return RemoteError(
            f"function {function!r} on server {self.name!r} raised {kind}: {message}",
            remote_type=kind,
            remote_message=message,
            remote_traceback=text,
            server=self.name,
            function=function,
        )

    def pong(self) -> bytes:
        """The answer to a PING: who answers, and what it can do."""
        from pylm import __version__

        info = {
            "name": self.name,
            "kind": self.kind,
            "functions": list(self.functions),
            "idempotent": list(self.idempotent),
            "pid": os.getpid(),
            "version": __version__,
        }
        return json.dumps(info).encode("utf-8")
