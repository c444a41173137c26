"""The chained :class:`Server`: a stage that sends each result on to its
next stage (or to one of its branches, chosen by ``handle_stream``), with a
copy to each ``tee``."""

from __future__ import annotations

import logging
import struct
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import ServerOptions
from pylm.chained.outlet import Outlet
from pylm.chained.stage import DEFAULT_HWM, Stage, addresses
from pylm.errors import PylmError, RegistryError
from pylm.transport import send_frame

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pylm.registry.records import StageConfig

__all__ = ["Server"]

_REWIRE_MS = 200  # how often a stage following the registry looks for changes
_SPLIT = protocol.SPLIT_PAYLOAD
_FAST = protocol.MAGIC + bytes([protocol.VERSION, protocol.REQUEST, 0])
_pack_sizes = struct.Struct(">HH").pack  # target and route sizes, at offset 5


def _calls(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    calls = [value] if isinstance(value, str) else list(value)
    for call in calls:
        if not isinstance(call, str):
            raise TypeError(f"{what} must be str like 'step2.bar', got {type(call).__name__}")
    return calls


class Server(Stage):
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
                Outlet(call, addresses(next_address[call], "next_address")) for call in calls
            ]
        else:
            self.next_addresses = (
                [] if next_address is None else addresses(next_address, "next_address")
            )
            if len(calls) > 1 and self.next_addresses:
                raise ValueError("with several next calls, next_address is a dict call -> address")
            self._outlets = [Outlet(call, list(self.next_addresses)) for call in calls]
        if isinstance(tee, dict):
            self._tees = [Outlet(call, addresses(tee[call], "tee")) for call in tee]
        else:
            self._tees = [Outlet(call, []) for call in _calls(tee, "tee")]
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
        def at(outlet: Outlet) -> str:
            addresses = sorted(outlet.connected | set(outlet.addresses))
            return f"at {', '.join(addresses)}" if addresses else "(no instance yet)"

        return [f"next {outlet.call} {at(outlet)}" for outlet in self._outlets] + [
            f"tee {outlet.call} {at(outlet)}" for outlet in self._tees
        ]

    def _open_output(self) -> None:
        config = None
        if not self._outlets:
            config = self._configured_next()
            self._outlets = [Outlet(config.next, [])]
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
