"""Promises of docs/guarantees.md that no other test proved, observed from
outside: what a user sees in an error message and on the command line, what
a server answers, what its /metrics serves.

Each test was checked to fail with the mechanism it guards removed (the
mutants of scripts/mutants/docs.toml).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from helpers import answer_greeting, raw_pipeline_ends
from prerequisites import needs_etcd
from prometheus_client.parser import text_string_to_metric_families
from servers import Echo

from pylm import protocol
from pylm.cache import CacheClient
from pylm.chained import Server as Stage
from pylm.errors import (
    CurveRefused,
    PylmError,
    RegistryError,
    RegistryUnavailable,
    RequestTimeout,
)
from pylm.parallel import Client as JobClient
from pylm.parallel import Hub, JobResult, Master, Worker
from pylm.processes import free_port
from pylm.registry import LocalEtcd, Registry
from pylm.security import Curve, Keys, generate_keys
from pylm.standalone import Client, Server
from pylm.telemetry.sd import ServiceDiscovery
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)

PASSWORD = "s3cret-pw"


def test_a_registry_password_never_shows_in_an_error() -> None:
    """docs/registry.md: passwords never appear in error messages or on the
    command line; they are shown as ***. An etcd that cannot be reached, as
    a Registry, a name-only server, a by-name client and `pylm ls` say it."""
    url = f"etcd://root:{PASSWORD}@127.0.0.1:{free_port()}"
    shown = "etcd://root:***@127.0.0.1:"
    messages = []
    with pytest.raises(RegistryUnavailable) as registry_error:
        with Registry(url, cluster="masked", timeout=0.5) as registry:
            registry.instances()
    messages.append(str(registry_error.value))
    server = Echo("echo", registry=url, log_stdout=False)
    with pytest.raises(RegistryUnavailable) as server_error:
        server.start(background=True)
    server.stop()
    messages.append(str(server_error.value))
    with pytest.raises(RegistryUnavailable) as client_error:
        Client("echo", registry=url, timeout=0.5)
    messages.append(str(client_error.value))
    listing = subprocess.run(
        [sys.executable, "-m", "pylm", "--registry", url, "--registry-timeout", "0.5", "ls"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listing.returncode != 0
    messages.append(listing.stdout + listing.stderr)
    for message in messages:
        assert shown in message, message
        assert PASSWORD not in message, message


CHATTY = """
import sys
from pylm.standalone import Server

class Chatty(Server):
    def chat(self, message):
        for number in range(int(message)):
            self.logger.warning("line %d", number)
        return b"said " + message

