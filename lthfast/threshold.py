"""Global and layer-wise magnitude thresholds: which k alive weights to prune, and the mask update.

Semantics (identical on every implementation, thread count and device):

* key of a weight: its magnitude as float32 (exact for float32, float16, bfloat16 weights); with ``scales``,
  ``float32(|w|) * float32(scale)`` computed as one IEEE float32 multiply (round to nearest, ties to even;
  a product past the float32 range becomes +inf and ranks last).
* alive: mask nonzero (bool or uint8 masks; ``masks=None`` means every weight is alive). Only alive weights
  are ranked; masks only ever shrink.
* count: ``k`` as given, or ``k = round(amount * alive)`` with Python's ``round`` (half to even) of the
  float64 product, exactly as ``torch.nn.utils.prune._compute_nparams_toprune`` (e.g. 0.5 * 5 -> 2,
  0.5 * 7 -> 4). ``amount`` is always a fraction in [0, 1] (an int 1 means 100%, unlike torch's int amounts:
  pass counts as ``k``).
* order: alive weights ranked by (key, tensor index, row-major flat index); the first k are pruned. So among
  equal keys, lower tensor indices are pruned first, then lower flat indices.
* threshold: the largest pruned key (a Python float; the scaled key when scales are given). Every alive key
  below it is pruned, every alive key above it is kept, keys equal to it are pruned in the order above until
  k are pruned. ``-inf`` when k == 0 (nothing is pruned).
* layer-wise mode: each tensor is its own group (its own k from its own alive count); amount/k may be one
  scalar for all tensors or a per-tensor list. prune_ then returns a list of per-tensor thresholds.

Implementations: CPU tensors use the C++ extension ``lthfast._C`` (a bracketed radix select: a sample, one
counting pass over the weights that also keeps the ~2% of alive weights near the threshold and a bitset of
those below them, then one pass over masks and bitset only, or a second pass over the weights when the
sample misleads; no sort, no concatenation, no float copy of the weights) when it is built, else the torch
radix path; CUDA tensors use the torch radix path (per-tensor histograms with torch ops, no concatenation,
no host round trip except the one that reads the alive counts for validation and the
final threshold). ``lthfast.reference.threshold_prune`` is the sort-based oracle they all match bit for bit.

Bad input raises before any mask changes, naming the tensor index: NaN/Inf among a tensor's alive weights,
amount outside [0, 1], k negative or above the alive count, both or neither of amount and k, mask shape,
dtype or device mismatch, mixed devices, unsupported dtypes, bad scales. Non-contiguous weights and masks
work (the C++ path copies them to contiguous memory first, an extra 4 bytes per element of those tensors).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from lthfast import _backend

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MASK_DTYPES = (torch.bool, torch.uint8)
IMPLEMENTATIONS = ("cpp", "torch")


def global_threshold(tensors, masks=None, amount=None, k=None, scales=None) -> tuple[float, int]:
    """Threshold of global magnitude pruning, without changing anything.

    tensors: sequence of float32/float16/bfloat16 tensors (any shapes, empty ones included) on one device.
    masks: None (all alive) or one bool/uint8 tensor per weight, same shape and device.
    amount (fraction of the alive weights, in [0, 1]) xor k (count): how many to prune.
    scales: None or one non-negative finite float per tensor (ranks that tensor as if its magnitudes were
    scaled). Returns (threshold, k): the largest key that prune_ would prune (-inf when k == 0) and the count
    it would prune. See the module docstring for the exact semantics.
    """
    thresholds, count = _select(tensors, masks, amount, k, scales, layerwise=False, write=False)
    return thresholds[0], count


def prune_(tensors, masks, amount=None, k=None, scales=None, layerwise=False, zero_weights=False):
    """Prune the k smallest-magnitude alive weights: clears their entries in ``masks`` in place.

    Same arguments as ``global_threshold``; masks are required (bool or uint8, updated in place; pruned
    entries become 0/False, other entries keep their value). With ``layerwise=True`` each tensor is pruned
    by its own amount/k of its own alive weights (scalar for all or a per-tensor list). With
    ``zero_weights=True`` the tensors' entries pruned by this call are also set to +0.0 in place, in the
    same pass (entries dead before the call are left as they are). Returns (threshold, pruned count):
    threshold is a float, or a list of per-tensor floats in layer-wise mode.
    """
    if masks is None:
        raise TypeError("prune_: masks are required (they are updated in place)")
    thresholds, count = _select(
        tensors, masks, amount, k, scales, layerwise=layerwise, write=True, zero_weights=zero_weights
    )
    return (thresholds if layerwise else thresholds[0]), count


def _select(
    tensors, masks, amount, k, scales, *, layerwise, write, impl=None, threads=None, grain=None, zero_weights=False
):
    """Validates, then runs one implementation ("cpp" or "torch"; None: by device). Returns (thresholds, k)."""
    tensors, masks = _check_tensors(tensors, masks)
    n = len(tensors)
    groups = [[i] for i in range(n)] if layerwise else [list(range(n))]
    amounts, ks = _check_counts(amount, k, len(groups), layerwise)
    scales = _check_scales(scales, n)
    device = tensors[0].device if tensors else torch.device("cpu")
    if impl is None:
        impl = "cpp" if device.type == "cpu" and _backend.ext() is not None else "torch"
    if impl == "cpp":
        if device.type != "cpu" or _backend.ext() is None:
            raise RuntimeError(f"lthfast.threshold: the C++ path needs lthfast._C and CPU tensors (got {device})")
        thresholds, counts = _select_cpp(
            tensors, masks, groups, amounts, ks, scales, layerwise, write, threads, grain, zero_weights
        )
    elif impl == "torch":
        thresholds, counts = _select_torch(tensors, masks, groups, amounts, ks, scales, layerwise, write, zero_weights)
    else:
        raise ValueError(f"unknown threshold implementation {impl!r}: expected one of {IMPLEMENTATIONS}")
    return thresholds, sum(counts)


# ---- validation: everything is checked before any mask is touched ----


def _check_tensors(tensors, masks):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError("tensors must be a list or tuple of tensors")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"tensor {i} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    all_cpu = all(t.is_cpu for t in tensors)  # then no device objects to compare (~1 us each)
    for i, t in enumerate([] if all_cpu else tensors):
        if t.device != tensors[0].device:
            raise ValueError(f"tensor {i} is on {t.device} but tensor 0 is on {tensors[0].device}: mixed devices")
    if masks is None:
        return tensors, None
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence):
        raise TypeError("masks must be None or a list or tuple of tensors")
    masks = list(masks)
    if len(masks) != len(tensors):
        raise ValueError(f"got {len(masks)} masks for {len(tensors)} tensors")
    for i, (t, m) in enumerate(zip(tensors, masks)):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask {i} is a {type(m).__name__}, not a torch.Tensor")
        if m.dtype not in _MASK_DTYPES:
            raise TypeError(f"mask {i} has dtype {m.dtype}; masks are bool or uint8")
        if m.shape != t.shape:
            raise ValueError(f"mask {i} has shape {tuple(m.shape)} but tensor {i} has shape {tuple(t.shape)}")
        if not (all_cpu and m.is_cpu) and m.device != t.device:
            raise ValueError(f"mask {i} is on {m.device} but tensor {i} is on {t.device}")
    return tensors, masks


def _per_group(value, ngroups: int, layerwise: bool, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not layerwise:
            raise TypeError(f"{name} must be a scalar in global mode (lists are for layerwise=True)")
        if len(value) != ngroups:
            raise ValueError(f"{name} has {len(value)} entries for {ngroups} tensors")
        return list(value)
    return [value] * ngroups


def _check_counts(amount, k, ngroups: int, layerwise: bool):
    if (amount is None) == (k is None):
        raise ValueError("give exactly one of amount= (fraction of the alive weights) and k= (count)")
    where = (lambda i: f" for tensor {i}") if layerwise else (lambda i: "")
    if amount is not None:
        amounts = _per_group(amount, ngroups, layerwise, "amount")
        for i, a in enumerate(amounts):
            if isinstance(a, bool) or not isinstance(a, numbers.Real):
                raise TypeError(f"amount{where(i)} must be a real number, got {a!r}")
            if not 0.0 <= float(a) <= 1.0:
                raise ValueError(f"amount={a!r}{where(i)} is outside [0, 1]")
        return [float(a) for a in amounts], None
    ks = _per_group(k, ngroups, layerwise, "k")
    for i, c in enumerate(ks):
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"k{where(i)} must be an integer, got {c!r}")
        if c < 0:
            raise ValueError(f"k={c}{where(i)} is negative")
    return None, [int(c) for c in ks]


def _check_scales(scales, n: int):
    if scales is None:
        return None
    if isinstance(scales, torch.Tensor) or not isinstance(scales, Sequence) or len(scales) != n:
        raise ValueError(f"scales must be a list of {n} floats, one per tensor")
    out = []
    for i, s in enumerate(scales):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(f"scales[{i}] (tensor {i}) must be a real number, got {s!r}")
        s32 = torch.tensor(float(s), dtype=torch.float32)
        if not (torch.isfinite(s32) and s32 >= 0):
            raise ValueError(f"scales[{i}]={s!r} (tensor {i}) must be finite in float32 and >= 0")
        out.append(float(s32))
    return out


def _check_found(groups, alive, ks, bad_tensors, layerwise: bool) -> None:
    """Errors only known after counting: NaN/Inf weights, k above the alive count."""
    if bad_tensors:
        raise ValueError(f"tensor {bad_tensors[0]} holds NaN or Inf among its alive weights (tensors {bad_tensors})")
    for g, ids in enumerate(groups):
        if ks[g] > alive[g]:
            what = f"tensor {ids[0]}'s" if layerwise else "the"
            raise ValueError(f"k={ks[g]} exceeds {what} {alive[g]} alive weights")


# ---- the C++ path ----


def _contiguous(ts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[bool]]:
    """The tensors detached and contiguous, and which of them had to be copied to be."""
    out = [t.detach() for t in ts]
    copied = [not t.is_contiguous() for t in out]
    return [t.contiguous() if c else t for t, c in zip(out, copied)], copied


def _select_cpp(tensors, masks, groups, amounts, ks, scales, layerwise, write, threads, grain, zero_weights):
    weights, weights_copied = _contiguous(tensors)
    work, work_copied = (None, None) if masks is None else _contiguous(masks)
    # The C++ pass may prune in place before it has checked every weight (undone if the call fails): only with
    # bool masks (an undone mask byte is put back as 1), and where no two buffers share memory (checked there).
    speculate = zero_weights and write and all(m.dtype == torch.bool for m in work)
    res = _backend.ext().select(
        [w.data_ptr() for w in weights],
        [0] * len(weights) if work is None else [m.data_ptr() for m in work],
        [w.numel() for w in weights],
        [_DTYPE_CODES[w.dtype] for w in weights],
        scales or [],
        groups,
        amounts or [],
        ks or [],
        write,
        torch.get_num_threads() if threads is None else threads,
        1 << 16 if grain is None else grain,
        zero_weights,
        speculate,
    )
    _check_found(groups, res["alive"], res["k"], res["bad_tensors"], layerwise)
    if write:
        # Copies (non-contiguous masks, and weights when zeroing) go back with copy_, an in-place op that bumps
        # the version itself. The others were written through raw pointers: their version counters are bumped
        # as an in-place op would (a detached tensor shares its source's), so that caches keyed on them (the
        # masked layers' tile index and block plans) cannot serve the masks from before.
        back = list(zip(masks, work, work_copied))
        if zero_weights:
            back += zip(tensors, weights, weights_copied)
        bump = []
        for t, w, copied in back:
            if copied:
                t.detach().copy_(w)
            else:
                bump.append(w)
        torch.autograd.graph.increment_version(bump)
    return res["threshold"], res["k"]


# ---- the torch radix path (CUDA, and CPU without the extension) ----


def _keys(t: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Flat int32 key bits (row-major order) of one tensor."""
    keys = t.detach().reshape(-1).abs().to(torch.float32)
    if scale is not None:
        keys = keys * torch.tensor(scale, dtype=torch.float32, device=keys.device)
    return keys.view(torch.int32)


