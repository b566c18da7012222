"""Pruning strategies: pure functions (model, masks, ...) -> new Masks (and ``magnitude_``, in place).

Common rules: inputs are never modified; only alive weights are ranked and masks only shrink; every check
(fraction range, unknown names, mask shape / dtype / device, NaN weights, fully pruned layers asked to prune by
a rate of their own: layer-wise or an override) runs before anything is computed, and errors name the layer. In
a global ranking a fully pruned layer has nothing to rank and is passed over (global IMP can empty a layer, and
the next round goes on, as with torch.nn.utils.prune.global_unstructured). Magnitude ranking goes through
``lthfast.threshold`` (exact counts ``round(fraction * alive)`` like torch.nn.utils.prune; ties broken by
position, so results are deterministic). Random strategies draw from the given ``torch.Generator`` only, so
the same seed gives bitwise-identical masks.

Per-layer rates (``overrides``: {name pattern: rate}): a number is that layer's own fraction; a string
"x0.5" multiplies the base fraction (Frankle & Carbin prune the output layer at half the rate). An
overridden layer is pruned by exactly its own rate, the other layers share the (global or layer-wise)
ranking at the base fraction. ``leave_dense`` patterns are not pruned (their masks are returned unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lthfast.pruning._common import (
    RANKABLE_DTYPES,
    check_can_prune,
    check_can_prune_all,
    is_multiplier,
    matched,
    naming_bad_weights,
    overrides_by_name,
    parse_rate,
    prune_each_,
    prune_global_,
    resolve,
    to_masks,
)
from lthfast.pruning.layers import all_layers, check_fraction
from lthfast.pruning.masks import Masks
from lthfast.pruning.structured import (
    block_magnitude,
    block_prune,
    block_random_like,
    block_rearrange,
    n_m,
    n_m_prune,
    n_m_random_like,
)

__all__ = [
    "magnitude", "magnitude_", "one_shot", "random", "random_like", "rearrange", "block_magnitude", "n_m",
    "block_prune", "block_random_like", "block_rearrange", "n_m_prune", "n_m_random_like",
]  # fmt: skip


def __dir__() -> list[str]:
    """dir() and tab completion list the strategies only: the helpers imported above are not API."""
    return sorted(__all__)


def _plan(pairs, fraction: float, overrides, leave_dense, what: str, rate_of=parse_rate):
    """Split layers into the shared ranking and the overridden ones: (shared indices, {index: rate})."""
    names = [layer.name for layer, _ in pairs]
    dense = matched(leave_dense, names, f"{what} leave_dense")
    raw = overrides_by_name(overrides, names, what)
    own = {i: rate_of(raw[n], fraction, f"{what} override for {n!r}") for i, n in enumerate(names) if n in raw}
    shared = [i for i, n in enumerate(names) if n not in dense and i not in own]
    own = {i: r for i, r in own.items() if names[i] not in dense}
    return shared, own


def magnitude(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    fraction: float,
    *,
    layerwise: bool = False,
    overrides: Mapping[str, float | str] | None = None,
    leave_dense: str | Iterable[str] = (),
) -> Masks:
    """Prune ``fraction`` of the currently alive weights by magnitude; returns new Masks.

    ``masks`` (None: all alive for every prunable weight) selects the layers. Global ranking over all of
    them by default; ``layerwise=True`` prunes each layer by ``fraction`` of its own alive weights.
    """
    fraction = check_fraction(fraction, "magnitude")
    pairs = resolve(model, masks, "magnitude")
    shared, own = _plan(pairs, fraction, overrides, leave_dense, "magnitude")
    asked = (shared if fraction > 0 and layerwise else []) + [i for i, rate in own.items() if rate > 0]
    check_can_prune_all([pairs[i] for i in asked], "magnitude")
    new = [m.clone() for _, m in pairs]
    weights = [layer.param.detach() for layer, _ in pairs]
    with naming_bad_weights(pairs):
        if layerwise:
            each = {**{i: fraction for i in shared}, **own}
        else:
            prune_global_([weights[i] for i in shared], [new[i] for i in shared], amount=fraction)
            each = own
        idx = sorted(each)
        prune_each_([weights[i] for i in idx], [new[i] for i in idx], amounts=[each[i] for i in idx])
    return to_masks(pairs, new)


def magnitude_(
    model: nn.Module,
    fraction: float,
    *,
    layerwise: bool = False,
    overrides: Mapping[str, float | str] | None = None,
    leave_dense: str | Iterable[str] = (),
) -> nn.Module:
    """In place: prune ``fraction`` of the alive weights of ``model``'s prunable layers, by magnitude.

    A layer's alive weights are those its mask holds (a masked module's ``mask``, a torch-pruned module's
    ``weight_mask``); a layer without a mask (plain nn.Linear / nn.Conv2d, or a subclass ``sparsify`` left as
    it was) is pruned by zeroing, so its zero weights count as pruned and the others as alive. The same masks and
    zeroed weights as ``magnitude(model, held, ...).apply_(model)`` with those masks (``Masks.from_model`` plus
    ``weight != 0`` for the plain layers) on a model whose pruned weights are already zero (as ``apply_``,
    ``Snapshot.rewind_`` and ``mask_optimizer`` leave them); weights pruned before this call are not re-read or
    re-zeroed (``Masks.apply_`` does that). Returns ``model``.

    When every prunable layer is an lthfast masked layer with float32/float16/bfloat16 weights, one
    ``lthfast.threshold.prune_`` call (two with overrides in global mode: the shared ranking, then the
    overridden layers) ranks, clears the modules' own mask buffers and zeroes the weights it prunes in the same
    pass: no mask copies and no extra pass over every weight (benchmarks/bench_prune_step.py). Other models
    take the functional route above. Every check runs before any mask changes, as in ``magnitude`` (the
    overridden layers' NaN check included, so the second call cannot fail after the first has written).
    """
    fraction = check_fraction(fraction, "magnitude_")
    layers = all_layers(model)
    params = [layer.param for layer in layers]
    fast = bool(layers) and all(
        layer.layout == "masked" and p.dtype in RANKABLE_DTYPES for layer, p in zip(layers, params)
    )
    if not fast:
        # In the model's layer order (ties are broken by it): a plain layer's mask is its nonzero weights, else a
        # second call would rank the zeros of the first again and prune nothing new.
        held = Masks((layer.name, _held_mask(layer)) for layer in layers)
        new = magnitude(model, held, fraction, layerwise=layerwise, overrides=overrides, leave_dense=leave_dense)
        new.apply_(model)
        return model
    pairs = [(layer, layer.module._buffers["mask"]) for layer in layers]  # (the masked layers' own buffers)
    shared, own = _plan(pairs, fraction, overrides, leave_dense, "magnitude_")
    shared = shared if fraction > 0 else []
    own = {i: rate for i, rate in own.items() if rate > 0}
    if layerwise:  # (in the global ranking an emptied layer is passed over); NaN: the threshold checks
        check_can_prune_all([pairs[i] for i in shared], "magnitude_")
    for i in own:
        check_can_prune(pairs[i][0], pairs[i][1], "magnitude_", finite=not layerwise)
    from lthfast import threshold

    def prune(ids, amount, each):
        # (prune_ detaches the weights itself)
        threshold.prune_([params[i] for i in ids], [pairs[i][1] for i in ids], amount=amount, layerwise=each,
                         zero_weights=True)  # fmt: skip

    with torch.no_grad(), naming_bad_weights(pairs):
        if layerwise:  # one call: every layer its own k
            each = {**{i: fraction for i in shared}, **own}
            if each:
                prune(sorted(each), [each[i] for i in sorted(each)], True)
        else:
            if shared:
                prune(shared, fraction, False)
            if own:
                prune(sorted(own), [own[i] for i in sorted(own)], True)
    return model


def _held_mask(layer) -> torch.Tensor:
    mask = layer.current_mask()
    return layer.param.detach() != 0 if mask is None else mask.clone()


def _density_rate(value, density: float, where: str) -> float:
    """one_shot override: a number is the layer's target density; "x0.5" prunes 0.5 x (1 - density)."""
    if is_multiplier(value):
        return 1.0 - parse_rate(value, 1.0 - density, where)
    return parse_rate(value, density, where)


def one_shot(
    model: nn.Module,
    density: float,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    layerwise: bool = False,
    overrides: Mapping[str, float | str] | None = None,
    leave_dense: str | Iterable[str] = (),
) -> Masks:
    """Prune by magnitude straight to ``density`` (fraction of weights remaining) in one call; new Masks.

    Global: the shared layers keep ``round(density * their total size)`` weights between them; layer-wise:
    each keeps ``round(density * its size)``. Overrides give a layer its own target density (a number) or
    scale its pruned fraction ("x0.5": density 1 - 0.5 (1 - density)). A target above the current density
    raises (masks only shrink).
    """
    density = check_fraction(density, "one_shot density")
    pairs = resolve(model, masks, "one_shot")
    shared, own = _plan(pairs, density, overrides, leave_dense, "one_shot", rate_of=_density_rate)
    alive = [int(m.sum()) for _, m in pairs]
    total = [m.numel() for _, m in pairs]

    def count(indices, target, where, ranked):
        k = sum(alive[i] for i in indices) - round(target * sum(total[i] for i in indices))
        if k < 0:
            raise ValueError(f"one_shot: {where} is already below density {target} (masks only shrink)")
        for i in indices if k > 0 else []:
            check_can_prune(pairs[i][0], pairs[i][1], "one_shot", finite=False, ranked=ranked)
        return k

    groups = [[i] for i in shared] if layerwise else ([shared] if shared else [])
    targets = [density] * len(groups)
    ranked = [not layerwise] * len(groups)
    for i, target in own.items():
        groups.append([i])
        targets.append(target)
        ranked.append(False)
    names = [layer.name for layer, _ in pairs]
    ks = [
        count(g, t, names[g[0]] if len(g) == 1 else "the global ranking", r) for g, t, r in zip(groups, targets, ranked)
    ]
    new = [m.clone() for _, m in pairs]
    weights = [layer.param.detach() for layer, _ in pairs]
    with naming_bad_weights(pairs):
        singles = [g[0] for g in groups if len(g) == 1]
        prune_each_(
            [weights[i] for i in singles], [new[i] for i in singles], ks=[k for g, k in zip(groups, ks) if len(g) == 1]
        )
        for group, k in zip(groups, ks):
            if len(group) > 1:
                prune_global_([weights[i] for i in group], [new[i] for i in group], k=k)
    return to_masks(pairs, new)


def _randperm(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def _check_generator(generator, what: str) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{what}: generator must be a torch.Generator (for reproducible masks), got {generator!r}")


def _prune_random_(mask: torch.Tensor, k: int, generator: torch.Generator) -> None:
    """Set ``k`` uniformly chosen alive entries of ``mask`` to False, in place."""
    if k <= 0:
        return
    alive = mask.reshape(-1).nonzero().squeeze(1)
    chosen = alive[_randperm(alive.numel(), generator, mask.device)[:k]]
    mask.view(-1)[chosen] = False


def random(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    fraction: float,
    *,
    generator: torch.Generator,
    layerwise: bool = False,
    leave_dense: str | Iterable[str] = (),
) -> Masks:
    """Prune ``fraction`` of the alive weights uniformly at random (global or per layer); new Masks.

    Global: ``round(fraction * alive)`` weights chosen uniformly among all alive ones of the non-dense
    layers (one permutation of the total alive count, then per-layer draws).
    """
    _check_generator(generator, "random")
    fraction = check_fraction(fraction, "random")
    pairs = resolve(model, masks, "random")
    shared, _ = _plan(pairs, fraction, None, leave_dense, "random")
    for i in shared if fraction > 0 else []:
        check_can_prune(pairs[i][0], pairs[i][1], "random", ranked=not layerwise)
    new = [m.clone() for _, m in pairs]
    alive = [int(new[i].sum()) for i in shared]
    if layerwise:
        counts = [round(fraction * a) for a in alive]
    else:
        # Which layers the k pruned weights fall in: a uniform k-subset of the concatenated alive weights.
        k = round(fraction * sum(alive))
        picked = _randperm(sum(alive), generator, torch.device("cpu"))[:k]
        bounds = torch.tensor(alive, dtype=torch.int64).cumsum(0)
        counts = torch.bincount(torch.bucketize(picked, bounds, right=True), minlength=len(alive)).tolist()
    for i, k in zip(shared, counts):
        _prune_random_(new[i], k, generator)
    return to_masks(pairs, new)


def random_like(reference_masks: Mapping[str, torch.Tensor], *, generator: torch.Generator) -> Masks:
    """Fresh masks with each layer's alive count of ``reference_masks`` at uniformly random positions."""
    _check_generator(generator, "random_like")
    reference = reference_masks if isinstance(reference_masks, Masks) else Masks(reference_masks)
    out = Masks()
    for name, mask in reference.items():
        fresh = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        fresh[_randperm(mask.numel(), generator, mask.device)[: int(mask.sum())]] = True
        out[name] = fresh.view(mask.shape)
    return out


def rearrange(masks: Mapping[str, torch.Tensor], *, generator: torch.Generator) -> Masks:
    """Shuffle each layer's mask entries (a uniform random permutation per layer: same per-layer counts).

    For unstructured masks this is the same distribution as ``random_like`` (uniform positions at each layer's
    count; the "random pruning" control): the two differ only in the random draw. Kept under the name of the
    sanity-check papers' "layerwise rearrange" (Frankle et al. 2021, Su et al. 2020)."""
    _check_generator(generator, "rearrange")
    masks = masks if isinstance(masks, Masks) else Masks(masks)
    return Masks(
        (name, m.reshape(-1)[_randperm(m.numel(), generator, m.device)].view(m.shape)) for name, m in masks.items()
    )
