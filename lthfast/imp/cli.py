"""`lthfast imp`, `lthfast report` and `lthfast demo` subcommands.

``lthfast imp`` has one flag per ``Config`` option (``--prune-fraction``, ``--one-shot/--no-one-shot``, ``--amp``,
``--compile``, ...); ``--config FILE`` (YAML or JSON) sets any option and flags override it. Bad input ends with one
line ``lthfast: error: ...`` on stderr and exit status 2, before any training. Under ``torchrun`` (DDP) every rank
runs the command; rank 0 prints the report, and errors name their rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
import typing

from lthfast._threads import THREADS_HELP
from lthfast.imp.config import Config

# Hidden spellings that set the same option (not listed in --help).
ALIASES = {"replicates": ["--replicate"]}
# The command line's own wording where the option's documentation (Config) does not say what the CLI does.
HELP = {"threads": "CPU threads for torch, 0 = every core; see Threads below"}
DURATIONS = ("train_steps", "rewind", "warmup", "eval_every", "checkpoint_every")

DESCRIPTION = """\
Train, prune, rewind, repeat: iterative magnitude pruning (Frankle & Carbin's lottery tickets) with controls and
replicates. Each run lives in its own directory (OUT_DIR/<model>-<dataset>-<hash of the options>, or --name);
running the same command again resumes it where it stopped."""

EPILOG = f"""\
Durations are iterations (500it, or a bare number) or epochs (2ep). Flags override --config; --config FILE sets any
option by its name (YAML or JSON).

{textwrap.fill(THREADS_HELP, 116)}

example: lthfast imp --model lenet --dataset mnist1d --levels 5 --controls all --replicates 3"""


def _shown(default) -> str | None:
    """How --help shows a default (None: the option's own text says it)."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default == () or default == {}:
        return "none"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


def _metavar(name: str, hint) -> str:
    if name in DURATIONS:
        return "DURATION"
    if hint in (int, int | None):
        return "N"
    if hint in (float, float | None):
        return "X"
    if typing.get_origin(hint) is tuple:
        return "A,B,..."
    if typing.get_origin(hint) is dict:
        return "NAME=RATE,..."
    return name.upper()


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("options (each may also be set in --config)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = HELP.get(f.name, f.metadata.get("help", ""))
        if "(default:" not in help_text:  # some options' own text names the default ("default: global")
            help_text += f" (default: {_shown(default)})"
        if hints[f.name] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)  # fmt: skip
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                               metavar=_metavar(f.name, hints[f.name]), help=help_text)  # fmt: skip
        for alias in ALIASES.get(f.name, []):
            group.add_argument(alias, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the --config file, then the flags given on the command line."""
    from lthfast.imp.config import read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    names = {f.name for f in dataclasses.fields(Config)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return Config.from_dict(values, where=args.config if getattr(args, "config", None) else "options")


def _guarded(func):
    """Run a subcommand; known input errors become one line on stderr and exit status 2."""

    def wrapper(args: argparse.Namespace) -> int:
        from lthfast.data import DataError
        from lthfast.distributed import DistributedError, env_rank, env_world_size
        from lthfast.imp.errors import ImpError

        try:
            return func(args)
        except (ImpError, DataError, DistributedError) as exc:
            where = f"[rank {env_rank()}] " if env_world_size() > 1 else ""
            print(f"lthfast: error: {where}{exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("lthfast: interrupted; run the same command again to resume", file=sys.stderr)
            return 130

    return wrapper


@_guarded
def _cmd_imp(args: argparse.Namespace) -> int:
    from lthfast.distributed import env_rank
    from lthfast.imp.driver import run
    from lthfast.imp.report import report

    result = run(config_from_args(args))
    if env_rank() == 0:
        print(report(result.path, plots=False))
        print(f"run directory: {result.path}")
    return 0


@_guarded
def _cmd_report(args: argparse.Namespace) -> int:
    from lthfast.imp.report import NO_ROWS, report

    text = report(args.run_dir, plots=not args.no_plots)
    print(text)
    if not args.no_plots and not text.endswith(NO_ROWS):  # plots are drawn from finished units only
        print(f"plots: {args.run_dir.rstrip('/')}/plots/")
    return 0


@_guarded
def _cmd_demo(args: argparse.Namespace) -> int:
    from lthfast.distributed import env_rank
    from lthfast.imp.demo import DEMO
    from lthfast.imp.driver import run
    from lthfast.imp.report import report

    start = time.perf_counter()
    overrides = {k: v for k, v in vars(args).items() if k in ("out_dir", "quiet", "force", "backend", "name")}
    cfg = Config.from_dict({**DEMO, **overrides}, where="demo")
    # Named from the config, so that a changed demo starts a new run instead of being refused.
    result = run(cfg if cfg.name else cfg.replace(name=f"demo-{cfg.short_hash()}"))
    if env_rank() != 0:
        return 0
    print(report(result.path, plots=False))
    print(f"run directory: {result.path} (plots in {result.path}/plots/)")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def register(subparsers) -> None:
    """Add this package's subcommands to the top-level parser."""
    imp = subparsers.add_parser(
        "imp",
        help="iterative magnitude pruning with rewinding and controls (resumable)",
        usage="%(prog)s [--config FILE] [OPTIONS]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; flags override it")
    _add_config_flags(imp)
    imp.set_defaults(func=_cmd_imp)

    rep = subparsers.add_parser("report", help="print a run's table and redraw its plots")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/mlp-mnist1d-1a2b3c4d")
    rep.add_argument("--no-plots", action="store_true", help="print the table only")
    rep.set_defaults(func=_cmd_report)

    demo = subparsers.add_parser("demo", help="the embedded lottery-ticket demo (MLP on MNIST-1D, a few minutes)")
    demo.add_argument("--out-dir", default="runs", help="parent folder of the run directory (default: runs)")
    demo.add_argument("--name", default=argparse.SUPPRESS, help="run directory name")
    demo.add_argument("--backend", default=argparse.SUPPRESS, help="auto, torch or triton")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--force", action="store_true", help="delete what the run directory holds and start over")
    demo.set_defaults(func=_cmd_demo)
