"""The servers that several test files run, each in one place.

A server whose functions a test names (``echo``, ``tag``, ``done``, ...)
answers the same way wherever it runs; a test that needs another answer
declares its own server next to it."""

from __future__ import annotations

from pylm.chained import LastServer
from pylm.chained import Server as Stage
from pylm.parallel import Worker
from pylm.standalone import Server as RepServer

__all__ = ["Doer", "Doubler", "Echo", "Last", "Step"]


class Echo(RepServer):
    """A standalone server that answers a call with its message."""

    def echo(self, message: bytes) -> bytes:
        return message


class Step(Stage):
    """A pipeline stage that marks the job as passed through it."""

    def tag(self, message: bytes) -> bytes:
        return message + b">step"


class Last(LastServer):
    """A last stage that marks the job as done."""

    def done(self, message: bytes) -> bytes:
        return message + b">done"


class Doer(Worker):
    """A worker that answers a job with its message."""

    def echo(self, message: bytes) -> bytes:
        return message


class Doubler(Worker):
    """A worker that answers a job with its message twice."""

    def double(self, message: bytes) -> bytes:
        return message * 2
