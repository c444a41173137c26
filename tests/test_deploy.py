"""deploy/: the container image and the Kubernetes manifests.

Offline, every object of every manifest is checked against the Kubernetes
API's schemas (kubernetes-validate), the kustomizations against the files
they list, and the Prometheus Operator's objects against what promtool and
the operator take. Then the stack runs for real from the same manifests with
``podman kube play`` (tests/kube.py says what podman lacks and how the test
makes it up): a client container sends jobs through the pipeline, a stage is
scaled up and down, a pod is killed, and Prometheus sees every instance.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kube
import kubernetes_validate
import pytest
from prerequisites import missing, prometheus_problem

from pylm.registry import LocalEtcd, Registry
from pylm.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent
# The stack's pylm workloads, each with the instances it starts with.
SERVED = {
    "upper": 2,
    "reverse": 2,
    "tag": 2,
    "squares": 1,
    "squarer": 3,
    "gateway": 2,
    "pylm-sd": 1,
}
KUBE = kube.KUBE
MANIFESTS = sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")
KUSTOMIZATIONS = sorted(KUBE.rglob("kustomization.yaml"))
CUSTOM = {"PodMonitor", "PrometheusRule"}  # the Prometheus Operator's kinds
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are for


def objects(path: Path) -> list[dict[str, Any]]:
    return kube.load(path)


# -- offline -----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(KUBE)))
def test_every_object_is_valid_for_kubernetes(path: Path) -> None:
    for obj in objects(path):
        if obj["kind"] in CUSTOM:
            continue  # no schema ships for them: the tests below check them
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.timeout(60)
def test_the_validator_refuses_a_broken_object() -> None:
    (deployment,) = [o for o in objects(KUBE / "pylm" / "sd.yaml") if o["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    deployment["spec"]["replica"] = 2  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _stack(kustomization: Path) -> list[dict[str, Any]]:
    """The objects a kustomization gives (resources followed into folders)."""
    found: list[dict[str, Any]] = kube.generated(kustomization.parent)
    spec = kube.load(kustomization)[0]
    for entry in spec.get("resources", []):
        path = (kustomization.parent / entry).resolve()
        assert path.exists(), f"{kustomization}: no {entry}"
        found += _stack(path / "kustomization.yaml") if path.is_dir() else objects(path)
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "path", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(KUBE)) or "."
)
def test_each_kustomization_gives_a_whole_stack(path: Path) -> None:
    stack = _stack(path)
    names = [(o["kind"], o["metadata"]["name"]) for o in stack]
    assert len(names) == len(set(names)), f"an object twice: {sorted(names)}"
    listed = {p.resolve() for p in path.parent.iterdir() if p.suffix == ".yaml"} - {path}
    used = {(path.parent / e).resolve() for e in kube.load(path)[0].get("resources", [])}
    assert listed <= used, f"files no kustomization lists: {sorted(map(str, listed - used))}"
    if path.parent in (KUBE, KUBE / "dev", KUBE / "with-operator"):
        kinds = {kind for kind, _ in names}
        assert {"StatefulSet", "Deployment"} & kinds and "Job" in kinds
        workloads = {n for k, n in names if k in ("Deployment", "StatefulSet")}
        assert set(SERVED) | {"etcd"} <= workloads
        monitoring = "PodMonitor" if path.parent.name == "with-operator" else "Deployment"
        assert (monitoring, "pylm" if monitoring == "PodMonitor" else "prometheus") in names
        images = {i["name"] for i in kube.load(path)[0].get("images", [])}
        assert images == {"pylm"}, "the whole stack says which pylm image to run"


@pytest.mark.timeout(60)
def test_the_generated_rules_are_current() -> None:
    run = subprocess.run(
        ["python3", str(ROOT / "scripts" / "kube_rules.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.timeout(60)
def test_the_operators_objects_are_what_it_takes(tmp_path: Path) -> None:
    """The PrometheusRule's rules pass promtool; the PodMonitor selects the
    pods of the stack by their label and names ports they have."""
    problem = prometheus_problem()
    if problem is not None:
        missing(problem)
    (rule,) = objects(KUBE / "operator" / "prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    rules = tmp_path / "rules.yml"
    rules.write_text(json.dumps(rule["spec"]), encoding="utf-8")
    run = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (monitor,) = objects(KUBE / "operator" / "podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    scraped = set()
    for obj in _stack(KUBE / "with-operator" / "kustomization.yaml"):
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]
            assert labels.items() <= template["metadata"]["labels"].items(), obj["metadata"]
            for container in template["spec"]["containers"]:
                names = {port["name"] for port in container.get("ports", [])}
                if names & ports:
                    scraped.add(obj["metadata"]["name"])
    assert scraped == set(SERVED)


# -- systemd -----------------------------------------------------------------------

SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))


def _pylm_command() -> str:
    found = Path(sys.executable).parent / "pylm"
    path = str(found) if found.exists() else shutil.which("pylm")
    assert path is not None, "no pylm command: pip install -e ."
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_takes_the_unit_as_it_is(unit: Path, tmp_path: Path) -> None:
    """systemd-analyze verify says nothing of the unit (an unknown key, a bad
    value), with the pylm command where this machine has it."""
    if shutil.which("systemd-analyze") is None:
        missing("needs systemd-analyze: sudo apt-get install systemd")
    name = unit.name.replace("@.", "@upper.")
    text = unit.read_text(encoding="utf-8").replace("/opt/pylm/bin/pylm", _pylm_command())
    (tmp_path / name).write_text(text, encoding="utf-8")
    run = subprocess.run(
        ["systemd-analyze", "verify", f"./{name}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0 and not (run.stdout + run.stderr).strip(), run.stdout + run.stderr


def _service(unit: Path, instance: str) -> dict[str, list[str]]:
    """The [Service] settings of ``unit`` for ``instance`` (%i), each with its values."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value.replace("%i", instance))
    return settings


