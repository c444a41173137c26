"""The standalone request/reply server: one ROUTER socket, one serving loop.

Clients (:class:`pylm.standalone.client.Client`, its asyncio sibling, or a
plain ZeroMQ REQ/DEALER socket speaking :mod:`pylm.protocol`) send REQUEST
messages; the server runs the named function and answers each with a REPLY
or an ERROR. Requests are served one at a time, in arrival order.
"""

from __future__ import annotations

import logging
import struct
import sys
import warnings

import zmq

from pylm import protocol
from pylm.base import DEFAULT_MAX_PAYLOAD, BaseServer
from pylm.errors import ProtocolError, PylmError
from pylm.transport import bind, check_address, close_socket

__all__ = ["Server"]

_REQUEST_PREFIX = protocol.MAGIC + bytes([protocol.VERSION, protocol.REQUEST])
_MSG_ID = struct.Struct(">Q")
_HEAD_SIZE = protocol.HEAD_SIZE
# Frames other than the payload are small; this slack bounds them.
_FRAME_SLACK = 64 * 1024


class Server(BaseServer):
    """A request/reply server. Subclass it and add methods that take and
    return bytes::

        class MyServer(Server):
            def foo(self, message):
                return b'you sent me ' + message

        MyServer('my_server', 'tcp://127.0.0.1:5555').start()

    ``rep_address`` may use port 0 (``tcp://127.0.0.1:0``) to let the OS pick
    a free port; :attr:`address` then tells which one. ``messages``: serve that
    many requests, then return from :meth:`start`.

    ``perf_address`` and ``ping_address`` are accepted for compatibility with
    the 2016 pylm and ignored with a warning: a server answers pings on its
    own address (``Client.ping``).
    """

    _pylm_framework = True
    kind = "standalone"

    def __init__(
        self,
        name: str,
        rep_address: str,
        log_address: str | None = None,
        perf_address: str | None = None,
        ping_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        *,
        log_stdout: bool = True,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        context: zmq.Context | None = None,
    ) -> None:
        super().__init__(
            name,
            log_level=log_level,
            log_stdout=log_stdout,
            log_address=log_address,
            max_payload=max_payload,
            context=context,
        )
        for option, value in (("perf_address", perf_address), ("ping_address", ping_address)):
            if value is not None:
                warnings.warn(
                    f"{option}={value!r} is ignored: pylm servers answer pings on their own"
                    " address (Client.ping) and export metrics to Prometheus",
                    DeprecationWarning,
                    stacklevel=2,
                )
        if not isinstance(messages, int) or messages < 0:
            raise ValueError(f"messages must be a non-negative int, got {messages!r}")
        self.rep_address = check_address(rep_address, "rep_address")
        self.messages = messages
        self.address: str | None = None
        self.served = 0
        self._socket: zmq.Socket | None = None

    def _open(self) -> None:
        socket = self.context.socket(zmq.ROUTER)
        self._socket = socket
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_payload + _FRAME_SLACK)
        socket.bind(self._control_address)
        self.address = bind(socket, self.rep_address)
        self.logger.debug("%s listening on %s", self.name, self.address)

    def _close(self) -> None:
        close_socket(self._socket)
        self._socket = None

    def _serve(self) -> None:
        socket = self._socket
        assert socket is not None
        recv = socket.recv_multipart
        send = socket.send_multipart
        call = self._call
        reply_head = protocol.reply_head
        encode_error = protocol.encode_error
        unpack_id = _MSG_ID.unpack_from
        limit = self.messages
        served = self.served
        try:
            while served < limit:
                frames = recv()
                # Fast path: [routing id, REQUEST head, payload] from a DEALER.
                if len(frames) == 3:
                    head = frames[1]
                    if head[:4] == _REQUEST_PREFIX and len(head) > _HEAD_SIZE:
                        msg_id = unpack_id(head, 5)[0]
                        served += 1
                        try:
                            send(
                                [frames[0], reply_head(msg_id), call(head[_HEAD_SIZE:], frames[2])]
                            )
                        except PylmError as error:
                            send([frames[0], *encode_error(msg_id, error)])
                        continue
                if self._is_control(frames):
                    return
                served += self._handle_other(frames)
        finally:
            self.served = served

    def _handle_other(self, frames: list[bytes]) -> int:
        """Everything off the fast path; returns how many requests it served."""
        assert self._socket is not None
        # A REQ socket puts an empty delimiter between routing id and message.
        envelope = frames[:2] if len(frames) > 2 and frames[1] == b"" else frames[:1]
        body = frames[len(envelope) :]
        if not body:
            self._drop("no frames after the routing id", frames)
            return 0
        try:
            head = protocol.decode_head(body[0])
        except ProtocolError as error:
            msg_id = protocol.salvage_msg_id(body[0])
            self._drop(str(error), frames)
            if msg_id is not None:
                self._socket.send_multipart(envelope + protocol.encode_error(msg_id, error))
            return 0
        if head.kind == protocol.PING:
            self._socket.send_multipart(
                [*envelope, protocol.reply_head(head.msg_id, protocol.PONG), self._pong()]
            )
            return 0
        if head.kind == protocol.REQUEST and len(body) >= 2:
            try:
                answer = [protocol.reply_head(head.msg_id), self._call(head.target, body[1])]
            except PylmError as failure:
                answer = protocol.encode_error(head.msg_id, failure)
            self._socket.send_multipart(envelope + answer)
            return 1
        if head.kind == protocol.REQUEST:
            problem = ProtocolError("REQUEST without a payload frame")
        else:
            problem = ProtocolError(
                f"server {self.name!r} accepts REQUEST and PING, not"
                f" {protocol.KIND_NAMES[head.kind]}"
            )
        self._drop(str(problem), frames)
        self._socket.send_multipart(envelope + protocol.encode_error(head.msg_id, problem))
        return 0
