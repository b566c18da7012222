"""``lthfast bench layer``: one masked layer across sparsities, block sizes and providers.

For every (sparsity, block) row: draw a random block mask, time the tile-index build it needs after a prune,
then for every provider prepare it, check its outputs against the float64 reference, and time it on rotated
random inputs. Dense is timed in every row, so each ratio compares two measurements taken back to back.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from lthfast._backend import use_triton
from lthfast.bench import check, floor, timing
from lthfast.bench.masks import block_mask, check_sweep, conv_block_mask
from lthfast.bench.providers import PREPARE, PROVIDERS, Problem, Unsupported
from lthfast.indexing.tiles import build_tile_index

# Providers that compute the dense product whatever the mask: their floor is the dense one.
DENSE_WORK = ("dense", "mask-multiply")
# Substrings of the errors torch raises for an op it has no kernel for (dtype, device, layout): such a
# provider is "skipped" with torch's message; any other failure is an "error".
_UNSUPPORTED_HINTS = ("not implemented", "not supported", "unsupported", "only supports", "is supported only")


@dataclass
class LayerConfig:
    """What ``lthfast bench layer`` measures. ``shape``: linear (N, K); conv (Cout, Cin/groups, kh, kw)."""

    op: str = "linear"
    shape: tuple[int, ...] = (1024, 1024)
    tokens: int = 256  # linear: rows of x
    batch: int = 8  # conv
    image: tuple[int, int] = (16, 16)  # conv: input H, W
    stride: int = 1
    padding: int | None = None  # conv: None = kh // 2
    dilation: int = 1
    groups: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "forward"
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.9, 0.95, 0.98])
    blocks: list[int] = field(default_factory=lambda: [1, 16, 32, 64])
    providers: list[str] = field(default_factory=lambda: list(PROVIDERS))
    # Tile of the tile index timed after each prune: linear (block_n, block_k), the kernels' coarsest CUDA tile;
    # conv (Cout, Cin) channels, each tile spanning all kh x kw taps, as the conv kernels index it.
    tile: tuple[int, int] | None = None  # None = (64, 64) linear, (64, 32) conv
    min_run_time: float = 0.1  # CPU: seconds per blocked_autorange, per round
    repeats: int = 3  # rounds per provider, interleaved with the other providers' rounds
    warmup: int = 3  # CPU: warm-up calls
    warmup_ms: float = 25.0  # GPU: do_bench warm-up
    rep_ms: float = 100.0  # GPU: do_bench timed runs
    buffers: int | None = None  # rotated input sets; None = enough for timing.ROTATION_BYTES
    seed: int = 0
    peak_tflops: float | None = None  # floor: device peak; None = from floor.PEAKS for known GPUs and 16-bit dtypes
    peak_gbps: float | None = None
    cuda_graph: bool = False  # CUDA: time every provider's call captured as CUDA graphs (timing.graphed)

    def __post_init__(self) -> None:
        if self.cuda_graph and not str(self.device).startswith("cuda"):
            raise ValueError(f"LayerConfig: cuda_graph needs device 'cuda', got {self.device!r}")
        check_sweep("LayerConfig", self.sparsities, self.blocks, self.repeats)

    def conv_args(self) -> dict:
        kh = self.shape[2]
        padding = kh // 2 if self.padding is None else self.padding
        return {"stride": self.stride, "padding": padding, "dilation": self.dilation, "groups": self.groups}


def default_layer_config(op: str, device: str, **overrides) -> LayerConfig:
    """Defaults that finish in a few minutes on 2 CPU cores, and the issue's large shapes on a GPU."""
    if device == "cuda":
        base = {"dtype": "bfloat16", "repeats": 1}
        base |= {"shape": (4096, 4096), "tokens": 8192} if op == "linear" else {}
        base |= {"shape": (256, 256, 3, 3), "batch": 128, "image": (32, 32)} if op == "conv" else {}
    else:
        base = {"shape": (1024, 1024), "tokens": 256} if op == "linear" else {"shape": (256, 256, 3, 3)}
    base |= {k: v for k, v in overrides.items() if v is not None}
    return LayerConfig(op=op, device=device, **base)


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "fp64": "float64"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or dtype not in check.TOLERANCE:
        raise ValueError(f"unsupported dtype {name!r}: expected one of float32, bfloat16, float16, float64")
    return dtype


