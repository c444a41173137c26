"""Metrics and health: what /metrics says after a known workload, /healthz,
and service discovery from the registry (a real etcd)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from helpers import ANY
from prometheus_client.parser import text_string_to_metric_families

from pylm.chained import LastServer, LoopClient, Server
from pylm.errors import RemoteError, UnknownFunction
from pylm.registry import InstanceRecord, Registry
from pylm.standalone import Client
from pylm.standalone import Server as StandaloneServer
from pylm.telemetry.counting import BUSY, SAMPLE_EVERY, FunctionStats, Sampling
from pylm.telemetry.recent import RECENT, errors_url, fetch_errors, read_errors
from pylm.telemetry.sd import ServiceDiscovery, scrape_targets

pytestmark = pytest.mark.timeout(60)


class Echo(StandaloneServer):
    def echo(self, message: bytes) -> bytes:
        return message

    def fail(self, message: bytes) -> bytes:
        raise ValueError("no")


class Double(Server):
    def double(self, message: bytes) -> bytes:
        return message * 2


class Count(LastServer):
    def count(self, message: bytes) -> bytes:
        return b"%d" % len(message)


def unique(prefix: str) -> str:
    """Server names of this test's own: series of one name in a process add up."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample /metrics serves, by name and labels."""
    status, body = get(url)
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found[name, frozenset(labels.items())]


def test_metrics_count_a_known_workload_exactly() -> None:
    name = unique("echo")
    with Echo(name, ANY, log_stdout=False) as server:
        assert server.metrics_url is not None and server.metrics_url.endswith("/metrics")
        with Client(server.address, name) as client:
            for i in range(10):
                assert client.job("echo", b"%d" % i) == b"%d" % i
            for _ in range(2):
                with pytest.raises(RemoteError):
                    client.job("fail", b"abc")
            with pytest.raises(UnknownFunction):
                client.job("nope", b"x")
        with zmq.Context.instance().socket(zmq.REQ) as garbage:
            garbage.connect(server.address)
            garbage.send(b"not pylm at all")
            assert garbage.poll(5000)
            garbage.recv()
        found = samples(server.metrics_url)
    assert value(found, "pylm_calls_total", server=name, function="echo", outcome="ok") == 10
    assert value(found, "pylm_calls_total", server=name, function="echo", outcome="error") == 0
    assert value(found, "pylm_calls_total", server=name, function="fail", outcome="error") == 2
    assert value(found, "pylm_calls_total", server=name, function="(unknown)", outcome="error") == 1
    # Calls this close together are timed one in SAMPLE_EVERY (counting); all counted.
    timed = value(found, "pylm_call_duration_seconds_count", server=name, function="echo")
    assert 1 <= timed <= 10
    assert (
        value(found, "pylm_call_duration_seconds_bucket", server=name, function="echo", le="+Inf")
        == timed
    )
    assert value(found, "pylm_messages_received_total", server=name) == 14
    assert value(found, "pylm_messages_malformed_total", server=name, reason="head") == 1
    assert value(found, "pylm_messages_malformed_total", server=name, reason="envelope") == 0
    assert value(found, "pylm_messages_sent_total", server=name, to="client") == 13
    assert value(found, "pylm_in_flight_messages", server=name) == 0
    assert value(found, "pylm_received_bytes_total", server=name) == 10 + 2 * 3 + 1
    assert value(found, "pylm_sent_bytes_total", server=name) == 10
    assert value(found, "pylm_server_ready", server=name) == 1
    info = [
        labels
        for (metric, labels) in found
        if metric == "pylm_server_info" and ("server", name) in labels
    ]
    assert dict(info[0])["kind"] == "standalone"
    # The client in this process counts its side.
    assert (
        value(found, "pylm_client_requests_total", server=name, function="echo", outcome="ok") == 10
    )
    assert (
        value(found, "pylm_client_requests_total", server=name, function="fail", outcome="error")
        == 2
    )
    assert (
        value(found, "pylm_client_request_duration_seconds_count", server=name, function="echo")
        == 10
    )


def test_client_timeouts_are_counted() -> None:
    name = unique("nobody")
    with Echo(unique("host"), ANY, log_stdout=False) as host:  # serves this process's /metrics
        with Client("tcp://127.0.0.1:1", name, timeout=0.1) as client:
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    client.job("echo", b"x")
        assert host.metrics_url is not None
        found = samples(host.metrics_url)
    assert value(found, "pylm_client_timeouts_total", server=name, function="echo") == 3


