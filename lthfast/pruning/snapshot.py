"""``Snapshot``: a deep copy of a model's state (and optionally optimizer and RNG state) to rewind to.

Lottery-ticket rewinding restores the weights of step 0 (or k) but keeps the masks found later. A snapshot
therefore stores copies (never references: training after the snapshot cannot alter it) of every state_dict
entry except masks, and ``rewind_`` writes them back in place (the Parameter objects stay, so optimizers
keep working), then re-zeroes the pruned weights under the model's CURRENT masks.
"""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

from lthfast.pruning.layers import all_layers, masked_state_keys, zero_pruned_


def _mask_keys(model: nn.Module) -> set[str]:
    return {mask_key for mask_key, _ in masked_state_keys(model).values()}


def _rng_state() -> dict:
    import numpy

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _zero_pruned_state_(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Zero pruned stored weights (and their optimizer state) under the model's current masks."""
    for layer in all_layers(model):
        mask = layer.current_mask()
        if mask is None:
            continue
        layer.enforce_mask_()
        state = optimizer.state.get(layer.param) if optimizer is not None else None
        for value in (state or {}).values():
            if isinstance(value, torch.Tensor) and value.shape == layer.param.shape and value.is_floating_point():
                zero_pruned_(value, mask)


class Snapshot:
    """Deep copy of ``model``'s weights and buffers (masks excluded), optionally optimizer and RNG state.

    ``Snapshot(model, optimizer=None, rng=False, device=None, step=None)``: tensors are detached clones, on
    ``device`` if given (e.g. "cpu" to spare accelerator memory), else on their own device. ``step`` is a
    free label (e.g. the training iteration) kept with the snapshot.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        rng: bool = False,
        device: torch.device | str | None = None,
        step: int | None = None,
    ) -> None:
        masks = _mask_keys(model)
        with torch.no_grad():
            self.model_state = {
                k: v.detach().to(device=device, copy=True) for k, v in model.state_dict().items() if k not in masks
            }
        self.optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        self.rng_state = copy.deepcopy(_rng_state()) if rng else None
        self.step = step

    def _targets(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Snapshot key -> the model tensor it restores, checked (names, shapes) before anything is written."""
        current = model.state_dict(keep_vars=True)
        masks = _mask_keys(model)
        targets, restored = {}, set()
        for key, saved in self.model_state.items():
            # A snapshot taken before torch.nn.utils.prune restores into ``weight_orig`` (and vice versa).
            candidates = [key, key + "_orig"] + ([key[: -len("_orig")]] if key.endswith("_orig") else [])
            target = next((c for c in candidates if c in current and c not in masks), None)
            if target is None:
                raise KeyError(f"Snapshot.rewind_: the model has no entry {key!r}")
            if current[target].shape != saved.shape:
                raise ValueError(
                    f"Snapshot.rewind_: {target!r} has shape {tuple(current[target].shape)}, "
                    f"the snapshot {tuple(saved.shape)}"
                )
            targets[key] = current[target]
            restored.add(target)
        missing = set(current) - masks - restored
        if missing:
            raise KeyError(f"Snapshot.rewind_: the snapshot lacks {sorted(missing)}")
        return targets

    @torch.no_grad()
    def rewind_(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
        """Restore the saved weights and buffers into ``model`` in place, keeping its current masks.

        Pruned stored weights are zeroed afterwards. With ``optimizer`` (and a snapshot that captured one),
        its state is restored too and the state of pruned entries zeroed; captured RNG state is restored.
        Raises before writing anything when names or shapes do not match. Returns ``model``.
        """
        if optimizer is not None and self.optimizer_state is None:
            raise ValueError("Snapshot.rewind_: an optimizer was given but the snapshot holds no optimizer state")
        targets = self._targets(model)
        for key, tensor in targets.items():
            tensor.copy_(self.model_state[key])
        if optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        _zero_pruned_state_(model, optimizer)
        if self.rng_state is not None:
            _set_rng_state(self.rng_state)
        return model

    def state_dict(self) -> dict:
        """A dict for ``torch.save``: model / optimizer / rng state and the step label (copies)."""
        return copy.deepcopy(
            {"model": self.model_state, "optimizer": self.optimizer_state, "rng": self.rng_state, "step": self.step}
        )

    @classmethod
    def from_state_dict(cls, state: dict) -> Snapshot:
        """The inverse of ``state_dict``."""
        missing = {"model", "optimizer", "rng", "step"} - set(state)
        if missing:
            raise KeyError(f"Snapshot.from_state_dict: missing {sorted(missing)}")
        out = cls.__new__(cls)
        state = copy.deepcopy(state)
        out.model_state, out.optimizer_state = state["model"], state["optimizer"]
        out.rng_state, out.step = state["rng"], state["step"]
        return out
