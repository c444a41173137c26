"""The lifecycle promises of docs/hub.md, docs/tee.md, docs/chained.md,
docs/parallel.md and docs/operations.md that no other test guarded, observed
from outside: the results clients get, what side branches keep, the logs
servers write, how long ``stop()`` takes (issue 20).

- a hub in the registry that is stopped waits for its workers' answers to
  the jobs on its books: every job's result reaches the client, and nothing
  is logged as unanswered;
- ... also when it is one of two instances of its name (its workers still
  answer it after it left the registry);
- ... and when they do not come within its wait (10 s), it logs how many
  jobs it leaves unanswered, and returns;
- a hub with a full queue reads no more of its input, and drops nothing;
- a hub drops an input stream that has had no news for a while, with a
  warning;
- a stage in the registry that is stopped while its next stage stays full
  drops a message with a warning and returns within its 5 s of draining;
- a tee's side branch that does not read holds the main line up, and no copy
  is dropped to relieve it: every copy reaches the side branch once it reads;
  so does a tee stage found by name that has no instance yet;
- the jobs of a client that knows a master by name spread over every
  instance of that name, and every result arrives once.

Each test names the mechanism whose removal makes it fail
(scripts/mutants/lifecycle.toml applies those removals).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import zmq
from helpers import ANY, unique
from prometheus_client import REGISTRY

import pylm.parallel.dispatch
import pylm.parallel.hub
from pylm import protocol
from pylm.base import BaseServer
from pylm.chained import LastServer, LoopClient, Sink
from pylm.chained import Server as Stage
from pylm.errors import RequestTimeout
from pylm.parallel import Client, Hub, Master, Worker
from pylm.registry import Registry
from pylm.testing import wait_for

BEAT = 0.2  # s between heartbeats


def queued(server: str) -> float:
    """Jobs waiting for a worker at ``server``, as its /metrics gives them."""
    value = REGISTRY.get_sample_value("pylm_jobs_queued", {"server": server})
    assert value is not None, f"no pylm_jobs_queued for {server}"
    return value


def happens(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition()`` comes true within ``seconds``: to give a
    broken mechanism the time to show, never to decide a test that holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def warned(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


@pytest.fixture
def ipc_folder() -> Iterator[str]:
    """A fresh folder for ipc:// endpoints (short paths: socket paths are
    limited). ipc keeps the kernel's buffers small (about 200 KiB a
    connection), so that a reader that does not read fills them quickly."""
    folder = tempfile.mkdtemp(prefix="pylm-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- a hub's stop()


class Gated(Worker):
    """A worker whose jobs wait for the test's gate; ``entered`` counts the
    jobs it has begun."""

    def __init__(self, *args: object, gate: threading.Event, **options: object) -> None:
        super().__init__(*args, **options)  # type: ignore[arg-type]
        self.gate = gate
        self.entered = 0
        self.lock = threading.Lock()

    def hold(self, message: bytes) -> bytes:
        with self.lock:
            self.entered += 1
        self.gate.wait(30)
        return b"done " + message


class Echo(Worker):
    def echo(self, message: bytes) -> bytes:
        return message


class Last(LastServer):
    def keep(self, message: bytes) -> bytes:
        return message


@pytest.mark.timeout(60)
def test_a_stopped_hub_waits_for_its_workers_answers(
    pylm_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A hub holds 4 jobs on its books (one running on its worker, held
    there by a gate, one more the worker holds in its 2 slots, 2 queued)
    when it is stopped: it deregisters, and only
    once it has (the gate opens then) does the worker answer. Every job's
    result still reaches the client, stop() returns only after that, and
    the hub logs no job as unanswered. Fails without the hub's wait for its
    workers' answers (``Hub._drain_before_leaving``)."""
    hub_name, last_name = unique("hub"), unique("last")
    caplog.set_level(logging.WARNING, logger=hub_name)
    gate = threading.Event()
    last = Last(last_name, registry=pylm_registry, log_stdout=False)
    hub = Hub(
        hub_name,
        next_call=f"{last_name}.keep",
        registry=pylm_registry,
        heartbeat=BEAT,
        misses=50,  # a worker slowed by a loaded machine is not declared dead
        log_stdout=False,
    )
    worker = Gated(
        unique("w"),
        hub_name,
        gate=gate,
        slots=2,
        heartbeat=BEAT,
        registry=pylm_registry,
        log_stdout=False,
    )
    results: list[object] = []
    stopped = threading.Event()

    def stop_hub() -> None:
        hub.stop(timeout=20)
        stopped.set()

    stopper = threading.Thread(target=stop_hub)
    try:
        for server in (last, hub, worker):
            server.start(background=True)
        with LoopClient(hub_name, registry=pylm_registry, announce=False, timeout=5) as client:
            reader = threading.Thread(
                target=lambda: results.extend(
                    client.results("hold", [b"%d" % n for n in range(4)], timeout=5)
                )
            )
            reader.start()
            try:
                wait_for(lambda: worker.entered == 1, 15, "the worker running a job")
                stopper.start()
                wait_for(lambda: not pylm_registry.instances(hub_name), 15, "the hub deregistered")
                assert not stopped.is_set(), "stop() returned with jobs on the hub's books"
                gate.set()
            finally:
                gate.set()
                reader.join(30)
        stopper.join(30)
        assert stopped.is_set()
        values = sorted(result.value for result in results)  # type: ignore[attr-defined]
        errors = [result.error for result in results if result.error]  # type: ignore[attr-defined]
        assert errors == []
        assert values == [b"done %d" % n for n in range(4)]
        assert not warned(caplog, "unanswered")
    finally:
        gate.set()
        if stopper.is_alive():
            stopper.join(30)
        for server in (worker, hub, last):
            server.stop()