def _command(unit: Path, instance: str, env_files: Path) -> tuple[list[str], dict[str, str]]:
    """ExecStart's command line and environment as systemd makes them:
    Environment=, then each EnvironmentFile= (from ``env_files``), then
    ``${VAR}`` as one word and ``$VAR`` split on white space."""
    service = _service(unit, instance)
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        env.update(word.split("=", 1) for word in shlex.split(line))  # type: ignore[misc]
    for entry in service.get("EnvironmentFile", []):
        path = env_files / Path(entry.lstrip("-")).name
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    argv: list[str] = []
    for word in service["ExecStart"][0].split():
        if word.startswith("${"):
            argv.append(env[word[2:-1]])
        elif word.startswith("$"):
            argv += env[word[1:]].split()
        else:
            argv.append(word)
    return argv, env


@pytest.mark.timeout(60)
def test_the_template_unit_runs_the_server_its_file_names() -> None:
    argv, env = _command(SYSTEMD / "pylm@.service", "squarer", SYSTEMD)
    assert argv == [
        "/opt/pylm/bin/pylm", "run", "workers.py:Squarer", "--name", "squarer",
        "--master", "squares", "--wait", "30",
    ]  # fmt: skip
    assert env["PYLM_REGISTRY"].startswith("etcd://")
    argv, _ = _command(SYSTEMD / "pylm@.service", "upper", SYSTEMD)
    assert argv[1:] == ["run", "pipeline.py:Upper", "--name", "upper"]


@pytest.mark.timeout(60)
def test_the_template_units_server_registers_and_stops_cleanly_on_sigterm(
    pylm_etcd: LocalEtcd, pylm_cluster: str
) -> None:
    """The command systemd runs for pylm@upper, in the folder of the example
    code: the server registers; SIGTERM (systemctl stop) takes it out of the
    registry and it exits with 0."""
    argv, env = _command(SYSTEMD / "pylm@.service", "upper", SYSTEMD)
    env.update(PYLM_REGISTRY=pylm_etcd.url, PYLM_CLUSTER=pylm_cluster, PYLM_HOST="127.0.0.1")
    argv[0] = _pylm_command()
    with Registry(pylm_etcd.url, cluster=pylm_cluster) as registry:
        registry.set_config("upper", "reverse.reverse")  # as topology.toml wires it
    server = subprocess.Popen(argv, cwd=KUBE / "pylm" / "app", env={**os.environ, **env})
    try:
        with Registry(pylm_etcd.url, cluster=pylm_cluster) as registry:
            wait_for(lambda: len(registry.instances("upper")) == 1, 30, "upper's record")
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0
            assert registry.instances("upper") == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# -- on podman ---------------------------------------------------------------------


def _wait_until_up(url: str, timeout: float) -> None:
    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    wait_for(answers, timeout=timeout, what="an answer from " + url)