def _alive(t: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    if m is None:
        return torch.ones(t.numel(), dtype=torch.bool, device=t.device)
    return m.reshape(-1) != 0


def _histogram(digits: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of int64 digits in [0, bins]; bin `bins` collects the dead elements. Stays on the device."""
    hist = torch.zeros(bins + 1, dtype=torch.int64, device=digits.device)
    return hist.index_add_(0, digits, torch.ones(1, dtype=torch.int64, device=digits.device).expand_as(digits))


def _locate(hist: torch.Tensor, rank) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket holding the rank-th (1-based) counted element, and the count in buckets below it (0-d tensors)."""
    cum = hist[:-1].cumsum(0)
    below = cum < rank
    return below.sum(), torch.where(below, cum, 0).max()


def _select_torch(tensors, masks, groups, amounts, ks, scales, layerwise, write, zero_weights=False):
    n = len(tensors)
    mask_of = (lambda i: None) if masks is None else (lambda i: masks[i])
    scale_of = (lambda i: None) if scales is None else (lambda i: scales[i])
    if n == 0:
        return [float("-inf")] * len(groups), [0] * len(groups)
    # The one unavoidable host read before selection: alive counts (for k) and NaN/Inf flags (to raise).
    stats = []
    for i, t in enumerate(tensors):
        alive = _alive(t, mask_of(i))
        bad = (~torch.isfinite(t.detach().reshape(-1)) & alive).any()
        stats.append(torch.stack([alive.sum(), bad.to(torch.int64)]))
    stats = torch.stack(stats).tolist()
    alive_t = [s[0] for s in stats]
    alive_g = [sum(alive_t[i] for i in ids) for ids in groups]
    counts = ks if ks is not None else [round(a * alive_g[g]) for g, a in enumerate(amounts)]
    _check_found(groups, alive_g, counts, [i for i, s in enumerate(stats) if s[1]], layerwise)
    thresholds = []
    for ids, count in zip(groups, counts):
        if count == 0:
            thresholds.append(None)
            continue
        thresholds.append(_radix_select(tensors, [mask_of(i) for i in ids], ids, count, scale_of, write, zero_weights))
    bits = [t for t in thresholds if t is not None]
    values = iter(torch.stack(bits).to(torch.int32).view(torch.float32).tolist() if bits else [])
    return [float("-inf") if t is None else next(values) for t in thresholds], counts


def _radix_select(tensors, masks, ids, count, scale_of, write, zero_weights=False) -> torch.Tensor:
    """Key bits (0-d int64 tensor) of the count-th smallest alive key of tensors[ids]; clears masks if write.

    Two histogram passes (16 + 15 key bits) find the key T and the number r of its ties to prune; a third
    pass clears alive keys < T and the first r ties in (tensor, flat index) order (a running cumsum).
    """
    hist = None
    for i, m in zip(ids, masks):
        key, alive = _keys(tensors[i], scale_of(i)), _alive(tensors[i], m)
        h = _histogram(torch.where(alive, key >> 15, 1 << 16).long(), 1 << 16)
        hist = h if hist is None else hist + h
    high, below = _locate(hist, count)
    rank = count - below
    hist = None
    for i, m in zip(ids, masks):
        key, alive = _keys(tensors[i], scale_of(i)), _alive(tensors[i], m)
        h = _histogram(torch.where(alive & ((key >> 15) == high), key & 0x7FFF, 1 << 15).long(), 1 << 15)
        hist = h if hist is None else hist + h
    low, below_low = _locate(hist, rank)
    threshold = high * (1 << 15) + low
    ties_to_prune = rank - below_low
    if write:
        ties_before = torch.zeros((), dtype=torch.int64, device=threshold.device)
        for i, m in zip(ids, masks):
            key, alive = _keys(tensors[i], scale_of(i)), _alive(tensors[i], m)
            tie = alive & (key == threshold)
            tie_rank = torch.cumsum(tie, 0) + ties_before
            prune = (alive & (key < threshold)) | (tie & (tie_rank <= ties_to_prune))
            ties_before = ties_before + tie.sum()
            m.masked_fill_(prune.view(m.shape), 0)
            if zero_weights:
                tensors[i].detach().masked_fill_(prune.view(m.shape), 0)
    return threshold
