"""Routing to next stages: an :class:`Outlet` is where a stage sends on to
one next stage (a PUSH socket connected to that stage's instances, given or
followed in the registry, and which instance gets a stream's items);
:class:`ToNextStage` is the output of a stage with a next stage, over its
outlets: the next stage, the branches, the tees."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.calls import curve_key
from pylm.chained.output import Output, WaitForRoom
from pylm.errors import PylmError
from pylm.liveness import Connections, retire, to_live_peers
from pylm.logs import LimitedLog
from pylm.protocol import SPLIT_PAYLOAD, one_frame_request
from pylm.protocol import forward as forward_request
from pylm.security import Curve
from pylm.transport import copied, send_frame

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, Registry

__all__ = ["Outlet", "ToNextStage"]


class Outlet:
    """Where a stage sends on to one next stage: a PUSH socket connected to
    the stage's instances, given or followed in the registry (the registry's
    thread notes changes, the serving thread applies them).

    Every message to that stage leaves through :attr:`socket` (libzmq picks
    the instance, round-robin) or :meth:`for_stream` (the instance a job's
    stream goes to): the choice of instance is made here and nowhere else."""

    def __init__(self, call: str, addresses: list[str]) -> None:
        self.curve: Curve | None = None  # the stage's CURVE settings, given to open()
        self._logger = logging.getLogger(__name__)  # the stage's, once open() gives it
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
        self._links: Connections | None = None

    def open(
        self,
        context: zmq.Context,
        hwm: int,
        registry: Registry | None,
        curve: Curve | None,
        logger: logging.Logger,
        links: Connections | None = None,
        at_once: bool = True,
    ) -> zmq.Socket:
        """Connect to the given addresses, or (with ``registry``) to the
        instances registered now (``at_once``: read now; otherwise as the
        following first tells, without waiting on etcd), and follow them;
        with the stage's CURVE settings, telling its ``logger`` of instances
        that join and leave, and its ``links`` of the connections that live
        and drop."""
        self._context, self._hwm, self._links = context, hwm, links
        self.curve, self._logger = curve, logger
        if registry is not None:
            if at_once:  # otherwise the key comes with the records (_changed)
                self._key = curve_key(self.server, registry.instances(self.server), self.curve)
        elif self.curve is not None:  # by address: never plain text in silence
            where = ", ".join(self.addresses)
            self.curve.require_server_key(f"next stage {self.server!r} at {where}")
        socket = self._push_socket()
        self.socket = socket
        for address in self.addresses:
            socket.connect(address)
        if registry is not None:
            if at_once:
                self._changed(registry.instances(self.server))  # connect at once ...
                self.rewire()
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

    def rewire(self) -> bool:
        """Apply what the registry said; True if an instance joined or left
        (:attr:`socket` is then one made anew)."""
        with self._lock:
            wanted, self._wanted = self._wanted, None
        if wanted is None or self.socket is None:
            return False
        logger = self._logger
        joined = wanted - self.connected
        if joined:
            self._secure(self.socket)  # the key may have come with these instances
            if self.curve is not None and not (self._key or self.curve.server_key):
                if not self._warned_plain:
                    logger.warning(
                        "next stage %s registered no CURVE key: this stage, with CURVE,"
                        " sends to it in plain text",
                        self.server,
                    )
                self._warned_plain = True
            # A key in the records, and none here (open() refuses that
            # when the key is there first).
            if self.curve is None and self._key and not self._warned_keys:
                self._warned_keys = True
                logger.error(
                    "next stage %s requires CURVE and this stage has no keys"
                    " (PYLM_CURVE_KEYS): what it sends there is refused, and those jobs"
                    " time out; restart it with keys",
                    self.server,
                )
        left = self.connected - wanted
        if left:
            # A new socket for the instances that stay; what the old one
            # queued for those that left still reaches them (pylm.liveness).
            retire(self.socket, self._links)
            self.socket = self._push_socket()
            joined = wanted
        for address in joined:
            self.socket.connect(address)
            if address in self.connected:
                continue
            logger.info("next stage %s: instance %s joined", self.server, address)
        for address in left:
            if self._links is not None:
                self._links.discard(address)
            logger.info("next stage %s: instance %s left", self.server, address)
        self.connected = wanted
        self._instances = sorted(wanted | set(self.addresses))
        for address in [a for a in self._sticky if a not in wanted]:
            retire(self._sticky.pop(address), self._links)
        return bool(joined)

    def _push_socket(self) -> zmq.Socket:
        assert self._context is not None
        socket: zmq.Socket = to_live_peers(self._context.socket(zmq.PUSH))
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, self._hwm)
        self._secure(socket)
        if self._links is not None:
            self._links.watch(socket, drops=True)
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
        address = instances[zlib.crc32(route + msg_id.to_bytes(8, "big")) % len(instances)]
        socket = self._sticky.get(address)
        if socket is None:
            socket = self._sticky[address] = self._push_socket()
            socket.connect(address)
        return socket

    @property
    def following(self) -> concurrent.futures.Future[None] | None:
        """The registry's following of the next stage (None: not followed)."""
        return self._following

    def stop_following(self) -> None:
        following, self._following = self._following, None
        if following is not None:
            following.cancel()

    def take_sockets(self) -> list[zmq.Socket | None]:
        sockets: list[zmq.Socket | None] = [self.socket, *self._sticky.values()]
        self.socket = None
        self._sticky.clear()
        return sockets


