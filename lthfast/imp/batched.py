"""Several IMP units trained in the same steps: ``lthfast imp``'s batched mode (issue 23).

The driver's scheduler (``lthfast.imp.driver``) hands ``train_units`` a group of prepared units
(``lthfast.imp.levels.Prepared``) that start at the same iteration and resume from the same checkpoint iteration, or
from none. Their models are stacked into one (``lthfast.units``) and one optimizer, built as ``make_optimizer`` builds
a unit's, steps the stack: SGD, Adam and AdamW are elementwise, so one optimizer over the stack is the units' own
optimizers side by side. Everything else stays each unit's own, as ``train_unit`` has it: the batches (its
replicate's ``BatchSampler``), the augmentation generator and RNG seeds, the learning-rate schedule, the evaluations,
the early-stop bookkeeping and ``checkpoint.pt``, written in ``train_unit``'s format from the unit's own model, its
part of the optimizer state and its RNG states. So a batched run resumes one unit at a time and the other way round,
and a unit's files equal its sequential training's up to the float summation order of the stacked products
(``tests/imp/test_imp_batched.py`` states the measured difference).

Evaluations copy each unit's part of the stack into the unit's own model and evaluate that model as ``train_unit``
does: the metrics are the unit's weights' metrics computed as a sequential run computes them (the stacked dense
products would round differently), and the copy is what checkpoint.pt and the unit's files need anyway.

A group fails as a whole: its units share every step, so an exception in the loop ends them all and is re-raised.
Each checkpoint.pt is written atomically and done.json only after training, so the files of finished units (of
earlier groups) are untouched and every unit of the group resumes from its last checkpoint; a kill between two
units' checkpoints leaves them at different iterations, which the scheduler then trains in different groups.

Not batched, with the reason warned once (``blocker``): DDP, ``--compile``, ``--amp fp16`` and dropout > 0 (a
stacked model draws one dropout mask for all its units, not each unit's own draw); a model ``lthfast.units`` cannot
stack, or whose stacked forward does not compute each unit's forward, raises ``StackError`` before any step.
"""

from __future__ import annotations

import copy
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lthfast import units
from lthfast.data import Dataset, augment_crop_flip
from lthfast.distributed import World
from lthfast.imp import graphed
from lthfast.imp.config import Config, Steps
from lthfast.imp.errors import CheckpointError
from lthfast.imp.train import (
    _record,
    _result,
    _resume,
    _rng_state,
    _sync,
    autocast,
    lr_at,
    make_optimizer,
    seed_unit,
    use_fused_optimizer,
    write_checkpoint,
)
from lthfast.pruning.layers import zero_pruned_

# Optimizer state tensors per weight (the working set of ``group_size``).
STATE_TENSORS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
# Share of the free memory a group may plan to fill.
MEMORY_SHARE = 0.8


def wanted(cfg: Config, device: torch.device) -> bool:
    """Whether the run asks for batched training: ``--no-sequential``, or by default on CUDA. The CPU default is one
    unit at a time: there stacked units measured 0.58-1.10x dense throughput against 0.97-1.52x for one training at a
    time with the CPU's sparse routes (benchmarks/results/units/README.md)."""
    if cfg.sequential is not None:
        return not cfg.sequential
    return device.type == "cuda"


def blocker(cfg: Config, world: World) -> str | None:
    """Why this run's units cannot train together (None: they can)."""
    if world.active:
        return "DDP (torchrun) trains each unit across the processes"
    if cfg.compile:
        return "--compile compiles one unit's model"
    if cfg.amp == "fp16":
        return "fp16's GradScaler would skip every unit's step when one unit's gradients overflow"
    if cfg.dropout > 0:
        return "dropout > 0: a stacked model draws one dropout mask for all its units, not each unit's own"
    return None


def enabled(cfg: Config, world: World) -> bool:
    """Whether the driver trains ready units together; warns the reason when asked for (or the default) and blocked."""
    if not wanted(cfg, world.device):
        return False
    why = blocker(cfg, world)
    if why is not None:
        warn_sequential(why)
    return why is None


def warn_sequential(why: str) -> None:
    warnings.warn(f"lthfast imp: units train one at a time: {why}", stacklevel=3)


