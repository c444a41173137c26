"""Standalone request/reply servers and their clients."""

from pylm.exposed import idempotent
from pylm.standalone.aio import AsyncClient
from pylm.standalone.client import Client
from pylm.standalone.servers import Server

__all__ = ["AsyncClient", "Client", "Server", "idempotent"]
