"""The ``lthfast`` command line: argparse subcommands (info, imp, ablate, report, demo, bench)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
lthfast: lottery-ticket experiments (iterative magnitude pruning with rewinding) on sparse-accelerated
PyTorch layers, and the benchmarks that measure them.

  lthfast demo                      the embedded lottery-ticket demo (an MLP on MNIST-1D)
  lthfast imp --levels 5 ...        your own run; the same command again resumes it
  lthfast ablate --block 1,16,32    one run per pruning granularity: accuracy against speed
  lthfast report RUN_DIR            a run's table and plots
  lthfast bench layer|train         sparsity-vs-speed benchmarks

'lthfast COMMAND --help' lists a command's options."""


def _cmd_info(args: argparse.Namespace) -> int:
    from lthfast._backend import describe

    for key, value in describe().items():
        print(f"{key:20s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lthfast", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, device, extension and backend")
    info.set_defaults(func=_cmd_info)
    from lthfast.bench.cli import register as register_bench
    from lthfast.imp.cli import register as register_imp

    register_imp(sub)
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's arguments, after restarting the process under a passive
    OpenMP wait where the command computes on the CPU: ``lthfast._threads``)."""
    if argv is None:
        from lthfast._threads import reexec_with_passive_wait

        reexec_with_passive_wait(sys.argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
