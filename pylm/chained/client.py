"""The client of a pipeline: sends jobs to its first stage, receives the
results from its last stage."""

from __future__ import annotations

import itertools
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from pylm import protocol
from pylm.cache import CacheClient
from pylm.calls import (
    DEFAULT_TIMEOUT,
    Caller,
    curve_key,
    pong_info,
    read_answer,
)
from pylm.discovery import DEFAULT_WAIT, Peers, check_wait
from pylm.errors import (
    CurveRefused,
    ProtocolError,
    PylmError,
    RegistryError,
    RequestTimeout,
)
from pylm.lifecycle import Closing
from pylm.protocol import (
    BATCH_PREFIX,
    COUNT,
    DEFAULT_MAX_PAYLOAD,
    HEAD_SIZE,
    LEAD,
    REPLY_LEAD,
    REPLY_PREFIX,
    pack_id_deadline,
    read_id,
)
from pylm.security import Curve
from pylm.telemetry.counting import BUCKETS, SAMPLE_EVERY, FunctionStats
from pylm.transport import check_address, close_socket, default_context, rest_of, send_frame
from pylm.window import JobResult, Outcome, Send, Stop, Wait, Window, WindowedClient

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, Registry

__all__ = ["JobResult", "LoopClient"]

DEFAULT_IN_FLIGHT = 1000
LAST_KINDS = ("chained-last", "sink")  # the kinds of stage that answer clients
MAX_BATCH = 1024  # jobs per message at most

_FIRST_BOUND = BUCKETS[0]
_UNTIMED_MASK = SAMPLE_EVERY - 1
_WIRING_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_DISCONNECTED
)
_ARGUMENTS = (
    "LoopClient takes the last stage's push_address as push_address (the first"
    " argument: results come from there) and the first stage's pull_address as"
    " pull_address (the second: jobs go there)"
)


def _bucket(seconds: float) -> int:
    return bisect_left(BUCKETS, seconds)


def _resolve_pipeline(
    registry: Registry, first: str, wait: float
) -> tuple[list[InstanceRecord], str, str, list[InstanceRecord]]:
    """From the registry: the first stage's instances, its cache address,
    and the last stage's name and instances, found by following each
    stage's ``next`` (waiting up to ``wait`` seconds for each stage)."""
    records = registry.wait_for_instances(first, wait)
    firsts = records
    db = next((record.endpoints["db"] for record in records if "db" in record.endpoints), None)
    if not any("pull" in record.endpoints for record in records) or db is None:
        raise RegistryError(f"{first!r} is not a chained stage: it has no pull and db endpoints")
    seen = {first}
    while True:
        if all(record.kind in LAST_KINDS for record in records):
            return firsts, db, records[0].name, records
        following = next((record.next for record in records if record.next), None)
        if not following:
            raise RegistryError(
                f"stage {records[0].name!r} has no next stage and is not a last stage"
            )
        name = following.rpartition(".")[0]
        if name in seen:
            raise RegistryError(f"the pipeline from {first!r} loops back to {name!r}")
        seen.add(name)
        records = registry.wait_for_instances(name, wait)


