"""pylm's HTTP gateway (pylm.gateway): a real uvicorn on an OS-chosen port
in front of real servers found in a real etcd, called over HTTP."""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import Doer, Last, Step

from pylm.gateway import STREAM_IN_FLIGHT, Gateway, HTTPServer, read_tokens
from pylm.parallel import Master
from pylm.processes import end_process
from pylm.registry import LocalEtcd, Registry
from pylm.standalone import Server
from pylm.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class Echo(Server):
    def echo(self, message: bytes) -> bytes:
        return b"echo " + message

    def fail(self, message: bytes) -> bytes:
        raise ValueError("no good: " + message.decode())

    def slow(self, message: bytes) -> bytes:
        threading.Event().wait(float(message))  # a function that takes its time
        return b"late"


@contextmanager
def serving(gateway: Gateway) -> Iterator[str]:
    """``gateway`` served on a port the system picks: its URL."""
    server = HTTPServer(gateway, port=0)
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_for(lambda: _status(f"{server.url}/healthz") == 200, 20, "the gateway serving")
        yield server.url
    finally:
        server.stop()
        thread.join(20)
        assert not thread.is_alive()


@pytest.fixture
def gateway(pylm_registry: Registry) -> Iterator[str]:
    """A gateway over the test's cluster: its URL."""
    with serving(Gateway(pylm_registry, timeout=2, max_body=1000)) as url:
        yield url


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def post(url: str, body: bytes, token: str | None = None) -> tuple[int, str, bytes]:
    """Status, content type and body of a POST (with a bearer ``token``)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers["content-type"], answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read()


def test_a_call_through_the_gateway_and_many_at_once(
    serve: object, pylm_registry: Registry, gateway: str
) -> None:
    """POST /echo_server/echo answers the function's result as raw bytes;
    64 requests at once all get their own answer."""
    serve(Echo("echo_server", registry=pylm_registry, log_stdout=False))  # type: ignore[operator]
    wait_for(lambda: pylm_registry.instances("echo_server") != [], 20, "the server listed")
    wait_for(lambda: post(f"{gateway}/echo_server/echo", b"x")[0] == 200, 20, "followed")
    assert post(f"{gateway}/echo_server/echo", b"hello") == (
        200,
        "application/octet-stream",
        b"echo hello",
    )
    with ThreadPoolExecutor(64) as pool:
        answers = list(
            pool.map(lambda n: post(f"{gateway}/echo_server/echo", b"%d" % n), range(256))
        )
    assert [body for _, _, body in answers] == [b"echo %d" % n for n in range(256)]


def test_errors_are_problem_details_with_the_status_that_fits(
    serve: object, pylm_registry: Registry, gateway: str
) -> None:
    serve(Echo("echo_server", registry=pylm_registry, log_stdout=False))  # type: ignore[operator]
    wait_for(lambda: post(f"{gateway}/echo_server/echo", b"x")[0] == 200, 20, "followed")

    def problem(path: str, body: bytes = b"x") -> tuple[int, dict[str, object]]:
        status, kind, raw = post(f"{gateway}{path}", body)
        assert kind == "application/problem+json", (path, kind)
        document = json.loads(raw)
        assert document["status"] == status
        return status, document

    status, document = problem("/nobody/echo")
    assert status == 404 and document["title"] == "Unknown server"
    status, document = problem("/echo_server/nothing")
    assert status == 404 and "no function 'nothing'" in str(document["detail"])
    assert problem("/-bad/echo")[0] == 400
    assert problem("/bad%20name/echo")[0] == 400
    assert problem("/echo_server/_private")[0] == 400
    status, document = problem("/echo_server/fail", b"boom")
    assert status == 502
    assert document["remote_type"] == "ValueError"
    assert document["remote_message"] == "no good: boom"
    assert problem("/echo_server/echo", b"x" * 1001)[0] == 413
    assert problem("/echo_server/slow", b"5")[0] == 504  # the gateway's timeout: 2 s
    status, document = problem("/gateway/anything")  # the gateway itself: not callable
    assert status == 501 and document["title"] == "Kind not served"


def test_healthz_and_openapi_describe_the_live_cluster(
    serve: object, pylm_registry: Registry, gateway: str
) -> None:
    serve(Echo("echo_server", registry=pylm_registry, log_stdout=False))  # type: ignore[operator]

    def described() -> dict[str, object]:
        with urllib.request.urlopen(f"{gateway}/openapi.json", timeout=5) as answer:
            return dict(json.loads(answer.read()))

    wait_for(lambda: "/echo_server/echo" in described()["paths"], 20, "echo described")  # type: ignore[operator]
    paths = described()["paths"]
    assert set(paths) == {"/echo_server/echo", "/echo_server/fail", "/echo_server/slow"}  # type: ignore[arg-type]
    with urllib.request.urlopen(f"{gateway}/healthz", timeout=5) as answer:
        assert json.loads(answer.read()) == {"status": "ok", "registry": True}


_SERVER = """
from pylm.standalone import Server

