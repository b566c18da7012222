"""`lthfast bench` subcommand: ``bench layer`` (one masked layer) and ``bench train`` (whole training steps).

Both print a table, write ``bench_<kind>-...-<device>.json`` (schema in benchmarks/README.md) and a PNG of the
speed-up against sparsity next to it: in a new folder under ``./lthfast-bench/`` unless ``--out`` names one, where
an existing file is refused unless ``--force``. Bad settings and an unwritable output end with one line on stderr
and exit status 2, before anything is measured.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
import time
from pathlib import Path

from lthfast._threads import THREADS_HELP

# Parent of the fresh folder each run writes to when --out is not given (relative to the working directory).
DEFAULT_PARENT = Path("lthfast-bench")

EPILOG = f"""\
Output: without --out each run writes its JSON and PNG to a new folder in the working directory, e.g.
{DEFAULT_PARENT}/layer-linear-forward-20250131-142500/; with --out DIR they go to DIR, and a file already there is an
error unless --force. (The repository's committed results live in benchmarks/results/: write there only by naming
it with --out.)

{textwrap.fill(THREADS_HELP, 116)}

Noise: a measurement whose rounds disagree (slowest round's median over the fastest's > 1.5, or the p20-p80 range
> 20% of the median) is marked ~ in the table and "noisy": true in the JSON; the crossover line then says so."""


def _floats(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.lower().replace(",", "x").split("x") if s.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected sizes like 1024x1024, got {text!r}") from exc
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return dims


def _at_least(low: float, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    return parse


def _positive(text: str) -> float:
    value = _at_least(0.0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return name


def _common(p: argparse.ArgumentParser, defaults: dict[str, str]) -> None:
    """The options both sweeps share; ``defaults``: the subcommand's default of each, as the help shows it."""
    d = defaults
    p.add_argument(
        "--sparsity", type=_floats, default=None, help=f"comma-separated sparsities (default: {d['sparsity']})"
    )
    p.add_argument(
        "--block", type=_ints, default=None, help=f"mask block sizes, 1 = unstructured (default: {d['block']})"
    )
    p.add_argument("--dtype", default=None, help=f"float32, bf16, fp16 or float64 (default: {d['dtype']})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto: cuda if present)")
    p.add_argument(
        "--tile",
        type=_dims,
        default=None,
        help="tile of the tile index timed after a prune, NxK "
        "(default: 64x64 for linear layers, 64x32 channels for conv)",
    )
    p.add_argument(
        "--min-run-time",
        type=_positive,
        default=None,
        help=f"CPU: seconds of timed runs per provider and round (default: {d['min_run_time']})",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help=f"rounds per provider, interleaved (default: {d['repeats']})"
    )
    p.add_argument(
        "--rep-ms",
        type=_positive,
        default=None,
        help=f"GPU: milliseconds of timed runs, do_bench's rep (default: {d['rep_ms']})",
    )
    p.add_argument(
        "--buffers",
        type=_at_least(1),
        default=None,
        help="rotated input sets (default: enough for 64 MiB, between 4 and 64)",
    )
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--threads", type=_at_least(0), default=0, help="CPU: torch threads, 0 = every core (default: 0)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for the JSON and PNG (default: a new folder under ./{DEFAULT_PARENT}/)",
    )
    p.add_argument("--force", action="store_true", help="overwrite result files that exist in --out")
    p.add_argument("--tag", default="", help="suffix for the file names (default: none)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--notes", default="", help="free text stored in the JSON (e.g. machine load)")


