"""Parallel patterns: a master hands jobs to any number of workers."""

from pylm.parallel.client import Client, JobResult
from pylm.parallel.dispatch import Gathering
from pylm.parallel.master import Master
from pylm.parallel.worker import Worker

__all__ = ["Client", "Gathering", "JobResult", "Master", "Worker"]
