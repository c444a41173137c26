"""The :class:`LastServer`: the stage that answers the client of every
job, through a ROUTER socket its clients connect to and greet; its output is
:class:`~pylm.chained.to_clients.ToClients`."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import zmq

from pylm import protocol
from pylm.base import Options2016, ServerOptions
from pylm.chained.stage import DEFAULT_HWM, IDLE_MS, Stage
from pylm.chained.to_clients import ToClients
from pylm.errors import ProtocolError
from pylm.protocol import FRAME_SLACK
from pylm.transport import check_address, recv_message

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["LastServer"]

_ROUTER_RETRY_MS = 10  # how soon a last stage tries again to send to a full client


class LastServer(Stage):
    """The last stage of a pipeline: runs the function a job names and sends
    the result back to the client that sent the job, through a ROUTER socket
    bound at ``push_address`` to which clients connect."""

    _pylm_framework = True
    kind = "chained-last"
    _output: ToClients

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
        old = Options2016(log_address, perf_address, ping_address, log_level, messages)
        super().__init__(name, pull_address, db_address, old, hwm=hwm, **options)
        self.push_address = push_address and check_address(push_address, "push_address")
        self.push: str | None = None  # where clients connect for results
        self._router: zmq.Socket | None = None
        self._output = ToClients(
            name=name, logger=self.logger, stats=self.stats, log_limited=self._log_limited
        )
        self._idle_timeout = IDLE_MS

    def _open_output(self) -> None:
        router = self._secure(self.context.socket(zmq.ROUTER))
        self._router = router
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, self.hwm)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown client: an error, not silence
        router.setsockopt(zmq.MAXMSGSIZE, FRAME_SLACK)  # clients only say hello
        self._output.attach(router)
        self.push = self._listen(router, self.push_address or self._any_port())
        self._poller.register(router, zmq.POLLIN)
        self._idle_timeout = self._poll_timeout

    def _endpoints(self) -> dict[str, str]:
        assert self.push is not None
        return {**super()._endpoints(), "push": self.push}

    def _name_only(self) -> bool:
        return super()._name_only() or self.push_address is None

    def _outputs(self) -> list[zmq.Socket | None]:
        self._router = None
        return self._output.close()

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
            pong = protocol.encode(protocol.PONG, message.msg_id, self._pong())
            self._output.put(frames[0], pong)
            self._output.release(frames[0])
        else:
            self._drop("kind", "clients only send PING on the results socket", frames)

    def _tick(self) -> None:
        output = self._output
        output.tick()
        # Results wait for a client: wake up soon to send them.
        self._poll_timeout = _ROUTER_RETRY_MS if output.waiting else self._idle_timeout
