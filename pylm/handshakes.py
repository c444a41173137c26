"""Counting the connections to a server's ports that fail their ZMTP
handshake: bytes that are not ZeroMQ, a greeting of another protocol
version or mechanism, a CURVE client with the wrong key.

libzmq drops such a connection by itself, before any message reaches the
server; only a monitor on the listening socket sees it. The monitor is read
by :mod:`pylm.monitors`' thread (a serving thread never waits for it), which
counts each failed handshake, per server, as
``pylm_messages_malformed_total{reason="handshake"}``. A connection that
closes before it sent a whole greeting (a TCP probe, a port scan) fails no
handshake in libzmq's eyes, and is not counted. Counting ends when the
socket closes (or another monitor replaces this one, as
:func:`pylm.transport.close_listener` does).
"""

from __future__ import annotations

from typing import Protocol

import zmq

from pylm import monitors

__all__ = ["HandshakeCounter", "watch"]

_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class HandshakeCounter(Protocol):
    """Where the failed handshakes of a server are counted (its ServerStats)."""

    handshakes_failed: int


def watch(socket: zmq.Socket, counter: HandshakeCounter) -> None:
    """Count the failed handshakes of the listening ``socket`` in
    ``counter.handshakes_failed``, from now until the socket closes. Called by
    the thread that owns ``socket``, once it is bound."""

    def count(event: monitors.Event) -> None:
        if event.kind & _FAILED:
            counter.handshakes_failed += 1

    monitors.watch(socket, _FAILED, count)
