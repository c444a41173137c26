"""How a pipeline's client is wired to the pipeline's two ends, and the
checks that name a wrong wiring instead of waiting out a timeout.

:func:`find_pipeline` reads the pipeline from the registry: the first
stage's instances (where jobs go) and cache, and the last stage's instances
(where results come from), found by following each stage's ``next``.
:class:`Wiring` holds the client's connections to the last stage's
instances, a results socket each, followed in the registry when found by
name, and greets each one before jobs go out: a last stage's ROUTER drops
messages for a client it has not heard from. By address it also watches
the handshakes of those sockets and of the jobs socket, so that addresses
given swapped, or a server of another kind, are named on the first job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import zmq

from pylm import monitors, protocol
from pylm.calls import curve_key, pong_info, read_answer
from pylm.discovery import Peers
from pylm.errors import ProtocolError, PylmError, RegistryError, RequestTimeout
from pylm.security import Curve
from pylm.transport import close_socket

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, Registry

__all__ = ["LAST_KINDS", "Pipeline", "Wiring", "find_pipeline"]

LAST_KINDS = ("chained-last", "sink")  # the kinds of stage that answer clients

_WATCHED_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_DISCONNECTED
)
_WATCH_SLICE = 0.05  # s between looks at a greeting's watched handshakes
_ARGUMENTS = (
    "LoopClient takes the last stage's push_address as push_address (the first"
    " argument: results come from there) and the first stage's pull_address as"
    " pull_address (the second: jobs go there)"
)


class Pipeline(NamedTuple):
    """A pipeline as the registry lists it, for its client."""

    firsts: Peers  # the first stage's pull endpoints, followed
    db: str  # the first stage's cache
    lasts: Peers  # the last stage's push endpoints, followed
    registry: Registry | None  # opened for this pipeline: the client closes it
    first_key: bytes | None  # CURVE keys from the records; None: plain connections
    last_key: bytes | None


def find_pipeline(
    first: str, registry: Registry | str | None, wait: float, curve: Curve | None
) -> Pipeline:
    """The pipeline whose first stage is named ``first``, from ``registry``
    (a :class:`~pylm.registry.Registry`, or the address of one to open),
    waiting up to ``wait`` seconds for each stage's instances."""
    from pylm.registry import Registry

    client = registry if isinstance(registry, Registry) else Registry(registry)
    try:
        firsts, db, last, lasts = _resolve(client, first, wait)
        if not any("push" in record.endpoints for record in lasts):
            raise RegistryError(f"the last stage {last!r} has no push endpoint")
        keys = curve_key(first, firsts, curve), curve_key(last, lasts, curve)
    except BaseException:
        if client is not registry:
            client.close()
        raise
    return Pipeline(
        Peers(client, first, "pull", firsts),
        db,
        Peers(client, last, "push", lasts),
        None if client is registry else client,
        *keys,
    )


def _resolve(
    registry: Registry, first: str, wait: float
) -> tuple[list[InstanceRecord], str, str, list[InstanceRecord]]:
    """From the registry: the first stage's instances, its cache address,
    and the last stage's name and instances, found by following each
    stage's ``next`` (waiting up to ``wait`` seconds for each stage)."""
    records = registry.wait_for_instances(first, wait)
    firsts = records
    db = next((record.endpoints["db"] for record in records if "db" in record.endpoints), None)
    if not any("pull" in record.endpoints for record in records) or db is None:
        raise RegistryError(f"{first!r} is not a chained stage: it has no pull and db endpoints")
    seen = {first}
    while True:
        if all(record.kind in LAST_KINDS for record in records):
            return firsts, db, records[0].name, records
        following = next((record.next for record in records if record.next), None)
        if not following:
            raise RegistryError(
                f"stage {records[0].name!r} has no next stage and is not a last stage"
            )
        name = following.rpartition(".")[0]
        if name in seen:
            raise RegistryError(f"the pipeline from {first!r} loops back to {name!r}")
        seen.add(name)
        records = registry.wait_for_instances(name, wait)


