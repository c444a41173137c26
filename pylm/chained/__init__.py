"""Chained servers: pipelines of servers and the client that feeds them."""

from pylm.chained.client import JobResult, LoopClient
from pylm.chained.servers import LastServer, Server, Sink

__all__ = ["JobResult", "LastServer", "LoopClient", "Server", "Sink"]
