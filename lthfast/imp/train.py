"""Training one unit (a level's ticket or a control branch): the loop, evaluation, metrics and checkpoints.

A unit trains from iteration ``start`` (0, or the rewind point) to ``steps.train``. It evaluates on the
validation and test sets every ``eval_every`` iterations and at the end; at an evaluation at least
``checkpoint_every`` iterations after the last checkpoint it writes ``checkpoint.pt`` (model, optimizer, RNG,
metrics so far). Restarting the unit from that checkpoint reproduces the uninterrupted run exactly: the data
order is a function of the iteration (``BatchSampler``) and every RNG state is restored.

Under DDP (``world.size`` processes) ``batch_size`` is the global batch: every rank draws the same indices and
trains on its slice of them, and DDP averages the gradients, so an iteration sees the examples a single process
would (up to the order of float sums). Augmentation is drawn for the whole batch on every rank (then sliced), so it
matches a single process too; dropout draws differ per rank. Every rank evaluates (the same weights give the same
numbers) and only rank 0 writes; checkpoints hold every rank's RNG state and refuse another world size.
``cfg.amp`` trains (and evaluates) under ``torch.autocast`` (fp16 with a GradScaler, saved in checkpoints);
``cfg.compile`` trains through ``torch.compile(fullgraph=True)`` and evaluates eagerly.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lthfast.data import BatchSampler, Dataset, augment_crop_flip
from lthfast.distributed import World
from lthfast.imp import graphed, rundir
from lthfast.imp.config import Config, Steps
from lthfast.imp.errors import CheckpointError
from lthfast.nn import MaskedConv2d, MaskedLinear
from lthfast.pruning import MaskedAdam, MaskedAdamW, MaskedSGD, mask_optimizer

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Unit:
    """One training run of the IMP loop and the folder it records into."""

    path: Path
    label: str  # e.g. "r0 L3 ticket", for progress bars
    start: int  # first iteration (the rewind point for pruned levels)
    seed: int  # seeds dropout and augmentation


def use_fused_optimizer(model: nn.Module) -> bool:
    """Whether ``model`` trains with lthfast's fused masked optimizers: float32 weights on the CPU, unless
    ``LTHFAST_FUSED_OPTIMIZER=0``. They give torch's numbers bit for bit (a run is the same experiment either way)
    and step only the alive weights."""
    if os.environ.get("LTHFAST_FUSED_OPTIMIZER", "1").strip() == "0":
        return False
    params = list(model.parameters())
    return bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def make_optimizer(cfg: Config, params, model: nn.Module | None = None, *, masks=None) -> torch.optim.Optimizer:
    """SGD, SGD with momentum, Adam or AdamW at ``cfg.lr`` (the schedule rescales it every iteration): torch's, or,
    given the ``model`` the parameters belong to (or ``masks``, {weight: bool mask}, as for a stacked model), lthfast's
    fused masked equivalents (MaskedSGD / MaskedAdam / MaskedAdamW) that step only the alive weights and keep the
    pruned ones and their state at zero."""
    params = list(params)
    fused = model is not None or masks is not None
    sgd, adam, adamw = (
        (MaskedSGD, MaskedAdam, MaskedAdamW) if fused else (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
    )
    extra = {} if not fused else {"model": model} if model is not None else {"masks": masks}
    if cfg.optimizer == "sgd":
        return sgd(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    if cfg.optimizer == "momentum":
        return sgd(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **extra)
    if cfg.optimizer == "adam":
        return adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    return adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def lr_at(iteration: int, cfg: Config, steps: Steps) -> float:
    """Learning rate of ``iteration``: linear warmup, then constant, step (x gamma per milestone) or cosine."""
    factor = 1.0
    if steps.warmup and iteration < steps.warmup:
        factor = (iteration + 1) / steps.warmup
    if cfg.schedule == "step":
        factor *= cfg.gamma ** sum(iteration >= m for m in steps.milestones)
    elif cfg.schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * iteration / steps.train))
    return cfg.lr * factor


def autocast(cfg: Config, device: torch.device, cache: bool = True):
    """The ``torch.autocast`` context of ``cfg.amp`` on ``device`` (disabled for "none"); ``cache=False`` for a step
    captured as a CUDA graph (autocast's cast cache would hold tensors of the capture)."""
    dtype = AMP_DTYPES.get(cfg.amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=cache)


def use_cuda_graph(cfg: Config, device: torch.device, world: World) -> bool:
    """Whether a unit's steps are replayed as a CUDA graph: ``cfg.cuda_graph`` on CUDA where the run allows it
    (``graphed.blocker``; the reason is warned once otherwise)."""
    if not cfg.cuda_graph or device.type != "cuda":
        return False
    why = graphed.blocker(cfg, device, world)
    if why is not None:
        warnings.warn(f"lthfast imp: training steps run eagerly, without CUDA graphs: {why}", stacklevel=3)
    return why is None


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000, amp: str = "none"
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on (x, y), in eval mode; restores the training mode.

    amp: "none", "bf16" or "fp16": the forward runs under that autocast, as in training (the loss in float32).
    """
    if len(y) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    dtype = AMP_DTYPES.get(amp)
    for i in range(0, len(y), batch):
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x[i : i + batch])
        loss += F.cross_entropy(logits.float(), y[i : i + batch], reduction="sum")
        correct += (logits.argmax(1) == y[i : i + batch]).sum()
    model.train(was_training)
    return loss.item() / len(y), correct.item() / len(y)


def _rng_state(aug: torch.Generator, world: World) -> dict:
    """RNG states to checkpoint. Under DDP rank r's CPU and CUDA states are entry r of "ranks" (gathered, a
    collective); the augmentation generator is the same on every rank."""
    state = {"torch": torch.get_rng_state(), "aug": aug.get_state()}
    if not world.active:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state
    own = {"torch": state["torch"]}
    if world.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(world.device)
    state["ranks"] = world.all_gather(own)
    return state


def _set_rng_state(state: dict, aug: torch.Generator, world: World) -> None:
    aug.set_state(state["aug"])
    if not world.active:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        return
    own = state["ranks"][world.rank]
    torch.set_rng_state(own["torch"])
    if "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"], world.device)


def seed_unit(unit: Unit, world: World) -> torch.Generator:
    """Seed torch's RNG for the unit's dropout (rank 0 draws as a single process would); returns the unit's
    augmentation generator."""
    aug = torch.Generator().manual_seed(unit.seed + 1)
    torch.manual_seed(unit.seed + 1_000_003 * world.rank)
    return aug


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_unit(
    model: nn.Module,
    data: Dataset,
    cfg: Config,
    steps: Steps,
    unit: Unit,
    sampler: BatchSampler,
    *,
    on_iteration: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    progress=None,
    world: World | None = None,
) -> dict:
    """Train ``model`` (in place, masks already applied) for ``unit``; returns the unit's result record.

    Resumes from ``unit.path/checkpoint.pt`` when it exists. ``on_iteration(it, model, optimizer)`` is called
    before the step of every iteration (the driver captures the rewind state with it). ``progress`` is a tqdm
    bar (or None) advanced once per iteration. Writes checkpoint.pt and metrics.jsonl (rank 0); the caller writes
    the rest of the unit's files and, last, its done.json. ``world``: the DDP job (None: a single process); every
    rank calls this with the same arguments.
    """
    world = world or World(device=data.x_train.device)
    device = data.x_train.device
    # The fused optimizers keep pruned weights and their state at zero themselves; torch's get the guard.
    fused = use_fused_optimizer(model)
    optimizer = make_optimizer(cfg, model.parameters(), model if fused else None)
    guard = None if fused else mask_optimizer(optimizer, model)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    aug = seed_unit(unit, world)
    augment = cfg.augment and data.x_train.dim() == 4
    ckpt_path = unit.path / "checkpoint.pt"
    state = {"iteration": unit.start, "metrics": [], "best": None, "train_s": 0.0, "wall_s": 0.0, "samples": 0}
    if ckpt_path.exists():
        state = _resume(ckpt_path, model, optimizer, aug, scaler, world)
    graph = use_cuda_graph(cfg, device, world)
    if graph:
        graphed.graph_ready(optimizer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    net = _parallel(model, cfg, world)
    t_wall = time.perf_counter()
    wall_before = state["wall_s"]
    last_ckpt = state["iteration"]
    it = state["iteration"]
    if not state["metrics"]:
        _record(model, data, state, it, cfg.lr, None, None, cfg)
    if progress is not None:
        progress.reset(total=steps.train - unit.start)
        progress.update(it - unit.start)
        progress.set_description(unit.label)
    shard = cfg.batch_size // world.size
    mine = slice(world.rank * shard, (world.rank + 1) * shard)
    totals = torch.zeros(2, device=device)  # train loss sum, correct count (this rank's examples)
    seen = 0

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step on (x, y), adding its loss and correct count to ``totals``."""
        with autocast(cfg, device, cache=not graph):
            logits = net(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        totals[0] += loss.detach().float() * len(y)
        totals[1] += (logits.detach().argmax(1) == y).sum()

    if graph:
        step = graphed.GraphedStep(step, lambda: optimizer.zero_grad(set_to_none=True))
    _sync(device)
    t_train = time.perf_counter()
    while it < steps.train:
        if on_iteration is not None:
            on_iteration(it, model, optimizer)
        lr = lr_at(it, cfg, steps)
        graphed.set_lr(optimizer, lr)
        idx = sampler.indices(it)
        if augment:  # drawn for the whole batch, so every rank's slice is what a single process would train on
            x = augment_crop_flip(data.x_train[idx.to(device, non_blocking=True)], aug)[mine]
        else:
            x = data.x_train[idx[mine].to(device, non_blocking=True)]
        y = data.y_train[idx[mine].to(device, non_blocking=True)]
        step(x, y)
        it += 1
        seen += len(y) * world.size
        if progress is not None:
            progress.update(1)
        if it % steps.eval_every == 0 or it == steps.train:
            _sync(device)
            state["train_s"] += time.perf_counter() - t_train
            state["samples"] += seen
            loss_sum, correct = world.all_reduce_sum_(totals).tolist()
            _record(model, data, state, it, lr, loss_sum / seen, correct / seen, cfg)
            totals.zero_()
            seen = 0
            state["iteration"] = it
            if it - last_ckpt >= steps.checkpoint_every or it == steps.train:
                state["wall_s"] = wall_before + time.perf_counter() - t_wall
                _checkpoint(ckpt_path, model, optimizer, aug, scaler, state, world)
                last_ckpt = it
            t_train = time.perf_counter()
    if guard is not None:
        guard.remove()
    state["wall_s"] = wall_before + time.perf_counter() - t_wall
    return _result(state, unit, device, cfg)


def _parallel(model: nn.Module, cfg: Config, world: World) -> nn.Module:
    """What the training loop calls: ``model``, compiled with ``cfg.compile``, wrapped in DDP under torchrun.

    The model is compiled first and DDP wraps the compiled module: DDP's own forward does not trace with
    ``fullgraph=True`` (dynamo stops at its logger), while DDP's gradient hooks work on a compiled module's
    parameters all the same (the all-reduce then starts after the compiled backward instead of overlapping it).
    DDP leaves the mask buffers alone: broadcasting them before every forward (DDP's default for buffers) would
    write them in place, so the ops' tile index, cached per mask version, would be rebuilt at every iteration, and
    a rank whose mask differed would be overwritten silently instead of refused (the driver checks the masks'
    checksum across ranks after every prune instead). Other buffers (BatchNorm statistics) follow rank 0 as usual.
    """
    net = torch.compile(model, fullgraph=True) if cfg.compile else model
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        masks = [f"{name}.mask" for name, m in net.named_modules() if isinstance(m, (MaskedLinear, MaskedConv2d))]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, masks)
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=device_ids)
    return net