@pytest.mark.timeout(60)
def test_stopping_one_of_two_hub_instances_loses_no_job(pylm_registry: Registry) -> None:
    """Two instances of one hub name share a worker; one instance is stopped
    while it has jobs on its books (the worker holds one behind a gate).
    The worker sees that instance leave the registry, and still answers the
    jobs it gives it while it drains and waits: every one of the client's 10
    jobs gives its result, none times out. Failed when a worker disconnected
    from a master instance as soon as it left the registry (its answers and
    heartbeats stopped, so the leaving hub declared it dead and left with
    its jobs unanswered); fails without the worker's grace for a master that
    left (``Worker._follow``)."""
    hub_name, last_name = unique("hub"), unique("last")
    gate = threading.Event()
    last = Last(last_name, registry=pylm_registry, log_stdout=False)
    hubs = [
        Hub(
            hub_name,
            next_call=f"{last_name}.keep",
            registry=pylm_registry,
            heartbeat=BEAT,
            misses=50,  # a worker slowed by a loaded machine is not declared dead
            log_stdout=False,
        )
        for _ in range(2)
    ]
    worker = Gated(
        unique("w"), hub_name, gate=gate, heartbeat=BEAT, registry=pylm_registry, log_stdout=False
    )
    results: list[object] = []
    stopper = threading.Thread(target=hubs[0].stop, kwargs={"timeout": 30})
    try:
        for server in (last, *hubs):
            server.start(background=True)
        wait_for(lambda: len(pylm_registry.instances(hub_name)) == 2, 15, "both hubs listed")
        worker.start(background=True)
        with LoopClient(hub_name, registry=pylm_registry, announce=False, timeout=5) as client:
            reader = threading.Thread(
                target=lambda: results.extend(
                    client.results("hold", [b"%d" % n for n in range(10)], timeout=5)
                )
            )
            reader.start()
            try:
                wait_for(lambda: worker.entered == 1, 15, "the worker running a job")
                stopper.start()
                wait_for(
                    lambda: len(pylm_registry.instances(hub_name)) == 1, 15, "one hub deregistered"
                )
                gate.set()
            finally:
                gate.set()
                reader.join(30)
        stopper.join(40)
        errors = [result.error for result in results if result.error]  # type: ignore[attr-defined]
        assert errors == []
        values = sorted(result.value for result in results)  # type: ignore[attr-defined]
        assert values == sorted(b"done %d" % n for n in range(10))
        assert client.books.retried == 0  # the leaving hub answered: none was sent again
    finally:
        gate.set()
        if stopper.is_alive():
            stopper.join(40)
        everyone: list[BaseServer] = [worker, *hubs, last]
        for each in everyone:
            each.stop()


