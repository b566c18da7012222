"""`lthfast bench` subcommand: ``bench layer`` (one masked layer) and ``bench train`` (whole training steps).

Both print a table, write ``<out>/bench_<kind>-...-<device>.json`` (schema in benchmarks/README.md) and a PNG
of the speed-up against sparsity next to it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

_DEFAULT_NOTE = ""


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
        return tuple(int(s) for s in text.lower().replace(",", "x").split("x") if s.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected sizes like 1024x1024, got {text!r}") from exc


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return name


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=_floats, default=None, help="comma-separated sparsities")
    p.add_argument("--block", type=_ints, default=None, help="mask block sizes (1 = unstructured)")
    p.add_argument("--dtype", default=None, help="float32 | bf16 | fp16 | float64 (default: per device)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tile", type=_dims, default=None, help="tile of the tile index timed after a prune (NxK)")
    p.add_argument("--min-run-time", type=float, default=None, help="CPU: seconds of timed runs per provider")
    p.add_argument("--repeats", type=int, default=None, help="rounds per provider, interleaved (CPU default 3)")
    p.add_argument("--rep-ms", type=float, default=None, help="GPU: milliseconds of timed runs (do_bench rep)")
    p.add_argument("--buffers", type=int, default=None, help="rotated input sets (default: enough for 64 MiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON and PNG")
    p.add_argument("--tag", default="", help="suffix for the file names")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--notes", default=_DEFAULT_NOTE, help="free text stored in the JSON (e.g. machine load)")


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
        parts += ["--model", cfg.model, "--batch", str(cfg.batch)]
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


def _finish(kind: str, stem: str, body: dict, cfg, args: argparse.Namespace, command: str) -> int:
    import torch

    from lthfast.bench import plots, results

    device = torch.device(cfg.device)
    doc = results.document(kind, body, device, command, args.notes, provider="lthfast")
    print(results.format_table(doc))
    if not args.no_save:
        name = f"bench_{stem}-{results.device_tag(device)}{'-' + args.tag if args.tag else ''}"
        json_path = results.write_json(doc, args.out / f"{name}.json")
        png_path = plots.plot_speedup(doc, args.out / f"{name}.png")
        print(f"wrote {json_path} and {png_path}")
    return 0


def _setup_errors(func):
    """A bad setting (caught before the run) ends with one line on stderr and exit status 2, no traceback."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            setup = func(args)
        except ValueError as exc:
            print(f"lthfast bench: error: {exc}", file=sys.stderr)
            return 2
        return setup()

    return wrapper


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
    command = _command("layer", args, cfg)  # before the run: a bad setting fails in seconds, not after the sweep
    return lambda: _finish("layer", f"layer-{cfg.op}-{cfg.mode}", run_layer(cfg), cfg, args, command)


@_setup_errors
def _cmd_train(args: argparse.Namespace):
    from lthfast.bench.train import VARIANTS, TrainConfig, default_blocks, run_train

    device = _device(args)
    overrides = {
        "sparsities": args.sparsity, "blocks": args.block, "dtype": args.dtype, "tile": args.tile,
        "min_run_time": args.min_run_time, "rep_ms": args.rep_ms, "repeats": args.repeats, "buffers": args.buffers,
    }  # fmt: skip
    providers = list(VARIANTS) if args.providers == "all" else [p.strip() for p in args.providers.split(",")]
    cfg = TrainConfig(
        model=args.model, batch=args.batch, device=device, providers=providers, seed=args.seed,
        **{k: v for k, v in overrides.items() if v is not None},
    )  # fmt: skip
    if cfg.blocks is None:
        cfg.blocks = default_blocks(cfg.model)
    command = _command("train", args, cfg)
    return lambda: _finish("train", f"train-{cfg.model}", run_train(cfg), cfg, args, command)


def register(subparsers) -> None:
    """Add ``bench layer`` and ``bench train`` to the top-level parser."""
    bench = subparsers.add_parser("bench", help="sparsity-vs-speed benchmarks (layer sweeps, training throughput)")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    layer = sub.add_parser("layer", help="one masked layer: providers x sparsity x block size")
    layer.add_argument("--kind", default="linear", choices=("linear", "conv"))
    layer.add_argument("--shape", type=_dims, default=None, help="linear NxK (out x in); conv CoutxCinxKHxKW")
    layer.add_argument("--tokens", type=int, default=None, help="linear: rows of the input")
    layer.add_argument("--batch", type=int, default=None, help="conv: batch size")
    layer.add_argument("--image", type=_dims, default=None, help="conv: input HxW")
    layer.add_argument("--stride", type=int, default=None)
    layer.add_argument("--padding", type=int, default=None, help="conv: default kh // 2")
    layer.add_argument("--groups", type=int, default=None)
    layer.add_argument("--mode", default="forward", choices=("forward", "train"), help="train = forward + backward")
    layer.add_argument("--providers", default="all", help="comma-separated, or all; dense is always included")
    layer.add_argument("--peak-tflops", type=float, default=None, help="device peak for the floor (with --peak-gbps)")
    layer.add_argument("--peak-gbps", type=float, default=None, help="device memory bandwidth for the floor")
    _common(layer)
    layer.set_defaults(func=_cmd_layer)

    train = sub.add_parser("train", help="whole training steps of a masked network: samples/s")
    train.add_argument("--model", default="lenet300", choices=("lenet300", "resnet20", "vgg16"))
    train.add_argument("--batch", type=int, default=128)
    train.add_argument("--providers", default="all", help="dense,torch-prune,lthfast (dense is always included)")
    _common(train)
    train.set_defaults(func=_cmd_train)
