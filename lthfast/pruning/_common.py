"""Shared checks and helpers of the pruning strategies (validate everything first, then compute)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lthfast.pruning.layers import Layer, alive_flags, check_finite, check_fraction, matches
from lthfast.pruning.masks import Masks


def resolve(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, what: str) -> list[tuple[Layer, torch.Tensor]]:
    """(layer, mask) pairs of ``masks`` (all-alive masks of every prunable weight when None), validated."""
    if masks is None:
        masks = Masks.ones(model)
    elif not isinstance(masks, Masks):
        masks = Masks(masks)
    try:
        return masks.layers_of(model)
    except (KeyError, TypeError, ValueError) as exc:
        raise type(exc)(f"{what}: {exc.args[0] if exc.args else exc}") from exc


def matched(patterns: str | Iterable[str] | None, names: list[str], what: str) -> set[str]:
    """The names matched by any fnmatch pattern; a pattern matching nothing is an error naming it."""
    if patterns is None:
        return set()
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    out = set()
    for p in patterns:
        hit = {n for n in names if matches(p, n)}
        if not hit:
            raise ValueError(f"{what}: pattern {p!r} matches no layer of the masks; known: {names}")
        out |= hit
    return out


def is_multiplier(value) -> bool:
    return isinstance(value, str) and value.strip()[:1] in ("x", "*")


def parse_rate(value, base: float, where: str) -> float:
    """An override value: a number (or numeric string, "0.3") is the layer's own fraction; "x0.5" (or "*0.5")
    multiplies ``base``."""
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text[1:] if is_multiplier(text) else text)
        except ValueError:
            raise ValueError(f"{where}: override {value!r} must be a number or a multiplier like 'x0.5'") from None
        if not is_multiplier(text):
            return check_fraction(number, where)
        if number < 0:
            raise ValueError(f"{where}: multiplier {value!r} must be >= 0")
        return check_fraction(number * base, f"{where} ({value!r} x {base})")
    return check_fraction(value, where)


def overrides_by_name(overrides: Mapping | None, names: list[str], what: str) -> dict[str, object]:
    """name -> raw override value (patterns expanded; a later pattern wins); unknown patterns raise."""
    out: dict[str, object] = {}
    if overrides is None:
        return out
    if not isinstance(overrides, Mapping):
        raise TypeError(f"{what}: overrides must be a mapping of name pattern -> rate, got {type(overrides).__name__}")
    for pattern, value in overrides.items():
        for name in matched(pattern, names, f"{what} overrides"):
            out[name] = value
    return out


def check_can_prune_all(pairs: list[tuple[Layer, torch.Tensor]], what: str) -> None:
    """Every layer asked to prune more must have alive weights (the masks checked in one batch)."""
    for (layer, mask), alive in zip(pairs, alive_flags([mask for _, mask in pairs])):
        if mask.numel() and not alive:
            raise ValueError(f"{what}: layer {layer.name!r} is already fully pruned and was asked to prune further")


def check_can_prune(layer: Layer, mask: torch.Tensor, what: str, finite: bool = True, ranked: bool = False) -> None:
    """A layer asked to prune more must have alive weights (and, with ``finite``, all of them finite).

    ``ranked``: the layer is one of a global ranking, where an emptied layer simply has nothing to rank (IMP's
    global pruning can empty a layer, and the next round must go on, as torch's global_unstructured does).
    """
    if not ranked:
        check_can_prune_all([(layer, mask)], what)
    if finite:
        check_finite(layer.param, mask, layer.name)


@contextlib.contextmanager
def naming_bad_weights(pairs: list[tuple[Layer, torch.Tensor]]):
    """lthfast.threshold checks for NaN / inf among alive weights for free, but names tensors by index: on its
    error, find the layer and raise naming it."""
    try:
        yield
    except ValueError as exc:
        if "NaN" not in str(exc):
            raise
        for layer, mask in pairs:
            check_finite(layer.param, mask, layer.name)
        raise


def two_d(t: torch.Tensor) -> torch.Tensor:
    """The [out, in * kh * kw] view of a Linear / Conv2d weight (or mask)."""
    return t.reshape(t.shape[0], -1)


RANKABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rankable(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, as float32 when its dtype is not one the threshold ranks natively (float64 weights are
    ranked by their float32 magnitudes)."""
    t = t.detach()
    return t if t.dtype in RANKABLE_DTYPES else t.float()


def prune_global_(weights: list[torch.Tensor], masks: list[torch.Tensor], *, amount=None, k=None) -> None:
    """Prune the ``amount`` fraction (or ``k``) smallest-magnitude alive entries over all tensors, in place."""
    from lthfast import threshold

    if not weights or (k == 0 if k is not None else amount == 0):
        return
    threshold.prune_([rankable(w) for w in weights], masks, amount=amount, k=k)


def prune_each_(weights: list[torch.Tensor], masks: list[torch.Tensor], *, amounts=None, ks=None) -> None:
    """Prune each tensor by its own fraction (``amounts``) or count (``ks``) of its alive entries, in place."""
    from lthfast import threshold

    counts = amounts if amounts is not None else ks
    keep = [i for i, c in enumerate(counts) if c > 0]
    if not keep:
        return
    per = [counts[i] for i in keep]
    threshold.prune_(
        [rankable(weights[i]) for i in keep],
        [masks[i] for i in keep],
        amount=per if amounts is not None else None,
        k=per if ks is not None else None,
        layerwise=True,
    )


def to_masks(pairs: list[tuple[Layer, torch.Tensor]], new: list[torch.Tensor]) -> Masks:
    return Masks((layer.name, m) for (layer, _), m in zip(pairs, new))
