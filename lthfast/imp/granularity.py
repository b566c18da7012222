"""Structured IMP (``--block B``, ``--nm N:M``): the masks of a pruned level and of its random controls.

A structured level prunes to a count of weights, the count the unstructured schedule reaches: iterative, each
level removes ``round(fraction * alive)`` of the weights the previous level of that schedule kept (per ranking
group: the shared global ranking, each layer when layer-wise, each overridden layer at its own rate); one-shot,
``round((1 - fraction)^level * total)`` kept from the dense network. Whole blocks cannot hit that count exactly:
``block_prune`` removes the number of lowest-scoring blocks whose weights come nearest it, and a later level makes up
for an earlier one's rounding, since every target comes from the schedule rather than from the previous level's
count. ``leave_dense`` layers are never pruned. Block 1 without N:M never comes here: the unstructured path is the
one unstructured runs always took.
"""

from __future__ import annotations

import torch
from torch import nn

from lthfast.imp.config import Config
from lthfast.pruning import Masks, strategies
from lthfast.pruning._common import matched, overrides_by_name, parse_rate


def is_structured(cfg: Config) -> bool:
    return cfg.block != 1 or cfg.nm is not None


def scheduled_alive(total: int, fraction: float, level: int, one_shot: bool = False) -> int:
    """Weights the unstructured schedule keeps of ``total`` at ``level``: ``level`` times ``alive -= round(fraction *
    alive)`` (iterative, what ``strategies.magnitude`` does level by level), or ``round((1 - fraction)^level *
    total)`` (one-shot, what ``strategies.one_shot`` keeps)."""
    if one_shot:
        return round((1 - fraction) ** level * total)
    alive = total
    for _ in range(level):
        alive -= round(fraction * alive)
    return alive


def ranking_groups(cfg: Config, masks: Masks, level: int) -> list[tuple[list[str], int]]:
    """(layer names ranked together, weights they keep at ``level``) for ``block_prune`` / ``n_m_prune``."""
    names = list(masks)
    totals = {name: masks[name].numel() for name in names}
    dense = matched(cfg.leave_dense, names, "leave_dense")
    raw = overrides_by_name(dict(cfg.layer_fractions), names, "layer_fractions")
    own = {n: parse_rate(v, cfg.prune_fraction, f"layer_fractions[{n}]") for n, v in raw.items() if n not in dense}
    shared = [n for n in names if n not in dense and n not in own]
    keep = lambda group, rate: scheduled_alive(sum(totals[n] for n in group), rate, level, cfg.one_shot)  # noqa: E731
    if cfg.layerwise:
        groups = [([n], keep([n], cfg.prune_fraction)) for n in shared]
    else:
        groups = [(shared, keep(shared, cfg.prune_fraction))] if shared else []
    return groups + [([n], keep([n], rate)) for n, rate in own.items()]


def level_masks(cfg: Config, model: nn.Module, masks: Masks, level: int) -> Masks:
    """The masks of ``level`` from ``model``'s weights and its current ``masks`` (the previous level's, or the dense
    level's all-alive masks for one-shot), at the run's granularity."""
    groups = ranking_groups(cfg, masks, level)
    if cfg.nm is not None:
        n, m = cfg.nm_pair()
        return strategies.n_m_prune(model, masks, groups, n=n, m=m)
    return strategies.block_prune(model, masks, groups, block=cfg.block)


def control_masks(cfg: Config, ticket: Masks, control: str, generator: torch.Generator) -> Masks:
    """The random_prune / rearrange control's masks at the run's granularity: the ticket's per-layer block counts at
    random block positions (random_prune) or its blocks shuffled (rearrange); for N:M, the ticket's count in every
    group of M at random positions of the group (both controls: two draws of one distribution)."""
    if cfg.nm is not None:
        return strategies.n_m_random_like(ticket, m=cfg.nm_pair()[1], generator=generator)
    if control == "random_prune":
        return strategies.block_random_like(ticket, block=cfg.block, generator=generator)
    return strategies.block_rearrange(ticket, block=cfg.block, generator=generator)
