"""`lthfast imp`, `lthfast ablate`, `lthfast report` and `lthfast demo` subcommands.

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
from lthfast.imp.errors import ConfigError

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


ABLATE_DESCRIPTION = """\
One lthfast imp run per pruning granularity (--block), with the same options and seeds, into sibling run
directories OUT_DIR/<name>-b<B> (N:M: <name>-nm<N>-<M>); the same command again resumes them. Then a table
(ablation.md, ablation.json) and two plots (accuracy.png, speed.png) in OUT_DIR/<name>-ablation/: per level,
the ticket's test accuracy, the accuracy lost against unstructured (paired by replicate, 95% CI), the training
speed-up against the dense level 0, and which granularities are on the accuracy/speed Pareto front. <name> is
--name, else <model>-<dataset>-<hash of the options>. Blocks are ranked by the L1 norm of their weights divided
by their number of elements (see docs/ablation.md)."""

ABLATE_EPILOG = """\
example: lthfast ablate --block 1,16,32,64 --levels 14 --replicates 3 --train-steps 1000it --threads 1"""


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
    if name in ("nm", "block"):
        return {"nm": "N:M", "block": "B"}[name]
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


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("options (each may also be set in --config)")
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = HELP.get(f.name, f.metadata.get("help", ""))
        if "(default:" not in help_text:  # some options' own text names the default ("default: global")
            help_text += f" (default: {_shown(default)})"
        if hints[f.name] in (bool, bool | None):
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
def _cmd_ablate(args: argparse.Namespace) -> int:
    from lthfast.distributed import env_rank
    from lthfast.imp.ablate import parse_granularities, run_ablation

    granularities = parse_granularities(args.granularities)
    cfg = config_from_args(args)
    if cfg.block != 1 or cfg.nm is not None:
        raise ConfigError("lthfast ablate sets block / nm itself: list the granularities in --block, e.g. 1,16,2:4")
    result = run_ablation(cfg, granularities, layer_bench=args.layer_bench)
    if env_rank() == 0:
        print(result.table())
        print(f"ablation: {result.path} (ablation.md, ablation.json, accuracy.png, speed.png)")
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

    ablate = subparsers.add_parser(
        "ablate",
        help="the same imp run at several pruning granularities: accuracy against speed (resumable)",
        usage="%(prog)s --block 1,16,32,64 [--layer-bench] [--config FILE] [OPTIONS]",
        description=ABLATE_DESCRIPTION,
        epilog=ABLATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ablate.add_argument(
        "--block", dest="granularities", default="1,16,32,64", metavar="G,G,...",
        help="granularities: block sizes (1 = unstructured, 4, 8, 16, 32, 64, 128) and N:M (e.g. 2:4) "
        "(default: 1,16,32,64)",
    )  # fmt: skip
    ablate.add_argument(
        "--layer-bench", action=argparse.BooleanOptionalAction, default=False,
        help="also time every prunable layer (dense and lthfast, forward + both gradients) at each level's masks "
        "of replicate 0 (default: off; a few seconds per level)",
    )  # fmt: skip
    ablate.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; flags override it")
    _add_config_flags(ablate, skip=("block", "nm"))
    ablate.set_defaults(func=_cmd_ablate)

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