def test_pipeline_stages_count_what_they_pass_on() -> None:
    first, last = unique("double"), unique("count")
    with Count(last, ANY, ANY, ANY, log_stdout=False) as end:
        with Double(first, ANY, end.address, f"{last}.count", ANY, log_stdout=False) as start:
            with LoopClient(end.push, start.address, start.db, first, announce=False) as client:
                results = list(client.job("double", [b"ab"] * 25))
            assert results == [b"4"] * 25
            assert start.metrics_url == end.metrics_url  # one endpoint per process
            assert start.metrics_url is not None
            found = samples(start.metrics_url)
    assert value(found, "pylm_calls_total", server=first, function="double", outcome="ok") == 25
    assert value(found, "pylm_messages_sent_total", server=first, to="next") == 25
    assert value(found, "pylm_calls_total", server=last, function="count", outcome="ok") == 25
    assert value(found, "pylm_messages_sent_total", server=last, to="client") == 25
    assert value(found, "pylm_messages_received_total", server=last) == 25
    assert (
        value(found, "pylm_client_requests_total", server=first, function="double", outcome="ok")
        == 25
    )


def test_busy_stages_time_a_sample_and_count_every_call() -> None:
    """64 jobs in one BATCH: every stage and the client count all 64 and time
    the first and every SAMPLE_EVERY-th (pylm.telemetry.counting)."""
    first, last = unique("double"), unique("count")
    timed = 64 // SAMPLE_EVERY
    with Count(last, ANY, ANY, ANY, log_stdout=False) as end:
        with Double(first, ANY, end.address, f"{last}.count", ANY, log_stdout=False) as start:
            with LoopClient(
                end.push, start.address, start.db, first, announce=False, batch=64
            ) as client:
                results = list(client.job("double", [b"ab"] * 64))
            assert results == [b"4"] * 64
            assert start.metrics_url is not None
            found = samples(start.metrics_url)
    for server, function in ((first, "double"), (last, "count")):
        assert (
            value(found, "pylm_calls_total", server=server, function=function, outcome="ok") == 64
        )
        assert (
            value(found, "pylm_call_duration_seconds_count", server=server, function=function)
            == timed
        )
    assert value(found, "pylm_received_bytes_total", server=first) == 64 * 2
    assert value(found, "pylm_sent_bytes_total", server=first) == 64 * 4
    assert (
        value(found, "pylm_client_requests_total", server=first, function="double", outcome="ok")
        == 64
    )
    assert (
        value(found, "pylm_client_request_duration_seconds_count", server=first, function="double")
        == timed
    )


def test_a_server_that_is_not_busy_times_every_call() -> None:
    name = unique("echo")
    with Echo(name, ANY, log_stdout=False) as server, Client(server.address, name) as client:
        assert server.metrics_url is not None
        for i in range(3):
            assert client.job("echo", b"%d" % i) == b"%d" % i
            time.sleep(0.005)  # the workload itself: calls further apart than a busy server's
        found = samples(server.metrics_url)
    assert value(found, "pylm_call_duration_seconds_count", server=name, function="echo") == 3


def test_sampling_times_a_sample_of_calls_close_together() -> None:
    answers = []
    for _ in range(5):  # a loaded machine may pause between the two calls for over BUSY
        sampling = Sampling()
        began = time.perf_counter()
        first, second = sampling.untimed_next(), sampling.untimed_next()
        answers.append((first, second))
        assert first == 0  # the first call: time the next one too
        if time.perf_counter() - began < BUSY:
            assert second == SAMPLE_EVERY - 1  # at once after it: busy
            return
    pytest.fail(f"two calls never came within {BUSY} s of each other: {answers}")


def test_metrics_counters_add_untimed_calls() -> None:
    numbers = FunctionStats()
    numbers.done(0.001, 3, 4)
    numbers.untimed += 2
    numbers.failed(None, 5)
    numbers.failed(0.5, 6)
    assert (numbers.calls, numbers.errors, numbers.ok, numbers.untimed) == (5, 2, 3, 3)
    assert sum(numbers.buckets) == 2 and numbers.bytes_in == 3 + 5 + 6
    total = FunctionStats()
    total.add(numbers)
    total.add(numbers)
    assert (total.calls, total.untimed, sum(total.buckets)) == (10, 6, 4)


def test_healthz_and_metrics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("health")
    with Echo(name, ANY, log_stdout=False) as server:
        assert server.metrics_url is not None
        status, body = get(server.metrics_url.replace("/metrics", "/healthz"))
        assert status == 200
        answer = json.loads(body)
        assert answer["status"] == "ok"
        assert server.stats is not None
        mine = {
            "name": name,
            "kind": "standalone",
            "instance": server.stats.instance,
            "ready": True,
        }
        assert mine in answer["servers"]
        assert get(server.metrics_url.replace("/metrics", "/nothing"))[0] == 404
    quiet = Echo(unique("quiet"), ANY, log_stdout=False, metrics=False)
    with quiet:
        assert quiet.metrics_url is None and quiet.stats is None
    monkeypatch.setenv("PYLM_METRICS", "off")
    with Echo(unique("quiet"), ANY, log_stdout=False) as off:
        assert off.metrics_url is None and off.stats is None