# ---- how many units train together ----------------------------------------------------------------------------
def working_set(model: nn.Module, cfg: Config, data: Dataset) -> int:
    """Bytes one unit adds to a group's training (an estimate): its weights 4 + k times (the unit's own model, its
    part of the stack, the gradient, W ⊙ M for the products, k optimizer state tensors), its masks twice, the input
    batch, and 3 times the outputs of the model's leaf modules for one batch (kept for the backward, their gradients
    and a temporary), counted in one forward pass in eval mode."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    masks = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name.rpartition(".")[2] == "mask")
    x = data.x_train[: cfg.batch_size]
    outputs = 0

    def count(module, args, out) -> None:
        nonlocal outputs
        if isinstance(out, torch.Tensor):
            outputs += out.numel() * out.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if next(m.children(), None) is None]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return weights * (4 + STATE_TENSORS[cfg.optimizer]) + 2 * masks + x.numel() * x.element_size() + 3 * outputs


def free_memory(device: torch.device) -> int:
    """Bytes free for training: CUDA's free memory plus what torch's allocator holds unused; on the CPU the
    physical memory no process uses (``SC_AVPHYS_PAGES``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def group_size(cfg: Config, device: torch.device, per_unit: int) -> int:
    """Most units to train together: as many working sets (``working_set``) as fit in ``MEMORY_SHARE`` of the free
    memory (at least 1), capped by ``cfg.max_parallel`` when it is not 0."""
    fits = max(1, int(MEMORY_SHARE * free_memory(device)) // max(1, per_unit))
    return min(fits, cfg.max_parallel) if cfg.max_parallel else fits


# ---- the stack ----------------------------------------------------------------------------------------------------
def stack(models: list[nn.Module], x: torch.Tensor) -> nn.Module:
    """``units.stack(models)``, checked on ``x`` (a few examples): the stacked forward in eval mode must give each
    model's own logits (up to rounding). StackError with the reason otherwise: a forward that mixes units (a sum over
    channels, a fixed reshape) would train them wrongly, not fail."""
    stacked = units.stack(models)
    names = [name for name, _ in stacked.named_parameters()]
    if names != [name for name, _ in models[0].named_parameters()]:
        raise units.StackError("stack: the stacked model's parameters are not in the model's order")
    with torch.no_grad():
        want = torch.stack([m.eval()(x) for m in models])
        try:
            got = stacked.eval()(units.stack_input(x.expand(len(models), *x.shape)))
        except (RuntimeError, ValueError) as exc:
            raise units.StackError(f"stack: the stacked model's forward fails ({str(exc).splitlines()[0]})") from None
        finally:
            for m in (*models, stacked):
                m.train()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max() + 1)):
        raise units.StackError("stack: the stacked model's forward does not compute each unit's (it mixes units)")
    return stacked


@torch.no_grad()
def _copy_out(stacked: nn.Module, u: int, model: nn.Module) -> None:
    """Unit ``u``'s weights and buffers into its own model (not its masks: they do not change in training, and
    writing them would rebuild the layers' mask caches)."""
    own = model.state_dict()
    for name, t in stacked.state_dict().items():
        if name.rpartition(".")[2] != "mask":
            own[name].copy_(units.split(stacked, name, t)[u])


