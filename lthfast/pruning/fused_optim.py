"""MaskedSGD, MaskedAdam, MaskedAdamW: torch.optim's SGD / Adam / AdamW whose step touches only the alive weights.

They are subclasses of torch's optimizers: the same arguments (plus where the masks come from), param_groups, state
keys (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and state_dict, which loads
into torch's optimizer and back. State tensors are dense and weight-shaped, exactly zero where the weight is pruned.

One lthfast._C call per step updates every float32 CPU parameter (csrc/sparse_optim.cpp): a masked weight at the flat
offsets of its alive entries (cached on the mask), or, under a dense mask (at least ``MASKED_DENSITY`` alive), at
every entry with the gradient read as zero where pruned; a parameter without a mask (a bias) at every entry. Each
element goes through torch's single-tensor (foreach=False) float32 operations in torch's order, so weights and state
equal torch's bit for bit on the alive entries. The gradient is never read where the weight is pruned.

When a mask changes (in place, ``module.mask = new``, ``load_state_dict``), when a weight is written outside the
optimizer (e.g. rewound) or when state is loaded, the next step first zeroes the pruned entries of that weight and
of its state: O(weight) once per change, not per step.

Stepped by torch's own step instead, with the pruned entries zeroed after every step: parameters that are not
float32, not on the CPU, or not contiguous, or whose gradient is sparse or not contiguous; groups with a Tensor lr,
``capturable``, ``differentiable`` or ``fused=True``; steps under a GradScaler's ``grad_scale``; everything when
lthfast._C is not built.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import _get_scalar_dtype, _use_grad_for_differentiable

from lthfast import _backend
from lthfast.indexing import cached_on_mask
from lthfast.nn import check_mask
from lthfast.pruning.layers import Layer, all_layers, zero_pruned_

# At or above this alive fraction a masked weight is stepped at every entry (vectorized) rather than gathered at
# its alive offsets.
MASKED_DENSITY = 0.3

_DENSE, _MASKED, _SPARSE32, _SPARSE64, _FLAG = 0, 1, 2, 3, 4
_F32, _STRIDED = torch.float32, torch.strided


class _Alive(NamedTuple):
    """What the step needs of one mask: the contiguous bool mask and where the kernel reads (``kind``, ``index``,
    ``count``: the flat alive offsets, or the mask itself for a dense one)."""

    mask: torch.Tensor
    kind: int
    index: torch.Tensor
    count: int


class _StepPlan(NamedTuple):
    """A fused step's sorted parameters and what they were sorted from (``_FusedMasked._planned``)."""

    groups: tuple  # (group dict, its params, its state signature) per param group
    idle: tuple  # parameters that had no gradient
    entries: list  # per fused parameter: [p, version, address, storage, where its mask is found (_mask_source),
    #                mask, its version, address, storage, state dict, its items, state tensors, their versions]
    fused: list
    where: tuple  # _where(fused): the kernel's index, kind, count and group lists


def _build_alive(raw: torch.Tensor) -> _Alive:
    mask = _as_bool(raw).contiguous()
    flat = mask.numpy().reshape(-1)
    if np.count_nonzero(flat) >= MASKED_DENSITY * flat.size:
        return _Alive(mask, _MASKED, mask, flat.size)
    offsets = np.flatnonzero(flat)
    wide = flat.size >= 2**31
    index = torch.from_numpy(offsets if wide else offsets.astype(np.int32))
    return _Alive(mask, _SPARSE64 if wide else _SPARSE32, index, offsets.size)


def _alive_of(raw: torch.Tensor) -> _Alive:
    """The ``_Alive`` of a CPU mask (bool, or torch.nn.utils.prune's float ``weight_mask``), cached on it."""
    return cached_on_mask(raw, ("fused optimizer",), lambda: _build_alive(raw))


def _as_bool(raw: torch.Tensor) -> torch.Tensor:
    return raw if raw.dtype == torch.bool else raw != 0


