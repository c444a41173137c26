"""The ``pylm`` console script."""

from __future__ import annotations

import argparse
import sys

from pylm import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pylm", description="pylm: clusters of microservers over ZeroMQ"
    )
    parser.add_argument("--version", action="version", version=f"pylm {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help(sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
