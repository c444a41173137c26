"""Promises of the registry paths, observed from outside (issue 20): what a
client following the registry reaches, and what it keeps reaching, while
instances of its server join, leave, stop, die, or vanish from a listing.

Every test runs against a real etcd (pylm.testing's fixtures) and real
servers on OS-chosen ports; each was checked to fail with the mechanism it
guards removed (see the commit that added it).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import zmq
from helpers import calls_through_a_scale_down

import pylm.chained.to_clients
from pylm import protocol
from pylm.chained import LastServer, LoopClient
from pylm.chained import Server as Stage
from pylm.demo import Last
from pylm.errors import RequestTimeout
from pylm.registry import InstanceRecord, LocalEtcd, Registry
from pylm.standalone import Client, Server
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class Marked(Server):
    """A server whose one function says which instance answered."""

    def __init__(self, name: str, marker: bytes, **options: object) -> None:
        super().__init__(name, log_stdout=False, **options)  # type: ignore[arg-type]
        self._marker = marker

    def who(self, message: bytes) -> bytes:
        return self._marker


class Forward(Stage):
    """A first stage passing each job on as it is."""

    def fwd(self, message: bytes) -> bytes:
        return message


class MarkedLast(LastServer):
    """A last stage whose one function says which instance ran the job."""

    def __init__(self, name: str, marker: bytes, **options: object) -> None:
        super().__init__(name, log_stdout=False, **options)  # type: ignore[arg-type]
        self._marker = marker

    def mark(self, message: bytes) -> bytes:
        return self._marker


@pytest.fixture
def other_registry(pylm_etcd: LocalEtcd) -> Iterator[Registry]:
    """A registry client of a second cluster on the same etcd."""
    registry = Registry(pylm_etcd.url, cluster=f"test-{uuid.uuid4().hex[:10]}")
    try:
        yield registry
    finally:
        registry.close()


def reached_until(client: Client, marker: bytes, timeout: float, *, tolerate: bool) -> list[bytes]:
    """Call ``client`` until ``marker`` answers; the answers seen on the way.
    ``tolerate``: calls that time out meanwhile are expected (not counted)."""
    seen: list[bytes] = []

    def answered() -> bool:
        try:
            seen.append(client.job("who", b""))
        except RequestTimeout:
            if not tolerate:
                raise
        return seen[-1:] == [marker]

    wait_for(answered, timeout, f"a call reaching {marker!r}")
    return seen


def test_following_stays_in_its_cluster(pylm_registry: Registry, other_registry: Registry) -> None:
    """A client of cluster A following server 'echo' by name never reaches
    cluster B's 'echo', though B's instance registers after the client
    started following. A second A instance registered after B's proves the
    client has seen every change up to then (etcd reports them in order)."""
    first = Marked("echo", b"A1", registry=pylm_registry)
    stranger = Marked("echo", b"B", registry=other_registry)
    second = Marked("echo", b"A2", registry=pylm_registry)
    started: list[Server] = []
    try:
        started.append(first)
        first.start(background=True)
        with Client("echo", registry=pylm_registry, timeout=5, wait=10) as client:
            assert client.job("who", b"") == b"A1"
            started.append(stranger)
            stranger.start(background=True)
            assert [r.name for r in other_registry.instances("echo")] == ["echo"]
            started.append(second)
            second.start(background=True)
            seen = reached_until(client, b"A2", 20, tolerate=False)
            seen += [client.job("who", b"") for _ in range(40)]
        assert set(seen) == {b"A1", b"A2"}, "a call reached the other cluster's server"
    finally:
        for server in reversed(started):
            server.stop()


def test_pipeline_following_stays_in_its_cluster(
    pylm_registry: Registry, other_registry: Registry
) -> None:
    """A stage of cluster A whose next call is 'last.mark' and a LoopClient
    of cluster A never reach cluster B's 'last', though it registers after
    both started following; a second A instance registered after it proves
    they have seen every change up to then."""
    first = MarkedLast("last", b"A1", registry=pylm_registry)
    stranger = MarkedLast("last", b"B", registry=other_registry)
    second = MarkedLast("last", b"A2", registry=pylm_registry)
    step = Forward("step", next_call="last.mark", registry=pylm_registry, log_stdout=False)
    started: list[Stage | LastServer] = []
    try:
        for stage in (first, step):
            started.append(stage)
            stage.start(background=True)
        with LoopClient("step", registry=pylm_registry, announce=False, timeout=5) as client:
            assert list(client.job("fwd", [b"x"])) == [b"A1"]
            started.append(stranger)
            stranger.start(background=True)
            assert [r.name for r in other_registry.instances("last")] == ["last"]
            started.append(second)
            second.start(background=True)
            seen: list[bytes] = []

            def reached_second() -> bool:
                seen.extend(client.job("fwd", [b"x"]))
                return seen[-1] == b"A2"

            wait_for(reached_second, 20, "a job reaching the second A instance")
            seen += client.job("fwd", [b"x"] * 100)
        assert set(seen) == {b"A1", b"A2"}, "a job reached the other cluster's stage"
    finally:
        for server in reversed(started):
            server.stop()


def test_stopping_one_of_two_instances_fails_no_call(pylm_registry: Registry) -> None:
    """Scale-down: clients call without a pause while one of two instances
    is stopped with stop(); it deregisters, then drains, so no call times out."""
    leaving = Marked("echo", b"leaving", registry=pylm_registry)
    staying = Marked("echo", b"staying", registry=pylm_registry)
    try:
        for server in (leaving, staying):
            server.start(background=True)
        failures = calls_through_a_scale_down(
            pylm_registry, "echo", {b"leaving", b"staying"}, leaving.stop
        )
    finally:
        for server in (leaving, staying):
            server.stop()
    assert failures == []


def test_stopping_one_of_two_stage_instances_loses_no_job(pylm_registry: Registry) -> None:
    """A LoopClient streams jobs through two instances of a stage while one
    is stopped with stop(): it deregisters, then drains, so every job comes
    back as a result (none times out, none is sent twice)."""
    last = Last("last", registry=pylm_registry, log_stdout=False)
    leaving = Forward("step", next_call="last.baz", registry=pylm_registry, log_stdout=False)
    staying = Forward("step", next_call="last.baz", registry=pylm_registry, log_stdout=False)
    stages = [last, leaving, staying]
    total = 3000
    halfway = threading.Event()

    def payloads() -> Iterator[bytes]:
        for i in range(total):
            if i == total // 3:
                halfway.set()
            yield b"%d" % i

    results: list[bytes] = []
    failures: list[BaseException] = []
    clients: list[LoopClient] = []

    def stream() -> None:
        try:
            results.extend(clients[0].job("fwd", payloads(), timeout=10))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=stream)
    try:
        for stage in stages:
            stage.start(background=True)
        wait_for(lambda: len(pylm_registry.instances("step")) == 2, 20, "both instances listed")
        clients.append(LoopClient("step", registry=pylm_registry, announce=False, max_in_flight=50))
        thread.start()
        assert halfway.wait(30)
        leaving.stop()
        thread.join(45)
    finally:
        for client in clients:
            client.close()
        if thread.is_alive():
            thread.join(15)
        for stage in reversed(stages):
            stage.stop()
    assert failures == []
    assert sorted(results) == sorted(b"ACK: %d" % i for i in range(total))
    # The stage drained what reached it, and what the client had queued for
    # it still went there: no job waited for the client's books to resend it.
    assert clients[0].books.retried == 0


def test_an_empty_listing_keeps_the_connections(pylm_registry: Registry) -> None:
    """When etcd lists no instance of a server (records gone while the
    instance lives), a client keeps calling the instance it had."""
    server = Marked("echo", b"alive", rep_address="tcp://127.0.0.1:0")  # no registry of its own
    following: list[concurrent.futures.Future[None]] = []
    try:
        server.start(background=True)
        assert server.address is not None
        record = InstanceRecord(
            name="echo", kind="standalone", endpoints={"rep": server.address}, functions=["who"]
        )
        registration = pylm_registry.register(record, ttl=5)
        with Client("echo", registry=pylm_registry, timeout=5, wait=10) as client:
            # A follower beside the client's, on the same registry client:
            # once it has seen the empty listing, the client's has too.
            empty = threading.Event()
            following.append(
                pylm_registry.follow("echo", lambda records: None if records else empty.set())
            )
            assert client.job("who", b"") == b"alive"
            registration.close()  # the listing is empty now; the instance lives
            assert empty.wait(10), "no follower saw the empty listing"
            for _ in range(50):
                assert client.job("who", b"") == b"alive"
    finally:
        for future in following:
            future.cancel()
        server.stop()


_DOOMED = """
from pylm.standalone import Server

