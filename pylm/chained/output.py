"""A stage's output: where its results go.

The stage loop (:mod:`pylm.chained.stage`) reads a job, runs the function it
names and hands the result to the stage's output, whose kind says where
results go: :class:`~pylm.chained.outlet.ToNextStage` sends them on to the
next stage (and to a branch, and a copy to each tee; a hub's workers' results
too), :class:`~pylm.chained.to_clients.ToClients` answers the clients. One verb
hands a result on, ``send``: ``send_fast`` and ``send_batch`` are the same
act on the fast paths' bytes. An error for a job goes with ``send_error``,
an earlier stage's ERROR or END with ``forward``.

Which peer gets a message (its liveness, the pick among instances) is the
output's business alone: the loop only hands results over.

An output knows nothing of the stage class: what it needs of its stage (its
name, its logger, a rate-limited log line, its counters, how to wait for a
full peer) comes in through its constructor, typed by the names declared
here, so that an output can be built, read and tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

from pylm import protocol
from pylm.errors import PylmError

__all__ = ["Output", "WaitForRoom"]


#: How a stage waits a while for a full peer's ``socket`` to take messages,
#: serving what it must meanwhile (its cache, a stop): an output's sends
#: call it between attempts.
WaitForRoom = Callable[[zmq.Socket], None]


class Output:
    """What a stage's loop hands its results to (see the module's docstring)."""

    #: One line, no copies: the fast paths may send a result as the bytes
    #: :meth:`fast_message` makes, and a BATCH's results as one BATCH.
    plain = True
    #: While the stage is leaving: the time after which a send no longer
    #: waits for a full peer (the message is dropped, with a warning).
    deadline: float | None = None

    def send(self, message: protocol.Message, result: bytes) -> None:
        """Send on the result of a decoded REQUEST."""
        raise NotImplementedError

    def send_fast(self, body: bytes, start: int, end: int, result: bytes) -> None:
        """Send on the result of the one-frame REQUEST ``body`` (the fast
        path), whose route is ``body[start:end]``."""
        raise NotImplementedError

    def fast_message(self, body: bytes, start: int, end: int, result: bytes) -> bytes:
        """The message that carries the result of the one-frame REQUEST
        ``body`` (route ``body[start:end]``) on, as one of a batch."""
        raise NotImplementedError

    def error_route(self, route: bytes) -> bytes:
        """The route an error for a job of ``route`` carries on."""
        raise NotImplementedError

    def send_batch(self, results: list[tuple[bytes, bytes]]) -> None:
        """Send on a BATCH's results: (route, :meth:`fast_message`), in order."""
        raise NotImplementedError

    def send_error(self, message: protocol.Message, error: PylmError) -> None:
        """Send on the error a job ended with (it reaches the job's client)."""
        raise NotImplementedError

    def forward(self, message: protocol.Message, frames: list[bytes]) -> None:
        """Pass on an earlier stage's ERROR, or the END of a job's stream."""
        raise NotImplementedError

    def next_call(self) -> str | None:
        """The call results go to (the stage's registry record says it)."""
        return None

    def branch_calls(self) -> list[str]:
        """The next calls besides the first (registry record)."""
        return []

    def tee_calls(self) -> list[str]:
        """The calls that get a copy of every result (registry record)."""
        return []

    def rewire(self) -> bool:
        """Apply what the registry said about the peers; True if one joined."""
        return False

    def stop_following(self) -> None:
        """Stop following the peers in the registry (before it closes)."""

    def tick(self) -> None:
        """Called after every round of the stage's loop (timers)."""

    def close(self) -> list[zmq.Socket | None]:
        """Give up the sockets, for the stage to close."""
        raise NotImplementedError
