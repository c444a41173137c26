"""A server's control address: how :meth:`~pylm.base.BaseServer.stop` wakes
the serving loop from another thread without sharing a socket with it.

The serving loop binds :attr:`Control.address` on one of the sockets it
polls anyway (so the control costs the loop no extra poll) and treats a
message that :meth:`Control.is_control` recognises as the order to stop.
:meth:`Control.wake` sends that message from any thread, on a socket of its
own that it closes at once. The part holds no socket between calls: the
loop's socket, which it binds and closes, is its only lifecycle.
"""

from __future__ import annotations

import os
import uuid

import zmq

from pylm.security import Curve

__all__ = ["Control"]


class Control:
    """The inproc address and the token that stop a server's loop."""

    def __init__(self, context: zmq.Context, curve: Curve | None) -> None:
        self.context = context
        self.curve = curve
        self.address = f"inproc://pylm-control-{uuid.uuid4().hex}"
        self.token = b"pylm-stop-" + os.urandom(16)

    def wake(self) -> None:
        """Tell the loop to stop; nothing happens if it is gone already."""
        socket = self.context.socket(zmq.DEALER)
        try:
            socket.setsockopt(zmq.LINGER, 1000)
            if self.curve is not None:  # the loop's socket takes CURVE clients only
                self.curve.connect(socket, self.curve.keys.public)
            socket.connect(self.address)
            # The empty delimiter lets REP and ROUTER receivers alike read it.
            socket.send_multipart([b"", self.token], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the loop is gone already; nothing to wake
        finally:
            socket.close()

    def is_control(self, body: bytes) -> bool:
        """Whether ``body``, read by the loop, is :meth:`wake`'s message."""
        return body == self.token