server = Chatty("chatty", "tcp://127.0.0.1:0", sys.argv[1], log_stdout=False)
server.start(background=True)
print(server.address, flush=True)
sys.stdin.read()  # until the test closes it
server.stop(timeout=5)
"""


def test_a_log_collector_that_is_not_there_never_holds_a_server_up(free_tcp_address: str) -> None:
    """docs/operations.md: a server's log_address PUSH socket queues 10,000
    lines; more are dropped rather than block the server. With no collector
    at its log_address, a server that logs 20,000 lines answers every call
    and stops when asked. (The server runs in a process of its own, so that
    one that blocks is killed, not left behind.)"""
    child = subprocess.Popen(
        [sys.executable, "-c", CHATTY, free_tcp_address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        address = child.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        with Client(address, "chatty", timeout=10) as client:
            for _ in range(4):
                assert client.job("chat", b"5000") == b"said 5000"
            assert client.job("chat", b"0") == b"said 0"
        child.stdin.close()
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        text: str = answer.read().decode()
    return text


def registry_samples(url: str, server: str) -> dict[str, float]:
    """The pylm_registry_* samples of one server, as its /metrics serves them."""
    text = get_text(url)
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("pylm_registry_") and sample.labels.get("server") == server
    }


@needs_etcd
def test_an_etcd_outage_shows_in_the_registry_metrics() -> None:
    """docs/operations.md, etcd down: pylm_registry_reachable drops to 0 and
    pylm_registry_keepalive_failures_total grows; the server counts itself
    unregistered (pylm_registry_registered 0). When etcd is back, both are 1
    again, and the server is listed again."""
    name = f"steady-{uuid.uuid4().hex[:8]}"
    with LocalEtcd() as etcd, Registry(etcd.url, cluster="metered", timeout=2) as registry:
        server = Echo(name, registry=registry, ttl=1, log_stdout=False, metrics=True)
        with server:
            url = server.metrics_url
            assert url is not None
            before = registry_samples(url, name)
            assert before["pylm_registry_reachable"] == 1
            assert before["pylm_registry_registered"] == 1
            assert before["pylm_registry_keepalive_failures_total"] == 0
            etcd.stop()

            def lost() -> bool:
                now = registry_samples(url, name)
                return (
                    now["pylm_registry_reachable"] == 0
                    and now["pylm_registry_registered"] == 0
                    and now["pylm_registry_keepalive_failures_total"] > 0
                )

            wait_for(lost, 15, "the metrics to show etcd lost")
            etcd.start()

            def back() -> bool:
                now = registry_samples(url, name)
                return now["pylm_registry_reachable"] == 1 and now["pylm_registry_registered"] == 1

            wait_for(back, 15, "the metrics to show etcd back")
            assert [record.name for record in registry.instances(name)] == [name]


def test_a_missing_allow_folder_lets_in_only_the_servers_own_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/security.md: an allow folder that does not exist is not an
    error; it reads as an empty list, and the server then refuses every
    client except its own key (a server always lets in its own public key,
    so servers that share one pair let each other in)."""
    generate_keys("server", tmp_path)
    generate_keys("stranger", tmp_path)
    monkeypatch.setenv("PYLM_CURVE_KEYS", str(tmp_path / "server.key_secret"))
    monkeypatch.setenv("PYLM_CURVE_ALLOW", str(tmp_path / "no-such-folder"))
    server = Echo("guarded", "tcp://127.0.0.1:0", log_stdout=False)
    server.start(background=True)
    try:
        assert server.address is not None
        public = Keys.load(tmp_path / "server.key").public
        stranger = Curve(Keys.load(tmp_path / "stranger.key_secret"), server_key=public)
        with Client(server.address, "guarded", curve=stranger, timeout=0.5) as client:
            with pytest.raises(CurveRefused, match="refused this client's key"):
                client.job("echo", b"let me in")
        same_pair = Curve(Keys.load(tmp_path / "server.key_secret"), server_key=public)
        with Client(server.address, "guarded", curve=same_pair, timeout=5) as client:
            assert client.job("echo", b"one of us") == b"one of us"
    finally:
        server.stop(timeout=5)


def test_a_record_others_would_skip_is_refused_at_start_naming_the_field(
    pylm_registry: Registry,
) -> None:
    """docs/operations.md: a server refuses to register a record others
    would skip; start() raises, naming the field (here 1,025 functions, over
    the schema's 1,024), and nothing is registered."""
    functions = {f"f{number}": (lambda self, message: message) for number in range(1025)}
    wide = type("Wide", (Server,), functions)("wide", registry=pylm_registry, log_stdout=False)
    try:
        with pytest.raises(RegistryError, match=r"'wide' cannot register: .*field 'functions'"):
            wide.start(background=True)
    finally:
        wide.stop(timeout=5)
    assert pylm_registry.instances("wide") == []


def hub_before(raw_socket: Callable[[int], zmq.Socket], max_queued: int) -> tuple[Hub, zmq.Socket]:
    """A started hub with a name of its own (its own series in this
    process's metrics) that sends on to ``last.done`` through the PULL
    socket it returns."""
    next_stage = raw_socket(zmq.PULL)
    port = next_stage.bind_to_random_port("tcp://127.0.0.1")
    hub = Hub(
        f"hub-{uuid.uuid4().hex[:8]}",
        "tcp://127.0.0.1:0",
        f"tcp://127.0.0.1:{port}",
        "last.done",
        "tcp://127.0.0.1:0",
        workers_address="tcp://127.0.0.1:0",
        max_queued=max_queued,
        log_stdout=False,
        metrics=True,
    )
    hub.start(background=True)
    return hub, next_stage


