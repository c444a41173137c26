"""The ``pylm`` console script."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from pylm import __version__
from pylm.errors import PylmError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pylm", description="pylm: clusters of microservers over ZeroMQ"
    )
    parser.add_argument("--version", action="version", version=f"pylm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    etcd = commands.add_parser(
        "etcd",
        help="run a local etcd for development and print the PYLM_REGISTRY to use",
        description="Run a single-member etcd (the etcd binary from PATH) until Ctrl-C.",
    )
    etcd.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1)")
    etcd.add_argument("--port", type=int, default=2379, help="client port (2379; 0: any free port)")
    etcd.add_argument(
        "--data-dir", default=".pylm/etcd", help="where etcd keeps its data (.pylm/etcd)"
    )
    return parser


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "etcd":
            return run_etcd(args)
    except PylmError as exc:
        print(f"pylm: {exc}", file=sys.stderr)
        return 2
    parser.print_help(sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
