"""One replicate of the IMP loop: dense level, pruned levels, and the control branches, each resumable.

Under DDP every rank runs the same loop on the same files: each computes the masks of a prune from the run
directory (the previous level's weights, the rewind state) with the same seeds, the masks' checksum is compared
across ranks before training (a mismatch raises on every rank), and rank 0 alone writes. Every unit ends with a
collective after its files are written, so no rank reads a file before rank 0 has finished writing it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lthfast.data import BatchSampler
from lthfast.distributed import World
from lthfast.imp import granularity, rundir
from lthfast.imp.config import Config, Steps
from lthfast.imp.errors import CheckpointError
from lthfast.imp.train import Unit, train_unit
from lthfast.pruning import Masks, Snapshot, sparsify, strategies


def derive_seed(*keys) -> int:
    """A 31-bit seed from any keys (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Prepared:
    """A unit ready to train: its model (masks applied, weights rewound or fresh) and what its training needs.

    ``snapshot_at``: level 0's rewind point when the rewind state is still to be saved; the training calls
    ``snapshot(model, it)`` with the unit's weights of that iteration, before its step."""

    replicate: Replicate
    level: int
    branch: str
    model: nn.Module
    unit: Unit
    sampler: BatchSampler
    snapshot_at: int | None = None
    snapshot: Callable[[nn.Module, int], None] | None = None

    def on_iteration(self) -> Callable | None:
        """The snapshot as ``train_unit``'s ``on_iteration`` hook (None when there is none to take)."""
        if self.snapshot_at is None:
            return None

        def capture(it: int, model: nn.Module, optimizer) -> None:
            if it == self.snapshot_at:
                self.snapshot(model, it)

        return capture


class Replicate:
    """State shared by the units of replicate ``r``; ``run()`` trains whatever is not finished yet, one unit at a
    time. A unit is ``prepare``d (its model built from the run directory), trained (``train``, or with other units
    by ``lthfast.imp.batched``) and ``finish``ed (its files written, done.json last)."""

    def __init__(
        self, cfg: Config, steps: Steps, rd, r: int, seeds: dict, make_model, data, sampler, world: World, progress
    ):
        self.cfg, self.steps, self.rd, self.r = cfg, steps, rd, r
        self.seeds, self.make_model, self.data, self.sampler = seeds, make_model, data, sampler
        self.world, self.device, self.progress = world, world.device, progress

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> None:
        for level, branch in self.units():
            if not self.is_done(level, branch):
                prepared = self.prepare(level, branch)
                self.finish(prepared, self.train(prepared))

    def units(self) -> list[tuple[int, str]]:
        """Every unit of the replicate as (level, branch), in the order ``run`` trains them."""
        controls_at = set(self.cfg.controls_at())
        out = [(0, "ticket")]
        for level in range(1, self.cfg.levels + 1):
            out.append((level, "ticket"))
            if level in controls_at:
                out += [(level, control) for control in self.cfg.controls]
        return out

    def path(self, level: int, branch: str) -> Path:
        return self.rd.unit(self.r, level, branch)

    def is_done(self, level: int, branch: str) -> bool:
        return rundir.is_done(self.path(level, branch))

    def needs(self, level: int, branch: str) -> tuple[int, str] | None:
        """The unit whose files this one is made from: a control's ticket; a ticket's previous level (level 0 with
        ``one_shot``); None for level 0."""
        if level == 0:
            return None
        if branch != "ticket":
            return level, "ticket"
        return (0 if self.cfg.one_shot else level - 1), "ticket"

    def ready(self, level: int, branch: str) -> bool:
        """Whether the unit is unfinished and the unit it is made from is finished."""
        needed = self.needs(level, branch)
        return not self.is_done(level, branch) and (needed is None or self.is_done(*needed))

    def start(self, level: int) -> int:
        """The iteration a unit's training starts from: 0 at level 0, else the rewind point."""
        return 0 if level == 0 else self.steps.rewind

    def prepare(self, level: int, branch: str) -> Prepared:
        """Build the unit's model from the run directory (fresh at level 0; pruned and rewound for a ticket; a
        control's masks and weights from its ticket)."""
        if level == 0:
            return self._level0()
        return self._ticket(level) if branch == "ticket" else self._control(level, branch)

    def _fresh_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return sparsify(self.make_model().to(self.device))

    def _prepared(self, model: nn.Module, level: int, branch: str, **snapshot) -> Prepared:
        seed = derive_seed(self.seeds["dropout"], level, branch)
        label = f"r{self.r} L{level} {branch}"
        unit = Unit(path=self.path(level, branch), label=label, start=self.start(level), seed=seed)
        return Prepared(self, level, branch, model, unit, self.sampler, **snapshot)

    def _level0(self) -> Prepared:
        path = self.path(0, "ticket")
        model = self._fresh_model(self.seeds["init"])
        rewind_path = self.rd.rewind_path(self.r)

        def save(model: nn.Module, step: int) -> None:  # the rewind state, written by rank 0
            self.world.on_main(
                lambda: rundir.save_torch(rewind_path, Snapshot(model, device="cpu", step=step).state_dict())
            )

        snapshot_at = None
        if not rewind_path.exists():
            if self.steps.rewind == 0:
                save(model, 0)
            else:
                snapshot_at = self.steps.rewind
        if (path / "checkpoint.pt").exists() and not rewind_path.exists():
            self._check_rewind_before_checkpoint(path)
        return self._prepared(model, 0, "ticket", snapshot_at=snapshot_at, snapshot=save)

    def _check_rewind_before_checkpoint(self, path: Path) -> None:
        state = rundir.load_torch(path / "checkpoint.pt")
        if json.loads(state["state"])["iteration"] > self.steps.rewind:
            raise CheckpointError(
                f"{self.rd.rewind_path(self.r)} is missing but level 0 trained past the rewind point; "
                f"delete {path} to redo level 0"
            )

    def _ticket(self, level: int) -> Prepared:
        model = self._fresh_model(self.seeds["init"])
        masks = self._prune(model, level)
        self.world.check_same(masks, f"the masks of replicate {self.r} level {level}")
        self._rewind(model, masks)
        return self._prepared(model, level, "ticket")

    def _control(self, level: int, control: str) -> Prepared:
        ticket = rundir.load_masks(self.rd.unit(self.r, level) / "mask.safetensors", device=self.device)
        generator = torch.Generator().manual_seed(derive_seed(self.seeds["prune"], level, control))
        if control == "random_reinit":
            model = self._fresh_model(derive_seed(self.seeds["init"], level, control))
            ticket.apply_(model)
        else:
            model = self._fresh_model(self.seeds["init"])
            if granularity.is_structured(self.cfg):
                masks = granularity.control_masks(self.cfg, ticket, control, generator)
            elif control == "random_prune":
                masks = strategies.random_like(ticket, generator=generator)
            else:
                masks = strategies.rearrange(ticket, generator=generator)
            self._rewind(model, masks)
        self.world.check_same(Masks.from_model(model), f"the {control} masks of replicate {self.r} level {level}")
        return self._prepared(model, level, control)

    # ---- steps ------------------------------------------------------------------------------------------
    def _load_trained(self, model: nn.Module, level: int) -> None:
        """Load the final weights and masks of the ticket at ``level`` into ``model`` (in place)."""
        unit = self.rd.unit(self.r, level)
        if not rundir.is_done(unit):
            raise CheckpointError(f"{unit} is not finished but a later level needs it; delete the later levels")
        tensors = rundir.load_tensors(unit / "model.safetensors")
        try:
            model.load_state_dict(tensors)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{unit / 'model.safetensors'} does not fit the model ({str(exc).splitlines()[0]})"
            ) from None

    def _prune(self, model: nn.Module, level: int) -> Masks:
        """The masks of ``level``: from level-1's trained weights (iterative) or level 0's (one-shot)."""
        cfg = self.cfg
        if granularity.is_structured(cfg):
            self._load_trained(model, 0 if cfg.one_shot else level - 1)
            return granularity.level_masks(cfg, model, Masks.from_model(model), level)
        if cfg.one_shot:
            self._load_trained(model, 0)
            density = (1 - cfg.prune_fraction) ** level
            overrides = {k: (1 - _rate(v, cfg.prune_fraction)) ** level for k, v in cfg.layer_fractions.items()}
            return strategies.one_shot(
                model, density, layerwise=cfg.layerwise, overrides=overrides or None, leave_dense=cfg.leave_dense
            )
        self._load_trained(model, level - 1)
        return strategies.magnitude(
            model, Masks.from_model(model), cfg.prune_fraction, layerwise=cfg.layerwise,
            overrides=dict(cfg.layer_fractions) or None, leave_dense=cfg.leave_dense,
        )  # fmt: skip

    def _rewind(self, model: nn.Module, masks: Masks) -> None:
        """Give ``model`` the masks and the rewind-point weights (pruned weights zero)."""
        state = rundir.load_torch(self.rd.rewind_path(self.r))
        masks.apply_(model)
        try:
            Snapshot.from_state_dict(state).rewind_(model)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{self.rd.rewind_path(self.r)} does not fit the model ({exc})") from exc

    def train(self, prepared: Prepared) -> dict:
        """Train the unit alone (``train_unit``); returns its result record."""
        return train_unit(
            prepared.model, self.data, self.cfg, self.steps, prepared.unit, prepared.sampler,
            on_iteration=prepared.on_iteration(), progress=self.progress.iterations, world=self.world,
        )  # fmt: skip

    def finish(self, prepared: Prepared, result: dict, together: int = 1) -> None:
        """Write the trained unit's files (done.json last) and report it. ``together``: how many units trained in
        its steps (1 alone; its timings are then the group's)."""
        model, path, level, branch = prepared.model, prepared.unit.path, prepared.level, prepared.branch
        masks = Masks.from_model(model)
        result.update(
            replicate=self.r, level=level, branch=branch, density=masks.density(),
            alive=masks.alive_count(), total=masks.total_count(),
            backend=self.cfg.backend, device=str(self.device), world_size=self.world.size,
            amp=self.cfg.amp, compile=self.cfg.compile, trained_with=together,
        )  # fmt: skip

        def write() -> None:
            rundir.save_masks(path / "mask.safetensors", masks)
            rundir.save_tensors(path / "model.safetensors", model.state_dict())
            layers = {n: {"density": d, "alive": int(masks[n].sum()), "total": masks[n].numel()}
                      for n, d in masks.layer_density().items()}  # fmt: skip
            rundir.write_json(path / "sparsity.json", {"density": masks.density(), "layers": layers})
            rundir.write_json(path / rundir.DONE, result)  # last: marks the unit finished

        self.world.on_main(write)  # collective: every rank waits until the unit's files are written
        self.progress.done()
        final = result["final"]
        self.progress.line(
            f"{prepared.unit.label:24s} {100 * result['density']:7.2f}% weights  test acc {final['test_acc']:.4f}  "
            f"early stop @{result['early_stop_iteration']:<6d} {result['samples_per_s']:9.0f} samples/s"
        )


def _rate(value: str, base: float) -> float:
    """A per-level layer rate: "x0.5" scales the base fraction, a number is the layer's own fraction."""
    text = str(value).strip()
    return float(text[1:]) * base if text[:1] in ("x", "*") else float(text)
