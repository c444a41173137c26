"""Chained servers: pipelines in which each stage's result is the payload of
the next stage's function, and the last stage answers the client.

A job enters the first stage's PULL socket as a REQUEST whose *route* is the
routing id of the client that sent it. Each :class:`Server` runs the named
function and PUSHes a REQUEST for its ``next_call`` (``'step2.bar'``) with
the result as payload, keeping message id, route and deadline. The
:class:`LastServer` sends the REPLY through its ROUTER socket to the client
the route names. An error anywhere (unknown function, user exception,
non-bytes result) travels on down the chain as an ERROR with the same route,
so it reaches the client that sent the job while the pipeline keeps flowing.

Every stage also serves its cache (``set/get/delete``, see
:mod:`pylm.cache`) on ``db_address``. Sockets have high-water marks: a slow
stage makes the stages before it wait, and in the end the client, instead
of letting queues grow.
"""

from __future__ import annotations

import concurrent.futures
import logging
import struct
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import BaseServer, ServerOptions
from pylm.cache import Cache
from pylm.calls import curve_key
from pylm.errors import ProtocolError, PylmError, RegistryError
from pylm.security import Curve
from pylm.telemetry.counting import SAMPLE_EVERY, Sampling
from pylm.transport import (
    Backlog,
    check_address,
    close_listener,
    close_socket,
    read_envelope,
    recv_message,
    rest_of,
    send_frame,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pylm.registry import InstanceRecord, Registry
    from pylm.registry.records import StageConfig

__all__ = ["LastServer", "Server", "Sink"]

DEFAULT_HWM = 1000  # messages a socket queues before its sender waits
# A last stage keeps results for a client not connected yet (one that found
# the stage in the registry after its jobs got there) this long, this many.
PARK_SECONDS = 10.0
PARK_LIMIT = 10_000
MAX_BACKLOG = 100_000  # results a last stage keeps for clients not reading, in all
_ROUTER_RETRY_MS = 10  # how soon a last stage tries again to send to a full client
_REWIRE_MS = 200  # how often a stage following the registry looks for changes
_IDLE_MS = 1000  # how long an idle stage waits for input at most, then looks again
# s of quiet input before a leaving stage closes: the stages before it apply
# a change of the registry before serving what they read next (see _serve),
# so they stop sending here within the watch's delay and the round they are in.
_DRAIN_QUIET = 0.2
_DRAIN_MAX = 5.0  # s a leaving stage serves at most
_BATCH = 256  # messages read in a row before the loop looks at its other sockets
_UNTIMED_MASK = SAMPLE_EVERY - 1  # a BATCH's jobs: index & mask, a call not timed
_FRAME_SLACK = 64 * 1024
_HEAD_SIZE = protocol.HEAD_SIZE
_SPLIT = protocol.SPLIT_PAYLOAD
_FAST = protocol.MAGIC + bytes([protocol.VERSION, protocol.REQUEST, 0])
_SIZES = struct.Struct(">HH")  # target and route sizes, at offset 5
_unpack_sizes = _SIZES.unpack_from
_pack_sizes = _SIZES.pack
_NO_DEADLINE = bytes(8)
_BATCH_PREFIX = protocol.BATCH_PREFIX
_unpack_id = protocol.unpack_id
_pack_id = struct.Struct(">Q").pack
_FIRST = zmq.SNDMORE | zmq.NOBLOCK


class _Stopping(Exception):
    """Raised inside the loop when stop() asked it to end."""


def _addresses(value: str | Sequence[str], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"{what} needs at least one address")
    return [check_address(item, what) for item in items]


class _Stage(BaseServer):
    """What every stage shares: a PULL input, a cache, one serving loop."""

    _pylm_framework = True

    def __init__(
        self,
        name: str,
        pull_address: str | None,
        db_address: str | None,
        log_address: str | None,
        perf_address: str | None,
        ping_address: str | None,
        log_level: int,
        messages: int,
        *,
        hwm: int,
        **options: Unpack[ServerOptions],
    ) -> None:
        super().__init__(
            name,
            log_level=log_level,
            log_address=log_address,
            messages=messages,
            ignored={"perf_address": perf_address, "ping_address": ping_address},
            **options,
        )
        self.pull_address = pull_address and check_address(pull_address, "pull_address")
        self.db_address = db_address and check_address(db_address, "db_address")
        self.hwm = hwm
        self.cache = Cache(name)
        self.address: str | None = None  # where the PULL socket listens
        self.db: str | None = None  # where the cache listens
        self._pull: zmq.Socket | None = None
        self._db_socket: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._following: concurrent.futures.Future[None] | None = None
        # ms a wait for input lasts at most (stop() wakes it anyway); shorter
        # when the registry may rewire the stage, or results wait to be sent.
        self._poll_timeout: int = _IDLE_MS
        self._send_deadline: float | None = None  # set while leaving
        self._plain = True  # one output, no copies: the fast paths apply
        self._sampling = Sampling()  # which calls are timed (pylm.telemetry.counting)

    # ------------------------------------------------------------------ sockets

    def _open(self) -> None:
        pull = self._secure(self.context.socket(zmq.PULL))
        self._pull = pull
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, self.hwm)
        pull.setsockopt(zmq.MAXMSGSIZE, self.max_payload + _FRAME_SLACK)
        self.address = self._listen(pull, self.pull_address or self._any_port())
        # A ROUTER, its envelopes read here (see pylm.standalone.servers):
        # junk from one peer costs only its own message.
        db = self._secure(self.context.socket(zmq.ROUTER))
        self._db_socket = db
        db.setsockopt(zmq.LINGER, 0)
        db.setsockopt(zmq.MAXMSGSIZE, self.max_payload + _FRAME_SLACK)
        db.bind(self._control_address)  # stop() wakes the loop through it
        self.db = self._listen(db, self.db_address or self._any_port())
        self._open_output()
        self._poller.register(pull, zmq.POLLIN)
        self._poller.register(db, zmq.POLLIN)
        self._register(
            self._endpoints(),
            required=self._name_only(),
            next=self._next(),
            branches=self._branches(),
            tee=self._tee_calls(),
        )

    def _any_port(self) -> str:
        return f"tcp://{self.host}:0"

    def _endpoints(self) -> dict[str, str]:
        assert self.address is not None and self.db is not None
        return {"pull": self.address, "db": self.db}

    def _name_only(self) -> bool:
        return self.pull_address is None or self.db_address is None

    def _next(self) -> str | None:
        return None

    def _branches(self) -> list[str]:
        """Next calls besides the first (registry record)."""
        return []

    def _tee_calls(self) -> list[str]:
        """Calls that get a copy of every result (registry record)."""
        return []

    def _deregister(self) -> None:
        self._stop_following()  # before the registry it runs on may close
        super()._deregister()

    def _stop_following(self) -> None:
        following, self._following = self._following, None
        if following is not None:
            following.cancel()

    def _close(self) -> None:
        self._stop_following()
        for socket in (self._pull, self._db_socket, *self._outputs()):
            close_listener(socket)  # a last stage's output listens too
        self._pull = self._db_socket = None

    def _open_output(self) -> None:
        raise NotImplementedError

    def _outputs(self) -> list[zmq.Socket | None]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        pull, poll = self._pull, self._poller.poll
        assert pull is not None
        debug = self.logger.isEnabledFor(logging.DEBUG)
        try:
            while self.served < self.messages:
                if debug:
                    self.logger.debug("%s Waiting for a message", self.name)
                ready = poll(self._poll_timeout)
                # Rewired before serving: what is read after the registry
                # reported a change goes by the new wiring, however long the
                # poll waited (an instance leaving drains only _DRAIN_QUIET).
                self._rewire()
                for socket, _ in ready:
                    if socket is pull:
                        self._drain(pull, debug)
                    else:
                        self._serve_other(socket)
                self._tick()
        except _Stopping:
            if self.registration is not None:
                self._drain_before_leaving(pull, debug)

    def _drain_before_leaving(self, pull: zmq.Socket, debug: bool) -> None:
        """A registered stage leaves cleanly: it deregisters, so that the
        stages before it stop sending to it, and serves what still arrives
        until its input has been quiet for a moment."""
        self._deregister()
        quiet_since = time.monotonic()
        give_up = quiet_since + _DRAIN_MAX
        self._send_deadline = give_up  # nor may a full next stage hold the stop up
        while (left := _DRAIN_QUIET - (time.monotonic() - quiet_since)) > 0:
            if time.monotonic() >= give_up:
                break
            if pull.poll(max(1, min(50, round(left * 1000))), zmq.POLLIN):
                self._drain(pull, debug)
                quiet_since = time.monotonic()
            self._rewire()

    def _tick(self) -> None:
        """Called after every round of the loop (subclasses' timers)."""

    def _rewire(self) -> bool:
        """Apply changes the registry reported (in the serving thread, which
        owns the sockets); True if it connected to a new instance. Nothing to
        do for a stage with fixed addresses."""
        return False

    def _drain(self, pull: zmq.Socket, debug: bool) -> None:
        received, passed = self._drain_batch(pull, debug)
        if self.stats is not None:  # counted in locals, added once a batch
            self.stats.received += received
            self.stats.sent += passed

    def _drain_batch(self, pull: zmq.Socket, debug: bool) -> tuple[int, int]:
        """Serve the messages waiting, up to a batch; how many were read and
        how many of them the fast path passed on."""
        recv, call = pull.recv, self._call
        received = passed = 0
        counting, sampling = self.stats is not None, self._sampling
        untimed = sampling.untimed
        for _ in range(min(_BATCH, self.messages - self.served)):
            try:
                # One recv per message: the head tells whether a payload
                # frame follows (asking the socket costs more than the rest).
                body = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            received += 1
            if debug:
                self.logger.debug("%s Got a message", self.name)
            if body[:5] == _BATCH_PREFIX:
                carried, sent_on = self._serve_batch(body)
                received += carried - 1
                passed += sent_on
                continue
            if body[:5] == _FAST and len(body) >= _HEAD_SIZE:
                # Fast path: a one-frame REQUEST with a route.
                target_size, route_size = _unpack_sizes(body, 5)
                start = _HEAD_SIZE + target_size
                end = start + route_size
                if route_size and end <= len(body):
                    self.served += 1
                    if debug:
                        self._looking_for(body[_HEAD_SIZE:start])
                    if untimed:
                        untimed -= 1
                        timed = False
                    else:
                        timed = True
                        if counting:
                            untimed = sampling.untimed_next()
                    try:
                        result = call(body[_HEAD_SIZE:start], body[end:], timed)
                    except PylmError as error:
                        self._fail(protocol.decode([body]), error)
                    else:
                        self._emit(body, start, end, result)
                    passed += 1
                    continue
            self._handle([body, *rest_of(pull)])
        sampling.untimed = untimed
        return received, passed

    def _serve_batch(self, body: bytes) -> tuple[int, int]:
        """Serve the jobs of a BATCH and send their results on together, as
        a BATCH again; (jobs carried, results sent in the batch)."""
        try:
            jobs = protocol.unpack_batch(body)
        except ProtocolError as error:
            self._drop("batch", f"{error} (no route back: dropped)", [body])
            return 1, 0
        if not self._plain:  # branches or tees: the general path, job by job
            for job in jobs:
                self._handle([job])
            return len(jobs), 0
        outputs: list[tuple[bytes, bytes]] = []  # (route, message) in order
        call = self._call
        for index, job in enumerate(jobs):
            if job[:5] == _FAST and len(job) >= _HEAD_SIZE:
                target_size, route_size = _unpack_sizes(job, 5)
                start = _HEAD_SIZE + target_size
                end = start + route_size
                if route_size and end <= len(job):
                    self.served += 1
                    try:
                        result = call(job[_HEAD_SIZE:start], job[end:], not index & _UNTIMED_MASK)
                    except PylmError as error:
                        failure = protocol.encode_error(
                            _unpack_id(job, 9)[0], error, self._error_route(job[start:end])
                        )
                        if len(failure) == 1:
                            outputs.append((job[start:end], failure[0]))
                        else:  # too large for a batch: on its own
                            self._fail(protocol.decode([job]), error)
                        continue
                    if len(result) > _SPLIT:  # too large for a batch: on its own
                        self._emit(job, start, end, result)
                    else:
                        outputs.append((job[start:end], self._output(job, start, end, result)))
                    continue
            self._handle([job])  # anything else: one by one, as ever
        self._emit_batch(outputs)
        return len(jobs), len(outputs)

    # Subclass hooks for batches.
    def _output(self, body: bytes, start: int, end: int, result: bytes) -> bytes:
        """The message that carries the result of the one-frame request
        ``body`` (route ``body[start:end]``) on."""
        raise NotImplementedError

    def _error_route(self, route: bytes) -> bytes:
        """The route an error message carries (the next stage needs it)."""
        raise NotImplementedError

    def _emit_batch(self, outputs: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def _serve_other(self, socket: zmq.Socket) -> None:
        """Serve a socket other than the input: here the cache (and stop)."""
        if socket is self._db_socket:
            self._serve_db()

    def _serve_db(self) -> None:
        """Answer the cache requests waiting, up to a batch (and see stop()'s call)."""
        db = self._db_socket
        assert db is not None
        for _ in range(_BATCH):
            try:
                frames = recv_message(db)
            except zmq.Again:
                return
            parts = read_envelope(frames)
            if parts is None:
                self._drop("envelope", "a cache request in no envelope known", frames)
                continue
            envelope, message = parts
            if len(message) == 1 and self._is_control(message[0]):
                raise _Stopping
            try:
                request = protocol.decode(message)
            except ProtocolError as error:
                self._drop("head", f"{error} (a cache request)", message)
                answer = protocol.encode_error(protocol.salvage_msg_id(message) or 0, error)
            else:
                try:
                    answer = self.cache.answer(request)
                except ProtocolError as error:
                    reason = "payload" if request.kind == protocol.REQUEST else "kind"
                    self._drop(reason, f"{error} (a cache request)", message)
                    answer = protocol.encode_error(request.msg_id, error)
            # A ROUTER drops what a peer that is gone or not reading cannot take.
            db.send_multipart([*envelope, *answer], zmq.NOBLOCK)

    def _handle(self, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError as error:
            self._drop("head", f"{error} (no route back: dropped)", frames)
            return
        if message.kind == protocol.END and len(message.payload) not in (0, 8):
            problem = ProtocolError(
                f"an END's count is 8 bytes (or none), got {len(message.payload)}"
            )
            self._drop("payload", str(problem), frames)
            if message.route:
                self._fail(message, problem)  # its client hears why the stream ends
        elif message.kind in (protocol.ERROR, protocol.END):
            if message.route:
                self._pass_on(message, frames)  # an earlier stage failed, or a stream ended
            elif message.kind == protocol.ERROR:
                self._unrouted_error(protocol.decode_error(message.payload))
        elif message.kind != protocol.REQUEST:
            if not message.route:
                self._drop("route", "a message without a route cannot be answered", frames)
                return
            problem = ProtocolError(
                f"stage {self.name!r} takes REQUEST, ERROR and END, not"
                f" {protocol.KIND_NAMES[message.kind]}"
            )
            self._fail(message, problem)
        else:
            # A REQUEST; one without a route (a tee's copy) runs and goes on
            # unanswered; one flagged MORE (a stream's item) stays flagged.
            self.served += 1
            if self.logger.isEnabledFor(logging.DEBUG):
                self._looking_for(message.target)
            try:
                result = self._call(message.target, message.payload)
            except PylmError as error:
                if message.route:
                    self._fail(message, error)
                else:
                    self._unrouted_error(error)
            else:
                self._succeed(message, result)
        if self.stats is not None:
            self.stats.sent += 1

    def _unrouted_error(self, error: PylmError) -> None:
        """A job without a route (a tee's copy) failed: nobody to tell but the log."""
        self._log_limited(
            "unrouted", logging.WARNING, "%s: a job without a route failed: %s", self.name, error
        )

    def _looking_for(self, target: bytes) -> None:
        function = target.rpartition(b".")[2].decode("utf-8", "replace")
        self.logger.debug("Looking for %s", function)

    # Subclass hooks: where results and errors go.
    def _emit(self, body: bytes, start: int, end: int, result: bytes) -> None:
        """Send on the result of the fast path's request ``body``, whose
        route is ``body[start:end]``."""
        raise NotImplementedError

    def _succeed(self, message: protocol.Message, result: bytes) -> None:
        raise NotImplementedError

    def _fail(self, message: protocol.Message, error: PylmError) -> None:
        raise NotImplementedError

    def _pass_on(self, message: protocol.Message, frames: list[bytes]) -> None:
        raise NotImplementedError

    def _send(self, socket: zmq.Socket, frames: list[bytes]) -> bool:
        """Send to the next stage (a PUSH socket), waiting while it is full
        (serving the cache and watching for stop meanwhile); False if the
        message was dropped because the stage is leaving. A last stage
        never waits: it sends to clients through its backlog."""
        poller: zmq.Poller | None = None
        while True:
            try:
                socket.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
                return True
            except zmq.Again:
                if self._rewire():
                    continue  # the instance to send to has just joined: try again now
                if self._send_deadline is not None and time.monotonic() > self._send_deadline:
                    self.logger.warning(
                        "%s: leaving with the next stage still full: a message is dropped",
                        self.name,
                    )
                    return False
                if poller is None:
                    poller = zmq.Poller()
                    poller.register(socket, zmq.POLLOUT)
                    poller.register(self._db_socket, zmq.POLLIN)
                if self._db_socket in dict(poller.poll(_REWIRE_MS)):
                    self._serve_db()


class _Outlet:
    """Where a stage sends on to one next stage: a PUSH socket connected to
    the stage's instances, given or followed in the registry (the registry's
    thread notes changes, the serving thread applies them)."""

    def __init__(self, call: str, addresses: list[str]) -> None:
        self.curve: Curve | None = None  # the stage's CURVE settings, set before open()
        self._key: bytes | None = None  # the next stage's CURVE key, from its records
        self._warned_plain = False  # logged that CURVE is on but the next stage has no key
        self._warned_keys = False  # logged that the next stage requires CURVE, and no keys here
        if not isinstance(call, str):
            raise TypeError(
                f"a next call must be a str like 'step2.bar', got {type(call).__name__}"
            )
        protocol.split_target(call.encode("utf-8"))  # ProtocolError if not server.function
        self.call = call
        self.target = call.encode("utf-8")
        self.server = call.rpartition(".")[0]
        self.addresses = addresses
        self.socket: zmq.Socket | None = None
        self._wanted: set[str] | None = None  # the instances the registry lists
        self.connected: set[str] = set()  # ... connected to
        self._lock = threading.Lock()
        self._following: concurrent.futures.Future[None] | None = None
        # One socket per instance for streams (see for_stream), made when needed.
        self._sticky: dict[str, zmq.Socket] = {}
        self._instances = sorted(addresses)
        self._context: zmq.Context | None = None
        self._hwm = 0

    def open(
        self,
        context: zmq.Context,
        hwm: int,
        registry: Registry | None,
        logger: logging.Logger | None = None,
    ) -> zmq.Socket:
        """Connect to the given addresses, or (with ``registry``) to the
        instances registered now, and follow them."""
        self._context, self._hwm = context, hwm
        if registry is not None:
            self._key = curve_key(self.server, registry.instances(self.server), self.curve)
        elif self.curve is not None:  # by address: never plain text in silence
            where = ", ".join(self.addresses)
            self.curve.require_server_key(f"next stage {self.server!r} at {where}")
        socket = self._push_socket()
        self.socket = socket
        for address in self.addresses:
            socket.connect(address)
        if registry is not None:
            self._changed(registry.instances(self.server))  # connect at once ...
            self.rewire(logger)
            self._following = registry.follow(self.server, self._changed)  # ... and follow
        return socket

    def _changed(self, records: list[InstanceRecord]) -> None:
        # While a new version of the next stage rolls out (its instances
        # differ in functions), only those with the function of this call
        # get its jobs; an instance without it could only fail them.
        function = self.call.rpartition(".")[2]
        having = [record for record in records if function in record.functions]
        wanted = {r.endpoints["pull"] for r in having or records if "pull" in r.endpoints}
        if not wanted:
            # Every record gone (instances stopping, or leases expired while
            # etcd was out of reach): keep the connections, as clients do
            # (pylm.discovery); instances that did stop are not sent to anyway.
            return
        key = next((record.curve.encode() for record in records if record.curve), None)
        with self._lock:
            self._wanted = wanted
            self._key = key or self._key

    def rewire(self, logger: logging.Logger | None) -> bool:
        """Apply what the registry said; True if an instance joined."""
        with self._lock:
            wanted, self._wanted = self._wanted, None
        if wanted is None or self.socket is None:
            return False
        joined = wanted - self.connected
        if joined:
            self._secure(self.socket)  # the key may have come with these instances
            if self.curve is not None and not (self._key or self.curve.server_key):
                if logger is not None and not self._warned_plain:
                    logger.warning(
                        "next stage %s registered no CURVE key: this stage, with CURVE,"
                        " sends to it in plain text",
                        self.server,
                    )
                self._warned_plain = True
            # A key in the records, and none here (open() refuses that
            # when the key is there first).
            if self.curve is None and self._key and logger is not None and not self._warned_keys:
                self._warned_keys = True
                logger.error(
                    "next stage %s requires CURVE and this stage has no keys"
                    " (PYLM_CURVE_KEYS): what it sends there is refused, and those jobs"
                    " time out; restart it with keys",
                    self.server,
                )
        for address in joined:
            self.socket.connect(address)
            if logger is not None:
                logger.info("next stage %s: instance %s joined", self.server, address)
        for address in self.connected - wanted:
            try:
                self.socket.disconnect(address)
            except zmq.ZMQError:
                pass  # never connected in libzmq's eyes: nothing to undo
            if logger is not None:
                logger.info("next stage %s: instance %s left", self.server, address)
        self.connected = wanted
        self._instances = sorted(wanted | set(self.addresses))
        for address in [a for a in self._sticky if a not in wanted]:
            close_socket(self._sticky.pop(address))
        return bool(joined)

    def _push_socket(self) -> zmq.Socket:
        assert self._context is not None
        socket: zmq.Socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, self._hwm)
        self._secure(socket)
        return socket

    def _secure(self, socket: zmq.Socket) -> None:
        """CURVE, with the next stage's key (given, or from its records), once known."""
        if self.curve is not None and (self._key or self.curve.server_key):
            self.curve.connect(socket, self._key)

    def for_stream(self, route: bytes, msg_id: int) -> zmq.Socket:
        """The socket for a job's stream items, its END and ERROR: all of
        them go to one instance of the next stage, chosen from the job, so
        that a hub there sees the whole stream (the others, round-robin)."""
        assert self.socket is not None
        instances = self._instances
        if len(instances) <= 1:
            return self.socket
        address = instances[zlib.crc32(route + _pack_id(msg_id)) % len(instances)]
        socket = self._sticky.get(address)
        if socket is None:
            socket = self._sticky[address] = self._push_socket()
            socket.connect(address)
        return socket

    def stop_following(self) -> None:
        following, self._following = self._following, None
        if following is not None:
            following.cancel()

    def take_sockets(self) -> list[zmq.Socket | None]:
        sockets: list[zmq.Socket | None] = [self.socket, *self._sticky.values()]
        self.socket = None
        self._sticky.clear()
        return sockets


def _calls(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    calls = [value] if isinstance(value, str) else list(value)
    for call in calls:
        if not isinstance(call, str):
            raise TypeError(f"{what} must be str like 'step2.bar', got {type(call).__name__}")
    return calls


class Server(_Stage):
    """A stage of a pipeline: runs the function a job names, then sends the
    result on as the payload of ``next_call`` (``'step2.bar'``) to the stage
    at ``next_address``::

        class Step1(Server):
            def foo(self, message):
                return b'you sent me ' + message

        Step1('step1', 'tcp://127.0.0.1:5555', 'tcp://127.0.0.1:5557',
              'step2.bar', 'tcp://127.0.0.1:5556').start()

    ``next_address`` may be a list: jobs are then spread over those stage
    instances, round-robin.

    Branches: ``next_call`` may be a list of calls; the stage's
    ``handle_stream(message)`` then returns ``(call, payload)`` for each
    result, choosing the branch it goes to (``call`` is one of the list, or
    its server's name). With explicit addresses, ``next_address`` is then a
    dict from each call to its address(es). Branches should meet again in
    one last stage (a :class:`Sink`), which answers the client.

    Tee: ``tee`` names more calls (``'audit.log'``; a dict call -> address
    with explicit addresses) that get a copy of every result, **without** a
    route: their stages run it and pass it on, and the last stage of a tee's
    branch keeps the result. Only the ``next_call`` line answers the client.
    """

    _pylm_framework = True
    kind = "chained"
    sends_to = "next"

    def __init__(
        self,
        name: str,
        pull_address: str | None = None,
        next_address: str | Sequence[str] | dict[str, str | Sequence[str]] | None = None,
        next_call: str | Sequence[str] | None = None,
        db_address: str | None = None,
        log_address: str | None = None,
        perf_address: str | None = None,
        ping_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        *,
        tee: str | Sequence[str] | dict[str, str | Sequence[str]] | None = None,
        hwm: int = DEFAULT_HWM,
        **options: Unpack[ServerOptions],
    ) -> None:
        super().__init__(
            name,
            pull_address,
            db_address,
            log_address,
            perf_address,
            ping_address,
            log_level,
            messages,
            hwm=hwm,
            **options,
        )
        calls = _calls(next_call, "next_call")
        if len(calls) > 1 and type(self).handle_stream is Server.handle_stream:
            raise TypeError(
                f"stage {name!r} has {len(calls)} next calls: define"
                " handle_stream(message) to choose the branch of each result"
            )
        if isinstance(next_address, dict):
            unknown = set(next_address) - set(calls)
            if unknown or len(next_address) != len(calls):
                raise ValueError(
                    f"next_address must give the address(es) of each of {calls}, got"
                    f" {sorted(next_address)}"
                )
            self.next_addresses: list[str] = []
            self._outlets = [
                _Outlet(call, _addresses(next_address[call], "next_address")) for call in calls
            ]
        else:
            self.next_addresses = (
                [] if next_address is None else _addresses(next_address, "next_address")
            )
            if len(calls) > 1 and self.next_addresses:
                raise ValueError("with several next calls, next_address is a dict call -> address")
            self._outlets = [_Outlet(call, list(self.next_addresses)) for call in calls]
        if isinstance(tee, dict):
            self._tees = [_Outlet(call, _addresses(tee[call], "tee")) for call in tee]
        else:
            self._tees = [_Outlet(call, []) for call in _calls(tee, "tee")]
        self._by_call = {o.call: o for o in self._outlets} | {o.server: o for o in self._outlets}
        self._plain = len(self._outlets) <= 1 and not self._tees  # the fast paths apply
        self._push: zmq.Socket | None = None  # the first next stage's socket
        self._set_first()

    @property
    def next_call(self) -> str | None:
        """The (first) next stage's call."""
        return self._outlets[0].call if self._outlets else None

    @property
    def next_instances(self) -> set[str]:
        """The addresses of the next stage's instances this stage follows
        in the registry and is connected to."""
        return set(self._outlets[0].connected) if self._outlets else set()

    def handle_stream(self, message: bytes) -> tuple[str, bytes]:
        """With several next calls: the call (or server name) a result goes
        to, and the payload it takes there."""
        raise NotImplementedError

    def _set_first(self) -> None:
        self._next_target = self._outlets[0].target if self._outlets else b""

    def _name_only(self) -> bool:
        return (
            super()._name_only()
            or not self._outlets
            or any(not outlet.addresses for outlet in self._outlets + self._tees)
        )

    def _next(self) -> str | None:
        return self.next_call

    def _branches(self) -> list[str]:
        return [outlet.call for outlet in self._outlets[1:]]

    def _tee_calls(self) -> list[str]:
        return [outlet.call for outlet in self._tees]

    def _connects_to(self) -> list[str]:
        def at(outlet: _Outlet) -> str:
            addresses = sorted(outlet.connected | set(outlet.addresses))
            return f"at {', '.join(addresses)}" if addresses else "(no instance yet)"

        return [f"next {outlet.call} {at(outlet)}" for outlet in self._outlets] + [
            f"tee {outlet.call} {at(outlet)}" for outlet in self._tees
        ]

    def _open_output(self) -> None:
        config = None
        if not self._outlets:
            config = self._configured_next()
            self._outlets = [_Outlet(config.next, [])]
            self._by_call = {self._outlets[0].call: self._outlets[0]}
            self._set_first()
        for outlet in self._outlets + self._tees:
            registry = None if outlet.addresses else self._registry_client()
            if registry is not None:
                self._poll_timeout = _REWIRE_MS
            outlet.curve = self.curve
            outlet.open(self.context, self.hwm, registry, self.logger)
        self._push = self._outlets[0].socket
        following = self._outlets[0]._following
        if config is not None and following is not None:
            # The wiring came from the registry: keep it there (put back if
            # etcd loses it), on the registry's thread, for as long as this
            # stage follows its next stage (stop() ends that following).
            keeping = self._registry_client().keep_config(config)
            following.add_done_callback(lambda _: keeping.cancel())

    def _configured_next(self) -> StageConfig:
        from pylm.registry.records import MalformedRecord

        try:
            config = self._registry_client().stage_config(self.name)
        except MalformedRecord as exc:
            raise RegistryError(
                f"stage {self.name!r} cannot read its next stage: config/{self.name}: {exc}"
            ) from exc
        except RegistryError as exc:  # the same kind: unavailable, access denied...
            raise type(exc)(f"stage {self.name!r} cannot read its next stage: {exc}") from exc
        if config is None:
            raise RegistryError(
                f"stage {self.name!r} has no next stage: pass next_call='<server>.<function>'"
                f" (the stage its results go to), or set it with"
                f" `pylm topology set {self.name} --next <server>.<function>`"
            )
        return config

    def _rewire(self) -> bool:
        joined = False
        for outlet in self._outlets + self._tees:
            joined = outlet.rewire(self.logger) or joined
        return joined

    def _stop_following(self) -> None:
        super()._stop_following()
        for outlet in self._outlets + self._tees:
            outlet.stop_following()

    def _outputs(self) -> list[zmq.Socket | None]:
        self._push = None
        return [socket for outlet in self._outlets + self._tees for socket in outlet.take_sockets()]

    def _emit(self, body: bytes, start: int, end: int, result: bytes) -> None:
        push = self._push
        assert push is not None
        if len(result) > _SPLIT or not self._plain:
            self._succeed(protocol.decode([body]), result)
            return
        out = self._output(body, start, end, result)
        try:
            send_frame(push, out, zmq.NOBLOCK)
        except zmq.Again:
            self._send(push, [out])

    def _output(self, body: bytes, start: int, end: int, result: bytes) -> bytes:
        # The id and deadline bytes (9 to 25) go on as they came.
        sizes = _pack_sizes(len(self._next_target), end - start)
        return b"".join((_FAST, sizes, body[9:25], self._next_target, body[start:end], result))

    def _error_route(self, route: bytes) -> bytes:
        return route

    def _emit_batch(self, outputs: list[tuple[bytes, bytes]]) -> None:
        push = self._push
        assert push is not None
        if not outputs:
            return
        out = outputs[0][1] if len(outputs) == 1 else protocol.pack_batch([m for _, m in outputs])
        try:
            send_frame(push, out, zmq.NOBLOCK)
        except zmq.Again:
            self._send(push, [out])

    def _succeed(self, message: protocol.Message, result: bytes) -> None:
        outlet = self._outlets[0]
        payload = result
        if len(self._outlets) > 1:
            try:
                call, payload = self.handle_stream(result)
                chosen = self._by_call.get(call)
                if chosen is None:
                    raise ValueError(
                        f"handle_stream chose {call!r}, not one of"
                        f" {[o.call for o in self._outlets]}"
                    )
                if not isinstance(payload, bytes):
                    raise TypeError(f"handle_stream gave {type(payload).__name__}, not bytes")
            except Exception as exc:
                error = self._remote_error(self.name.encode() + b".handle_stream", exc)
                if message.route:
                    self._fail(message, error)
                else:
                    self._unrouted_error(error)
                return
            outlet = chosen
        assert outlet.socket is not None
        more = message.flags & protocol.MORE
        frames = protocol.encode(
            protocol.REQUEST,
            message.msg_id,
            payload,
            outlet.target,
            message.route,
            message.deadline,
            more,
        )
        socket = outlet.for_stream(message.route, message.msg_id) if more else outlet.socket
        self._send(socket, frames)
        for tee in self._tees:  # copies nobody answers: no route, no MORE
            assert tee.socket is not None
            copy = protocol.encode(
                protocol.REQUEST, message.msg_id, result, tee.target, b"", message.deadline
            )
            self._send(tee.socket, copy)

    def _fail(self, message: protocol.Message, error: PylmError) -> None:
        socket = self._outlets[0].for_stream(message.route, message.msg_id)
        self._send(socket, protocol.encode_error(message.msg_id, error, message.route))

    def _pass_on(self, message: protocol.Message, frames: list[bytes]) -> None:
        """An ERROR or an END: after the stream items of its job, if any."""
        self._send(self._outlets[0].for_stream(message.route, message.msg_id), frames)


class LastServer(_Stage):
    """The last stage of a pipeline: runs the function a job names and sends
    the result back to the client that sent the job, through a ROUTER socket
    bound at ``push_address`` to which clients connect."""

    _pylm_framework = True
    kind = "chained-last"

    def __init__(
        self,
        name: str,
        pull_address: str | None = None,
        push_address: str | None = None,
        db_address: str | None = None,
        log_address: str | None = None,
        perf_address: str | None = None,
        ping_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        *,
        hwm: int = DEFAULT_HWM,
        **options: Unpack[ServerOptions],
    ) -> None:
        super().__init__(
            name,
            pull_address,
            db_address,
            log_address,
            perf_address,
            ping_address,
            log_level,
            messages,
            hwm=hwm,
            **options,
        )
        self.push_address = push_address and check_address(push_address, "push_address")
        self.push: str | None = None  # where clients connect for results
        self._router: zmq.Socket | None = None
        # Results for clients not connected (yet): a client that found this
        # instance in the registry after its jobs got here greets it soon.
        self._parked: dict[bytes, list[tuple[float, list[bytes]]]] = {}
        self._parked_count = 0
        # Results for clients that are not reading, sent when they have room
        # (one that left meanwhile: as for one not here yet).
        self._backlog = Backlog(MAX_BACKLOG, self._park)
        self._idle_timeout = _IDLE_MS

    def _open_output(self) -> None:
        router = self._secure(self.context.socket(zmq.ROUTER))
        self._router = router
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, self.hwm)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown client: an error, not silence
        router.setsockopt(zmq.MAXMSGSIZE, _FRAME_SLACK)  # clients only say hello
        self._backlog.socket = router
        self.push = self._listen(router, self.push_address or self._any_port())
        self._poller.register(router, zmq.POLLIN)
        self._idle_timeout = self._poll_timeout

    def _endpoints(self) -> dict[str, str]:
        assert self.push is not None
        return {**super()._endpoints(), "push": self.push}

    def _name_only(self) -> bool:
        return super()._name_only() or self.push_address is None

    def _outputs(self) -> list[zmq.Socket | None]:
        router, self._router = self._router, None
        if self._parked_count:
            self.logger.warning(
                "%s: %d results dropped on stop: their clients were not connected"
                " (not yet, or no longer)",
                self.name,
                self._parked_count,
            )
            self._parked.clear()
            self._parked_count = 0
        return [router]

    def _serve_other(self, socket: zmq.Socket) -> None:
        if socket is self._router:
            self._greet()
        else:
            super()._serve_other(socket)

    def _greet(self) -> None:
        """Answer a client's hello (a PING on the results socket): once it has
        the answer, the client knows its results have a way back."""
        assert self._router is not None
        try:
            frames = recv_message(self._router)
        except zmq.Again:  # taken already (while waiting for room to send)
            return
        try:
            message = protocol.decode(frames[1:])
        except ProtocolError as error:
            self._drop("head", str(error), frames)
            return
        if message.kind == protocol.PING:
            # Through the backlog, as results go: a client that does not
            # read makes the stage wait for nobody.
            self._to_client(frames[0], protocol.encode(protocol.PONG, message.msg_id, self._pong()))
            self._release(frames[0])
        else:
            self._drop("kind", "clients only send PING on the results socket", frames)

    def _to_client(self, route: bytes, frames: list[bytes]) -> None:
        """Send to a client without waiting: a client whose queue is full (it
        is not reading) gets its results later from a backlog, while the
        other clients are served. Past MAX_BACKLOG results waiting in all, or
        a quarter of that for one client, the result is dropped (counted and
        logged): a stage never waits for a client."""
        if not self._backlog.offer(route, frames):
            if self.stats is not None:  # results: those of a BATCH count one by one
                batch = frames[0][:5] == _BATCH_PREFIX
                self.stats.undeliverable += len(protocol.unpack_batch(frames[0])) if batch else 1
            self._log_limited(
                "backlog-full",
                logging.WARNING,
                "%s: a result for client %s dropped: it takes none, and %d results wait for"
                " it (%d for all clients)",
                self.name,
                route.hex(),
                len(self._backlog.waiting(route)),
                self._backlog.size,
            )
        if self._backlog:
            self._poll_timeout = _ROUTER_RETRY_MS  # wake up to send what waits

    def _tick(self) -> None:
        if self._backlog:
            self._backlog.flush()
            if not self._backlog:
                self._poll_timeout = self._idle_timeout
        if self._parked_count:  # expired ones go with their warning, traffic or not
            self._expire_parked(time.monotonic())

    def _park(self, route: bytes, frames: list[bytes]) -> None:
        """Keep a result for a client not connected yet, for a while."""
        now = time.monotonic()
        self._expire_parked(now)
        if self._parked_count >= PARK_LIMIT:
            self.logger.warning(
                "%s: result for client %s dropped: it is not connected (and %d results"
                " already wait for clients)",
                self.name,
                route.hex(),
                self._parked_count,
            )
            return
        self._parked.setdefault(route, []).append((now + PARK_SECONDS, frames))
        self._parked_count += 1

    def _release(self, route: bytes) -> None:
        """The client ``route`` is connected: send it what waited for it."""
        assert self._router is not None
        self._expire_parked(time.monotonic())  # what expired is not sent late
        waiting = self._parked.pop(route, [])
        self._parked_count -= len(waiting)
        for _, frames in waiting:
            self._to_client(route, frames)  # parked again if it left meanwhile

    def _expire_parked(self, now: float) -> None:
        for route in [route for route, parked in self._parked.items() if parked[0][0] < now]:
            waiting = self._parked[route]
            kept = [entry for entry in waiting if entry[0] >= now]
            dropped = len(waiting) - len(kept)
            self._parked_count -= dropped
            if kept:
                self._parked[route] = kept
            else:
                del self._parked[route]
            self.logger.warning(
                "%s: %d results for client %s dropped: it did not connect within %g s",
                self.name,
                dropped,
                route.hex(),
                PARK_SECONDS,
            )

    def _emit(self, body: bytes, start: int, end: int, result: bytes) -> None:
        router = self._router
        assert router is not None
        if len(result) > _SPLIT:
            self._succeed(protocol.decode([body]), result)
            return
        route = body[start:end]
        reply = self._output(body, start, end, result)
        if self._backlog.holds(route):
            self._to_client(route, [reply])  # after what waits for that client
            return
        try:
            send_frame(router, route, _FIRST)  # the whole message goes, or none of it
        except zmq.ZMQError:  # full, or an unknown client: the careful way
            self._to_client(route, [reply])
            return
        send_frame(router, reply)

    def _output(self, body: bytes, start: int, end: int, result: bytes) -> bytes:
        return b"".join((protocol.REPLY_PREFIX, body[9:17], _NO_DEADLINE, result))

    def _error_route(self, route: bytes) -> bytes:
        return b""  # the client needs no route

    def _emit_batch(self, outputs: list[tuple[bytes, bytes]]) -> None:
        by_client: dict[bytes, list[bytes]] = {}
        for route, message in outputs:
            by_client.setdefault(route, []).append(message)
        for route, messages in by_client.items():
            batch = messages[0] if len(messages) == 1 else protocol.pack_batch(messages)
            self._to_client(route, [batch])

    def _succeed(self, message: protocol.Message, result: bytes) -> None:
        if not message.route:
            return  # a job nobody waits for (a tee's copy): its result stays here
        flags = message.flags & protocol.MORE
        reply = protocol.encode(protocol.REPLY, message.msg_id, result, flags=flags)
        self._to_client(message.route, reply)

    def _fail(self, message: protocol.Message, error: PylmError) -> None:
        self._to_client(message.route, protocol.encode_error(message.msg_id, error))

    def _pass_on(self, message: protocol.Message, frames: list[bytes]) -> None:
        """An ERROR or an END from an earlier stage: on to the client."""
        self._to_client(
            message.route, protocol.encode(message.kind, message.msg_id, message.payload)
        )


class Sink(LastServer):
    """A last stage that several stages feed (fan-in): the branches of a
    stage with ``handle_stream``, several pipelines, the copies of a
    ``tee``. It answers the client of every job that has a route (as a
    :class:`LastServer` does) and runs those without one (a tee's copies)
    for their effect: their results go nowhere, so a function that should
    keep them stores them itself. Any number of stages may name it as their
    next call; its PULL socket takes from all of them fairly."""

    _pylm_framework = True
    kind = "sink"