@pytest.fixture(scope="module")
def stack() -> Iterator[kube.Stack]:
    problem = kube.problem()
    if problem is not None:
        missing(problem)
    with kube.temporary() as folder:
        work = Path(folder)
        etcd, prometheus = (
            KUBE / "etcd-single" / "etcd.yaml",
            KUBE / "prometheus" / "prometheus.yaml",
        )
        running = kube.Stack(work, kube.images_of([etcd, prometheus]))
        try:
            kube.build_images(running)
            running.play(running.playable(objects(etcd)))
            running.etcd = f"etcd://{running.ip('etcd')}:2379"
            _wait_until_up(f"http://{running.ip('etcd')}:2379/health", timeout=60)
            config = objects(KUBE / "pylm" / "config.yaml")
            config += kube.generated(KUBE / "pylm")
            for part in ("topology", "pipeline", "parallel", "gateway", "sd"):
                running.play(running.playable(config + objects(KUBE / "pylm" / f"{part}.yaml")))
            rules = objects(KUBE / "prometheus" / "rules.yaml")
            running.play(running.playable(objects(prometheus) + rules))
            with Registry(running.etcd) as registry:

                def registered() -> bool:
                    found = [record.name for record in registry.instances()]
                    return all(found.count(name) == n for name, n in STARTED.items())

                wait_for(registered, timeout=60, what=f"instances registered as {STARTED}")
            yield running
        finally:
            running.close()


STARTED = {name: count for name, count in SERVED.items() if name != "pylm-sd"}  # registered