class Echo(Server):
    def echo(self, message):
        return b"echo " + message

Echo("doomed", ttl=60, log_stdout=False).start()
"""


def test_a_registered_server_with_no_live_instance_is_503(
    pylm_etcd: LocalEtcd, pylm_cluster: str, pylm_registry: Registry, gateway: str
) -> None:
    """A server process SIGKILLed with a lease of 60 s: its record stays,
    but no instance is reachable, and the gateway says so (503) rather than
    that it waited in vain (504)."""
    env = {**os.environ, "PYLM_REGISTRY": pylm_etcd.url, "PYLM_CLUSTER": pylm_cluster}
    process = subprocess.Popen([sys.executable, "-c", _SERVER], env=env)
    try:
        wait_for(lambda: post(f"{gateway}/doomed/echo", b"x")[0] == 200, 20, "served")
        process.kill()
        assert process.wait(10) == -signal.SIGKILL
        status, kind, body = post(f"{gateway}/doomed/echo", b"x")
        assert (status, kind) == (503, "application/problem+json"), body
        assert json.loads(body)["title"] == "No live instance"
    finally:
        end_process(process, 10)  # type: ignore[arg-type]


def test_bearer_tokens_from_a_file(serve: object, pylm_registry: Registry, tmp_path: Path) -> None:
    """With tokens, a call without one is a 401 (saying Bearer), with
    another a 403, with one of the file's the call; /healthz stays open."""
    serve(Echo("echo_server", registry=pylm_registry, log_stdout=False))  # type: ignore[operator]
    wait_for(lambda: pylm_registry.instances("echo_server") != [], 20, "the server listed")
    tokens = tmp_path / "tokens"
    tokens.write_text("# who may call\nalpha-123\n\nbeta-456\n")
    with serving(Gateway(pylm_registry, timeout=2, tokens=read_tokens(tokens))) as url:
        wait_for(lambda: post(f"{url}/echo_server/echo", b"x", "beta-456")[0] == 200, 20, "ok")
        status, kind, _ = post(f"{url}/echo_server/echo", b"x")
        assert (status, kind) == (401, "application/problem+json")
        request = urllib.request.Request(f"{url}/echo_server/echo", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
        assert post(f"{url}/echo_server/echo", b"x", "alpha-12")[0] == 403
        assert post(f"{url}/echo_server/echo", b"x", "alpha-123") == (
            200,
            "application/octet-stream",
            b"echo x",
        )
        assert _status(f"{url}/healthz") == 200


def test_the_gateway_registers_and_serves_its_metrics(
    serve: object, pylm_registry: Registry, gateway: str
) -> None:
    """Served, the gateway is a server of kind 'gateway' in the registry,
    whose metrics URL (what pylm sd hands Prometheus) counts its calls."""
    serve(Echo("echo_server", registry=pylm_registry, log_stdout=False))  # type: ignore[operator]
    wait_for(lambda: post(f"{gateway}/echo_server/echo", b"x")[0] == 200, 20, "followed")
    (record,) = pylm_registry.instances("gateway")
    assert record.kind == "gateway" and record.metrics == f"{gateway}/metrics"
    with urllib.request.urlopen(record.metrics, timeout=10) as answer:
        text = answer.read().decode()
    assert 'pylm_client_requests_total{function="echo",outcome="ok",server="echo_server"}' in text


def test_a_pipeline_and_a_master_through_the_gateway(
    serve: object, pylm_registry: Registry, gateway: str
) -> None:
    """POST /first/tag runs a job through the pipeline first -> last and
    answers its result; POST /pool/echo, a job of the master pool, done by
    its worker; 32 of each at once, each with its own result."""
    for server in (
        Last("last", registry=pylm_registry, log_stdout=False),
        Step("first", next_call="last.done", registry=pylm_registry, log_stdout=False),
        Master("pool", registry=pylm_registry, log_stdout=False),
        Doer("doer", "pool", registry=pylm_registry, log_stdout=False),
    ):
        serve(server)  # type: ignore[operator]
    wait_for(lambda: post(f"{gateway}/first/tag", b"x")[0] == 200, 20, "the pipeline")
    wait_for(lambda: post(f"{gateway}/pool/echo", b"x")[0] == 200, 20, "the master")
    assert post(f"{gateway}/first/tag", b"job") == (
        200,
        "application/octet-stream",
        b"job>step>done",
    )
    assert post(f"{gateway}/pool/echo", b"job")[2] == b"job"
    with urllib.request.urlopen(f"{gateway}/openapi.json", timeout=10) as answer:
        paths = json.load(answer)["paths"]
    assert "/pool/echo" in paths and "/first/tag" in paths  # a master's: its workers' functions
    with ThreadPoolExecutor(32) as pool:
        piped = list(pool.map(lambda n: post(f"{gateway}/first/tag", b"%d" % n)[2], range(64)))
        done = list(pool.map(lambda n: post(f"{gateway}/pool/echo", b"%d" % n)[2], range(64)))
    assert piped == [b"%d>step>done" % n for n in range(64)]
    assert done == [b"%d" % n for n in range(64)]
    status, kind, _ = post(f"{gateway}/pool/nothing", b"x")  # the worker says it has none
    assert (status, kind) == (404, "application/problem+json")


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (cert, key) files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert, secret = folder / "gateway.crt", folder / "gateway.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    secret.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, secret


def test_https_from_certificate_files(
    serve: object, pylm_registry: Registry, tmp_path: Path
) -> None:
    """Given a certificate and its key, the gateway serves HTTPS: a client
    that trusts the certificate calls through it, and it registers its
    metrics URL as https."""
    serve(Echo("echo_server", registry=pylm_registry, log_stdout=False))  # type: ignore[operator]
    wait_for(lambda: pylm_registry.instances("echo_server") != [], 20, "the server listed")
    cert, key = self_signed(tmp_path)
    trusting = ssl.create_default_context(cafile=str(cert))
    server = HTTPServer(Gateway(pylm_registry, timeout=2), port=0, certfile=cert, keyfile=key)
    assert server.url.startswith("https://127.0.0.1:")
    thread = threading.Thread(target=server.run)
    thread.start()

    def call() -> bytes:
        request = urllib.request.Request(
            f"{server.url}/echo_server/echo", data=b"sealed", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10, context=trusting) as answer:
            return bytes(answer.read())

    try:
        wait_for(lambda: _calls(call), 20, "the gateway serving HTTPS")
        assert call() == b"echo sealed"
        (record,) = pylm_registry.instances("gateway")
        assert record.metrics == f"{server.url}/metrics"
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP: no answer
            urllib.request.urlopen(server.url.replace("https", "http") + "/healthz", timeout=5)
    finally:
        server.stop()
        thread.join(20)


def _calls(call: Callable[[], bytes]) -> bool:
    try:
        return call() == b"echo sealed"
    except OSError:
        return False


def ndjson(url: str, lines: list[str]) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        url,
        data="\n".join(lines).encode(),
        method="POST",
        headers={"Content-Type": "application/x-ndjson"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers["content-type"], answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read()


def test_many_jobs_in_one_request_come_back_as_ndjson(
    serve: object, pylm_registry: Registry, gateway: str
) -> None:
    """An NDJSON request (a job a line, its payload as base64 or text) is
    answered with a line per job as it ends, with its index: its result in
    base64, or its problem; to a standalone server and through a pipeline.
    A line that is no job is a 400 naming it."""
    for server in (
        Echo("echo_server", registry=pylm_registry, log_stdout=False),
        Last("last", registry=pylm_registry, log_stdout=False),
        Step("first", next_call="last.done", registry=pylm_registry, log_stdout=False),
    ):
        serve(server)  # type: ignore[operator]
    wait_for(lambda: post(f"{gateway}/first/tag", b"x")[0] == 200, 20, "the pipeline")
    wait_for(lambda: post(f"{gateway}/echo_server/echo", b"x")[0] == 200, 20, "the server")
    jobs = [json.dumps({"text": f"t{n}"}) for n in range(40)]  # under the 1,000 B limit
    jobs.append(json.dumps({"payload": base64.b64encode(b"\x00\xff").decode()}))
    status, kind, body = ndjson(f"{gateway}/echo_server/echo", jobs)
    assert (status, kind) == (200, "application/x-ndjson")
    answers = [json.loads(line) for line in body.splitlines()]
    results = {a["index"]: base64.b64decode(a["result"]) for a in answers}
    assert results == {**{n: b"echo t%d" % n for n in range(40)}, 40: b"echo \x00\xff"}
    status, _, body = ndjson(
        f"{gateway}/first/tag", [json.dumps({"text": f"{n}"}) for n in range(50)]
    )
    piped = {a["index"]: base64.b64decode(a["result"]) for a in map(json.loads, body.splitlines())}
    assert status == 200 and piped == {n: b"%d>step>done" % n for n in range(50)}
    status, _, body = ndjson(f"{gateway}/echo_server/fail", ['{"text": "a"}', '{"text": "b"}'])
    problems = sorted((json.loads(line) for line in body.splitlines()), key=lambda a: a["index"])
    assert status == 200 and [p["problem"]["status"] for p in problems] == [502, 502]
    assert problems[1]["problem"]["remote_message"] == "no good: b"
    status, kind, body = ndjson(f"{gateway}/echo_server/echo", ['{"text": "a"}', "{not json"])
    assert (status, kind) == (400, "application/problem+json")
    assert "line 2" in json.loads(body)["detail"]


def test_pylm_gateway_without_its_extra_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['starlette'] = None; from pylm.cli import main;"
        " sys.exit(main(['--registry', 'etcd://127.0.0.1:1', 'gateway']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "pip install '.[gateway]'" in done.stderr


def test_the_clients_of_a_server_gone_from_the_registry_are_closed(
    pylm_registry: Registry,
) -> None:
    """A server called through the gateway, then gone from the registry:
    once it has been gone forget_after seconds, the gateway closes its client
    (standalone) or pool (pipeline), with or without calls meanwhile;
    servers still listed keep theirs."""
    gateway = Gateway(pylm_registry, timeout=2)
    gateway.forget_after = 0.5
    echo = Echo("echo_server", registry=pylm_registry, log_stdout=False)
    stay = Echo("stays", registry=pylm_registry, log_stdout=False)
    stages = [
        Last("last", registry=pylm_registry, log_stdout=False),
        Step("first", next_call="last.done", registry=pylm_registry, log_stdout=False),
    ]
    with serving(gateway) as url, stay:
        for server in (echo, *stages):
            server.start(background=True)
        try:
            wait_for(lambda: post(f"{url}/echo_server/echo", b"x")[0] == 200, 20, "echo found")
            wait_for(lambda: post(f"{url}/first/tag", b"x")[0] == 200, 20, "first found")
            assert post(f"{url}/stays/echo", b"x")[0] == 200
            assert {"echo_server", "stays"} <= set(gateway._clients) and "first" in gateway._pools
        finally:
            for server in (echo, *reversed(stages)):
                server.stop()
        wait_for(  # with no call meanwhile: the gateway looks by itself
            lambda: "echo_server" not in gateway._clients and "first" not in gateway._pools,
            20,
            "the clients of the servers gone closed",
        )
        assert "stays" in gateway._clients
        assert post(f"{url}/stays/echo", b"x")[2] == b"echo x"


def test_a_request_of_more_jobs_than_go_out_at_once_answers_each(
    serve: object, pylm_registry: Registry
) -> None:
    """1,000 jobs in one NDJSON request, STREAM_IN_FLIGHT out at a time:
    a line for each, with its own result."""
    serve(Echo("echo_server", registry=pylm_registry, log_stdout=False))  # type: ignore[operator]
    with serving(Gateway(pylm_registry, timeout=10)) as url:
        wait_for(lambda: post(f"{url}/echo_server/echo", b"x")[0] == 200, 20, "the server")
        jobs = [json.dumps({"text": f"{n}"}) for n in range(1000)]
        status, _, body = ndjson(f"{url}/echo_server/echo", jobs)
    assert status == 200 and STREAM_IN_FLIGHT < 1000
    lines = [json.loads(line) for line in body.splitlines()]
    assert len(lines) == 1000
    assert {line["index"]: base64.b64decode(line["result"]) for line in lines} == {
        n: b"echo %d" % n for n in range(1000)
    }


class Held(Step):
    """A stage that passes jobs on once the test says go, counting arrivals."""

    go = threading.Event()
    arrived = 0

    def hold(self, message: bytes) -> bytes:
        Held.arrived += 1
        assert Held.go.wait(30)
        return message


def test_a_batch_that_goes_away_gives_every_pooled_client_back(
    serve: object, pylm_registry: Registry
) -> None:
    """An NDJSON request to a pipeline whose caller hangs up while its jobs
    are held in a stage: the runs its jobs went out in end as the jobs do,
    and their clients come back to the pool with its room; calls after it
    are served."""
    from pylm.gateway import POOL

    Held.go.clear()
    Held.arrived = 0
    for server in (
        Last("last", registry=pylm_registry, log_stdout=False),
        Held("first", next_call="last.done", registry=pylm_registry, log_stdout=False),
    ):
        serve(server)  # type: ignore[operator]
    gateway = Gateway(pylm_registry, timeout=20)
    with serving(gateway) as url:
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        jobs = "\n".join(json.dumps({"text": f"{n}"}) for n in range(POOL + 8))
        connection.request(
            "POST", "/first/hold", jobs, headers={"Content-Type": "application/x-ndjson"}
        )
        wait_for(lambda: Held.arrived > 0, 20, "a job held in the stage")
        pool = gateway._pools["first"]
        assert pool._busy  # a run holds a client
        connection.close()  # the caller goes away
        Held.go.set()
        wait_for(
            lambda: not pool._busy and pool._room._value == POOL,  # type: ignore[union-attr]
            20,
            "every client back in the pool",
        )
        assert pool._idle
        assert post(f"{url}/first/hold", b"after")[2] == b"after>done"
        with ThreadPoolExecutor(16) as threads:
            answers = list(threads.map(lambda n: post(f"{url}/first/hold", b"%d" % n), range(64)))
        assert [answer[2] for answer in answers] == [b"%d>done" % n for n in range(64)]


def test_the_clients_of_a_server_gone_are_kept_while_a_call_uses_them(
    serve: object, pylm_registry: Registry
) -> None:
    """A call held in a stage whose record leaves the registry: the
    gateway keeps that pipeline's clients past forget_after while the call
    runs, the call gets its result, and the clients close after it."""
    Held.go.clear()
    Held.arrived = 0
    last = Last("last", registry=pylm_registry, log_stdout=False)
    first = Held("first", next_call="last.done", registry=pylm_registry, log_stdout=False)
    for server in (last, first):
        serve(server)  # type: ignore[operator]
    gateway = Gateway(pylm_registry, timeout=20)
    gateway.forget_after = 0.3
    with serving(gateway) as url, ThreadPoolExecutor(1) as caller:
        wait_for(lambda: pylm_registry.instances("first") != [], 20, "first listed")
        held = caller.submit(post, f"{url}/first/hold", b"held")
        wait_for(lambda: Held.arrived == 1, 20, "the call held in the stage")
        first._registrar.close()  # its record leaves; it still serves the call in hand
        wait_for(
            lambda: "first" in gateway._gone and time.monotonic() - gateway._gone["first"] > 0.6,
            20,
            "twice forget_after since first was seen gone",
        )
        assert "first" in gateway._pools  # in use: kept
        Held.go.set()
        assert held.result(20)[:2] == (200, "application/octet-stream")
        assert held.result()[2] == b"held>done"
        wait_for(lambda: "first" not in gateway._pools, 20, "the pool closed after the call")