def test_errors_shows_a_servers_last_failed_calls() -> None:
    """/errors, beside /metrics: each server's last calls whose function
    raised (function, type, message, time), at most RECENT, newest last;
    what read_errors gives back for that server and instance."""
    name = unique("failing")
    began = time.time()
    with Echo(name, ANY, log_stdout=False) as server:
        assert server.metrics_url is not None and server.stats is not None
        with Client(server.address, name) as client:
            for _ in range(RECENT + 3):
                with pytest.raises(RemoteError):
                    client.job("fail", b"abc")
            assert client.job("echo", b"fine") == b"fine"  # not an error: not noted
        url = errors_url(server.metrics_url)
        assert url == server.metrics_url.replace("/metrics", "/errors")
        status, body = get(url)
        assert status == 200
        notes = read_errors(body, name, server.stats.instance)
        assert fetch_errors(server.metrics_url, name, server.stats.instance, 5) == notes
    assert len(notes) == RECENT
    assert {(n.function, n.type, n.message) for n in notes} == {("fail", "ValueError", "no")}
    assert began <= notes[0].at <= notes[-1].at <= time.time()
    assert read_errors(body, name, "another instance") == []


def test_metrics_url_is_registered(pylm_registry: Registry) -> None:
    with Echo("monitored", registry=pylm_registry, log_stdout=False) as server:
        (record,) = pylm_registry.instances("monitored")
        assert record.metrics == server.metrics_url
        assert server.stats is not None and server.stats.instance == record.instance
        assert server.metrics_url is not None
        found = samples(server.metrics_url)
        assert value(found, "pylm_registry_registered", server="monitored") == 1
        assert value(found, "pylm_registry_reachable", server="monitored") == 1
        assert value(found, "pylm_registry_keepalive_failures_total", server="monitored") == 0
        assert ("pylm_server_info", frozenset({
            ("server", "monitored"), ("kind", "standalone"), ("version", record.version),
            ("instance_id", record.instance)})) in found  # fmt: skip


def test_scrape_targets_group_by_endpoint() -> None:
    def record(name: str, metrics: str | None, pid: int) -> InstanceRecord:
        return InstanceRecord(
            name, "chained", {"pull": "tcp://h:1"}, metrics=metrics, pid=pid, host="h"
        )

    targets = scrape_targets(
        [
            record("step1", "http://10.0.0.1:9100/metrics", 7),
            record("step2", "http://10.0.0.1:9100/metrics", 7),
            record("last", "http://10.0.0.2:9100/metrics", 8),
            record("dark", None, 9),
        ],
        "prod",
    )
    assert targets == [
        {"targets": ["10.0.0.1:9100"], "labels": {"cluster": "prod", "pylm_servers": "step1,step2",
         "pylm_kinds": "chained", "pylm_host": "h", "pylm_pid": "7"}},
        {"targets": ["10.0.0.2:9100"], "labels": {"cluster": "prod", "pylm_servers": "last",
         "pylm_kinds": "chained", "pylm_host": "h", "pylm_pid": "8"}},
    ]  # fmt: skip


@pytest.fixture
def discovery(pylm_registry: Registry, tmp_path: Path) -> Iterator[ServiceDiscovery]:
    with ServiceDiscovery(pylm_registry, port=0, file=tmp_path / "targets.json") as sd:
        yield sd


def test_service_discovery_follows_the_registry(
    discovery: ServiceDiscovery, pylm_registry: Registry, tmp_path: Path
) -> None:
    pylm_registry.set_config("wired_only", next="x.y")
    version = discovery.wait_for_change(0, 5)
    with Echo("sd_echo", registry=pylm_registry, log_stdout=False) as server:
        assert server.metrics_url is not None
        address = server.metrics_url.split("/")[2]
        deadline = time.monotonic() + 10
        while not discovery.targets:
            assert time.monotonic() < deadline, "the new instance never showed up"
            version = discovery.wait_for_change(version, 1)
        status, body = get(discovery.url)
        assert status == 200
        (group,) = json.loads(body)
        assert group["targets"] == [address]
        assert group["labels"]["pylm_servers"] == "sd_echo"
        assert group["labels"]["cluster"] == pylm_registry.config.cluster
        assert json.loads((tmp_path / "targets.json").read_text()) == [group]
        found = samples(f"http://{discovery.host}:{discovery.port}/metrics")
        cluster = pylm_registry.config.cluster
        assert (
            value(
                found,
                "pylm_registry_instances",
                cluster=cluster,
                server="sd_echo",
                kind="standalone",
            )
            == 1
        )
        assert (
            value(
                found,
                "pylm_registry_instances",
                cluster=cluster,
                server="wired_only",
                kind="chained",
            )
            == 0
        )
        assert value(found, "pylm_registry_up", cluster=cluster) == 1
    deadline = time.monotonic() + 10
    while discovery.targets:  # a clean stop deregisters: the target goes
        assert time.monotonic() < deadline, "the stopped instance never left"
        version = discovery.wait_for_change(version, 1)
    assert json.loads((tmp_path / "targets.json").read_text()) == []