class _Wiring:
    """Watches the connections of a client's socket to addresses it was
    given, until the client's greeting: a connection that ends in the
    ZeroMQ handshake, before it succeeded, for a protocol error (libzmq
    reports no HANDSHAKE_FAILED_NO_DETAIL then) reached a socket of a kind
    this one cannot talk to (a PULL where a ROUTER should be: addresses
    swapped), and libzmq does not try that connection again. One the peer
    merely closed (HANDSHAKE_FAILED_NO_DETAIL: a proxy whose backend is not
    up, a server stopping) is tried again, and is no sign of wrong wiring.
    One that failed for a mechanism mismatch reached a server that takes
    CURVE only (a client by address without keys is watched), and is named
    as such."""

    def __init__(self, socket: zmq.Socket, expected: str) -> None:
        self.socket = socket
        self.expected = expected  # what the peer should be: "a last stage's push socket, ..."
        # An address of its own: pyzmq's default is named after the socket's
        # file descriptor, which a newer socket may reuse.
        address = f"inproc://pylm-wiring-{os.urandom(8).hex()}"
        self.monitor: zmq.Socket = socket.get_monitor_socket(_WIRING_EVENTS, address)
        self._shook: dict[bytes, bool] = {}  # endpoint -> handshake done, since connected
        self._secured: set[bytes] = set()  # endpoints whose peer uses another mechanism

    def refused(self) -> str | None:
        """Why a peer refused the connection in the handshake, if one did:
        where it is, and what that says."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.ZMQError:  # none waiting (Again), or closed
                return None
            endpoint, kind = event["endpoint"], event["event"]
            if kind == zmq.EVENT_CONNECTED:
                self._shook[endpoint] = False
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._shook[endpoint] = True
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._shook.pop(endpoint, None)  # closed by the peer: retried
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                if event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                    self._secured.add(endpoint)
            elif self._shook.get(endpoint) is False:  # disconnected in the handshake
                where = bytes(endpoint).decode(errors="replace")
                if endpoint in self._secured:
                    return (
                        f"the peer at {where} refused this client's plain connection: it"
                        " takes CURVE connections only. Give the client curve= (or set"
                        " PYLM_CURVE_KEYS) with its keys and the server's public key"
                        " (docs/security.md)"
                    )
                return (
                    f"the peer at {where} closed the connection in the ZeroMQ handshake: it is"
                    f" not {self.expected}. {_ARGUMENTS}"
                )

    def close(self) -> None:
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:  # the socket closed first: its monitoring ended with it
            pass
        self.monitor.close(linger=0)


class LoopClient(Caller, WindowedClient, Closing):
    """Sends jobs to the first stage of a pipeline and receives their results
    from the last stage::

        client = LoopClient('tcp://127.0.0.1:5561',   # push_address: the last stage's
                            'tcp://127.0.0.1:5555',   # pull_address: the first stage's
                            'tcp://127.0.0.1:5556',   # db_address: the first stage's
                            'step1')                  # the first stage's name
        for result in client.job('foo', [b'a message', b'another']):
            print(result)
        client = LoopClient('step1')                  # or from the registry

    Each address has the name of the stage's argument it must equal, as in
    the 2016 pylm: ``push_address`` is where the last stage pushes results
    (the client receives them there), ``pull_address`` where the first stage
    pulls jobs (the client sends them there). Given swapped, the client says
    so on its first job instead of waiting out its timeout.

    Results come back to the client that sent the jobs, whatever other
    clients use the pipeline. At most ``max_in_flight`` jobs are out at once;
    beyond that, and whenever the pipeline is full (``hwm``: messages the
    sending socket queues), sending waits for results.
    ``batch``: up to that many small jobs travel in one message (a BATCH),
    and so do their results, stage after stage; for many small jobs this
    multiplies the throughput. The payloads are taken from the iterable that
    many at a time, so leave it at 1 for an iterable that waits between items.
    A LoopClient is for one thread at a time.
    """

    _kind = "LoopClient"

    def __init__(
        self,
        push_address: str | Sequence[str],
        pull_address: str | None = None,
        db_address: str | None = None,
        server_name: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        batch: int = 1,
        hwm: int = 1000,
        announce: bool = True,
        context: zmq.Context | None = None,
        registry: Registry | str | None = None,
        curve: Curve | None = None,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        firsts: Peers | None = None
        self._wiring: dict[zmq.Socket, _Wiring] = {}  # sockets given addresses, until greeted
        self._miswired: PylmError | None = None
        curve = curve if curve is not None else Curve.from_env()
        keys: tuple[bytes | None, bytes | None] = (None, None)  # CURVE: first and last stage
        self._last: Peers | None = None  # the last stage's instances, when followed
        owned: Registry | None = None
        if pull_address is None and db_address is None and server_name is None:
            # Only the first stage's name: the rest comes from the registry,
            # followed from then on (stages' instances joining or leaving).
            if not isinstance(push_address, str) or "://" in push_address:
                raise ValueError(
                    "give LoopClient the first stage's name alone, or all four of"
                    " push_address, pull_address, db_address and server_name"
                )
            server_name = push_address
            firsts, db_address, self._last, owned, keys = self._follow_pipeline(
                server_name, registry, check_wait(wait), curve
            )
            push_address = self._last.endpoints
            pull_address = firsts.endpoints[0]
        if pull_address is None or db_address is None or server_name is None:
            raise ValueError("pull_address, db_address and server_name go together")
        super().__init__(pull_address, server_name, timeout, max_payload, curve=curve, wait=wait)
        # CURVE keys of the first and the last stage: by name, from their records
        # (None: that stage takes plain connections); by address, from the settings.
        self._by_name = firsts is not None
        if self._by_name:
            self.server_key, self._last_key = keys
        else:
            self._last_key = self.server_key
        if self._by_name and keys == (None, None):
            self.curve = None  # the pipeline takes plain connections: so does this client
        if firsts is not None:
            self._peers, self._registry = firsts, owned
            self.endpoints = firsts.endpoints
            self.connection = ",".join(firsts.endpoints)
        pushes = [push_address] if isinstance(push_address, str) else list(push_address)
        self.push_addresses = [check_address(address, "push_address") for address in pushes]
        if not self.push_addresses:
            raise ValueError("push_address needs at least one address")
        self._init_window(max_in_flight)
        if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be an int from 1 to {MAX_BATCH}, got {batch!r}")
        self.batch = batch
        self.db_address = check_address(db_address, "db_address")
        # The route: the results sockets' routing id, which every job carries
        # so that the last stage knows where its result goes.
        self.route = b"pylm-" + os.urandom(12)
        context = default_context(context)
        self._context = context
        # Addresses given (not from the registry) may be wrong; CURVE's own
        # handshake failures are watched already (Caller._no_answer).
        self._watch_wiring = not self._by_name and self.curve is None
        self._results = [self._result_socket(address) for address in self.push_addresses]
        self._jobs: zmq.Socket | None = self._secure(context.socket(zmq.PUSH))
        self._jobs.setsockopt(zmq.LINGER, 0)
        self._jobs.setsockopt(zmq.SNDHWM, hwm)
        if self._watch_wiring:
            self._wiring[self._jobs] = _Wiring(
                self._jobs, "a first stage's pull socket, which jobs go to"
            )
        # Not IMMEDIATE: with it, jobs queued for a first-stage instance that
        # leaves cleanly were lost (measured), while without it they reach the
        # instance, which serves them before it closes. The price: a killed
        # instance gets its share of jobs until its record expires.
        for endpoint in self.endpoints:  # several first-stage instances: round-robin
            self._jobs.connect(endpoint)
        self._cache: CacheClient | None = None
        self._greeted = False
        self._ids = itertools.count(1)
        self.dropped = 0  # results that belong to no job in flight (late, or garbage)
        if announce:
            print("Client with the following connections:")
            for address in self.push_addresses:
                print(f" *Listening to input from {address}")
            print(f" *Sending jobs to {self.connection}")

    @staticmethod
    def _follow_pipeline(
        first: str, registry: Registry | str | None, wait: float, curve: Curve | None
    ) -> tuple[Peers, str, Peers, Registry | None, tuple[bytes | None, bytes | None]]:
        from pylm.registry import Registry

        client = registry if isinstance(registry, Registry) else Registry(registry)
        try:
            firsts, db, last, lasts = _resolve_pipeline(client, first, wait)
            if not any("push" in record.endpoints for record in lasts):
                raise RegistryError(f"the last stage {last!r} has no push endpoint")
            keys = curve_key(first, firsts, curve), curve_key(last, lasts, curve)
        except BaseException:
            if client is not registry:
                client.close()
            raise
        return (
            Peers(client, first, "pull", firsts),
            db,
            Peers(client, last, "push", lasts),
            None if client is registry else client,
            keys,
        )

    def _follow(self, poller: zmq.Poller | None, timeout: float) -> None:
        """Apply what the registry says of the first and last stages now:
        jobs go to the first stage's instances, results come from every last
        stage instance (a new one is greeted before going on)."""
        if self._peers is not None and self._peers.changed and self._jobs is not None:
            self._rewire(self._jobs)
        if self._last is None or not self._last.changed:
            return
        joined, left = self._last.take()
        for address in left:
            index = self.push_addresses.index(address)
            socket = self._results.pop(index)
            self.push_addresses.pop(index)
            if poller is not None:
                poller.unregister(socket)
            self._handshakes.forget(socket)
            close_socket(socket)
        deadline = time.monotonic() + timeout
        for address in joined:
            socket = self._result_socket(address)
            self._results.append(socket)
            self.push_addresses.append(address)
            self._greet_one(socket, address, deadline, timeout)
            if poller is not None:
                poller.register(socket, zmq.POLLIN)

    # ------------------------------------------------------------------ jobs

    def _open(
        self, function: str, payloads: Iterator[bytes], timeout: float, window: Window
    ) -> tuple[Send, Wait]:
        jobs = self._jobs
        if jobs is None:
            raise RuntimeError("the client is closed")
        self._follow(None, timeout)
        self._greet(timeout)
        _, target, numbers = self._calls._target(function)
        # Every job's body is prefix + id and deadline + tail + payload.
        prefix = protocol.request_prefix(target, self.route)
        tail = target + self.route
        inline_limit = min(self._calls.max_payload, protocol.SPLIT_PAYLOAD)
        add, batch = window.add, self.batch
        poller = zmq.Poller()
        for socket in self._results:
            poller.register(socket, zmq.POLLIN)
        # Jobs the pipeline had no room for yet: their ids and frames.
        waiting: tuple[list[int], bytes | list[bytes]] | None = None
        carried: bytes | None = None  # a large payload taken, to go on its own next
        ids, clock, wall = self._ids, time.monotonic, time.time
        exhausted = False

        def send(room: int, until: float) -> Stop:
            """Up to ``batch`` small jobs per message while there is room."""
            nonlocal waiting, carried, exhausted
            if (self._last is not None and self._last.changed) or (
                self._peers is not None and self._peers.changed
            ):
                self._follow(poller, timeout)
            while room > 0:
                if waiting is None:
                    if exhausted:
                        return Stop.DONE
                    group: list[int] = []
                    bodies: list[bytes] = []
                    take = min(room, batch)
                    while len(bodies) < take:
                        payload = carried if carried is not None else next(payloads, None)
                        carried = None
                        if payload is None:
                            exhausted = True
                            break
                        if type(payload) is bytes and len(payload) <= inline_limit:
                            msg_id = next(ids)
                            stamp = pack_id_deadline(msg_id, wall() + timeout)
                            bodies.append(b"".join((prefix, stamp, tail, payload)))
                            group.append(msg_id)
                        elif bodies:
                            carried = payload  # a large one goes on its own, next
                            break
                        else:
                            protocol.check_payload(payload, self._calls.max_payload)
                            msg_id = next(ids)
                            frames = protocol.encode(
                                protocol.REQUEST,
                                msg_id,
                                bytes(payload),
                                target,
                                self.route,
                                wall() + timeout,
                            )
                            waiting = ([msg_id], frames[0] if len(frames) == 1 else frames)
                            break
                    if waiting is None:
                        if not bodies:
                            return Stop.DONE
                        message = bodies[0] if len(bodies) == 1 else protocol.pack_batch(bodies)
                        waiting = (group, message)
                try:
                    outgoing = waiting[1]
                    if isinstance(outgoing, bytes):
                        send_frame(jobs, outgoing, zmq.NOBLOCK)
                    else:
                        jobs.send_multipart(outgoing, zmq.NOBLOCK)
                except zmq.Again:
                    return Stop.BLOCKED
                now = clock()
                add(waiting[0], now)
                room -= len(waiting[0])
                waiting = None
                if now >= until:
                    return Stop.SLICED
            return Stop.FULL

        def wait(ms: int) -> list[Outcome]:
            if waiting is not None:
                poller.register(jobs, zmq.POLLOUT)
            ready = dict(poller.poll(ms))
            if waiting is not None:
                poller.unregister(jobs)
            outcomes: list[Outcome] = []
            for socket in self._results:
                if socket in ready:
                    outcomes += self._collect(socket, window, numbers)
            return outcomes

        return send, wait

    def _collect(
        self, socket: zmq.Socket, window: Window, numbers: FunctionStats | None
    ) -> list[Outcome]:
        """Every result waiting on ``socket``; counted in ``numbers``."""
        outcomes: list[Outcome] = []
        recv, jobs = socket.recv, window.jobs
        pop = jobs.pop
        # One clock reading for the results drained together (they were all
        # there by then): a job took now - its sending time.
        now = time.monotonic()
        bodies: list[bytes] = []  # the rest of a BATCH of results being read
        while True:
            in_batch = bool(bodies)
            if in_batch:
                body = bodies.pop()
            else:
                try:
                    body = recv(zmq.NOBLOCK)
                except zmq.Again:
                    return outcomes
                if body[LEAD] == BATCH_PREFIX:
                    try:
                        bodies = protocol.unpack_batch(body)
                    except ProtocolError:
                        self.dropped += 1
                        continue
                    bodies.reverse()  # popped from the end: in order
                    continue
            if body[REPLY_LEAD] == REPLY_PREFIX and len(body) >= HEAD_SIZE:  # a one-frame REPLY
                entry = pop(read_id(body)[0], None)
                if entry is None:
                    self.dropped += 1
                else:
                    outcomes.append((entry.index, body[HEAD_SIZE:], None, True))
                    if numbers is None:
                        continue
                    # numbers.done(...), inline, timing a sample (pylm.metrics.SAMPLE_EVERY)
                    if len(outcomes) & _UNTIMED_MASK == 1:
                        took = now - entry.sent
                        numbers.seconds += took
                        numbers.buckets[0 if took <= _FIRST_BOUND else _bucket(took)] += 1
                    else:
                        numbers.untimed += 1
                    numbers.bytes_out += len(body) - HEAD_SIZE
                continue
            frames = [body] if in_batch else [body, *rest_of(socket)]
            message = read_answer(frames)
            entry = None if message is None else jobs.get(message.msg_id)
            if entry is None or message is None:
                self.dropped += 1
                continue
            if message.kind == protocol.REPLY and message.flags & protocol.MORE:
                # An item of a job that gives several results (a Hub's).
                outcomes.append((entry.index, message.payload, None, False))
                window.tally(message.msg_id, entry, None)
                continue
            if message.kind == protocol.END:
                payload = message.payload
                count = COUNT.unpack(payload)[0] if len(payload) == COUNT.size else 0
                window.tally(message.msg_id, entry, count)
                continue
            pop(message.msg_id)
            took = now - entry.sent
            try:
                result = protocol.result_of(message)
            except PylmError as error:
                outcomes.append((entry.index, None, error, True))
                if numbers is not None:
                    numbers.failed(took, 0)
            else:
                outcomes.append((entry.index, result, None, True))
                if numbers is not None:
                    numbers.done(took, 0, len(result))

    def _secure(self, socket: zmq.Socket, server_key: bytes | None = None) -> zmq.Socket:
        return self._secure_stage(socket, server_key or self.server_key)  # the first stage

    def _secure_stage(self, socket: zmq.Socket, key: bytes | None) -> zmq.Socket:
        """CURVE to the stage whose key is ``key``; plain to a stage found
        by name that registered none."""
        if self._by_name and key is None:
            return socket
        return super()._secure(socket, key)

    def _result_socket(self, address: str) -> zmq.Socket:
        """A socket receiving results from the last stage instance at ``address``."""
        socket: zmq.Socket = self._secure_stage(self._context.socket(zmq.DEALER), self._last_key)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self.route)
        if self._watch_wiring:
            self._wiring[socket] = _Wiring(
                socket, "a last stage's push socket, which results come from"
            )
        socket.connect(address)
        return socket

    def _greet(self, timeout: float) -> None:
        """Make sure every last stage knows this client before jobs go out:
        a ROUTER drops messages for a client it has not heard from."""
        if self._greeted:
            return
        if self._miswired is not None:
            raise self._miswired
        deadline = time.monotonic() + timeout
        for socket, address in zip(self._results, self.push_addresses, strict=True):
            self._greet_one(socket, address, deadline, timeout)
        jobs = self._wiring.get(self._jobs) if self._jobs is not None else None
        refused = None if jobs is None else jobs.refused()
        if refused is not None:
            self._miswired = PylmError(refused)
            raise self._miswired
        self._stop_watching()
        self._greeted = True

    def _greet_one(self, socket: zmq.Socket, address: str, deadline: float, timeout: float) -> None:
        msg_id = next(self._ids)
        socket.send_multipart(protocol.encode(protocol.PING, msg_id))
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        wiring = self._wiring.get(socket)
        if wiring is not None:
            poller.register(wiring.monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
            if wiring is not None and wiring.monitor in ready:
                refused = wiring.refused()
                if refused is not None:
                    self._miswired = PylmError(refused)
                    raise self._miswired
            if socket not in ready:
                if left <= 0:
                    raise self._no_answer(
                        f"the last stage at {address} did not answer within {timeout:g} s"
                    )
                continue
            message = read_answer(socket.recv_multipart())
            if message is not None and message.msg_id == msg_id:
                self._check_last(message, address)
                return
            self.dropped += 1

    def _check_last(self, answer: protocol.Message, address: str) -> None:
        """Raise if the greeting's answer comes from a server of another
        kind than a last stage (a stage's db_address given as push_address)."""
        if answer.kind != protocol.PONG:
            return
        try:
            info = pong_info(answer.payload)
        except ProtocolError:
            return
        kind = info.get("kind")
        if isinstance(kind, str) and kind not in LAST_KINDS:
            what = "a stage's cache (its db_address)" if kind == "cache" else f"a {kind} server"
            self._miswired = PylmError(
                f"the server at {address} is {what} named {str(info.get('name'))!r},"
                f" not a last stage. {_ARGUMENTS}"
            )
            raise self._miswired

    def _stop_watching(self) -> None:
        wiring, self._wiring = list(self._wiring.values()), {}
        for watched in wiring:
            watched.close()

    def _no_answer(self, text: str, separator: str = ": ") -> RequestTimeout:
        error = super()._no_answer(text, separator)
        if isinstance(error, CurveRefused) or self._by_name:
            return error
        return RequestTimeout(
            f"{text}{separator}is every stage running? Check the addresses too: the last"
            " stage's push_address is this client's push_address, the first stage's"
            " pull_address this client's pull_address, and each stage's next_address the"
            " next stage's pull_address"
        )

    # ------------------------------------------------------------------ cache

    def _cache_client(self) -> CacheClient:
        if self._cache is None:
            self._cache = CacheClient(
                self.db_address,
                self.server_name,
                timeout=self.timeout,
                context=self._context,
                curve=self.curve and Curve(self.curve.keys, server_key=self.server_key),
            )
        return self._cache

    def set(self, value: bytes, key: str | None = None) -> str:
        """Store ``value`` in the first stage's cache; return its key."""
        return self._cache_client().set(value, key)

    def get(self, key: str) -> bytes:
        """The value under ``key`` in the first stage's cache."""
        return self._cache_client().get(key)

    def delete(self, key: str) -> None:
        """Remove ``key`` from the first stage's cache."""
        self._cache_client().delete(key)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._stop_watching()
        last, self._last = self._last, None
        if last is not None:
            last.close()
        self._stop_following()
        for socket in self._results:
            close_socket(socket)
        self._results = []
        close_socket(self._jobs)
        self._jobs = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None