@pytest.mark.timeout(60)
def test_a_stopped_hub_logs_the_jobs_it_leaves_unanswered(
    pylm_registry: Registry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub stopped with 4 jobs on its books whose worker does not answer
    (its gate stays shut) waits for them for its leave time (10 s; 1 s here),
    then returns, logs ``leaving with 4 job(s) unanswered``, and those jobs
    time out at their client. Fails without the hub's bound on that wait or
    without its warning."""
    monkeypatch.setattr(pylm.parallel.hub, "_LEAVE_MAX", 1.0)
    hub_name, last_name = unique("hub"), unique("last")
    caplog.set_level(logging.WARNING, logger=hub_name)
    gate = threading.Event()
    last = Last(last_name, registry=pylm_registry, log_stdout=False)
    hub = Hub(
        hub_name,
        next_call=f"{last_name}.keep",
        registry=pylm_registry,
        heartbeat=BEAT,
        misses=50,  # its worker is never declared dead here: only the leave time ends the wait
        log_stdout=False,
    )
    worker = Gated(
        unique("w"),
        hub_name,
        gate=gate,
        slots=2,
        heartbeat=BEAT,
        registry=pylm_registry,
        log_stdout=False,
    )
    results: list[object] = []
    try:
        for server in (last, hub, worker):
            server.start(background=True)
        with LoopClient(hub_name, registry=pylm_registry, announce=False, timeout=3) as client:
            reader = threading.Thread(
                target=lambda: results.extend(
                    client.results("hold", [b"%d" % n for n in range(4)], timeout=3)
                )
            )
            reader.start()
            try:
                wait_for(lambda: worker.entered == 1, 15, "the worker running a job")
                hub.stop(timeout=20)  # TimeoutError if it waits on without end
                assert warned(caplog, "leaving with 4 job(s) unanswered")
            finally:
                reader.join(30)
        errors = [result.error for result in results]  # type: ignore[attr-defined]
        assert len(errors) == 4 and all(isinstance(error, RequestTimeout) for error in errors)
    finally:
        gate.set()
        for server in (worker, hub, last):
            server.stop()


@pytest.mark.timeout(60)
def test_a_hub_with_a_full_queue_reads_no_more_and_drops_nothing(
    pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    """A hub with no worker and ``max_queued=5`` given 50 jobs queues 5 and
    reads no more (its ``pylm_jobs_queued`` is 5); once a worker joins, all
    50 results reach the client, each once. Fails when the hub reads its
    input past a full queue (the ``full`` check in ``Hub._drain``)."""
    hub_name, last_name = unique("hub"), unique("last")
    serve(Last(last_name, registry=pylm_registry, log_stdout=False))
    hub = serve(
        Hub(
            hub_name,
            next_call=f"{last_name}.keep",
            registry=pylm_registry,
            heartbeat=BEAT,
            max_queued=5,
            log_stdout=False,
        )
    )
    results: list[bytes] = []
    failures: list[BaseException] = []
    with LoopClient(hub_name, registry=pylm_registry, announce=False, timeout=10) as client:

        def run() -> None:
            try:
                results.extend(client.job("echo", [b"%d" % n for n in range(50)]))
            except BaseException as exc:
                failures.append(exc)

        reader = threading.Thread(target=run)
        reader.start()
        try:
            wait_for(lambda: queued(hub_name) >= 5, 15, "a full queue at the hub")
            # A hub past its bound reads on at once: 1 s to show it, which
            # decides nothing when the bound holds.
            happens(lambda: queued(hub_name) > 5, 1.0)
            assert queued(hub_name) == 5
            assert hub.full  # type: ignore[attr-defined]
            serve(Echo(unique("w"), hub_name, registry=pylm_registry, log_stdout=False))
        finally:
            reader.join(40)
    assert failures == []
    assert sorted(results) == sorted(b"%d" % n for n in range(50))


@pytest.mark.timeout(60)
def test_a_hubs_input_stream_with_no_news_is_dropped_with_a_warning(
    raw_socket: Callable[[int], zmq.Socket],
    serve: Callable[..., object],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An earlier stage sends a hub one item of a stream (flagged MORE) and
    then nothing, neither items nor its END: the hub passes the item's
    result on (flagged MORE), and once the stream has had no news for
    STREAM_IDLE (10 minutes; 0.5 s here) drops it with a warning. Fails
    without the expiry of idle input streams (``Dispatcher._expire_streams``)."""
    monkeypatch.setattr(pylm.parallel.dispatch, "STREAM_IDLE", 0.5)
    name = unique("hub")
    caplog.set_level(logging.WARNING, logger=name)
    after = raw_socket(zmq.PULL)  # the next stage
    after.setsockopt(zmq.RCVTIMEO, 30000)
    port = after.bind_to_random_port("tcp://127.0.0.1")
    hub = Hub(
        name,
        ANY,
        f"tcp://127.0.0.1:{port}",
        "next.stage",
        ANY,
        workers_address=ANY,
        heartbeat=BEAT,
        log_stdout=False,
    )
    serve(hub)
    assert hub.address and hub.back
    serve(Echo(unique("w"), name, hub.back, heartbeat=BEAT, log_stdout=False))
    before = raw_socket(zmq.PUSH)  # the earlier stage
    before.connect(hub.address)
    item = protocol.encode(
        protocol.REQUEST, 7, b"item", f"{name}.echo".encode(), b"route", 0.0, protocol.MORE
    )
    before.send_multipart(item)
    passed = protocol.decode(after.recv_multipart())
    assert (passed.kind, passed.payload, passed.route) == (protocol.REQUEST, b"item", b"route")
    assert passed.flags & protocol.MORE
    wait_for(
        lambda: warned(caplog, "a stream idle for 0.5 s dropped (1 of"),
        15,
        "the idle stream's warning",
    )


# ---------------------------------------------------------------- a full next stage


class Forward(Stage):
    def fwd(self, message: bytes) -> bytes:
        return message


@pytest.mark.timeout(60)
def test_stop_with_the_next_stage_full_drops_with_a_warning_and_returns(
    pylm_registry: Registry, ipc_folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A registered stage whose next stage never reads, fed without a pause:
    the stage, then its input, fill up (the sender finds no room). stop()
    drains for at most 5 s,
    then drops what it cannot pass on, logs that it does (``leaving with the
    next stage still full: a message is dropped``) and returns. Fails when
    a leaving stage waits on a full next stage without end (the send
    deadline set as stop is heard, in ``Stage._serve_db``)."""
    name = unique("step")
    caplog.set_level(logging.WARNING, logger=name)
    context: zmq.Context = zmq.Context.instance()
    stuck = context.socket(zmq.PULL)  # the next stage: bound, never read
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.bind(f"ipc://{ipc_folder}/next")
    stage = Forward(
        name,
        f"ipc://{ipc_folder}/in",
        f"ipc://{ipc_folder}/next",
        "nobody.reads",
        ANY,
        log_stdout=False,
        hwm=1,
        registry=pylm_registry,
    )
    feed = context.socket(zmq.PUSH)  # the earlier stage: it sends on and on, used by feeder
    feed.setsockopt(zmq.LINGER, 0)
    feed.setsockopt(zmq.SNDHWM, 1)
    feed.setsockopt(zmq.SNDTIMEO, 50)
    payload = b"x" * 65536
    blocked = threading.Event()  # the feed found no room once
    done = threading.Event()

    def feeder() -> None:
        """Send jobs until told to stop, so that the stage's input does not
        go quiet: it stays full, and the drain keeps finding jobs to pass on."""
        sent = 0
        while not done.is_set():
            message = protocol.encode(protocol.REQUEST, sent, payload, f"{name}.fwd".encode(), b"")
            try:
                feed.send_multipart(message)
                sent += 1
            except zmq.Again:
                blocked.set()

    feeding = threading.Thread(target=feeder)
    try:
        stage.start(background=True)
        feed.connect(f"ipc://{ipc_folder}/in")
        feeding.start()
        assert blocked.wait(20), "the stage's input never filled up"
        began = time.monotonic()
        stage.stop(timeout=15)  # TimeoutError if it waits on without end
        took = time.monotonic() - began
        assert not stage.running
        assert warned(caplog, "leaving with the next stage still full: a message is dropped")
        assert took < 12, f"stop() took {took:.1f} s (5 s of draining at most)"
    finally:
        done.set()
        if feeding.is_alive():
            feeding.join(10)
        # A stage still waiting (the mechanism broken) is let go: read its output.
        give_up = time.monotonic() + 20
        while stage.running and time.monotonic() < give_up:
            if stuck.poll(50):
                stuck.recv_multipart()
        stage.stop()
        feed.close()
        stuck.close()


# ---------------------------------------------------------------- a tee's side branch


class Copy(Stage):
    def copy(self, message: bytes) -> bytes:
        return message


class Receipt(LastServer):
    def issue(self, message: bytes) -> bytes:
        return b"ok %d" % len(message)


class Archive(Sink):
    """A side branch's sink that reads nothing until the test's gate opens,
    then keeps every copy."""

    def __init__(self, *args: object, gate: threading.Event, **options: object) -> None:
        super().__init__(*args, **options)  # type: ignore[arg-type]
        self.gate = gate
        self.kept: list[bytes] = []
        self.lock = threading.Lock()
        self.entered = threading.Event()

    def keep(self, message: bytes) -> bytes:
        self.entered.set()
        self.gate.wait(30)
        with self.lock:
            self.kept.append(message[:8])
        return message


@pytest.mark.timeout(60)
def test_a_side_branch_that_does_not_read_holds_the_main_line_and_loses_no_copy(
    ipc_folder: str,
) -> None:
    """A stage tees 60 results of 64 KiB to a sink that reads nothing until
    a gate opens. Meanwhile the client gets fewer than half of its results
    (the teeing stage waits for room in the side branch before its next
    job); once the gate opens, the client gets all 60 and the sink keeps
    all 60 copies, each once. Fails when a tee drops a copy it has no room
    for (the ``put`` of copies in ``ToNextStage.send``).

    While the gate is shut, the test waits up to 3 s for the client to get
    every result, which happens only if copies are dropped; that wait
    decides nothing when the promise holds (the count is bounded by the
    side branch's buffers however long it waits)."""
    total = 60
    gate = threading.Event()
    at = f"ipc://{ipc_folder}"
    archive = Archive("archive", f"{at}/a", f"{at}/ap", ANY, gate=gate, log_stdout=False, hwm=1)
    receipt = Receipt("receipt", f"{at}/r", f"{at}/rp", ANY, log_stdout=False)
    orders = Copy(
        "orders",
        f"{at}/o",
        f"{at}/r",
        "receipt.issue",
        ANY,
        tee={"archive.keep": f"{at}/a"},
        log_stdout=False,
        hwm=1,
    )
    servers = [archive, receipt, orders]
    results: list[bytes] = []
    every = threading.Event()
    failures: list[BaseException] = []

    def payloads() -> Iterator[bytes]:
        for n in range(total):
            yield b"%08d" % n + b"x" * 65528

    def run(client: LoopClient) -> None:
        try:
            for result in client.job("copy", payloads(), timeout=40):
                results.append(result)
            every.set()
        except BaseException as exc:
            failures.append(exc)

    try:
        for server in servers:
            server.start(background=True)
        assert receipt.push and orders.address and orders.db
        with LoopClient(
            receipt.push, orders.address, orders.db, "orders", announce=False
        ) as client:
            reader = threading.Thread(target=run, args=(client,))
            reader.start()
            try:
                assert archive.entered.wait(20), "no copy reached the side branch"
                every.wait(3)  # set only if the main line ran free
                held = len(results)
                gate.set()
                reader.join(40)
            finally:
                gate.set()
                reader.join(40)
        assert failures == []
        assert held < total // 2, f"the client got {held} of {total} results with the tee full"
        assert sorted(results) == [b"ok 65536"] * total
        wait_for(lambda: len(archive.kept) >= total, 20, "every copy in the side branch")
        assert sorted(archive.kept) == [b"%08d" % n for n in range(total)]
    finally:
        gate.set()
        for server in reversed(servers):
            server.stop()


class Tally(Sink):
    """A side branch's sink that keeps every copy."""

    def __init__(self, *args: object, **options: object) -> None:
        super().__init__(*args, **options)  # type: ignore[arg-type]
        self.kept: list[bytes] = []
        self.lock = threading.Lock()

    def keep(self, message: bytes) -> bytes:
        with self.lock:
            self.kept.append(message)
        return message


@pytest.mark.timeout(60)
def test_a_tee_stage_not_registered_yet_holds_the_main_line_and_gets_every_copy(
    pylm_registry: Registry,
) -> None:
    """A stage tees by name to a side stage that has no instance yet: the
    client gets at most the first of its 10 results (the stage waits before
    its next job), and once the side stage registers, all 10 results and all
    10 copies arrive. Fails when a tee drops a copy it cannot send (the
    ``put`` of copies in ``ToNextStage.send``).

    While the side stage is absent, the test waits up to 2 s for the client
    to get every result, which happens only if copies are dropped."""
    orders, receipt, archive = unique("orders"), unique("receipt"), unique("archive")
    total = 10
    main = [
        Receipt(receipt, registry=pylm_registry, log_stdout=False),
        Copy(
            orders,
            next_call=f"{receipt}.issue",
            tee=f"{archive}.keep",
            registry=pylm_registry,
            log_stdout=False,
        ),
    ]
    side = Tally(archive, registry=pylm_registry, log_stdout=False)
    results: list[bytes] = []
    every = threading.Event()
    failures: list[BaseException] = []

    def run(client: LoopClient) -> None:
        try:
            results.extend(client.job("copy", [b"%d" % n for n in range(total)], timeout=30))
            every.set()
        except BaseException as exc:
            failures.append(exc)

    try:
        for server in main:
            server.start(background=True)
        with LoopClient(orders, registry=pylm_registry, announce=False) as client:
            reader = threading.Thread(target=run, args=(client,))
            reader.start()
            try:
                every.wait(2)  # set only if the main line ran free
                held = len(results)
                side.start(background=True)
            finally:
                reader.join(40)
        assert failures == []
        assert held <= 1, f"the client got {held} of {total} results with no tee stage"
        assert sorted(results) == [b"ok %d" % len(b"%d" % n) for n in range(total)]
        wait_for(lambda: len(side.kept) >= total, 20, "every copy in the side branch")
        assert sorted(side.kept) == sorted(b"%d" % n for n in range(total))
    finally:
        side.stop()
        for server in reversed(main):
            server.stop()


# ---------------------------------------------------------------- instances of a master


class Marked(Master):
    """A master whose results say which instance passed them on."""

    def __init__(self, *args: object, marker: bytes, **options: object) -> None:
        super().__init__(*args, **options)  # type: ignore[arg-type]
        self.marker = marker

    def gather(self, message: bytes) -> Iterator[bytes]:
        yield self.marker + b"|" + message


@pytest.mark.timeout(60)
def test_a_clients_jobs_spread_over_every_instance_of_a_master_name(
    pylm_registry: Registry, serve: Callable[..., object]
) -> None:
    """Three masters of one name, a worker, and a client that knows only the
    name: each instance passes on a share of the client's 300 jobs (at least
    a tenth; round-robin gives a third each), and every result arrives once.
    Fails when a client sends to one instance only (the connection to every
    endpoint in ``pylm.parallel.Client``)."""
    name = unique("m")
    markers = [b"m%d" % n for n in range(3)]
    for marker in markers:
        serve(Marked(name, registry=pylm_registry, heartbeat=BEAT, log_stdout=False, marker=marker))
    wait_for(lambda: len(pylm_registry.instances(name)) == 3, 10, "three instances listed")
    serve(Echo(unique("w"), name, registry=pylm_registry, heartbeat=BEAT, log_stdout=False))
    with Client(name, registry=pylm_registry, timeout=10) as client:
        # Connected to all three first (what pylm_peers_live counts): jobs go
        # only to instances whose connection is up, and 300 go out at once.
        wait_for(lambda: client._connections.live_peers == 3, 10, "three live connections")
        results = list(client.job("echo", [b"%d" % n for n in range(300)]))
    by = Counter(result.split(b"|")[0] for result in results)
    payloads = Counter(result.split(b"|")[1] for result in results)
    assert len(results) == 300 and sorted(payloads) == sorted(b"%d" % n for n in range(300))
    assert set(by) == set(markers), f"instances that served: {dict(by)}"
    assert min(by.values()) >= 30, f"jobs by instance: {dict(by)}"