def test_protocol_ping_still_answers_with_metrics_on() -> None:
    with (
        Echo(unique("ping"), ANY, log_stdout=False) as server,
        Client(server.address, server.name) as client,
    ):
        assert client.ping()["name"] == server.name


def test_top_quantiles_follow_prometheus_interpolation() -> None:
    from pylm.telemetry.top import quantile

    increase = {0.001: 50.0, 0.01: 90.0, 0.1: 100.0, float("inf"): 100.0}
    assert quantile(0.5, increase) == pytest.approx(0.001)
    assert quantile(0.7, increase) == pytest.approx(0.001 + 0.009 * 0.5)
    assert quantile(0.99, increase) == pytest.approx(0.01 + 0.09 * 0.9)
    assert quantile(0.5, {0.001: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.99, {0.001: 1.0, float("inf"): 2.0}) == 0.001  # above the last bound


def test_pylm_top_shows_rates_from_the_servers(pylm_registry: Registry) -> None:
    import os
    import subprocess
    import sys
    import threading

    stop = threading.Event()
    with Echo("topped", registry=pylm_registry, log_stdout=False) as server:

        def load() -> None:
            with Client(server.address, "topped") as client:
                while not stop.is_set():
                    client.job("echo", b"x")

        worker = threading.Thread(target=load)
        worker.start()
        try:
            env = {**os.environ, "PYLM_REGISTRY": pylm_registry.config.url}
            command = [
                "--cluster",
                pylm_registry.config.cluster,
                "top",
                "--once",
                "--interval",
                "0.5",
            ]
            done = subprocess.run(
                [sys.executable, "-m", "pylm.cli", *command],
                env=env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        finally:
            stop.set()
            worker.join(10)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("topped "))
    fields = line.split()
    assert fields[1] == "standalone" and fields[2] == "1"
    assert float(fields[3]) > 0  # calls per second (no next stage: that column is blank)
    assert "metrics unreachable" not in line


def test_metrics_bind_their_own_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYLM_METRICS_HOST", "127.0.0.2")  # the servers listen on 127.0.0.1
    with Echo(unique("apart"), ANY, log_stdout=False) as server:
        assert server.address is not None and server.address.startswith("tcp://127.0.0.1:")
        assert server.metrics_url is not None
        assert server.metrics_url.startswith("http://127.0.0.2:")
        assert get(server.metrics_url.replace("/metrics", "/healthz"))[0] == 200


def test_reading_metrics_is_bounded_by_peers_that_drip_or_speak_no_http() -> None:
    """pylm top and the console read every instance's /metrics: a peer that
    answers a byte at a time, or that is not HTTP at all, counts as no
    answer within about the timeout, next to one that answers."""
    import socket
    import threading

    from pylm.telemetry import top

    stop = threading.Event()

    def listener(serve: Callable[[socket.socket], None]) -> str:
        server = socket.create_server(("127.0.0.1", 0))

        def run() -> None:
            with server:
                connection, _ = server.accept()
                with connection:
                    connection.recv(4096)
                    serve(connection)

        threading.Thread(target=run, daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}/metrics"

    def drip(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        while not stop.wait(0.2):  # a slow peer: a byte every 0.2 s
            connection.sendall(b"#")

    def not_http(connection: socket.socket) -> None:
        connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    name = unique("answers")
    with Echo(name, ANY, log_stdout=False) as server:
        assert server.metrics_url is not None
        urls = [listener(drip), listener(not_http), server.metrics_url]
        began = time.monotonic()
        try:
            texts, answered = top.fetch(urls, timeout=1.0)
        finally:
            stop.set()
        took = time.monotonic() - began
    assert answered == {urls[0]: False, urls[1]: False, urls[2]: True}
    assert len(texts) == 1 and name in texts[0]
    assert took < 5, took  # about the timeout, however long the drip lasts