def _record(model, data: Dataset, state: dict, it: int, lr: float, train_loss, train_acc, cfg: Config) -> None:
    val_loss, val_acc = evaluate(model, data.x_val, data.y_val, amp=cfg.amp)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, amp=cfg.amp)
    row = {
        "iteration": it, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
        "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
    }  # fmt: skip
    state["metrics"].append(row)
    # The early-stop iteration: Frankle & Carbin's is the iteration of minimum validation loss (their footnote 2,
    # appendix C); the first one on ties. Training itself runs to the end either way.
    best = state["best"]
    if cfg.early_stop == "val_loss":
        better = best is None or val_loss < best["val_loss"]
    else:
        better = best is None or val_acc > best["val_acc"]
    if better:
        state["best"] = row


def _checkpoint(path: Path, model, optimizer, aug, scaler, state: dict, world: World) -> None:
    """Collective under DDP (the RNG states are gathered); rank 0 writes."""
    state_dict = graphed.eager_state_dict(optimizer)
    write_checkpoint(path, model.state_dict(), state_dict, _rng_state(aug, world), state, world, scaler)


def write_checkpoint(
    path: Path, model_state: dict, optimizer_state: dict, rng: dict, state: dict, world: World, scaler=None
) -> None:
    """``checkpoint.pt`` of a unit (and its metrics.jsonl, from ``state``): what ``_resume`` reads back. Rank 0
    writes; ``lthfast.imp.batched`` writes its units' checkpoints through it."""
    ckpt = {
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": rng,
        "state": json.dumps(state),
        "world_size": world.size,
    }
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()

    def write() -> None:
        rundir.save_torch(path, ckpt)
        rundir.write_text(path.parent / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["metrics"]))

    world.on_main(write)


