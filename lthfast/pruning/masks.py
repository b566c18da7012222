"""``Masks``: fully qualified weight name -> bool mask, validated on write, applicable to any model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping

import torch
from torch import nn

from lthfast.nn import check_mask
from lthfast.pruning.layers import Layer, all_layers, select_layers, write_masks_fast_


def _check_entry(name, mask) -> None:
    if not isinstance(name, str):
        raise TypeError(f"Masks keys are weight names (str), got {name!r}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"Masks[{name!r}]: expected a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"Masks[{name!r}]: mask must be bool, got {mask.dtype}")


class Masks(MutableMapping):
    """An ordered mapping ``"fc1.weight" -> bool tensor`` (True = alive), shaped like the weight.

    Writing checks the key and the dtype, and that a replaced entry keeps its shape. ``apply_`` checks
    every entry against a model (name, shape, dtype, device) before it changes anything. Tensors are stored
    as given (no copy); strategies always return new Masks with new tensors.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] = ()) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        items = masks.items() if isinstance(masks, Mapping) else masks
        for name, mask in items:
            self[name] = mask

    # -- mapping ----------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        _check_entry(name, mask)
        old = self._masks.get(name)
        if old is not None and old.shape != mask.shape:
            raise ValueError(f"Masks[{name!r}]: shape {tuple(mask.shape)} differs from the stored {tuple(old.shape)}")
        self._masks[name] = mask

    def __delitem__(self, name: str) -> None:
        del self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"Masks({len(self)} layers, density={self.density():.4f})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.equal(other)

    __hash__ = None  # mutable

    def equal(self, other: Mapping[str, torch.Tensor]) -> bool:
        """Same names and bitwise-equal masks (order ignored)."""
        if set(self.keys()) != set(other.keys()):
            return False
        return all(self[n].shape == other[n].shape and torch.equal(self[n], other[n].to(self[n].device)) for n in self)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def ones(cls, model: nn.Module, include=None, exclude=None) -> Masks:
        """All-alive masks for ``prunable(model, include, exclude)``, on each weight's device."""
        layers = select_layers(model, include, exclude)
        return cls((layer.name, torch.ones_like(layer.param, dtype=torch.bool)) for layer in layers)

    @classmethod
    def from_model(cls, model: nn.Module) -> Masks:
        """Copies of the masks held by ``model``: masked modules' ``mask`` and torch-pruned ``weight_mask``."""
        out = cls()
        for layer in all_layers(model):
            mask = layer.current_mask()
            if mask is not None:
                out[layer.name] = mask.clone()
        return out

    def clone(self) -> Masks:
        """A deep copy (new tensors)."""
        return Masks((n, m.clone()) for n, m in self.items())

    def to(self, device: torch.device | str) -> Masks:
        """A copy with every mask on ``device``."""
        return Masks((n, m.to(device)) for n, m in self.items())

    # -- statistics -------------------------------------------------------------------------------------
    def alive_count(self) -> int:
        """Number of True entries over all layers."""
        return sum(int(m.sum()) for m in self.values())

    def total_count(self) -> int:
        """Number of entries over all layers."""
        return sum(m.numel() for m in self.values())

    def density(self) -> float:
        """Global fraction of alive weights (alive / total); 0.0 for empty masks."""
        total = self.total_count()
        return self.alive_count() / total if total else 0.0

    def layer_density(self) -> dict[str, float]:
        """Per-layer fraction of alive weights."""
        return {n: (int(m.sum()) / m.numel() if m.numel() else 0.0) for n, m in self.items()}

    def sparsity_report(self) -> str:
        """A plain-text table: layer, shape, alive / total, density; then the global line."""
        rows = [(n, "x".join(map(str, m.shape)), int(m.sum()), m.numel()) for n, m in self.items()]
        width = max([len(r[0]) for r in rows] + [len("total")])
        lines = [f"{'layer':<{width}}  {'shape':>16}  {'alive':>12}  {'total':>12}  density"]
        for name, shape, alive, total in rows:
            density = alive / total if total else 0.0
            lines.append(f"{name:<{width}}  {shape:>16}  {alive:>12}  {total:>12}  {density:.4f}")
        alive, total = sum(r[2] for r in rows), sum(r[3] for r in rows)
        lines.append(f"{'total':<{width}}  {'':>16}  {alive:>12}  {total:>12}  {alive / total if total else 0.0:.4f}")
        return "\n".join(lines)

    # -- model interaction ------------------------------------------------------------------------------
    def layers_of(self, model: nn.Module) -> list[tuple[Layer, torch.Tensor]]:
        """(layer, mask) for every entry, in this mapping's order, each checked against ``model``.

        Raises naming the layer when a name is unknown or a mask's shape, dtype or device is wrong.
        """
        by_name = {layer.name: layer for layer in all_layers(model)}
        out = []
        for name, mask in self.items():
            layer = by_name.get(name)
            if layer is None:
                raise KeyError(f"mask {name!r}: no nn.Linear/nn.Conv2d weight of that name; known: {list(by_name)}")
            check_mask(mask, layer.param, name)
            out.append((layer, mask))
        return out

    def apply_(self, model: nn.Module) -> nn.Module:
        """Write the masks into ``model`` in place and zero the pruned stored weights.

        Masked modules get ``set_mask_`` + ``apply_mask_`` (on CPU, with lthfast._C, one pass over all of
        them that rewrites only the weights that change); torch-pruned modules get ``weight_mask`` updated in
        place and ``weight_orig`` zeroed; plain modules get their pruned weights zeroed (the mask itself is not
        stored there). Every entry is validated before anything changes. Returns ``model``.
        """
        pairs = self.layers_of(model)
        written = write_masks_fast_(pairs)  # CPU masked layers, in one pass when lthfast._C is built
        for (layer, mask), done in zip(pairs, written):
            if not done:
                layer.write_mask_(mask)
        return model

    # -- files ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Save to ``.pt`` (torch.save of a dict) or ``.safetensors``; tensors are written from the CPU."""
        path = os.fspath(path)
        tensors = {n: m.detach().cpu().contiguous() for n, m in self.items()}
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            # safetensors sorts its keys; the order (the global ranking's tie order) travels in the metadata.
            save_file(tensors, path, metadata={"format": "lthfast.Masks", "order": json.dumps(list(tensors))})
        elif path.endswith(".pt") or path.endswith(".pth"):
            torch.save(tensors, path)
        else:
            raise ValueError(f"{path}: unknown mask file type; use .pt or .safetensors")

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> Masks:
        """Load masks saved by ``save`` (.pt or .safetensors) onto ``device`` (default CPU)."""
        path = os.fspath(path)
        device = device if device is not None else "cpu"
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device=str(device)) as f:
                order = json.loads((f.metadata() or {}).get("order", "[]")) or list(f.keys())
                data = {name: f.get_tensor(name) for name in order}
        elif path.endswith(".pt") or path.endswith(".pth"):
            data = torch.load(path, map_location=device, weights_only=True)
        else:
            raise ValueError(f"{path}: unknown mask file type; use .pt or .safetensors")
        if not isinstance(data, Mapping):
            raise TypeError(f"{path}: expected a mapping of name -> bool tensor, got {type(data).__name__}")
        try:
            return cls(data)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{path}: {exc}") from exc