def _weight_shaped(value, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape


def _unit_optimizer_state(stacked_state: dict, stacked: nn.Module, u: int) -> dict:
    """Unit ``u``'s optimizer state_dict, as its own optimizer (``make_optimizer`` over its model) would hold it."""
    named = list(stacked.named_parameters())
    state = {}
    for i, per in stacked_state["state"].items():
        name, param = named[i]
        state[i] = {
            k: units.split(stacked, name, v)[u].clone() if _weight_shaped(v, param) else copy.deepcopy(v)
            for k, v in per.items()
        }
    return {"state": state, "param_groups": copy.deepcopy(stacked_state["param_groups"])}


def _stacked_optimizer_state(unit_states: list[dict], stacked: nn.Module, model: nn.Module) -> dict:
    """The units' optimizer state_dicts (read from their checkpoints) as one over the stack."""
    named = list(stacked.named_parameters())
    params = list(model.parameters())
    state = {}
    for i, per in unit_states[0]["state"].items():
        state[i] = {}
        for k, v in per.items():
            values = [s["state"][i][k] for s in unit_states]
            if _weight_shaped(v, params[i]):
                state[i][k] = units.join(stacked, named[i][0], values)
            elif all(_same(v, other) for other in values[1:]):
                state[i][k] = v
            else:
                raise CheckpointError(f"the checkpoints of units trained together differ in optimizer state {k!r}")
    return {"state": state, "param_groups": unit_states[0]["param_groups"]}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def _guard(optimizer: torch.optim.Optimizer, masks: dict[torch.Tensor, torch.Tensor]):
    """Keep the pruned stacked weights and their state at zero after every step (``mask_optimizer``'s zeroing, for
    torch's optimizers, which do not know the stacked layers)."""

    @torch.no_grad()
    def zero(opt, args, kwargs) -> None:
        for param, mask in masks.items():
            zero_pruned_(param, mask)
            for value in opt.state.get(param, {}).values():
                if _weight_shaped(value, param) and value.is_floating_point():
                    zero_pruned_(value, mask)

    return optimizer.register_step_post_hook(zero)


# ---- the loop -----------------------------------------------------------------------------------------------------
def train_units(group: list, data: Dataset, cfg: Config, steps: Steps, *, progress=None, on_iteration=None) -> list:
    """Train the prepared units of ``group`` (``levels.Prepared``; same start, same checkpoint iteration) in the same
    steps, each resuming from its checkpoint.pt; returns their result records (``train_unit``'s), in order.

    Raises StackError before any step when the models cannot be stacked (the caller trains them one at a time).
    ``on_iteration(it, group)`` is called before every step; ``progress``: as ``train_unit``'s.
    """
    device = data.x_train.device
    world = World(device=device)  # one process: batched training is off under DDP
    count = len(group)
    models = [p.model for p in group]
    fused = use_fused_optimizer(models[0])
    augs, rngs, states, resumed = [], [], [], []
    for p in group:
        aug = seed_unit(p.unit, world)
        state = {"iteration": p.unit.start, "metrics": [], "best": None, "train_s": 0.0, "wall_s": 0.0, "samples": 0}
        ckpt_path = p.unit.path / "checkpoint.pt"
        if ckpt_path.exists():  # read into the unit's own model and optimizer, as train_unit resumes
            own = make_optimizer(cfg, p.model.parameters(), p.model if fused else None)
            state = _resume(ckpt_path, p.model, own, aug, None, world)
            resumed.append(own.state_dict())
        augs.append(aug)
        rngs.append(_rng_state(aug, world))  # training draws nothing from torch's RNG without dropout
        states.append(state)
    if len({s["iteration"] for s in states}) != 1 or len(resumed) not in (0, count):
        raise ValueError("train_units: the units of a group must resume from the same iteration")
    stacked = stack(models, data.x_train[:2])
    masks = units.masks(stacked)
    optimizer = make_optimizer(cfg, stacked.parameters(), masks=masks if fused else None)
    guard = None if fused else _guard(optimizer, masks)
    if resumed:
        optimizer.load_state_dict(_stacked_optimizer_state(resumed, stacked, models[0]))

    start, it = group[0].unit.start, states[0]["iteration"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stacked.train()
    t_wall = time.perf_counter()
    walls_before = [s["wall_s"] for s in states]
    last_ckpt = it
    for model, state in zip(models, states):
        if not state["metrics"]:
            _record(model, data, state, it, cfg.lr, None, None, cfg)
    if progress is not None:
        progress.reset(total=steps.train - start)
        progress.update(it - start)
        progress.set_description(group[0].unit.label + (f" +{count - 1}" if count > 1 else ""))
    augment = cfg.augment and data.x_train.dim() == 4
    snapshots = [(u, p) for u, p in enumerate(group) if p.snapshot_at is not None]
    totals = torch.zeros(count, 2, device=device)  # per unit: train loss sum, correct count
    seen = 0
    _sync(device)
    t_train = time.perf_counter()
    while it < steps.train:
        if on_iteration is not None:
            on_iteration(it, group)
        for u, p in snapshots:
            if it == p.snapshot_at:
                _copy_out(stacked, u, p.model)
                p.snapshot(p.model, it)
        lr = lr_at(it, cfg, steps)
        graphed.set_lr(optimizer, lr)
        idx = torch.stack([p.sampler.indices(it) for p in group]).to(device, non_blocking=True)
        if augment:
            xs = torch.stack([augment_crop_flip(data.x_train[i], aug) for i, aug in zip(idx, augs)])
        else:
            xs = data.x_train[idx]
        ys = data.y_train[idx]
        with autocast(cfg, device):
            logits = stacked(units.stack_input(xs))
            loss = units.cross_entropy(logits, ys)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            logits = logits.detach().float()
            per_unit = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(ys.shape).mean(1)
            totals[:, 0] += per_unit * ys.shape[1]
            totals[:, 1] += (logits.argmax(2) == ys).sum(1)
        it += 1
        seen += ys.shape[1]
        if progress is not None:
            progress.update(1)
        if it % steps.eval_every == 0 or it == steps.train:
            _sync(device)
            elapsed = time.perf_counter() - t_train
            sums = totals.tolist()
            checkpoint = it - last_ckpt >= steps.checkpoint_every or it == steps.train
            optimizer_state = optimizer.state_dict() if checkpoint else None
            for u, (p, state) in enumerate(zip(group, states)):
                _copy_out(stacked, u, p.model)
                state["train_s"] += elapsed  # the group's training time: every unit trained all of it
                state["samples"] += seen
                _record(p.model, data, state, it, lr, sums[u][0] / seen, sums[u][1] / seen, cfg)
                state["iteration"] = it
                if checkpoint:
                    state["wall_s"] = walls_before[u] + time.perf_counter() - t_wall
                    rng = {**rngs[u], "aug": augs[u].get_state()}
                    unit_state = _unit_optimizer_state(optimizer_state, stacked, u)
                    write_checkpoint(p.unit.path / "checkpoint.pt", p.model.state_dict(), unit_state, rng, state, world)
            if checkpoint:
                last_ckpt = it
            totals.zero_()
            seen = 0
            t_train = time.perf_counter()
    if guard is not None:
        guard.remove()
    results = []
    for p, state, before in zip(group, states, walls_before):
        state["wall_s"] = before + time.perf_counter() - t_wall
        results.append(_result(state, p.unit, device, cfg))
    return results