def checkpoint_iteration(path: Path) -> int | None:
    """The iteration a unit resumes from: that of its ``checkpoint.pt`` (None when it has none)."""
    if not path.exists():
        return None
    ckpt = rundir.load_torch(path)
    try:
        return int(json.loads(ckpt["state"])["iteration"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds no training state; {rundir.recovery_hint(path)}") from exc


def _resume(path: Path, model, optimizer, aug, scaler, world: World) -> dict:
    ckpt = rundir.load_torch(path)
    written_by = ckpt.get("world_size", 1) if isinstance(ckpt, dict) else 1
    if written_by != world.size:
        raise CheckpointError(
            f"{path} was written by a run of {written_by} process(es) and this run has {world.size}: resume it with "
            f"torchrun --nproc-per-node {written_by} (or one process for 1), or delete {path.parent} to redo the unit"
        )
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], aug, world)
        if scaler is not None:
            scaler.load_state_dict(ckpt["scaler"])
        return json.loads(ckpt["state"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise CheckpointError(
            f"{path} does not match this run ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"{rundir.recovery_hint(path)}"
        ) from exc


def _result(state: dict, unit: Unit, device: torch.device, cfg: Config) -> dict:
    final, best = state["metrics"][-1], state["best"]
    peak, kind = _peak_memory_mb(device)
    return {
        "start_iteration": unit.start,
        "iterations": state["iteration"],
        "final": final,
        "early_stop": cfg.early_stop,
        "early_stop_iteration": best["iteration"],
        "early_stop_val_acc": best["val_acc"],
        "early_stop_val_loss": best["val_loss"],
        "early_stop_test_acc": best["test_acc"],
        "train_s": state["train_s"],
        "wall_s": state["wall_s"],
        "samples": state["samples"],
        "samples_per_s": state["samples"] / state["train_s"] if state["train_s"] > 0 else float("nan"),
        "peak_mem_mb": peak,
        "peak_mem_kind": kind,
    }