def shapes(cfg: LayerConfig) -> dict:
    """Input, weight and output shapes and the dense FLOPs of one call (train = forward + dX + dW = 3x)."""
    if cfg.op == "linear":
        n, k = cfg.shape
        x, y = (cfg.tokens, k), (cfg.tokens, n)
        flops = 2 * cfg.tokens * n * k
    else:
        cout, cin_g, kh, kw = cfg.shape
        c = cfg.conv_args()
        ho, wo = (
            (size + 2 * c["padding"] - c["dilation"] * (kern - 1) - 1) // c["stride"] + 1
            for size, kern in zip(cfg.image, (kh, kw))
        )
        x, y = (cfg.batch, cin_g * cfg.groups, *cfg.image), (cfg.batch, cout, ho, wo)
        flops = 2 * cfg.batch * ho * wo * cout * cin_g * kh * kw
    if cfg.mode == "train":
        flops *= 3
    return {"x": list(x), "weight": list(cfg.shape), "y": list(y), "flops": flops}


def _input_sets(cfg: LayerConfig, dtype, device, generator) -> timing.Rotation:
    s = shapes(cfg)
    train = cfg.mode == "train"
    per_set = (math.prod(s["x"]) + (math.prod(s["y"]) if train else 0)) * dtype.itemsize
    count = cfg.buffers or timing.buffer_count(per_set)
    sets = []
    for _ in range(count):
        x = torch.randn(s["x"], generator=generator).to(device, dtype).requires_grad_(train)
        sets.append((x, torch.randn(s["y"], generator=generator).to(device, dtype)) if train else (x,))
    return timing.Rotation(sets)