class _Watch:
    """Watches the connections of a client's socket to addresses it was
    given, until the client's greeting: a connection that ends in the
    ZeroMQ handshake, before it succeeded, for a protocol error (libzmq
    reports no HANDSHAKE_FAILED_NO_DETAIL then) reached a socket of a kind
    this one cannot talk to (a PULL where a ROUTER should be: addresses
    swapped), and libzmq does not try that connection again. One the peer
    merely closed (HANDSHAKE_FAILED_NO_DETAIL: a proxy whose backend is not
    up, a server stopping) is tried again, and is no sign of wrong wiring.
    One that failed for a mechanism mismatch reached a server that takes
    CURVE only (a client by address without keys is watched), and is named
    as such."""

    def __init__(self, socket: zmq.Socket, expected: str) -> None:
        self.socket = socket
        self.expected = expected  # what the peer should be: "a last stage's push socket, ..."
        # Read in pylm.monitors' thread, as the events come:
        self._shook: dict[str, bool] = {}  # endpoint -> handshake done, since connected
        self._secured: set[str] = set()  # endpoints whose peer uses another mechanism
        self._refused: str | None = None
        self._tried: set[str] = set()  # endpoints whose first connection attempt ended
        self._expected = 0  # connections made that report their attempts (tcp, ipc)
        self._heard = threading.Event()  # set at each event, for wait_for_handshakes
        monitors.watch(socket, _WATCHED_EVENTS, self._note)

    def expect(self, endpoint: str) -> None:
        """Count a connection the socket makes to ``endpoint``: the handshakes
        are waited for until its first attempt is known to have ended
        (libzmq reports the attempts of tcp and ipc connections only)."""
        if endpoint.startswith(("tcp://", "ipc://")):
            self._expected += 1

    def refused(self) -> str | None:
        """Why a peer refused the connection in the handshake, if one did:
        where it is, and what that says."""
        return self._refused

    def wait_for_handshakes(self, deadline: float) -> None:
        """Wait, until ``deadline`` (monotonic time) at most, for the
        handshakes of the connections made to end (in success, or in a
        refusal), and for every connection expected to have made its first
        attempt (the monitor's events come from libzmq's I/O thread, later
        than the connect): a peer of the wrong kind is then known before
        jobs go. A peer not listening (the attempt is retried) is not
        waited for."""
        while self._refused is None and (
            len(self._tried) < self._expected or False in list(self._shook.values())
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._heard.wait(min(left, 0.05))
            self._heard.clear()

    def _note(self, event: monitors.Event) -> None:
        try:
            self._noted(event)
        finally:
            self._heard.set()

    def _noted(self, event: monitors.Event) -> None:
        endpoint, kind = event.endpoint, event.kind
        if kind in (zmq.EVENT_CONNECTED, zmq.EVENT_CONNECT_RETRIED):
            self._tried.add(endpoint)
        if kind == zmq.EVENT_CONNECTED:
            self._shook[endpoint] = False
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._shook[endpoint] = True
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._shook.pop(endpoint, None)  # closed by the peer: retried
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if event.value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                self._secured.add(endpoint)
        elif kind == zmq.EVENT_DISCONNECTED and self._shook.get(endpoint) is False:
            if self._refused is not None:
                return  # the first reason stands
            if endpoint in self._secured:
                self._refused = (
                    f"the peer at {endpoint} refused this client's plain connection: it"
                    " takes CURVE connections only. Give the client curve= (or set"
                    " PYLM_CURVE_KEYS) with its keys and the server's public key"
                    " (docs/security.md)"
                )
            else:
                self._refused = (
                    f"the peer at {endpoint} closed the connection in the ZeroMQ handshake:"
                    f" it is not {self.expected}. {_ARGUMENTS}"
                )

    def close(self) -> None:
        monitors.stop(self.socket)


class Wiring:
    """A pipeline client's connections to the last stage's instances: a
    results socket per address in :attr:`addresses` (:attr:`sockets`, in
    the same order, changed in place), each with the client's ``route`` as
    its routing id, which every job carries so that the last stage knows
    where its result goes.

    ``lasts``: the last stage's instances, followed in the registry
    (:meth:`follow`); None when the addresses were given. ``watch``: the
    addresses were given and the connections are plain, so a wrong one is
    watched for in the handshakes until the greeting. What the client
    lends: ``secure`` readies a socket for the last stage (CURVE, when on),
    ``forget`` stops watching its CURVE handshakes before it closes,
    ``no_answer`` shapes the error of a greeting left unanswered, and
    ``ids`` numbers greetings apart from jobs."""

    def __init__(
        self,
        addresses: list[str],
        *,
        context: zmq.Context,
        route: bytes,
        lasts: Peers | None,
        watch: bool,
        secure: Callable[[zmq.Socket], zmq.Socket],
        forget: Callable[[zmq.Socket], None],
        no_answer: Callable[[str], RequestTimeout],
        ids: Iterator[int],
    ) -> None:
        self._context = context
        self._route = route
        self._lasts = lasts
        self._watch = watch
        self._secure = secure
        self._forget = forget
        self._no_answer = no_answer
        self._ids = ids
        self._watches: dict[zmq.Socket, _Watch] = {}  # results sockets, until greeted
        self._jobs_watch: _Watch | None = None
        self._miswired: PylmError | None = None
        self._greeted = False
        self.addresses = list(addresses)
        self.sockets = [self._socket(address) for address in self.addresses]

    @property
    def changed(self) -> bool:
        """Whether the registry lists other last-stage instances than those connected."""
        return self._lasts is not None and self._lasts.changed

    @property
    def greeted(self) -> bool:
        """Whether every last-stage instance connected has answered the greeting."""
        return self._greeted

    @property
    def watches(self) -> bool:
        """Whether the handshakes of the client's sockets are watched until the greeting."""
        return self._watch

    def watch_jobs(self, jobs: zmq.Socket, endpoint: str) -> None:
        """Watch the client's jobs socket (given addresses, before it
        connects to ``endpoint``)."""
        if self._watch:
            self._jobs_watch = _Watch(jobs, "a first stage's pull socket, which jobs go to")
            self._jobs_watch.expect(endpoint)

    def _socket(self, address: str) -> zmq.Socket:
        """A socket receiving results from the last stage instance at ``address``."""
        socket: zmq.Socket = self._secure(self._context.socket(zmq.DEALER))
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self._route)
        if self._watch:
            self._watches[socket] = _Watch(
                socket, "a last stage's push socket, which results come from"
            )
        socket.connect(address)
        return socket

    def follow(self, poller: zmq.Poller | None, timeout: float) -> int:
        """Apply what the registry says of the last stage now: a socket per
        instance, a new one greeted before going on; ``poller`` (when
        given) polls the sockets kept. Returns how many answers to no
        greeting (late, or garbage) the greetings dropped."""
        if self._lasts is None or not self._lasts.changed:
            return 0
        joined, left = self._lasts.take()
        for address in left:
            index = self.addresses.index(address)
            socket = self.sockets.pop(index)
            self.addresses.pop(index)
            if poller is not None:
                poller.unregister(socket)
            self._forget(socket)
            close_socket(socket)
        deadline = time.monotonic() + timeout
        dropped = 0
        for address in joined:
            socket = self._socket(address)
            self.sockets.append(socket)
            self.addresses.append(address)
            dropped += self._greet_one(socket, address, deadline, timeout)
            if poller is not None:
                poller.register(socket, zmq.POLLIN)
        return dropped

    def greet(self, timeout: float) -> int:
        """Make sure every last stage knows this client before jobs go out
        (once): each answers a PING within ``timeout``, and is a last stage.
        Raises :class:`~pylm.errors.PylmError` naming a wrong wiring,
        again on every call after it. Returns how many answers to no
        greeting (late, or garbage) it dropped."""
        if self._greeted:
            return 0
        if self._miswired is not None:
            raise self._miswired
        deadline = time.monotonic() + timeout
        dropped = 0
        for socket, address in zip(self.sockets, self.addresses, strict=True):
            dropped += self._greet_one(socket, address, deadline, timeout)
        if self._jobs_watch is not None:
            self._jobs_watch.wait_for_handshakes(deadline)
            self._raise_refused(self._jobs_watch)
        self._stop_watching()
        self._greeted = True
        return dropped

    def _greet_one(self, socket: zmq.Socket, address: str, deadline: float, timeout: float) -> int:
        """Greet the last stage instance at ``address``; returns how many
        other answers came meanwhile (dropped)."""
        msg_id = next(self._ids)
        greeting: list[bytes] | None = protocol.encode(protocol.PING, msg_id)
        dropped = 0
        watched = self._watches.get(socket)
        while True:
            if greeting is not None:
                # Without waiting: a connection whose handshake was refused
                # is not tried again, and a send to it would wait forever.
                try:
                    socket.send_multipart(greeting, zmq.NOBLOCK)
                    greeting = None
                except zmq.Again:
                    pass
            left = deadline - time.monotonic()
            # In slices while the greeting or the handshakes wait: a refusal ends the wait.
            sliced = watched is not None or greeting is not None
            wait = min(left, _WATCH_SLICE) if sliced else left
            ready = socket.poll(max(1, int(wait * 1000))) if left > 0 else 0
            if watched is not None:
                self._raise_refused(watched)
            if not ready:
                if left <= 0:
                    raise self._no_answer(
                        f"the last stage at {address} did not answer within {timeout:g} s"
                    )
                continue
            message = read_answer(socket.recv_multipart())
            if message is not None and message.msg_id == msg_id:
                self._check_last(message, address)
                return dropped
            dropped += 1

    def _raise_refused(self, watched: _Watch) -> None:
        refused = watched.refused()
        if refused is not None:
            self._miswired = PylmError(refused)
            raise self._miswired

    def _check_last(self, answer: protocol.Message, address: str) -> None:
        """Raise if the greeting's answer comes from a server of another
        kind than a last stage (a stage's db_address given as push_address)."""
        if answer.kind != protocol.PONG:
            return
        try:
            info = pong_info(answer.payload)
        except ProtocolError:
            return
        kind = info.get("kind")
        if isinstance(kind, str) and kind not in LAST_KINDS:
            what = "a stage's cache (its db_address)" if kind == "cache" else f"a {kind} server"
            self._miswired = PylmError(
                f"the server at {address} is {what} named {str(info.get('name'))!r},"
                f" not a last stage. {_ARGUMENTS}"
            )
            raise self._miswired

    def _stop_watching(self) -> None:
        watches, self._watches = list(self._watches.values()), {}
        if self._jobs_watch is not None:
            watches.append(self._jobs_watch)
            self._jobs_watch = None
        for watched in watches:
            watched.close()

    def close(self) -> None:
        """Stop watching and following; close the results sockets."""
        self._stop_watching()
        lasts, self._lasts = self._lasts, None
        if lasts is not None:
            lasts.close()
        for socket in self.sockets:
            close_socket(socket)
        self.sockets.clear()