class Doomed(Server):
    def who(self, message):
        return b"doomed"

Doomed("echo", ttl=1, log_stdout=False).start()
"""


def test_a_killed_instance_leaves_the_rotation_before_its_lease_expires(
    pylm_etcd: LocalEtcd, pylm_registry: Registry
) -> None:
    """An instance killed with SIGKILL takes no call once its connection
    drops, though its record stays listed until its lease expires (10 s):
    every call after the drop is answered by the survivor."""
    survivor = Marked("echo", b"survivor", registry=pylm_registry)
    env = {
        **os.environ,
        "PYLM_REGISTRY": pylm_etcd.url,
        "PYLM_CLUSTER": pylm_registry.config.cluster,
    }
    doomed = subprocess.Popen([sys.executable, "-c", _DOOMED], env=env)
    try:
        survivor.start(background=True)
        wait_for(lambda: len(pylm_registry.instances("echo")) == 2, 20, "both instances listed")
        with Client("echo", registry=pylm_registry, timeout=5, wait=10) as client:
            reached_until(client, b"doomed", 20, tolerate=False)
            reached_until(client, b"survivor", 20, tolerate=False)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(10)
            wait_for(lambda: client.drops >= 1, 10, "the client seeing the connection drop")
            answers = [client.job("who", b"") for _ in range(60)]
            listed = len(pylm_registry.instances("echo"))
        assert set(answers) == {b"survivor"}
        assert listed == 2  # the dead one's record still there: routing did not wait for it
    finally:
        if doomed.poll() is None:
            doomed.kill()
        doomed.wait(10)
        survivor.stop()


def test_parked_results_expire_with_a_warning(
    caplog: pytest.LogCaptureFixture,
    raw_socket: Callable[[int], zmq.Socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A last stage keeps a result for a client not connected (yet) for
    PARK_SECONDS (10 s; 1 s here), then drops it with a warning, with no other
    traffic needed: the client connecting later gets only what was sent after
    it connected."""
    monkeypatch.setattr(pylm.chained.to_clients, "PARK_SECONDS", 1.0)
    caplog.set_level(logging.WARNING, logger="last")
    last = Last(
        "last",
        pull_address="tcp://127.0.0.1:0",
        push_address="tcp://127.0.0.1:0",
        db_address="tcp://127.0.0.1:0",
        log_stdout=False,
    )
    last.start(background=True)
    try:
        assert last.address is not None and last.push is not None
        jobs = raw_socket(zmq.PUSH)
        jobs.connect(last.address)
        late = b"pylm-" + os.urandom(12)
        jobs.send_multipart(protocol.encode(protocol.REQUEST, 1, b"lost", b"last.baz", late))
        dropped = f"1 results for client {late.hex()} dropped: it did not connect within 1 s"
        wait_for(
            lambda: any(dropped in record.getMessage() for record in caplog.records),
            15,
            "the parked result's warning, with no other traffic",
        )
        client = raw_socket(zmq.DEALER)
        client.setsockopt(zmq.ROUTING_ID, late)
        client.connect(last.push)
        client.send_multipart(protocol.encode(protocol.PING, 7))
        assert protocol.decode(client.recv_multipart()).kind == protocol.PONG
        jobs.send_multipart(protocol.encode(protocol.REQUEST, 2, b"kept", b"last.baz", late))
        # Results reach a client in the order sent: the first after the
        # hello is the new job's, not the expired one.
        answer = protocol.decode(client.recv_multipart())
        assert (answer.kind, answer.msg_id, answer.payload) == (protocol.REPLY, 2, b"ACK: kept")
    finally:
        last.stop()


@pytest.mark.timeout(30)
def test_wiring_and_leases_stay_in_their_cluster(
    pylm_registry: Registry, other_registry: Registry
) -> None:
    """Two clusters on one etcd wire a stage of the same name each their
    own way: each reads only its own wiring (all of it, or one stage's),
    and only its own instances' leases."""
    pylm_registry.set_config("step1", next="mine.f")
    other_registry.set_config("step1", next="theirs.g")
    other_registry.set_config("only_theirs", next="x.y")
    assert {name: c.next for name, c in pylm_registry.configs().items()} == {"step1": "mine.f"}
    config = pylm_registry.stage_config("step1")
    assert config is not None and config.next == "mine.f"
    assert pylm_registry.stage_config("only_theirs") is None
    with Marked("echo", b"mine", registry=pylm_registry):
        assert len(pylm_registry.leases_left("echo")) == 1
        assert other_registry.leases_left() == {}