def test_a_hub_keeps_10000_input_streams_open_and_refuses_the_next(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    """docs/operations.md: a master or hub keeps 10,000 input streams open at
    most; a new one over it gets an ERROR (down the pipeline, to its client)
    and is counted as malformed, reason `limit`. 10,001 streams each open
    with an item (no worker takes them); only the last is refused."""
    hub, next_stage = hub_before(raw_socket, max_queued=20_000)
    name = hub.name
    try:
        assert hub.address is not None and hub.metrics_url is not None
        earlier = raw_socket(zmq.PUSH)
        earlier.connect(hub.address)
        for msg_id in range(10_001):
            item = protocol.encode(
                protocol.REQUEST, msg_id, b"x", f"{name}.f".encode(), b"client", flags=protocol.MORE
            )
            earlier.send_multipart(item)
        assert next_stage.poll(10_000), "no ERROR for the stream over the limit"
        refused = protocol.decode(next_stage.recv_multipart())
        assert (refused.kind, refused.msg_id, refused.route) == (protocol.ERROR, 10_000, b"client")
        assert b"10000 input streams open" in refused.payload
        assert next_stage.poll(200) == 0  # the other 10,000 were taken
        malformed = [
            sample.value
            for family in text_string_to_metric_families(get_text(hub.metrics_url))
            for sample in family.samples
            if sample.name == "pylm_messages_malformed_total"
            and sample.labels == {"server": name, "reason": "limit"}
        ]
        assert malformed == [1]
    finally:
        hub.stop(timeout=5)


class Wrap(Stage):
    """A stage that wraps each payload, and refuses b"bad"."""

    def f(self, message: bytes) -> bytes:
        if message == b"bad":
            raise ValueError("bad payload")
        return b"f(" + message + b")"


def test_a_tee_copy_is_the_result_with_no_route_and_no_more_flag(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    """docs/tee.md: for every result a stage sends on, each tee call gets a
    REQUEST whose payload is the stage's result, with the job's message id,
    no route (nobody waits for it) and no MORE flag (a stream's item is
    copied as a job of its own). ENDs and errors are not copied, nor is
    anything when the stage's function failed. The main line's message
    keeps its route and flag."""
    main, side = raw_socket(zmq.PULL), raw_socket(zmq.PULL)
    main_port = main.bind_to_random_port("tcp://127.0.0.1")
    side_port = side.bind_to_random_port("tcp://127.0.0.1")
    stage = Wrap(
        "wrap",
        "tcp://127.0.0.1:0",
        f"tcp://127.0.0.1:{main_port}",
        "last.done",
        "tcp://127.0.0.1:0",
        tee={"audit.keep": f"tcp://127.0.0.1:{side_port}"},
        log_stdout=False,
    )
    stage.start(background=True)
    try:
        assert stage.address is not None
        earlier = raw_socket(zmq.PUSH)
        earlier.connect(stage.address)
        route = b"client"
        sent = [
            protocol.encode(protocol.REQUEST, 1, b"item", b"wrap.f", route, flags=protocol.MORE),
            protocol.encode(protocol.REQUEST, 2, b"job", b"wrap.f", route),
            protocol.encode(protocol.REQUEST, 3, b"bad", b"wrap.f", route),
            protocol.encode(protocol.END, 1, (1).to_bytes(8, "big"), route=route),
            protocol.encode_error(4, PylmError("upstream"), route),
            protocol.encode(protocol.REQUEST, 99, b"last", b"wrap.f", route),
        ]
        for frames in sent:
            earlier.send_multipart(frames)
        copies: list[protocol.Message] = []
        while not copies or copies[-1].msg_id != 99:  # one socket: in the order sent
            assert side.poll(10_000), f"copies so far: {copies}"
            copies.append(protocol.decode(side.recv_multipart()))
        assert [
            (c.kind, c.msg_id, c.target, c.route, c.flags & protocol.MORE, c.payload)
            for c in copies
        ] == [
            (protocol.REQUEST, 1, b"audit.keep", b"", 0, b"f(item)"),
            (protocol.REQUEST, 2, b"audit.keep", b"", 0, b"f(job)"),
            (protocol.REQUEST, 99, b"audit.keep", b"", 0, b"f(last)"),
        ]
        assert side.poll(200) == 0
        passed: list[protocol.Message] = []
        while not passed or passed[-1].msg_id != 99:
            assert main.poll(10_000), f"passed on so far: {passed}"
            passed.append(protocol.decode(main.recv_multipart()))
        item = passed[0]
        assert (item.msg_id, item.route, item.flags & protocol.MORE) == (1, route, protocol.MORE)
        assert sorted((m.msg_id, m.kind) for m in passed) == [
            (1, protocol.REQUEST),
            (1, protocol.END),
            (2, protocol.REQUEST),
            (3, protocol.ERROR),
            (4, protocol.ERROR),
            (99, protocol.REQUEST),
        ]
    finally:
        stage.stop(timeout=5)


class Echoer(Worker):
    def work(self, message: bytes) -> bytes:
        return b"done " + message


def test_a_hub_with_a_full_queue_reads_no_more_input_and_loses_nothing(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    """docs/hub.md, backpressure: a hub queues at most max_queued jobs
    waiting for a worker, then stops reading its input (pylm_jobs_queued
    stays at max_queued), while still serving its cache; once a worker
    joins, every job is run and sent on, each once. Nothing is dropped."""
    hub, next_stage = hub_before(raw_socket, max_queued=5)
    name = hub.name
    worker = None
    try:
        assert hub.address is not None and hub.db is not None and hub.back is not None
        url = hub.metrics_url
        assert url is not None

        def queued() -> float:
            (value,) = [
                sample.value
                for family in text_string_to_metric_families(get_text(url))
                for sample in family.samples
                if sample.name == "pylm_jobs_queued" and sample.labels == {"server": name}
            ]
            return value

        earlier = raw_socket(zmq.PUSH)
        earlier.connect(hub.address)
        for msg_id in range(50):
            job = b"%d" % msg_id
            earlier.send_multipart(
                protocol.encode(protocol.REQUEST, msg_id, job, f"{name}.work".encode(), b"c")
            )
        wait_for(lambda: queued() >= 5, 10, "the hub's queue to fill")
        # The cache is served by the same loop that reads the input: once it
        # answers, the hub has had its chance to read more, and took none.
        with CacheClient(hub.db, name, timeout=5) as cache:
            assert cache.set(b"still served", "k") == "k"
            assert cache.get("k") == b"still served"
        assert queued() == 5
        worker = Echoer("w", name, hub.back, log_stdout=False)
        worker.start(background=True)
        results: list[protocol.Message] = []
        while len(results) < 50:
            assert next_stage.poll(10_000), f"{len(results)} results only"
            results.append(protocol.decode(next_stage.recv_multipart()))
        assert sorted((m.msg_id, m.payload, m.route, m.target) for m in results) == [
            (msg_id, b"done %d" % msg_id, b"c", b"last.done") for msg_id in range(50)
        ]
        # Nothing more comes for those 50: a last job's result is the next thing out.
        earlier.send_multipart(
            protocol.encode(protocol.REQUEST, 50, b"50", f"{name}.work".encode(), b"c")
        )
        assert next_stage.poll(10_000), "no result for the last job"
        assert protocol.decode(next_stage.recv_multipart()).msg_id == 50
    finally:
        if worker is not None:
            worker.stop(timeout=5)
        hub.stop(timeout=5)


def test_a_stage_whose_wiring_is_malformed_does_not_start(pylm_registry: Registry) -> None:
    """docs/operations.md: a stage whose own wiring (config/<name>) is
    malformed does not start: start() raises a RegistryError naming the
    field, and the stage registers nothing. (The wiring is written here as
    anyone with write access to etcd could, past pylm's own checks.)"""
    name = f"wired-{uuid.uuid4().hex[:8]}"
    key = f"{pylm_registry.config.prefix}config/{name}".encode()
    pylm_registry._call(pylm_registry._etcd(lambda etcd: etcd.put(key, b'{"next": 5}')))
    stage = Wrap(name, registry=pylm_registry, log_stdout=False)
    try:
        with pytest.raises(RegistryError, match=rf"config/{name}: field 'next' must be a string"):
            stage.start(background=True)
    finally:
        stage.stop(timeout=5)
    assert pylm_registry.instances(name) == []


def test_a_worker_is_given_its_masters_name_not_an_address() -> None:
    """docs/parallel.md: a worker's master is the master's name; an address
    is refused with ValueError, before anything starts."""
    for master in ("tcp://127.0.0.1:5556", "ipc:///tmp/master", ""):
        with pytest.raises(ValueError, match="master must be the master's name"):
            Echoer("w", master, log_stdout=False)


class Holder(Worker):
    """A worker whose `hold` runs until the test releases it."""

    started = threading.Event()
    release = threading.Event()

    def hold(self, message: bytes) -> bytes:
        Holder.started.set()
        Holder.release.wait(30)
        return b"held " + message

    def fast(self, message: bytes) -> bytes:
        return b"fast " + message


def test_a_master_restarted_on_its_address_takes_no_answer_to_its_predecessors_jobs() -> None:
    """docs/parallel.md, wire protocol: job numbers count from a random
    number, so that a master restarted on the same address takes no answer
    to its predecessor's jobs. A worker still running a job of the first
    master answers it to the second, whose own job waits in its queue: the
    second master's client gets its own job's result, not that answer."""
    Holder.started.clear()
    Holder.release.clear()
    first = Master("m", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", heartbeat=0.2, log_stdout=False)
    first.start(background=True)
    second = None
    worker = None
    old_outcomes: list[JobResult] = []
    new_outcomes: list[JobResult] = []
    old_call = None
    old_client = None
    try:
        front, back = first.front, first.back
        assert front is not None and back is not None
        worker = Holder("w", "m", back, heartbeat=0.2, log_stdout=False)
        worker.start(background=True)
        old_client = JobClient(front, "m", timeout=3)

        def old_job() -> None:
            old_outcomes.extend(old_client.results("hold", [b"old"]))

        old_call = threading.Thread(target=old_job)
        old_call.start()
        assert Holder.started.wait(10), "the worker never ran the first master's job"
        first.stop(timeout=5)
        second = Master("m", front, back, heartbeat=0.2, log_stdout=False)
        second.start(background=True)
        with JobClient(front, "m", timeout=10) as client:
            results = client.results("fast", [b"new"])
            first_result = threading.Thread(target=lambda: new_outcomes.extend(results))
            first_result.start()
            wait_for(lambda: second is not None and second.queued == 1, 10, "the new job queued")
            Holder.release.set()  # the old job's answer goes to the second master
            first_result.join(15)
        old_call.join(10)
        (new,) = new_outcomes
        assert (new.value, new.error) == (b"fast new", None)
        (old,) = old_outcomes
        assert isinstance(old.error, RequestTimeout)  # its master is gone
    finally:
        Holder.release.set()
        if old_call is not None:
            old_call.join(10)
        if old_client is not None:
            old_client.close()
        for server in (worker, second, first):
            if server is not None:
                server.stop(timeout=5)


@needs_etcd
def test_pylm_sd_shows_an_etcd_outage_and_keeps_its_targets() -> None:
    """docs/operations.md, etcd down: `pylm sd`'s pylm_registry_up drops to
    0 (alert PylmSdDown) and it keeps serving the targets it knows; when
    etcd is back, pylm_registry_up is 1 again."""
    name = f"sd-{uuid.uuid4().hex[:8]}"
    with (
        LocalEtcd() as etcd,
        Registry(etcd.url, cluster="sd-outage", timeout=1) as registry,
        Echo(name, registry=registry, log_stdout=False, metrics=True) as server,
        ServiceDiscovery(registry, port=0) as discovery,
    ):
        assert server.metrics_url is not None
        target = server.metrics_url.split("/")[2]
        metrics = f"http://{discovery.host}:{discovery.port}/metrics"

        def up() -> float:
            (value,) = [
                sample.value
                for family in text_string_to_metric_families(get_text(metrics))
                for sample in family.samples
                if sample.name == "pylm_registry_up"
            ]
            return value

        def targets() -> list[str]:
            return [t for group in json.loads(get_text(discovery.url)) for t in group["targets"]]

        wait_for(lambda: targets() == [target], 10, "the server as a target")
        assert up() == 1
        etcd.stop()
        wait_for(lambda: up() == 0, 15, "pylm_registry_up at 0")
        assert targets() == [target]
        etcd.start()
        wait_for(lambda: up() == 1, 15, "pylm_registry_up at 1 again")
        assert targets() == [target]


def test_a_loop_client_ends_a_stream_once_its_end_and_all_its_items_are_in(
    raw_socket: Callable[[int], zmq.Socket],
) -> None:
    """docs/hub.md, what the LoopClient does: an END announcing n items ends
    the job once n items are in, in whatever order the items and the END
    came (stage instances may reorder them); a stream of no items ends the
    job with no result. Here a last stage (raw sockets) sends a job's END
    before its two items, and another job's END of no items."""
    # batch=1: the jobs read here one message each
    first, last, client = raw_pipeline_ends(raw_socket, timeout=10, batch=1)
    outcomes: list[JobResult] = []
    running = threading.Thread(
        target=lambda: outcomes.extend(client.results("f", [b"two items", b"none"]))
    )
    try:
        running.start()
        peer = answer_greeting(last)
        jobs = []
        for _ in range(2):
            assert first.poll(10_000), "no job"
            jobs.append(protocol.decode(first.recv_multipart()))
        stream, empty = sorted(jobs, key=lambda job: job.payload, reverse=True)
        assert stream.payload == b"two items" and stream.route == peer
        answers = [
            protocol.encode(protocol.END, stream.msg_id, (2).to_bytes(8, "big")),
            protocol.encode(protocol.REPLY, stream.msg_id, b"item 1", flags=protocol.MORE),
            protocol.encode(protocol.END, empty.msg_id, (0).to_bytes(8, "big")),
            protocol.encode(protocol.REPLY, stream.msg_id, b"item 2", flags=protocol.MORE),
        ]
        for answer in answers:
            last.send_multipart([peer, *answer])
        running.join(10)
        assert not running.is_alive(), "the jobs never ended"
        assert sorted((o.index, o.value, o.error) for o in outcomes) == [
            (0, b"item 1", None),
            (0, b"item 2", None),
        ]
    finally:
        client.close()
        running.join(10)
