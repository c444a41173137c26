"""Parallel patterns: a master (or a hub, inside a pipeline) hands jobs to
any number of workers."""

from pylm.parallel.aio import AsyncClient
from pylm.parallel.client import Client, JobResult
from pylm.parallel.dispatch import Gathering
from pylm.parallel.hub import Hub
from pylm.parallel.master import Master
from pylm.parallel.worker import Worker

__all__ = ["AsyncClient", "Client", "Gathering", "Hub", "JobResult", "Master", "Worker"]