def _command(kind: str, args: argparse.Namespace, cfg) -> str:
    """The full command that reproduces this run, with every resolved default spelled out."""
    parts = ["lthfast", "bench", kind]
    if kind == "layer":
        parts += ["--kind", cfg.op, "--shape", "x".join(map(str, cfg.shape)), "--mode", cfg.mode]
        parts += ["--tokens", str(cfg.tokens)] if cfg.op == "linear" else []
        if cfg.op == "conv":
            parts += ["--batch", str(cfg.batch), "--image", "x".join(map(str, cfg.image)), "--stride", str(cfg.stride)]
            parts += ["--padding", str(cfg.conv_args()["padding"]), "--groups", str(cfg.groups)]
        if cfg.peak_tflops and cfg.peak_gbps:
            parts += ["--peak-tflops", f"{cfg.peak_tflops:g}", "--peak-gbps", f"{cfg.peak_gbps:g}"]
    else:
        parts += ["--model", cfg.model, "--batch", str(cfg.batch), "--optimizer", cfg.optimizer]
    parts += ["--sparsity", ",".join(f"{s:g}" for s in cfg.sparsities), "--block", ",".join(map(str, cfg.blocks))]
    parts += ["--dtype", cfg.dtype, "--providers", ",".join(cfg.providers), "--device", cfg.device]
    parts += ["--tile", "x".join(map(str, cfg.tile))] if cfg.tile else []
    parts += ["--seed", str(cfg.seed), "--repeats", str(cfg.repeats)]
    parts += ["--buffers", str(cfg.buffers)] if cfg.buffers is not None else []
    if cfg.device == "cpu":
        import torch

        parts += ["--min-run-time", f"{cfg.min_run_time:g}", "--threads", str(torch.get_num_threads())]
    else:
        parts += ["--rep-ms", f"{cfg.rep_ms:g}"]
    return shlex.join(parts)


