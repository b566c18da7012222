"""The ``lthfast`` command line: argparse subcommands."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from lthfast._backend import describe

    for key, value in describe().items():
        print(f"{key:20s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lthfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, extension and backend")
    info.set_defaults(func=_cmd_info)
    from lthfast.bench.cli import register as register_bench
    from lthfast.imp.cli import register as register_imp

    register_imp(sub)
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
