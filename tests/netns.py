"""Hosts for multi-host tests: Linux network namespaces on one bridge.

:class:`Network` creates a "switch" namespace holding a bridge, and one
namespace per :meth:`Network.host`, joined to the bridge by a veth pair and
given an address of a private subnet the network picks at random. Each host
runs an agent (``netns_agent.py``) that calls functions of a module the test
names, so what runs on a host is a real process inside that namespace.
:meth:`Network.partition` cuts a host off the bridge, :meth:`Network.heal`
joins it again. Everything is removed on close, processes included.
Needs root and ``ip`` (iproute2); :func:`available` tells, naming what
would install it, and the tests pass its answer to ``prerequisites.missing``:
a skip, or under ``CI=true`` a failure.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pylm.lifecycle import Closing

HERE = Path(__file__).resolve().parent


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command: sudo apt-get install iproute2 (and run the tests as root)"
    if os.geteuid() != 0:
        return "network namespaces need root: run the tests as root (sudo bash scripts/test.sh)"
    probe = f"pylm-probe-{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
        ip("netns", "del", probe)
    except (RuntimeError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


class AgentError(RuntimeError):
    """A call on a host raised; the message carries its traceback."""


class Host:
    """One namespace with an address on the network, and its agent."""

    def __init__(self, network: Network, name: str, index: int) -> None:
        self.name = name
        self.namespace = f"pylm{network.tag}{name}"[:32]
        self.address = f"{network.subnet}.{index}"
        self.port = f"p{index}"  # its end on the switch
        self.log = Path(network.folder) / f"{name}.log"
        self._agent: subprocess.Popen[bytes] | None = None

    def start_agent(self, module: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
        with open(self.log, "ab") as log:
            self._agent = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, sys.executable, "-u",
                 str(HERE / "netns_agent.py"), module],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )  # fmt: skip

    def call(self, function: str, *args: Any, timeout: float = 60.0) -> Any:
        """``module.function(*args)`` on this host; its JSON result."""
        agent = self._agent
        assert agent is not None and agent.stdin is not None and agent.stdout is not None
        agent.stdin.write(json.dumps({"call": function, "args": args}).encode() + b"\n")
        agent.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(agent.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"{self.name}: {function} took over {timeout:g} s")
        line = agent.stdout.readline()
        if not line:
            raise AgentError(f"{self.name}: the agent died; its log: {self.tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise AgentError(f"{self.name}: {function}{tuple(args)!r} failed:\n{reply['error']}")
        return reply["value"]

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def close(self, timeout: float = 20.0) -> None:
        """End the agent: its module's ``stop_all`` runs when its input ends."""
        agent, self._agent = self._agent, None
        if agent is None:
            return
        assert agent.stdin is not None
        try:
            agent.stdin.close()
            agent.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            agent.kill()
            agent.wait(timeout)
        if agent.stdout is not None:
            agent.stdout.close()


class Network(Closing):
    """Hosts on one bridge, on a random 10.x.y.0/24; a context manager."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.{random.randrange(1, 255)}.{random.randrange(0, 256)}"
        self.switch = f"pylm{self.tag}switch"
        self.folder = tempfile.mkdtemp(prefix="pylm-netns-")
        self.hosts: list[Host] = []
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def host(self, name: str, module: str) -> Host:
        """A new host running an agent for ``module`` (a module under tests/)."""
        host = Host(self, name, len(self.hosts) + 1)
        self.hosts.append(host)
        ip("netns", "add", host.namespace)
        ip("link", "add", "eth0", "netns", host.namespace, "type", "veth",
           "peer", "name", host.port, "netns", self.switch)  # fmt: skip
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        ip("-n", host.namespace, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        host.start_agent(module)
        return host

    def partition(self, host: Host) -> None:
        """Cut ``host`` off: its port on the switch goes down."""
        ip("-n", self.switch, "link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        ip("-n", self.switch, "link", "set", host.port, "up")

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.close()
        for namespace in [h.namespace for h in self.hosts] + [self.switch]:
            try:  # anything the agents left behind dies with its namespace
                for pid in ip("netns", "pids", namespace).split():
                    os.kill(int(pid), signal.SIGKILL)
                ip("netns", "del", namespace)
            except (RuntimeError, OSError):
                pass
        shutil.rmtree(self.folder, ignore_errors=True)