def _retargeted(frames: list[bytes], target: bytes) -> list[bytes]:
    """A message not sent yet, every REQUEST in it (it may be a BATCH of
    them) now for ``target``, a new next stage's call; an ERROR or an END
    is for whichever next stage gets it."""
    message = protocol.decode(frames)
    if message.kind == protocol.BATCH:
        jobs = protocol.unpack_batch(frames[0])
        return [protocol.pack_batch([_retargeted([job], target)[0] for job in jobs])]
    if message.kind != protocol.REQUEST:
        return frames
    return protocol.encode(
        protocol.REQUEST,
        message.msg_id,
        message.payload,
        target,
        message.route,
        message.deadline,
        message.flags & protocol.MORE,
    )


class ToNextStage(Output):
    """The output of a :class:`~pylm.chained.server.Server` (and a hub): each
    result goes on to the next stage, as the payload of its call, or to the
    branch ``choose`` picks, and a copy to each tee; an error or an END goes
    on after the stream items of its job. A full next stage makes the stage
    wait (``wait_for_room``: it serves its cache meanwhile): backpressure,
    not loss.

    What it needs of its stage comes in as arguments: the stage's ``name``,
    ``logger`` and ``curve`` (its CURVE settings, for the outlets); with
    branches, ``choose`` (the stage's ``handle_stream``: a result's call and
    payload), ``remote_error`` (the error a failing ``choose`` gives the
    job, as for a failing function) and ``unrouted`` (what becomes of the
    error of a job without a route: a tee's copy)."""

    def __init__(
        self,
        outlets: list[Outlet],
        tees: list[Outlet],
        *,
        name: str,
        logger: logging.Logger,
        curve: Curve | None,
        wait_for_room: WaitForRoom,
        choose: Callable[[bytes], tuple[str, bytes]],
        remote_error: Callable[[bytes, Exception], PylmError],
        unrouted: Callable[[PylmError], None],
    ) -> None:
        self.tees = tees
        self.name = name
        self.logger = logger
        self._limited_log = LimitedLog(logger, 1)  # the drops of a stop: a line a second
        self.curve = curve
        self._wait_for_room = wait_for_room
        self._choose = choose
        self._remote_error = remote_error
        self._unrouted = unrouted
        self._choice = name.encode("utf-8") + b".handle_stream"  # who failed, when choose fails
        self.socket: zmq.Socket | None = None  # the first next stage's PUSH socket
        self.set_outlets(outlets)
        # What open() was given, for a next stage that changes while running
        # (retarget), and that change, noted by the registry's thread.
        self._opened: tuple[zmq.Context, int, Callable[[], Registry], Connections | None] | None
        self._opened = None
        self._retarget: str | None = None
        self._rerouted = False  # put() took the new next stage: results made before name the old
        self._lock = threading.Lock()
        self.retargeted: Callable[[str], None] | None = None  # told of each change applied

    def set_outlets(self, outlets: list[Outlet]) -> None:
        """The next stage (the first outlet) and the branches."""
        self.outlets = outlets
        self.target = outlets[0].target if outlets else b""  # the first next stage's call
        self._by_call = {o.call: o for o in outlets} | {o.server: o for o in outlets}
        self.plain = len(outlets) <= 1 and not self.tees

    def all(self) -> list[Outlet]:
        """The outlets and the tees."""
        return self.outlets + self.tees

    def open(
        self,
        context: zmq.Context,
        hwm: int,
        registry: Callable[[], Registry],
        links: Connections | None = None,
    ) -> bool:
        """Connect every outlet (to its addresses, or to the instances in
        ``registry()``, followed), its connections watched by ``links``;
        True if any follows the registry."""
        following = False
        for outlet in self.all():
            found = None if outlet.addresses else registry()
            following = following or found is not None
            outlet.open(context, hwm, found, self.curve, self.logger, links)
        self.socket = self.outlets[0].socket
        self._opened = (context, hwm, registry, links)
        return following

    def retarget(self, call: str) -> None:
        """The next stage is now ``call`` (``server.function``, from the
        registry's thread): applied by the serving thread at its next
        :meth:`rewire`, or in :meth:`put` by a message waiting for room.
        What was sent before goes on to the old one."""
        with self._lock:
            self._retarget = call

    def _switch(self, call: str) -> None:
        """Send to ``call`` from now on: a new outlet, following that
        stage's instances in the registry (found without waiting on etcd);
        the old one stops following, and its sockets are retired (what they
        queued still goes out, pylm.liveness.retire)."""
        old = self.outlets[0]
        if call == old.call or self._opened is None:
            return
        context, hwm, registry, links = self._opened
        new = Outlet(call, [])
        new.open(context, hwm, registry(), self.curve, self.logger, links, at_once=False)
        self.set_outlets([new, *self.outlets[1:]])
        self.socket = new.socket
        old.stop_following()
        for socket in old.take_sockets():
            if socket is not None:
                retire(socket, links)
        self.logger.info("%s: next stage now %s (was %s)", self.name, call, old.call)
        if self.retargeted is not None:
            self.retargeted(call)

    def next_call(self) -> str | None:
        return self.outlets[0].call if self.outlets else None

    def branch_calls(self) -> list[str]:
        return [outlet.call for outlet in self.outlets[1:]]

    def tee_calls(self) -> list[str]:
        return [outlet.call for outlet in self.tees]

    def rewire(self) -> bool:
        """Apply a new next stage (:meth:`retarget`) and the instances that
        joined and left; True if a socket changed."""
        changed = False
        if self._retarget is not None:
            with self._lock:
                call, self._retarget = self._retarget, None
            if call is not None and call != self.outlets[0].call:
                self._switch(call)
                changed = True
        return self._rewire_outlets() or changed

    def _rewire_outlets(self) -> bool:
        """The instances that joined and left, for each outlet (not a new
        next stage, which :meth:`put` takes only with the message it holds)."""
        changed = False
        for outlet in self.all():
            changed = outlet.rewire() or changed
        if changed:
            self.socket = self.outlets[0].socket
        return changed

    def stop_following(self) -> None:
        for outlet in self.all():
            outlet.stop_following()

    def close(self) -> list[zmq.Socket | None]:
        self.socket = None
        return [socket for outlet in self.all() for socket in outlet.take_sockets()]

    def send_fast(self, body: bytes, start: int, end: int, result: bytes) -> None:
        socket = self.socket
        assert socket is not None
        if len(result) > SPLIT_PAYLOAD or not self.plain:
            self.send(protocol.decode([body]), result)
            return
        out = forward_request(body, self.target, body[start:end], result)  # fast_message, inlined
        try:
            send_frame(socket, out, zmq.NOBLOCK)
        except zmq.Again:
            self.put(self.outlets[0], [out])

    def send_result(self, route: bytes, msg_id: int, deadline: float, result: bytes) -> None:
        """Send on a job's one result that was made here, not read with its
        request (a hub's, from its worker): one frame when nothing but the
        next stage gets it."""
        socket = self.socket
        assert socket is not None
        if not self.plain or not route:
            self.send(
                protocol.Message(protocol.REQUEST, msg_id, result, b"", route, deadline), result
            )
            return
        out = one_frame_request(msg_id, deadline, self.target, route, result)
        try:
            send_frame(socket, out, zmq.NOBLOCK)
        except zmq.Again:
            self.put(self.outlets[0], [out])

    def send_results(self, results: list[tuple[bytes, int, float, bytes]]) -> None:
        """Send on results made here (a hub's: route, message id, deadline,
        result each) together: one BATCH when nothing but the next stage
        gets them and each has a route, else one by one."""
        if not self.plain or not all(route for route, _, _, _ in results):
            for route, msg_id, deadline, result in results:
                self.send_result(route, msg_id, deadline, result)
            return
        target = self.target
        self.send_batch(
            [
                (route, one_frame_request(msg_id, deadline, target, route, result))
                for route, msg_id, deadline, result in results
            ]
        )

    def fast_message(self, body: bytes, start: int, end: int, result: bytes) -> bytes:
        return forward_request(body, self.target, body[start:end], result)

    def error_route(self, route: bytes) -> bytes:
        return route

    def send_batch(self, results: list[tuple[bytes, bytes]]) -> None:
        socket = self.socket
        assert socket is not None
        if not results:
            return
        out = results[0][1] if len(results) == 1 else protocol.pack_batch([m for _, m in results])
        if self._rerouted:  # made before put() took a new next stage: for the old one
            self._rerouted = False
            out = _retargeted([out], self.target)[0]
        try:
            send_frame(socket, out, zmq.NOBLOCK)
        except zmq.Again:
            self.put(self.outlets[0], [out])

    def send(self, message: protocol.Message, result: bytes) -> None:
        outlet = self.outlets[0]
        payload = result
        if len(self.outlets) > 1:
            try:
                call, payload = self._choose(result)
                chosen = self._by_call.get(call)
                if chosen is None:
                    raise ValueError(
                        f"handle_stream chose {call!r}, not one of {[o.call for o in self.outlets]}"
                    )
                if not isinstance(payload, bytes):
                    raise TypeError(f"handle_stream gave {type(payload).__name__}, not bytes")
            except Exception as exc:  # the job fails, as for a failing function
                error = self._remote_error(self._choice, exc)
                if message.route:
                    self.send_error(message, error)
                else:
                    self._unrouted(error)
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
        self.put(outlet, frames, (message.route, message.msg_id) if more else None)
        for tee in self.tees:  # copies nobody answers: no route, no MORE
            copy = protocol.encode(
                protocol.REQUEST, message.msg_id, result, tee.target, b"", message.deadline
            )
            self.put(tee, copy)

    def send_error(self, message: protocol.Message, error: PylmError) -> None:
        frames = protocol.encode_error(message.msg_id, error, message.route)
        self.after_stream(message.route, message.msg_id, frames)

    def forward(self, message: protocol.Message, frames: list[bytes]) -> None:
        self.after_stream(message.route, message.msg_id, frames)

    def after_stream(self, route: bytes, msg_id: int, frames: list[bytes]) -> None:
        """Send what ends a job (an ERROR, an END) after its stream's items,
        to the instance of the next stage that got them."""
        self.put(self.outlets[0], frames, (route, msg_id))

    def put(
        self, outlet: Outlet, frames: list[bytes], stream: tuple[bytes, int] | None = None
    ) -> bool:
        """Send to a next stage (to the instance that takes a job's
        ``stream``, route and id, if given), waiting while it is full (the
        stage serves its cache and watches for stop meanwhile); False if the
        message was dropped because the stage is leaving. A new next stage
        (:meth:`retarget`) noted while it waits takes the message, unless it
        belongs to a stream, which stays with the instance that has the
        stream's first items."""
        while True:
            socket = outlet.socket if stream is None else outlet.for_stream(*stream)
            assert socket is not None
            try:
                socket.send_multipart(frames, zmq.NOBLOCK, copy=copied(frames))
                return True
            except zmq.Again:
                if self._rewire_outlets():
                    continue  # instances joined or left: try again now, on the new socket
                if self._retarget is not None and stream is None and outlet is self.outlets[0]:
                    # The old next stage full, or gone: this message, never
                    # sent, takes the new one, with its call, on the new
                    # outlet's socket (the old one's are retired: what they
                    # queued still goes to the old next stage).
                    self.rewire()
                    if self.outlets[0] is not outlet:
                        outlet = self.outlets[0]
                        frames = _retargeted(frames, outlet.target)
                        self._rerouted = True
                    continue
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._limited_log.log(
                        "full",
                        logging.WARNING,
                        "%s: leaving with the next stage still full: a message is dropped",
                        self.name,
                    )
                    return False
                self._wait_for_room(socket)