def classify_failure(exc: Exception) -> tuple[str, str]:
    """("skipped" or "error", one-line message) for an exception raised while preparing or running a provider."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    unsupported = isinstance(exc, NotImplementedError) or any(h in text.lower() for h in _UNSUPPORTED_HINTS)
    return ("skipped" if unsupported else "error"), text


def _entry(name: str, status: str, reason: str | None = None, **extra) -> dict:
    return {"provider": name, "status": status, "reason": reason, **extra}


def prepare_provider(name: str, problem: Problem, rotation: timing.Rotation, expected: Callable):
    """Prepare one provider and check its outputs against the reference on the first input set.

    Returns ``(entry, prepared)``: prepared is None when the entry is "skipped" or "error" (then never timed).
    """
    try:
        prepared = PREPARE[name](problem)
    except Unsupported as exc:
        return _entry(name, "skipped", str(exc)), None
    except Exception as exc:  # noqa: BLE001 - a provider that cannot be built here is reported, not fatal
        status, text = classify_failure(exc)
        return _entry(name, status, f"prepare: {text}"), None
    try:
        outputs = prepared.call(*rotation.sets[0])
        if prepared.dense_outputs is not None:  # a compressed dW, expanded for the check only
            outputs = prepared.dense_outputs(outputs)
        dtype = problem.weight.dtype
        max_err = check.compare(outputs, expected(prepared.mask), prepared.mask, dtype, prepared.masked_dw)
    except check.CheckFailed as exc:
        return _entry(name, "error", f"output check failed: {exc}", detail=prepared.detail), None
    except Exception as exc:  # noqa: BLE001
        status, text = classify_failure(exc)
        return _entry(name, status, text, detail=prepared.detail), None
    density = float(prepared.mask.float().mean())
    return _entry(name, "ok", None, detail=prepared.detail, density=density, max_err=max_err), prepared


def time_conversion(entry: dict, prepared, device, cfg, log) -> None:
    """Time a provider's rebuild of its weight storage from W and M (``Prepared.convert``, what a mask change
    costs it) on its own: ``convert_ms`` in its entry and a log line, never part of its step time."""
    if prepared.convert is None or entry["status"] != "ok":
        return
    try:
        t = timing.measure(prepared.convert, device, warmup=1, min_run_time=min(0.05, cfg.min_run_time))
    except Exception as exc:  # noqa: BLE001 - reported in the entry, the other providers go on
        status, text = classify_failure(exc)
        entry.update(status=status, reason=f"conversion: {text}")
        return
    entry["convert_ms"] = t.median_ms
    log(f"  {entry['provider']} builds its sparse weight from W and M in {t.median_ms:.3f} ms after the prune")


def time_interleaved(
    calls: dict[str, Callable[[], object]], device, cfg
) -> tuple[dict[str, timing.Timing], dict[str, tuple[str, str]]]:
    """Time every call in ``cfg.repeats`` rounds, each round visiting the providers in a rotated order, and pool
    each provider's rounds: load that comes and goes on a shared machine then hits every provider alike.
    CPU warm-up calls run in the first round only (GPU: do_bench warms up every round, by time).

    Returns ``(timings, failures)``: a provider that raises while being timed (out of memory, a device fault) leaves
    the later rounds and is reported in ``failures`` as ``classify_failure``'s (status, message); the others go on.
    """
    rounds: dict[str, list[timing.Timing]] = {name: [] for name in calls}
    failures: dict[str, tuple[str, str]] = {}
    names = list(calls)
    for r in range(cfg.repeats if names else 0):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name in failures:
                continue
            warmup = cfg.warmup if r == 0 else 0
            try:
                t = timing.measure(
                    calls[name], device,
                    warmup=warmup, min_run_time=cfg.min_run_time, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - one failing provider must not lose the others' rows
                status, text = classify_failure(exc)
                failures[name] = (status, f"while timed: {text}")
                continue
            rounds[name].append(t)
    timings = {name: timing.merge(ts) for name, ts in rounds.items() if name not in failures}
    return timings, failures


def report_failures(results: list[dict], failures: dict[str, tuple[str, str]]) -> None:
    """Mark the entries of providers that failed while timed (``time_interleaved``'s failures)."""
    for r in results:
        if r["provider"] in failures:
            status, reason = failures[r["provider"]]
            r.update(status=status, reason=reason)


def _add_rates(results: list[dict], cfg: LayerConfig, rates: tuple[float, float] | None) -> None:
    """Speed-up over dense, TFLOP/s, and (where the device's peaks are known) the floor and how close to it."""
    s = shapes(cfg)
    flops = s["flops"]
    dense = next((r for r in results if r["provider"] == "dense" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] != "ok":
            continue
        seconds = r["median_ms"] * 1e-3
        r["speedup_vs_dense"] = dense["median_ms"] / r["median_ms"] if dense else None
        r["tflops_dense_equiv"] = flops / seconds / 1e12
        r["tflops_useful"] = flops * r["density"] / seconds / 1e12
        r["floor_ms"] = r["of_floor"] = None
        if rates is not None:
            work = 1.0 if r["provider"] in DENSE_WORK else r["density"]
            nbytes = floor.layer_bytes(s, work, parse_dtype(cfg.dtype).itemsize, cfg.mode == "train")
            r["floor_ms"] = floor.floor_ms(flops * work, nbytes, rates)
            r["of_floor"] = r["floor_ms"] / r["median_ms"]


def make_problem(cfg: LayerConfig, sparsity: float, block: int, weight, bias, rotation) -> tuple[Problem, Callable]:
    """The row's ``Problem`` (a fresh random mask, seeded by (seed, sparsity, block)) and ``expected(mask)``, the
    float64 reference outputs on the first input set (cached per mask)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round(sparsity * 1e6) * 101 + block)
    if cfg.op == "linear":
        mask = block_mask(*cfg.shape, sparsity, block, generator)
    else:
        mask = conv_block_mask(cfg.shape, sparsity, block, generator)
    mask = mask.to(weight.device)
    conv = cfg.conv_args() if cfg.op == "conv" else {}
    problem = Problem(cfg.op, cfg.mode, weight, mask, bias, sparsity, block, conv, seed=cfg.seed)
    cache: dict[int, tuple] = {}

    def expected(m: torch.Tensor) -> tuple:
        if id(m) not in cache:
            train = cfg.mode == "train"
            cache[id(m)] = check.reference_outputs(cfg.op, train, weight, m, bias, conv, *rotation.sets[0])
        return cache[id(m)]

    return problem, expected


def run_row(cfg: LayerConfig, sparsity: float, block: int, weight, bias, rotation, log) -> dict:
    """Measure every provider at one (sparsity, block). Returns the row dict of the JSON schema."""
    device = weight.device
    problem, expected = make_problem(cfg, sparsity, block, weight, bias, rotation)
    mask2d = problem.mask.reshape(problem.mask.shape[0], -1)
    bn, bk = cfg.tile
    taps = math.prod(cfg.shape[2:])  # 1 for linear
    index = build_tile_index(mask2d, bn, bk * taps)
    t_index = timing.measure(
        lambda: build_tile_index(mask2d, bn, bk * taps), device, warmup=1, min_run_time=min(0.05, cfg.min_run_time)
    )
    tile = f"{bn}x{bk}" + (f" x {taps} taps" if taps > 1 else "")
    log(
        f"  tile index {tile} built in {t_index.median_ms:.3f} ms after the prune "
        f"(sparsity {sparsity}, block {block}: {index.tile_density:.1%} of tiles alive)"
    )
    results, calls = [], {}
    for name in cfg.providers:
        entry, prepared = prepare_provider(name, problem, rotation, expected)
        results.append(entry)
        if prepared is None:
            continue
        time_conversion(entry, prepared, device, cfg, log)
        if entry["status"] != "ok":
            continue
        if not cfg.cuda_graph:
            calls[name] = lambda call=prepared.call: call(*next(rotation))
            continue
        try:
            calls[name] = timing.graphed(prepared.call, rotation.sets)
        except Exception as exc:  # noqa: BLE001 - a provider that cannot be captured is reported, not fatal
            status, text = classify_failure(exc)
            entry.update(status=status, reason=f"CUDA graph capture: {text}")
    timings, failures = time_interleaved(calls, device, cfg)
    report_failures(results, failures)
    for r in results:
        if r["provider"] in timings:
            r.update(timings[r["provider"]].as_dict())
        shown = f"{r['median_ms']:.3f} ms" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        log(f"  {r['provider']:16s} {shown}")
    flops = shapes(cfg)["flops"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    _add_rates(results, cfg, floor.peak(name, weight.dtype, cfg.peak_tflops, cfg.peak_gbps))
    return {
        "sparsity": sparsity,
        "block": block,
        "density": float(problem.mask.float().mean()),
        "tile": [bn, bk],
        "tile_density": index.tile_density,
        "tile_index_ms": t_index.median_ms,
        "flops": flops,
        "results": results,
    }


def make_tensors(cfg: LayerConfig) -> tuple[torch.Tensor, torch.Tensor, timing.Rotation]:
    """Random weight (scaled by 1/sqrt(fan-in)), bias and rotated input sets on ``cfg.device`` in ``cfg.dtype``."""
    dtype, device = parse_dtype(cfg.dtype), torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    generator = torch.Generator().manual_seed(cfg.seed)
    fan_in = math.prod(cfg.shape[1:])
    weight = (torch.randn(cfg.shape, generator=generator) / math.sqrt(fan_in)).to(device, dtype)
    bias = (0.1 * torch.randn(cfg.shape[0], generator=generator)).to(device, dtype)
    return weight, bias, _input_sets(cfg, dtype, device, generator)


def run_layer(cfg: LayerConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the whole sweep. Returns ``{"config", "shapes", "rows"}`` (``results.document`` adds the rest)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if cfg.tile is None:
        cfg.tile = (64, 64) if cfg.op == "linear" else (64, 32)
    if cfg.op not in ("linear", "conv"):
        raise ValueError(f"--kind must be linear or conv, got {cfg.op!r}")
    if cfg.mode not in ("forward", "train"):
        raise ValueError(f"--mode must be forward or train, got {cfg.mode!r}")
    expected_dims = 2 if cfg.op == "linear" else 4
    if len(cfg.shape) != expected_dims:
        raise ValueError(f"--shape for {cfg.op} needs {expected_dims} sizes, got {cfg.shape}")
    weight, bias, rotation = make_tensors(cfg)
    device = weight.device
    if device.type == "cpu" and "lthfast" in cfg.providers and use_triton(weight):
        log("WARNING: lthfast runs its Triton kernels in the CPU interpreter here (TRITON_INTERPRET=1 or backend")
        log("         'triton'): its timings measure the interpreter, not a fast path")
    log(f"lthfast bench layer: {cfg.op} {cfg.mode} {shapes(cfg)} {cfg.dtype} on {device}, {len(rotation)} input sets")
    rows = []
    for sparsity in cfg.sparsities:
        for block in cfg.blocks:
            log(f"sparsity {sparsity}, block {block}")
            rows.append(run_row(cfg, sparsity, block, weight, bias, rotation, log))
    config = asdict(cfg) | {"buffers": len(rotation)}
    if cfg.op == "conv":
        config["padding"] = cfg.conv_args()["padding"]
    return {"config": config, "shapes": shapes(cfg), "rows": rows}
