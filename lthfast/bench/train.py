"""``lthfast bench train``: whole training steps (forward, loss, backward, SGD step) of a masked network.

Variants, built from one set of weights and masks per row so that they compute the same function:
  dense        the plain model with W ⊙ M stored in its weights, trained dense (the cost without sparsity)
  torch-prune  torch.nn.utils.prune.custom_from_mask on every Linear/Conv2d (weight_orig * mask each forward)
  lthfast      every Linear/Conv2d replaced by lthfast.nn.MaskedLinear/MaskedConv2d.from_dense
  sparseprop   every Linear/Conv2d SparseProp can compute replaced by its SparseLinear/SparseConv2d built from W ⊙ M
               (the optimizer steps its compressed values); any other layer masked as torch-prune does. Optional
               package, run when named (not in "all"); the time to build its modules is reported as convert_ms.
Every Linear and Conv2d gets a random block mask at the row's sparsity (same sparsity in every layer). Before
timing, each variant's logits and every masked layer's weight gradient are compared with a float64 copy.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from lthfast import units as lthfast_units
from lthfast.bench import models, timing
from lthfast.bench.check import CheckFailed
from lthfast.bench.layer import classify_failure, parse_dtype, report_failures, time_interleaved
from lthfast.bench.masks import block_mask, check_sweep, conv_block_mask
from lthfast.bench.providers import Unsupported
from lthfast.indexing.tiles import build_tile_index
from lthfast.nn import MaskedConv2d, MaskedLinear

VARIANTS = ("dense", "torch-prune", "lthfast")
OPTIONAL_VARIANTS = ("sparseprop",)  # from an optional package: run when named, not in "all"
# Normalised logit error against a float64 copy of the masked network. Looser than one layer's (check.TOLERANCE):
# rounding compounds over up to 16 layers, TF32 included in float32 on a GPU; a wrong tile gives errors of O(1).
MODEL_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 1e-1}
# Weight gradients against the float64 network's, normalised by the layer's largest: looser again, since BatchNorm's
# backward cancels sums over the batch. torch's own float32 ResNet-20 (dense route, batch 128) is 1.2e-2 off in its
# 12th conv's gradient; a wrong tile or a leaked pruned weight is off by O(1).
GRAD_TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-2, torch.float16: 1e-1, torch.bfloat16: 2e-1}


@dataclass
class TrainConfig:
    model: str = "lenet300"
    batch: int = 128
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.9, 0.98])
    blocks: list[int] | None = None  # None: 1,16 for resnet20 (16-64 channels), 1,32 otherwise
    providers: list[str] = field(default_factory=lambda: list(VARIANTS))
    dtype: str = "float32"
    device: str = "cpu"
    lr: float = 0.01
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, weight decay 5e-4, lr) or "adam" (lr 1e-3)
    tile: tuple[int, int] | None = None  # tile index timed after a prune; None = (64, 64) linear, (64, 32) conv
    min_run_time: float = 0.3  # CPU: seconds per variant, per round
    repeats: int = 3  # rounds per variant, interleaved with the other variants' rounds
    warmup: int = 2  # CPU warm-up steps
    warmup_ms: float = 100.0  # GPU
    rep_ms: float = 500.0  # GPU
    buffers: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_sweep("TrainConfig", self.sparsities, self.blocks or [1], self.repeats)
        known = VARIANTS + OPTIONAL_VARIANTS
        unknown = [p for p in self.providers if p not in known and units_of(p) is None]
        if unknown:
            raise ValueError(f"unknown training variant(s) {unknown}: expected some of {list(known)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"TrainConfig: optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if "dense" not in self.providers:
            self.providers = ["dense", *self.providers]  # every ratio is to dense measured in the same run


def units_of(provider: str) -> int | None:
    """U of a provider "lthfast-unitsU" (U >= 1), else None."""
    match = re.fullmatch(r"lthfast-units([1-9][0-9]*)", provider)
    return int(match.group(1)) if match else None


def default_blocks(model: str) -> list[int]:
    """Unstructured and one block size that a model's layers are wide enough for (resnet20: 16 to 64 channels)."""
    return [1, 16] if model == "resnet20" else [1, 32]


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every nn.Linear and nn.Conv2d, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def random_masks(model: nn.Module, sparsity: float, block: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A bool mask per prunable module name: linear [out, in] tiles, conv [Cout x Cin] channel tiles."""
    out = {}
    for name, m in prunable(model):
        shape = tuple(m.weight.shape)
        mask = (
            block_mask(*shape, sparsity, block, generator)
            if m.weight.dim() == 2
            else conv_block_mask(shape, sparsity, block, generator)
        )
        out[name] = mask.to(m.weight.device)
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def build_variant(name: str, base: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``base`` (whose weights already hold W ⊙ M) set up as variant ``name``; "lthfast-unitsU": U
    copies of the lthfast variant stacked by ``lthfast.units`` (one model taking U batches side by side)."""
    if name == "sparseprop":
        return _sparseprop_model(base, masks)
    count = units_of(name)
    if count is not None:
        return lthfast_units.stack([build_variant("lthfast", base, masks) for _ in range(count)])
    model = copy.deepcopy(base)
    if name == "dense":
        return model
    for mod_name, module in prunable(model):
        mask = masks[mod_name]
        if name == "torch-prune":
            prune.custom_from_mask(module, "weight", mask)
        elif name == "lthfast":
            wrap = MaskedLinear if isinstance(module, nn.Linear) else MaskedConv2d
            _replace(model, mod_name, wrap.from_dense(module, mask))
        else:
            raise ValueError(f"unknown training variant {name!r}: expected one of {VARIANTS}")
    return model


def _sparseprop_model(base: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """``base`` with every layer SparseProp can compute as its module (built from W ⊙ M); the others masked by
    torch.nn.utils.prune. Raises ``Unsupported`` when the package is missing or no layer converts."""
    from lthfast.bench import sparseprop_peer as peer

    peer.load()
    model = copy.deepcopy(base)
    reasons = {}
    for mod_name, module in prunable(model):
        reason = peer.convertible(module)
        if reason is None:
            _replace(model, mod_name, peer.build_module(module, masks[mod_name]))
        else:
            reasons[mod_name] = reason
            prune.custom_from_mask(module, "weight", masks[mod_name])
    if len(reasons) == len(masks):
        raise Unsupported(f"no layer SparseProp can compute: {next(iter(reasons.values()))}")
    return model


def _weight_grad(module: nn.Module) -> torch.Tensor | None:
    """A masked layer's weight gradient in the dense weight's shape, whatever the layer stores."""
    if hasattr(module, "weight_orig"):  # torch.nn.utils.prune
        return module.weight_orig.grad
    if hasattr(module, "W_val"):  # SparseProp: the gradient of its compressed values
        from lthfast.bench import sparseprop_peer as peer

        return None if module.W_val.grad is None else peer.dense_weight(module, module.W_val.grad)
    return module.weight.grad


def _check_weight_grads(model: nn.Module, reference: nn.Module, masks: dict[str, torch.Tensor], dtype) -> None:
    """Every masked layer's weight gradient: exactly zero where pruned, the float64 reference's where alive."""
    tol = GRAD_TOLERANCE[dtype]
    for mod_name, mask in masks.items():
        grad = _weight_grad(model.get_submodule(mod_name))
        ref = reference.get_submodule(mod_name).weight.grad
        if grad is None:
            raise CheckFailed(f"{mod_name}: no weight gradient")
        if bool((grad[~mask] != 0).any()):
            raise CheckFailed(f"{mod_name}: weight gradient is nonzero where the mask is False")
        diff = float((grad.double() - ref).mul(mask).abs().max())
        scale = float(ref.mul(mask).abs().max())
        err = diff / scale if scale > 0 else diff
        if not math.isfinite(err) or err > tol:
            raise CheckFailed(f"{mod_name}: weight gradient normalised error {err:.2e} > {tol:.0e} ({dtype})")


def check_variant(model, variant, reference, masks, x, y, dtype) -> float:
    """Logits (train mode, no grad) against the float64 reference; then one backward: every masked weight's
    gradient zero where pruned and the reference's where alive. A stacked variant: every unit's logits, and
    unit 0's weight gradients (``lthfast.units.unit_state_dict`` of the gradients)."""
    count = units_of(variant)
    if count is not None:
        return _check_units(model, count, reference, masks, x, y, dtype)
    with torch.no_grad():
        out = model(x).double()
        ref = reference(x.double())
    scale = float(ref.abs().max())
    err = float((out - ref).abs().max()) / scale if scale > 0 else float((out - ref).abs().max())
    if not math.isfinite(err) or err > MODEL_TOLERANCE[dtype]:
        raise CheckFailed(f"logits: normalised error {err:.2e} > {MODEL_TOLERANCE[dtype]:.0e} ({dtype})")
    if variant != "dense":
        reference.zero_grad(set_to_none=True)
        F.cross_entropy(reference(x.double()), y).backward()
        F.cross_entropy(model(x).float(), y).backward()
        _check_weight_grads(model, reference, masks, dtype)
        model.zero_grad(set_to_none=True)
    return err


def _units_input(x: torch.Tensor, count: int) -> torch.Tensor:
    return lthfast_units.stack_input(x.unsqueeze(0).expand(count, *x.shape))


def _check_units(model, count, reference, masks, x, y, dtype) -> float:
    """``check_variant`` for a stack of ``count`` copies, every unit fed the same batch."""
    tol = MODEL_TOLERANCE[dtype]
    with torch.no_grad():
        out = model(_units_input(x, count)).double()
        ref = reference(x.double())
    scale = float(ref.abs().max())
    err = float((out - ref.unsqueeze(0)).abs().max()) / (scale if scale > 0 else 1.0)
    if not math.isfinite(err) or err > tol:
        raise CheckFailed(f"logits of the {count} units: normalised error {err:.2e} > {tol:.0e} ({dtype})")
    reference.zero_grad(set_to_none=True)
    F.cross_entropy(reference(x.double()), y).backward()
    lthfast_units.cross_entropy(model(_units_input(x, count)).float(), y.unsqueeze(0).expand(count, -1)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for mod_name, mask in masks.items():
        grad = grads.get(f"{mod_name}.weight")
        if grad is None:
            raise CheckFailed(f"{mod_name}: no weight gradient")
        for u in range(count):
            if bool((grad[u][~mask] != 0).any()):
                raise CheckFailed(f"{mod_name} unit {u}: weight gradient is nonzero where the mask is False")
        ref = reference.get_submodule(mod_name).weight.grad
        diff = float((grad[0].double() - ref).mul(mask).abs().max())
        scale = float(ref.mul(mask).abs().max())
        err = diff / scale if scale > 0 else diff
        if not math.isfinite(err) or err > GRAD_TOLERANCE[dtype]:
            raise CheckFailed(f"{mod_name}: weight gradient of unit 0, normalised error {err:.2e} > "
                              f"{GRAD_TOLERANCE[dtype]:.0e} ({dtype})")  # fmt: skip
    model.zero_grad(set_to_none=True)
    return err


def make_optimizer(cfg: TrainConfig, name: str, model: nn.Module) -> torch.optim.Optimizer:
    """The step's optimizer: torch's for every variant but lthfast's, which steps with lthfast's fused masked
    optimizer (alive weights only; pruned weights and their state stay exactly zero without a guard)."""
    import lthfast

    cpu = next(model.parameters()).device.type == "cpu"
    fused = (name == "lthfast" or units_of(name) is not None) and cpu
    where = {}
    if fused:  # a stack's masks are on its stacked layers, which only it knows
        where = {"masks": lthfast_units.masks(model)} if units_of(name) is not None else {"model": model}
    if cfg.optimizer == "adam":
        cls = lthfast.MaskedAdam if fused else torch.optim.Adam
        return cls(model.parameters(), lr=1e-3, **where)
    cls = lthfast.MaskedSGD if fused else torch.optim.SGD
    return cls(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4, **where)


def _step_fn(
    model: nn.Module, opt: torch.optim.Optimizer, rotation: timing.Rotation, count: int | None = None
) -> Callable[[], None]:
    """One training step; ``count`` units of a stacked model each take their own batch of the rotation."""
    if count is not None:

        def units_step() -> None:
            batches = [next(rotation) for _ in range(count)]
            x = lthfast_units.stack_input(torch.stack([b[0] for b in batches]))
            y = torch.stack([b[1] for b in batches])
            opt.zero_grad(set_to_none=True)
            lthfast_units.cross_entropy(model(x).float(), y).backward()
            opt.step()

        return units_step

    def step() -> None:
        x, y = next(rotation)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()

    return step


def prepare_variant(name, base, masks, reference, rotation, cfg: TrainConfig, dtype):
    """Build and check one variant. Returns ``(entry, step)``; step is None when the variant failed."""
    try:
        model = build_variant(name, base, masks)
        model.train()
        err = check_variant(model, name, reference, masks, *rotation.sets[0], dtype)
    except Unsupported as exc:
        return {"provider": name, "status": "skipped", "reason": str(exc)}, None
    except CheckFailed as exc:
        return {"provider": name, "status": "error", "reason": f"output check failed: {exc}"}, None
    except Exception as exc:  # noqa: BLE001 - reported per variant, the others still run
        status, text = classify_failure(exc)
        return {"provider": name, "status": status, "reason": text}, None
    opt = make_optimizer(cfg, name, model)
    entry = {"provider": name, "status": "ok", "reason": None, "max_err": err, "optimizer": type(opt).__name__}
    if units_of(name) is not None:
        entry["units"] = units_of(name)
    if name == "sparseprop":
        _sparseprop_conversion(entry, model, base, masks, cfg)
    return entry, (model, _step_fn(model, opt, rotation, units_of(name)))


def _sparseprop_conversion(entry: dict, model: nn.Module, base: nn.Module, masks, cfg: TrainConfig) -> None:
    """How many layers run as SparseProp modules, and the time to build them all from W and M (``convert_ms``:
    what a mask change costs it; not part of the step time)."""
    from lthfast.bench import sparseprop_peer as peer

    names = [n for n, _ in prunable(base) if peer.is_sparseprop(model.get_submodule(n))]
    modules = [(base.get_submodule(n), masks[n]) for n in names]
    build_all = lambda: [peer.build_module(m, mask) for m, mask in modules]
    t = timing.measure(build_all, torch.device("cpu"), warmup=1, min_run_time=min(0.05, cfg.min_run_time))
    rest = len(masks) - len(names)
    entry["detail"] = f"{len(names)} of {len(masks)} layers as SparseProp modules" + (
        f", {rest} masked by torch.nn.utils.prune (kernels SparseProp lacks)" if rest else ""
    )
    entry["convert_ms"] = t.median_ms


def _tile(cfg: TrainConfig, mask: torch.Tensor | None) -> tuple[int, int]:
    """(block_n, block_k) of a layer's tile index: conv tiles span all kh x kw taps of (64 Cout x 32 Cin)."""
    if mask is None or mask.dim() == 2:
        return cfg.tile or (64, 64)
    bn, bc = cfg.tile or (64, 32)
    return bn, bc * math.prod(mask.shape[2:])


def run_row(cfg: TrainConfig, base, sparsity, block, rotation, device, dtype, log) -> dict:
    """Masks at one (sparsity, block), the tile-index build, then every variant built, checked and timed."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round(sparsity * 1e6) * 101 + block)
    masks = random_masks(base, sparsity, block, generator)
    row_base = copy.deepcopy(base)
    with torch.no_grad():
        for mod_name, module in prunable(row_base):
            module.weight.mul_(masks[mod_name])
    reference = copy.deepcopy(row_base).double().train()
    jobs = [(m.reshape(m.shape[0], -1), *_tile(cfg, m)) for m in masks.values()]
    indexes = [build_tile_index(*job) for job in jobs]
    build_all = lambda: [build_tile_index(*job) for job in jobs]
    t_index = timing.measure(build_all, device, warmup=1, min_run_time=min(0.05, cfg.min_run_time))
    alive = sum(i.alive_tiles for i in indexes) / sum(i.tile_alive.numel() for i in indexes)
    log(f"  tile indices ({len(jobs)} layers) built in {t_index.median_ms:.3f} ms after the prune")
    density = float(sum(m.sum() for m in masks.values()) / sum(m.numel() for m in masks.values()))
    results, built = [], {}
    for name in cfg.providers:
        entry, ready = prepare_variant(name, row_base, masks, reference, rotation, cfg, dtype)
        results.append(entry)
        if ready is not None:
            built[name] = ready
    timings, failures = time_interleaved({name: step for name, (_, step) in built.items()}, device, cfg)
    report_failures(results, failures)
    x0, y0 = rotation.sets[0]
    for r in results:
        if r["provider"] not in timings:
            log(f"  {r['provider']:12s} {r['status']}: {r['reason']}")
            continue
        if "convert_ms" in r:
            log(f"  {r['provider']:12s} built from W and M in {r['convert_ms']:.3f} ms after the prune ({r['detail']})")
        t = timings[r["provider"]]
        count = r.get("units", 1)
        with torch.no_grad():  # a diverging run (NaN/inf) would time different arithmetic: recorded, not hidden
            logits = built[r["provider"]][0](_units_input(x0, count) if "units" in r else x0)
            loss_after = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y0.repeat(count)))
        samples = cfg.batch * count  # a stacked step trains every unit's batch
        r.update(density=density, samples_per_s=samples / (t.median_ms * 1e-3), loss_after=loss_after, **t.as_dict())
        log(f"  {r['provider']:12s} {r['samples_per_s']:.1f} samples/s")
    dense = next((r for r in results if r["provider"] == "dense" and r["status"] == "ok"), None)
    for r in results:  # throughput over dense's: a stacked step counts all its units' samples
        if r["status"] == "ok":
            r["speedup_vs_dense"] = r["samples_per_s"] / dense["samples_per_s"] if dense else None
    return {
        "sparsity": sparsity, "block": block, "density": density, "tile": list(_tile(cfg, None)), "tile_density": alive,
        "tile_index_ms": t_index.median_ms, "results": results,
    }  # fmt: skip


def run_train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the sweep. Returns ``{"config", "shapes", "rows"}`` (``results.document`` adds the rest)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if cfg.blocks is None:
        cfg.blocks = default_blocks(cfg.model)
    dtype, device = parse_dtype(cfg.dtype), torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    base, input_shape, classes, source = models.build(cfg.model)
    base = base.to(device, dtype)
    generator = torch.Generator().manual_seed(cfg.seed)
    per_set = cfg.batch * math.prod(input_shape) * dtype.itemsize
    sets = [
        (
            torch.randn(cfg.batch, *input_shape, generator=generator).to(device, dtype),
            torch.randint(0, classes, (cfg.batch,), generator=generator).to(device),
        )
        for _ in range(cfg.buffers or timing.buffer_count(per_set))
    ]
    rotation = timing.Rotation(sets)
    params = sum(m.weight.numel() for _, m in prunable(base))
    log(f"lthfast bench train: {cfg.model} ({source}), batch {cfg.batch}, {cfg.dtype} on {device}")
    rows = []
    for sparsity in cfg.sparsities:
        for block in cfg.blocks:
            log(f"sparsity {sparsity}, block {block}")
            rows.append(run_row(cfg, base, sparsity, block, rotation, device, dtype, log))
    config = asdict(cfg) | {"buffers": len(rotation), "model_source": source}
    shapes = {"x": [cfg.batch, *input_shape], "classes": classes, "prunable_weights": params}
    return {"config": config, "shapes": shapes, "rows": rows}