def _calls(metrics_url: str | None, function: str) -> float:
    """The calls of ``function`` a server process has counted."""
    assert metrics_url is not None
    with urllib.request.urlopen(metrics_url, timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pylm_calls_total{") and f'function="{function}"' in line
    )


def _running(stack: kube.Stack, container: str) -> bool:
    return stack.podman("inspect", container, "--format", "{{.State.Running}}").strip() == "true"


def _reverse_pod(stack: kube.Stack, name: str) -> None:
    """One more instance of the stage reverse, as a replica of its Deployment."""
    (deployment,) = [
        o
        for o in objects(KUBE / "pylm" / "pipeline.yaml")
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "reverse"
    ]
    config = objects(KUBE / "pylm" / "config.yaml") + kube.generated(KUBE / "pylm")
    stack.play([*config, stack.as_pod(name, deployment["spec"]["template"])])


# The stack is built by the first of these tests to run: up to 15 minutes on a
# machine that has no base image yet (deploy/debian-base.sh), 15 s otherwise.


@pytest.mark.timeout(900)
def test_a_client_container_gets_every_result_of_the_pipeline(stack: kube.Stack) -> None:
    out = stack.run("pylm-test-client", "client.py", "2000")
    assert "2000 jobs, 2000 right results" in out
    with Registry(stack.etcd) as registry:
        for record in registry.instances("upper") + registry.instances("reverse"):
            assert _calls(record.metrics, record.name) > 0, f"{record.host} served no job"
            assert record.metrics is not None and record.metrics.endswith(":9100/metrics")
            health = record.metrics.replace("/metrics", "/healthz")  # the probes' URL
            with urllib.request.urlopen(health, timeout=5) as answer:
                assert json.load(answer)["status"] == "ok"


@pytest.mark.timeout(900)
def test_every_instance_registers_its_pods_own_address(stack: kube.Stack) -> None:
    """Servers and gateways alike: the address in the registry is the pod's
    IP on the network, not a name that only a container engine's DNS knows."""
    with Registry(stack.etcd) as registry:
        records = registry.instances()
    assert {record.name for record in records} == set(STARTED)
    for record in records:
        assert record.metrics is not None
        assert urllib.parse.urlsplit(record.metrics).hostname == stack.ip(record.host), record


@pytest.mark.timeout(900)
def test_the_master_workers_gateway_and_console_answer(stack: kube.Stack) -> None:
    out = stack.run("pylm-test-call", "-m", "pylm", "call", "squares", "square", "12")
    assert out.strip() == "144"
    gateway = stack.ip("gateway-pod-0")
    request = urllib.request.Request(f"http://{gateway}:8080/upper/upper", data=b"hello")
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.read() == b"done: OLLEH"
    with urllib.request.urlopen(f"http://{stack.ip('gateway-pod-1')}:8080/", timeout=10) as answer:
        assert b"pylm" in answer.read()


def _scraped(stack: kube.Stack) -> set[str]:
    """The metrics URLs Prometheus scrapes, and last found up."""
    url = f"http://{stack.ip('prometheus')}:9090/api/v1/targets"
    with urllib.request.urlopen(url, timeout=5) as answer:
        targets = json.load(answer)["data"]["activeTargets"]
    return {t["scrapeUrl"] for t in targets if t["health"] == "up"}


@pytest.mark.timeout(900)
def test_prometheus_scrapes_every_instance_the_registry_lists(stack: kube.Stack) -> None:
    with Registry(stack.etcd) as registry:
        wanted = {record.metrics for record in registry.instances() if record.metrics}
    assert len(wanted) == sum(STARTED.values())
    wait_for(lambda: wanted <= _scraped(stack), timeout=60, what="Prometheus scraping all")
    prometheus = f"http://{stack.ip('prometheus')}:9090"
    url = f"{prometheus}/api/v1/query?query=count(up%7Bjob%3D%22pylm-sd%22%7D%3D%3D1)"
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert json.load(answer)["data"]["result"][0]["value"][1] == "1"


def _while_jobs_flow(
    stack: kube.Stack, client: str, metrics: str | None, disrupt: Callable[[], object]
) -> None:
    """A client container sends 60,000 jobs through the pipeline; once the
    instance serving ``metrics`` has taken 1,000 of them, ``disrupt()`` runs
    while the jobs still flow (asserted), and the client gets every result."""
    served = _calls(metrics, "reverse")
    stack.run(client, "client.py", "60000", detach=True)
    wait_for(lambda: _calls(metrics, "reverse") > served + 1000, 60, "jobs on the instance")
    disrupt()
    assert _running(stack, client), "the jobs ended before the disruption"
    assert stack.wait(client, timeout=120) == 0, stack.logs(client)
    assert "60000 jobs, 60000 right results" in stack.logs(client)


@pytest.mark.timeout(900)
def test_a_stage_scales_up_and_down_while_jobs_flow(stack: kube.Stack) -> None:
    """A third instance of reverse registers, takes jobs and is scraped.
    Stopped as a scale-down stops it (SIGTERM) while a client's jobs flow
    through it, it leaves the registry, ends what it holds and exits with 0,
    and the client gets every result."""
    _reverse_pod(stack, "reverse-pod-9")
    with Registry(stack.etcd) as registry:
        wait_for(
            lambda: len(registry.instances("reverse")) == 3,
            timeout=60,
            what="the new instance's record",
        )
        (new,) = [r for r in registry.instances("reverse") if r.host == "reverse-pod-9"]
        assert "2000 jobs, 2000 right results" in stack.run("pylm-test-up", "client.py", "2000")
        assert _calls(new.metrics, "reverse") > 0
        wait_for(lambda: new.metrics in _scraped(stack), 60, "Prometheus scraping the new one")

        # As the kubelet does: the pod's containers get SIGTERM and end
        # first, then its sandbox (podman's infra container, which holds the
        # network) goes; `podman pod stop` alone may stop both at once.
        # `podman stop` sends SIGTERM and waits for the end: in a thread, so
        # that the jobs are seen still flowing once the signal went.
        stopping = threading.Thread(
            target=stack.podman, args=("stop", "-t", "30", "reverse-pod-9-server")
        )
        _while_jobs_flow(stack, "pylm-test-down", new.metrics, stopping.start)
        stopping.join(60)
        assert not stopping.is_alive(), "the server did not stop"
        hosts = [r.host for r in registry.instances("reverse")]
        assert "reverse-pod-9" not in hosts, stack.logs("reverse-pod-9-server")
        stack.podman("pod", "stop", "reverse-pod-9")  # then its sandbox
    status = stack.podman("inspect", "reverse-pod-9-server", "--format", "{{.State.ExitCode}}")
    assert status.strip() == "0", stack.logs("reverse-pod-9-server")


@pytest.mark.timeout(900)
def test_no_job_is_lost_when_a_pod_is_killed(stack: kube.Stack) -> None:
    with Registry(stack.etcd) as registry:
        (victim,) = [r for r in registry.instances("reverse") if r.host == "reverse-pod-0"]
    _while_jobs_flow(
        stack,
        "pylm-test-kill",
        victim.metrics,
        lambda: stack.podman("pod", "kill", "--signal", "KILL", "reverse-pod-0"),
    )
    started = time.monotonic()
    assert "2000 jobs, 2000 right results" in stack.run("pylm-test-after", "client.py", "2000")
    assert time.monotonic() - started < 30