def _outputs(args: argparse.Namespace, stem: str, device_name: str) -> tuple[Path, Path] | None:
    """The JSON and PNG paths of this run, checked before anything is measured (None with --no-save): a new
    folder under ``DEFAULT_PARENT``, or ``--out`` where an existing file is refused without ``--force``."""
    import torch

    from lthfast.bench import results

    if args.no_save:
        return None
    name = f"bench_{stem}-{results.device_tag(torch.device(device_name))}{'-' + args.tag if args.tag else ''}"
    if args.out is None:
        folder = results.fresh_folder(DEFAULT_PARENT, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    else:
        folder = args.out
    paths = (folder / f"{name}.json", folder / f"{name}.png")
    results.check_output(list(paths), force=args.force)
    return paths


def _run_and_save(kind: str, run, cfg, args: argparse.Namespace, command: str, paths) -> int:
    import torch

    from lthfast._threads import load_warning
    from lthfast.bench import plots, results

    warning = load_warning(torch.get_num_threads()) if cfg.device == "cpu" else None
    if warning:
        print(warning, file=sys.stderr)
    try:
        body = run(cfg)
    except BaseException:
        if paths is not None and args.out is None:  # the fresh folder made for this run, still empty
            try:
                paths[0].parent.rmdir()
            except OSError:
                pass
        raise
    doc = results.document(kind, body, torch.device(cfg.device), command, args.notes, provider="lthfast")
    print(results.format_table(doc))
    if paths is not None:
        json_path = results.write_json(doc, paths[0], force=args.force)
        png_path = plots.plot_speedup(doc, paths[1])
        print(f"wrote {json_path} and {png_path}")
    return 0


def _setup_errors(func):
    """A bad setting or an unusable output (found before the run) ends with one line on stderr and exit status 2,
    no traceback, as the other lthfast commands and argparse's own errors do."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            setup = func(args)
        except ValueError as exc:
            print(f"lthfast: error: {exc}", file=sys.stderr)
            return 2
        return setup()

    return wrapper


def _check_layer(cfg) -> None:
    """What ``run_layer`` would refuse only after the setup: the shape's rank for the op, and the dtype."""
    from lthfast.bench.layer import parse_dtype

    want = 2 if cfg.op == "linear" else 4
    if len(cfg.shape) != want:
        example = "1024x1024 (out x in)" if cfg.op == "linear" else "256x256x3x3 (Cout x Cin x KH x KW)"
        got = "x".join(map(str, cfg.shape))
        raise ValueError(f"--shape {got}: a {cfg.op} layer needs {want} sizes, e.g. {example}")
    if cfg.op == "conv" and len(cfg.image) != 2:
        raise ValueError(f"--image {'x'.join(map(str, cfg.image))}: needs 2 sizes, HxW")
    parse_dtype(cfg.dtype)


@_setup_errors
def _cmd_layer(args: argparse.Namespace):
    from lthfast.bench.layer import default_layer_config, run_layer
    from lthfast.bench.providers import parse_providers

    device = _device(args)
    cfg = default_layer_config(
        args.kind, device, shape=args.shape, tokens=args.tokens, batch=args.batch, image=args.image,
        stride=args.stride, padding=args.padding, groups=args.groups, dtype=args.dtype, mode=args.mode,
        sparsities=args.sparsity, blocks=args.block, providers=parse_providers(args.providers), tile=args.tile,
        min_run_time=args.min_run_time, rep_ms=args.rep_ms, repeats=args.repeats, buffers=args.buffers, seed=args.seed,
        peak_tflops=args.peak_tflops, peak_gbps=args.peak_gbps,
    )  # fmt: skip
    if cfg.tile is None:
        cfg.tile = (64, 64) if cfg.op == "linear" else (64, 32)
    _check_layer(cfg)
    command = _command("layer", args, cfg)  # before the run: a bad setting fails in seconds, not after the sweep
    stem = f"layer-{cfg.op}-{cfg.mode}"
    paths = _outputs(args, stem, device)
    return lambda: _run_and_save("layer", run_layer, cfg, args, command, paths)


@_setup_errors
def _cmd_train(args: argparse.Namespace):
    from lthfast.bench.layer import parse_dtype
    from lthfast.bench.train import VARIANTS, TrainConfig, default_blocks, run_train

    device = _device(args)
    overrides = {
        "sparsities": args.sparsity, "blocks": args.block, "dtype": args.dtype, "tile": args.tile,
        "min_run_time": args.min_run_time, "rep_ms": args.rep_ms, "repeats": args.repeats, "buffers": args.buffers,
    }  # fmt: skip
    providers = list(VARIANTS) if args.providers == "all" else [p.strip() for p in args.providers.split(",")]
    providers += [f"lthfast-units{u}" for u in args.units if f"lthfast-units{u}" not in providers]
    cfg = TrainConfig(
        model=args.model, batch=args.batch, device=device, providers=providers, seed=args.seed,
        optimizer=args.optimizer, **{k: v for k, v in overrides.items() if v is not None},
    )  # fmt: skip
    if cfg.blocks is None:
        cfg.blocks = default_blocks(cfg.model)
    parse_dtype(cfg.dtype)
    command = _command("train", args, cfg)
    paths = _outputs(args, f"train-{cfg.model}", device)
    return lambda: _run_and_save("train", run_train, cfg, args, command, paths)


METAVARS = {
    "shape": "DIMS", "image": "HxW", "tile": "NxK", "sparsity": "LIST", "block": "LIST", "providers": "LIST",
    "out": "DIR", "dtype": "DTYPE", "threads": "N", "repeats": "N", "buffers": "N", "seed": "N", "tokens": "N",
    "batch": "N", "stride": "N", "padding": "N", "groups": "N", "min_run_time": "SECONDS", "rep_ms": "MS",
    "peak_tflops": "TFLOPS", "peak_gbps": "GBPS", "tag": "TEXT", "notes": "TEXT",
}  # fmt: skip


def _short_metavars(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.dest in METAVARS and action.option_strings and not action.choices:
            action.metavar = METAVARS[action.dest]


def _parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip


# What the help shows as each default (tests/test_bench_output.py checks them against LayerConfig and TrainConfig).
LAYER_DEFAULTS = {
    "sparsity": "0,0.5,0.9,0.95,0.98", "block": "1,16,32,64", "dtype": "float32 on CPU, bfloat16 on CUDA",
    "min_run_time": "0.1", "repeats": "3 on CPU, 1 on CUDA", "rep_ms": "100",
}  # fmt: skip
TRAIN_DEFAULTS = {
    "sparsity": "0,0.5,0.9,0.98", "block": "1,16 for resnet20, 1,32 for the others", "dtype": "float32",
    "min_run_time": "0.3", "repeats": "3", "rep_ms": "500",
}  # fmt: skip


def register(subparsers) -> None:
    """Add ``bench layer`` and ``bench train`` to the top-level parser."""
    bench = subparsers.add_parser(
        "bench", help="sparsity-vs-speed benchmarks (layer sweeps, training throughput)", epilog=EPILOG,
        description="Sparsity-vs-speed benchmarks: 'bench layer' times one masked layer, 'bench train' whole "
        "training steps, each against dense measured in the same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{layer,train}")

    layer = _parser(sub, "layer", "one masked layer: providers x sparsity x block size")
    layer.add_argument("--kind", default="linear", choices=("linear", "conv"), help="(default: linear)")
    layer.add_argument("--shape", type=_dims, default=None, help="linear NxK, out x in (default: 1024x1024 on CPU, "
                       "4096x4096 on CUDA); conv CoutxCinxKHxKW (default: 256x256x3x3)")  # fmt: skip
    layer.add_argument(
        "--tokens",
        type=_at_least(1),
        default=None,
        help="linear: rows of the input (default: 256 on CPU, 8192 on CUDA)",
    )
    layer.add_argument(
        "--batch", type=_at_least(1), default=None, help="conv: batch size (default: 8 on CPU, 128 on CUDA)"
    )
    layer.add_argument(
        "--image", type=_dims, default=None, help="conv: input HxW (default: 16x16 on CPU, 32x32 on CUDA)"
    )
    layer.add_argument("--stride", type=_at_least(1), default=None, help="conv (default: 1)")
    layer.add_argument("--padding", type=_at_least(0), default=None, help="conv (default: kh // 2)")
    layer.add_argument("--groups", type=_at_least(1), default=None, help="conv (default: 1)")
    layer.add_argument(
        "--mode", default="forward", choices=("forward", "train"), help="train = forward + backward (default: forward)"
    )
    layer.add_argument(
        "--providers",
        default="all",
        help="comma-separated, or all (all but sparseprop, sparseprop-width); dense is always included (default: all)",
    )
    layer.add_argument(
        "--peak-tflops",
        type=_positive,
        default=None,
        help="device peak for the floor, with --peak-gbps (default: known GPUs, 16-bit dtypes)",
    )
    layer.add_argument("--peak-gbps", type=_positive, default=None, help="device memory bandwidth for the floor")
    _common(layer, LAYER_DEFAULTS)
    _short_metavars(layer)
    layer.set_defaults(func=_cmd_layer)

    train = _parser(sub, "train", "whole training steps of a masked network: samples/s")
    train.add_argument(
        "--model",
        default="lenet300",
        choices=("lenet300", "mlp-mnist1d", "resnet20", "vgg16"),
        help="(default: lenet300)",
    )
    train.add_argument("--batch", type=_at_least(1), default=128, help="(default: 128)")
    train.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                       help="sgd: momentum 0.9, weight decay 5e-4, lr 0.01; adam: lr 1e-3. The lthfast variant steps "
                       "with lthfast's fused masked optimizer (MaskedSGD / MaskedAdam: alive weights only), the others "
                       "with torch's (default: sgd)")  # fmt: skip
    train.add_argument("--providers", default="all",
                       help="dense, torch-prune, lthfast, sparseprop, lthfast-unitsU, comma-separated, or all = the "
                       "first three; dense is always included (default: all)")  # fmt: skip
    train.add_argument("--units", type=_ints, default=[],
                       help="U,U,...: add providers lthfast-unitsU: U masked copies stacked by lthfast.units, one step "
                       "for all; samples/s counts every unit's samples (default: none)")  # fmt: skip
    _common(train, TRAIN_DEFAULTS)
    _short_metavars(train)
    train.set_defaults(func=_cmd_train)
