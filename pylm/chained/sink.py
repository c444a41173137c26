"""The :class:`Sink`: a last stage that several stages feed (fan-in)."""

from __future__ import annotations

from pylm.chained.last import LastServer

__all__ = ["Sink"]


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
