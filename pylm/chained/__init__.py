"""Chained servers: pipelines of servers and the client that feeds them."""

from pylm.chained.aio import AsyncLoopClient
from pylm.chained.client import JobResult, LoopClient
from pylm.chained.last import LastServer
from pylm.chained.server import Server
from pylm.chained.sink import Sink

__all__ = ["AsyncLoopClient", "JobResult", "LastServer", "LoopClient", "Server", "Sink"]
