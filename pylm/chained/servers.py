"""The 2016 import path of the chained servers (``pylm.chained.servers.Server``).

The servers live by role: the stage loop in :mod:`pylm.chained.stage`, the
outlet to a next stage in :mod:`pylm.chained.outlet`, :class:`Server` in
:mod:`pylm.chained.server`, :class:`LastServer` in :mod:`pylm.chained.last`
(its output to the clients in :mod:`pylm.chained.to_clients`) and :class:`Sink`
in :mod:`pylm.chained.sink`.
"""

from pylm.chained.last import LastServer
from pylm.chained.server import Server
from pylm.chained.sink import Sink
from pylm.chained.stage import DEFAULT_HWM
from pylm.chained.to_clients import MAX_BACKLOG, PARK_LIMIT, PARK_SECONDS

__all__ = [
    "DEFAULT_HWM",
    "MAX_BACKLOG",
    "PARK_LIMIT",
    "PARK_SECONDS",
    "LastServer",
    "Server",
    "Sink",
]