def _state_ok(t, p: torch.Tensor) -> bool:
    """Whether the kernel can take state tensor ``t`` of ``p``: contiguous float32 on the CPU, ``p``'s shape (or a
    0-dim float32 / float64 Adam step)."""
    if not isinstance(t, torch.Tensor) or not t.is_cpu or t.layout is not _STRIDED:
        return False
    if t.dim() == 0:
        return t.dtype in (torch.float32, torch.float64) and not t.requires_grad
    return t.dtype is _F32 and t.shape == p.shape and t.is_contiguous()


def stamp(t: torch.Tensor) -> tuple:
    """What stays equal while the contents of ``t`` do not change: ``contents_stamp`` (version and address) and the
    storage by identity (a weak reference), since two ``t.data = new`` swaps can hand the second storage the freed
    address of the first without moving the version. Writes through ``t.data[...]`` or a NumPy view change none of
    these (see MaskedLinear's docstring)."""
    return t._version, t.data_ptr(), weakref.ref(t.untyped_storage())


def _stamps(tensors) -> list:
    return [stamp(t) for t in tensors]


def _same(a: tuple, b: tuple) -> bool:
    """Whether two tuples hold the same tensor objects."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _held_mask(layer: Layer, p: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
    """(whether ``layer``'s module still holds ``p`` as its weight, the mask it holds for it or None)."""
    module = layer.module
    if module._parameters.get("weight_orig") is p and "weight_mask" in module._buffers:
        return True, module._buffers["weight_mask"]
    if module._parameters.get("weight") is p:
        return True, module._buffers.get("mask") if layer.layout == "masked" else None
    return False, None


def _mask_source(layer: Layer | None, p: torch.Tensor) -> tuple | None:
    """Where ``_held_mask`` found the mask of ``p``: (module, parameter name, buffer name or None), checked by identity
    in a planned step; None for a parameter whose mask cannot move (explicit, or no layer)."""
    if layer is None:
        return None
    module = layer.module
    if module._parameters.get("weight_orig") is p and "weight_mask" in module._buffers:
        return module, "weight_orig", "weight_mask"
    return module, "weight", "mask" if layer.layout == "masked" else None


def _plain_number(*values) -> bool:
    return not any(isinstance(v, torch.Tensor) for v in values)


_sqrt_ready = False


def _match_torch_sqrt(ext) -> None:
    """Make adam_step's square root torch.sqrt's: MKL's where torch uses it (a probe tells), else IEEE sqrt."""
    global _sqrt_ready
    if _sqrt_ready:
        return
    probe = torch.linspace(1e-6, 10.0, 4099)
    want, got = probe.sqrt(), torch.empty_like(probe)
    for mode in (1, 0):
        try:
            ext.optim_sqrt(mode, probe.data_ptr(), got.data_ptr(), probe.numel())
        except RuntimeError:  # no MKL in this torch
            continue
        if torch.equal(got, want):
            break
    _sqrt_ready = True


def _closure_loss(closure):
    """The loss of ``closure`` evaluated with gradients enabled (torch's step prologue), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _FusedMasked:
    """What MaskedSGD / MaskedAdam share: where each weight's mask is, the once-per-change zeroing, the torch path.

    Dicts are keyed by ``id(p)`` (a tensor's hash is a Python call) and their values hold ``p``. ``_records``, written
    after each fused step of ``p``: (``p``, its ``_Alive`` or None, its stamp, its state tensors, their stamps). While
    all still hold, the state is the kernel's kind and a masked ``p``'s pruned entries and state are zero.
    """

    _torch_class: type

    def __init__(self, params, *args, model: nn.Module | None = None, masks: Mapping | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)  # torch's SGD / Adam / AdamW, next in the subclasses' MRO
        self._init_masks(model, masks)

    def _init_masks(self, model: nn.Module | None, masks: Mapping | None) -> None:
        name = type(self).__name__
        if (model is None) == (masks is None):
            raise TypeError(f"{name}: give the model (model=...) or a mapping parameter -> mask (masks=...)")
        self._model = model
        self._explicit: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layers: dict[int, Layer] = {}
        self._records: dict[int, tuple] = {}
        self._alive_cache: dict[int, tuple] = {}
        self._plan: _StepPlan | None = None
        ours = {p for group in self.param_groups for p in group["params"]}
        if masks is not None:
            if not isinstance(masks, Mapping):
                raise TypeError(f"{name}: masks must map parameters to bool masks, got {type(masks).__name__}")
            for i, (param, mask) in enumerate(masks.items()):
                if not isinstance(param, torch.Tensor) or param not in ours:
                    raise ValueError(f"{name}: masks entry {i} is keyed by something the optimizer does not hold")
                self._explicit[id(param)] = (param, check_mask(mask, param, f"{name} masks entry {i}"))
            return
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: model must be an nn.Module, got {type(model).__name__}")
        self.refresh_masks()
        masked = [layer for layer in self._layers.values() if layer.layout != "plain"]
        if masked and not any(layer.param in ours for layer in masked):
            raise ValueError(
                f"{name}: the optimizer holds none of the model's masked weights "
                f"({', '.join(layer.name for layer in masked)}): build it from this model's parameters"
            )

    def __getstate__(self):
        # torch's keeps defaults, state and param_groups only; the masks' sources go along (as pairs: ids change)
        out = super().__getstate__()
        out["_model"] = self._model
        out["_explicit_pairs"] = list(self._explicit.values())
        return out

    def __setstate__(self, state):
        model, pairs = state.pop("_model", None), state.pop("_explicit_pairs", [])
        super().__setstate__(state)
        self._model = model
        self._explicit = {id(p): (p, m) for p, m in pairs}
        self._records, self._alive_cache, self._layers = {}, {}, {}
        self._plan = None
        self.refresh_masks()

    def refresh_masks(self) -> None:
        """Look the model's masked weights up again. Needed only after ``sparsify`` / ``from_torch_prune`` converted
        modules of the model once the optimizer was built (new masks, torch.nn.utils.prune applied later and masks
        written or replaced are followed without it)."""
        self._plan = None
        if self._model is not None:
            self._layers = {id(layer.param): layer for layer in all_layers(self._model)}

    def _mask_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The mask of ``p`` now (bool, or a torch-pruned module's float ``weight_mask``), or None."""
        explicit = self._explicit.get(id(p))
        if explicit is not None:
            return explicit[1]
        layer = self._layers.get(id(p))
        if layer is None:
            return None
        found, mask = _held_mask(layer, p)
        if not found:  # the module was converted or pruned since: look again, once
            self.refresh_masks()
            layer = self._layers.get(id(p))
            mask = None if layer is None else _held_mask(layer, p)[1]
        return mask

    def _alive_for(self, p: torch.Tensor, raw: torch.Tensor) -> _Alive:
        """``_alive_of(raw)`` behind a per-parameter check of the mask's contents (cheaper than the shared cache)."""
        c = self._alive_cache.get(id(p))
        if c is not None and c[1] is raw and c[2] == stamp(raw):
            return c[3]
        alive = _alive_of(raw)
        self._alive_cache[id(p)] = (p, raw, stamp(raw), alive)
        return alive

    def _weight_state(self, p: torch.Tensor) -> list[torch.Tensor]:
        state = self.state.get(p) or {}
        return [t for t in state.values() if isinstance(t, torch.Tensor) and t.shape == p.shape and t.dim()]

    def _ready(self, p: torch.Tensor, alive: _Alive | None, state: tuple) -> bool:
        """Whether the kernel can step ``p`` with ``state``; first zeroes the pruned entries of ``p`` and its state
        when anything changed since the last fused step recorded them."""
        rec = self._records.get(id(p))
        if (
            rec is not None
            and rec[1] is alive
            and rec[2] == stamp(p)
            and _same(rec[3], state)
            and rec[4] == _stamps(state)
        ):
            return True
        if not all(_state_ok(t, p) for t in state):
            return False
        if alive is not None:
            zero_pruned_(p, alive.mask)
            for t in state:
                if t.dim():
                    zero_pruned_(t, alive.mask)
        return True

    def guards(self, p: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether the last step stepped ``p`` here under ``mask``'s current contents and nothing has written ``p``
        or its state since: its pruned entries are zero (``mask_optimizer``'s guard skips it)."""
        rec, c = self._records.get(id(p)), self._alive_cache.get(id(p))
        return (
            rec is not None
            and c is not None
            and c[1] is mask
            and c[2] == stamp(mask)
            and rec[1] is c[3]
            and rec[2] == stamp(p)
            and rec[4] == _stamps(rec[3])
            and {id(t) for t in self._weight_state(p)} <= {id(t) for t in rec[3]}
        )

    def _collect(self, group_ok, state_of) -> tuple[list, list, list]:
        """Sort the parameters with a gradient: (fused: [(group index, p, _Alive or None, state)], copies of the
        param groups restricted to what torch steps, [(p, mask)] of the masked ones among those). The last step's
        list when its plan still holds (``_planned``)."""
        planned = self._planned(group_ok)
        if planned is not None:
            return planned.fused, [], []
        self._plan = None
        ext = _backend.ext()
        fused_ok = ext is not None and hasattr(ext, "adam_step") and getattr(self, "grad_scale", None) is None
        fused, torch_groups, masked = [], [], []
        for gi, group in enumerate(self.param_groups):
            fast = fused_ok and group_ok(group)
            rest = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                raw = self._mask_of(p)
                if (
                    fast
                    and p.dtype is _F32
                    and p.is_cpu
                    and p.is_contiguous()
                    and g.layout is _STRIDED
                    and g.is_contiguous()
                    and (raw is None or raw.is_cpu)
                ):
                    state = state_of(p, group)
                    alive = None if raw is None else self._alive_for(p, raw)
                    if state is not None and self._ready(p, alive, state):
                        fused.append((gi, p, alive, state))
                        continue
                rest.append(p)
                if raw is not None:
                    masked.append((p, raw))
            if rest:
                torch_groups.append({**group, "params": rest})
        return fused, torch_groups, masked

    def _torch_step(self, groups: list[dict], masked: list) -> None:
        """torch's own step over ``groups`` (copies of param groups, restricted), then zero the pruned entries of the
        masked parameters among them and of their state."""
        if not groups:
            return
        step = self._torch_class.step
        if getattr(step, "hooked", False):  # Optimizer's hook wrapper: the hooks run once, around our own step
            step = step.__wrapped__
        saved = self.param_groups
        self.param_groups = groups
        try:
            step(self)
        finally:
            self.param_groups = saved
        for p, raw in masked:
            mask = _as_bool(raw)
            zero_pruned_(p, mask)
            for t in self._weight_state(p):
                zero_pruned_(t, mask)
            self._records.pop(id(p), None)

    def _where_of(self, fused: list) -> tuple:
        """``_where(fused)``, kept in the plan when ``fused`` is the planned list."""
        plan = self._plan
        return plan.where if plan is not None and plan.fused is fused else self._where(fused)

    @staticmethod
    def _where(fused: list) -> tuple[list, list, list, list]:
        """The kernel's index, kind, count and group lists of the fused parameters."""
        index = [0 if a is None else a.index.data_ptr() for _, _, a, _ in fused]
        kinds = [_DENSE if a is None else a.kind for _, _, a, _ in fused]
        counts = [p.numel() if a is None else a.count for _, p, a, _ in fused]
        return index, kinds, counts, [gi for gi, _, _, _ in fused]

    # -------------------------------------------------------------------------------- the step plan
    # After a step that fused every parameter with a gradient, the sorted list is kept with what it was built from;
    # the next step checks that (parameters, gradients' layout, masks, state, groups) and reuses the list instead of
    # sorting again: the Python of a step was several times its kernel call on small models.

    def _state_signature(self, group: dict) -> tuple:
        """The group settings that decide which state tensors a parameter has (overridden per optimizer)."""
        return ()

    def _make_plan(self, fused: list, torch_groups: list) -> None:
        """Keep ``fused`` as the plan of the next step, after a step that ran it (records written)."""
        if torch_groups or not fused:
            self._plan = None
            return
        groups = tuple((g, tuple(g["params"]), self._state_signature(g)) for g in self.param_groups)
        stepped = {id(p) for _, p, _, _ in fused}
        idle = tuple(p for _, params, _ in groups for p in params if id(p) not in stepped)
        entries = []
        for _, p, alive, state in fused:
            raw = None if alive is None else self._alive_cache[id(p)][1]
            source = None if id(p) in self._explicit else _mask_source(self._layers.get(id(p)), p)
            st = self.state[p]
            entries.append([
                p, p._version, p.data_ptr(), p.untyped_storage(),  # the storage held: no other can take its address
                source, raw, *((raw._version, raw.data_ptr(), raw.untyped_storage()) if raw is not None
                               else (0, 0, None)),
                st, tuple(st.items()), state, tuple(t._version for t in state),
            ])  # fmt: skip
        self._plan = _StepPlan(groups, idle, entries, fused, self._where(fused))

    def _replan(self, fused: list, torch_groups: list) -> None:
        """After a step: a sorted (unplanned) list becomes the next step's plan."""
        plan = self._plan
        if plan is None or plan.fused is not fused:
            self._make_plan(fused, torch_groups)

    def _planned(self, group_ok) -> _StepPlan | None:
        """The last step's plan when nothing it was built from changed, else None. Written as flat loops: this runs
        every step, and on small models its Python was as long as the kernel call."""
        plan = self._plan
        if plan is None or getattr(self, "grad_scale", None) is not None:
            return None
        param_groups = self.param_groups
        if len(param_groups) != len(plan.groups):
            return None
        for g, (g0, params0, signature) in zip(param_groups, plan.groups):
            params = g["params"]
            if g is not g0 or len(params) != len(params0) or not group_ok(g) or self._state_signature(g) != signature:
                return None
            for a, b in zip(params, params0):
                if a is not b:
                    return None
        for p in plan.idle:
            if p.grad is not None:
                return None
        state = self.state
        for entry in plan.entries:
            p, version, address, _, source, raw, mask_version, mask_address, _, st, items, tensors, versions = entry
            g = p.grad
            if (
                g is None or g.layout is not _STRIDED or not g.is_contiguous() or p._version != version
                or p.data_ptr() != address
            ):  # fmt: skip
                return None
            if source is not None:
                module, pname, bname = source
                if module._parameters.get(pname) is not p:
                    return None
                if bname is not None and module._buffers.get(bname) is not raw:
                    return None
            if raw is not None and (raw._version != mask_version or raw.data_ptr() != mask_address):
                return None
            if state.get(p) is not st or len(st) != len(items):
                return None
            for k, v in items:
                if st.get(k) is not v:
                    return None
            for t, v in zip(tensors, versions):
                if t._version != v:
                    return None
        return plan

    def _record(self, fused: list) -> None:
        plan = self._plan
        if plan is None or plan.fused is not fused:
            for _, p, alive, state in fused:
                self._records[id(p)] = (p, alive, stamp(p), state, _stamps(state))
            return
        # a planned step: only the weights' versions moved (their records otherwise hold, as the plan checked)
        records = self._records
        for entry in plan.entries:
            p = entry[0]
            rec = records[id(p)]
            entry[1] = version = p._version
            records[id(p)] = (p, rec[1], (version, *rec[2][1:]), rec[3], rec[4])


class MaskedSGD(_FusedMasked, torch.optim.SGD):
    """torch.optim.SGD (same arguments, state and state_dict) that steps only the alive entries of masked weights.

    Masks: ``model``'s masked modules (MaskedLinear / MaskedConv2d ``mask``, torch.nn.utils.prune's ``weight_mask``),
    read at every step; or ``masks``, a mapping parameter -> bool mask of its shape. Parameters without a mask are
    stepped as torch does. See the module docstring for what torch steps instead of the fused kernel.
    """

    _torch_class = torch.optim.SGD

    @_use_grad_for_differentiable
    def step(self, closure=None):
        loss = _closure_loss(closure)
        fresh = set()

        def group_ok(g):
            return not g["differentiable"] and not g.get("fused") and _plain_number(g["lr"])

        def state_of(p, group):
            if group["momentum"] == 0:
                return ()
            state = self.state[p]
            if state.get("momentum_buffer") is None:  # torch's first step sets it to the gradient
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh.add(p)
            return (state["momentum_buffer"],)

        fused, torch_groups, masked = self._collect(group_ok, state_of)
        self._torch_step(torch_groups, masked)
        if fused:
            index, kinds, counts, groups = self._where_of(fused)
            if fresh:
                kinds = [k | (_FLAG if p in fresh else 0) for k, (_, p, _, _) in zip(kinds, fused)]
            ptrs = []
            for _, p, _, state in fused:
                ptrs += (p.data_ptr(), p.grad.data_ptr(), state[0].data_ptr() if state else 0)
            hyper = []
            for g in self.param_groups:
                hyper += (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], g["maximize"])
            _backend.ext().sgd_step(
                ptrs, index, kinds, counts, groups, list(map(float, hyper)), torch.get_num_threads()
            )
            torch.autograd.graph.increment_version([p for _, p, _, _ in fused])
            self._record(fused)
        self._replan(fused, torch_groups)
        return loss

    def _state_signature(self, group: dict) -> tuple:
        return (group["momentum"] != 0,)


class MaskedAdam(_FusedMasked, torch.optim.Adam):
    """torch.optim.Adam (same arguments, state and state_dict) that steps only the alive entries of masked weights.

    ``model`` / ``masks`` as for ``MaskedSGD``.
    """

    _torch_class = torch.optim.Adam

    @_use_grad_for_differentiable
    def step(self, closure=None):
        loss = _closure_loss(closure)

        def group_ok(g):
            return (
                not g["differentiable"]
                and not g["capturable"]
                and not g.get("fused")
                and _plain_number(g["lr"], *g["betas"])
            )

        def state_of(p, group):
            state = self.state[p]
            if len(state) == 0:  # torch's lazy initialization
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 4 if group["amsgrad"] else 3]
            return tuple(state[k] for k in keys) if all(k in state for k in keys) else None

        fused, torch_groups, masked = self._collect(group_ok, state_of)
        self._torch_step(torch_groups, masked)
        if fused:
            ext = _backend.ext()
            _match_torch_sqrt(ext)
            index, kinds, counts, groups = self._where_of(fused)
            kinds = [k | (_FLAG if s[0].dtype == torch.float64 else 0) for k, (_, _, _, s) in zip(kinds, fused)]
            ptrs = []
            for _, p, _, s in fused:
                ptrs += (
                    p.data_ptr(),
                    p.grad.data_ptr(),
                    s[1].data_ptr(),
                    s[2].data_ptr(),
                    s[3].data_ptr() if len(s) > 3 else 0,
                )
            hyper = []
            for g in self.param_groups:
                decoupled = g.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW))
                hyper += (g["lr"], *g["betas"], g["eps"], g["weight_decay"], g["amsgrad"], g["maximize"], decoupled)
            steps = [s[0].data_ptr() for _, _, _, s in fused]
            ext.adam_step(ptrs, steps, index, kinds, counts, groups, list(map(float, hyper)), torch.get_num_threads())
            torch.autograd.graph.increment_version([p for _, p, _, _ in fused])
            self._record(fused)
        self._replan(fused, torch_groups)
        return loss

    def _state_signature(self, group: dict) -> tuple:
        return (bool(group["amsgrad"]),)


class MaskedAdamW(MaskedAdam, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) that steps only the alive entries of masked weights.

    ``model`` / ``masks`` as for ``MaskedSGD``.
    """

    _torch_class = torch.optim.AdamW
