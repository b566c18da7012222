"""The implementations ``lthfast bench layer`` compares, one ``prepare`` function per provider.

Each provider turns a ``Problem`` (weight, mask, bias, op, mode) into a ``Prepared`` call that computes the
layer from one rotated input set: forward mode returns ``(y,)``, train mode ``(y, dX, dW, db)`` (forward and
backward, with ``torch.autograd.grad`` so nothing accumulates between calls). A provider that cannot run on
this device, dtype or op raises ``Unsupported`` with the reason; it is reported as skipped, never dropped.

  dense            F.linear / F.conv2d on the dense weight W ⊙ M (what training costs without sparsity)
  mask-multiply    W * M recomputed every forward, as torch.nn.utils.prune does (mask stored in the weight dtype)
  torch-bsr        W ⊙ M as a torch BSR tensor (CSR for block 1), F.linear; linear only
  semi-structured  torch.sparse.to_sparse_semi_structured with a 2:4 mask (50% sparse only; CUDA sm80+, forward)
  lthfast          lthfast.nn.MaskedLinear / MaskedConv2d (the layers sparsify installs)
  sparseprop       SparseProp's SparseLinear / SparseConv2d built from W ⊙ M (optional package; named, not in "all")
  sparseprop-width SparseProp's conv kernel vectorized over the output width instead of the batch (conv only)

A provider whose weight lives in its own storage sets ``Prepared.convert`` (rebuild it from W and M, as after a
prune; timed on its own, never inside a step) and ``Prepared.dense_outputs`` (its dW as the dense weight's shape,
for the output check only).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lthfast import reference
from lthfast.bench.masks import two_four_mask

PROVIDERS = ("dense", "mask-multiply", "torch-bsr", "semi-structured", "lthfast")
# Peers from optional packages: run when named, not in "all" (which the default sweeps and tests use).
OPTIONAL = ("sparseprop", "sparseprop-width")


class Unsupported(Exception):
    """This provider cannot run this problem here; the message is the reason shown as "skipped"."""


@dataclass
class Problem:
    """One benchmark row's layer. Tensors live on the benchmark device; ``weight`` holds random values even
    where the mask is False (as a pruned-but-not-zeroed weight does), so providers must apply the mask."""

    op: str  # "linear" | "conv"
    mode: str  # "forward" | "train"
    weight: torch.Tensor  # [N, K] or [Cout, Cin/groups, kh, kw]
    mask: torch.Tensor  # bool, weight's shape
    bias: torch.Tensor | None  # [N] / [Cout]
    sparsity: float
    block: int
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups
    seed: int = 0


@dataclass
class Prepared:
    """A provider ready to run: ``call(*input_set)``; the mask it computes with; whether its dW is masked."""

    call: Callable[..., tuple]
    mask: torch.Tensor
    masked_dw: bool = True
    detail: str = ""
    convert: Callable[[], object] | None = None  # rebuild the provider's weight storage from W and M
    dense_outputs: Callable[[tuple], tuple] | None = None  # the call's outputs in the reference's shapes


def _layer(op: str, x, w, b, conv: dict):
    return F.linear(x, w, b) if op == "linear" else F.conv2d(x, w, b, **conv)


def _leaf(t: torch.Tensor | None, train: bool) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().clone().requires_grad_(train)


def _wrap(fn: Callable, params: tuple, train: bool) -> Callable[..., tuple]:
    """Forward mode: ``(y,)``. Train mode: ``(y, dX, dW, db)`` from one backward with ``grad_out``."""
    if not train:
        return lambda x: (fn(x),)

    def step(x, grad_out):
        y = fn(x)
        wanted = (x,) + tuple(p for p in params if p is not None)
        grads = torch.autograd.grad(y, wanted, grad_out)
        db = grads[2] if len(grads) > 2 else None
        return y, grads[0], grads[1], db

    return step


def _dense(p: Problem) -> Prepared:
    train = p.mode == "train"
    w = _leaf(reference.masked_weight(p.weight, p.mask), train)
    b = _leaf(p.bias, train)
    return Prepared(_wrap(lambda x: _layer(p.op, x, w, b, p.conv), (w, b), train), p.mask, masked_dw=False)


def _mask_multiply(p: Problem) -> Prepared:
    train = p.mode == "train"
    w, b = _leaf(p.weight, train), _leaf(p.bias, train)
    mask = p.mask.to(p.weight.dtype)  # torch.nn.utils.prune keeps the mask as a buffer of the weight's dtype
    return Prepared(_wrap(lambda x: _layer(p.op, x, w * mask, b, p.conv), (w, b), train), p.mask)


def _torch_bsr(p: Problem) -> Prepared:
    if p.op != "linear":
        raise Unsupported("torch has no conv2d with a sparse (BSR/CSR) weight")
    n, k = p.weight.shape
    if p.block > 1 and (n % p.block or k % p.block):
        raise Unsupported(f"BSR blocksize {p.block} must divide the weight shape {n}x{k}")
    train = p.mode == "train"
    dense = reference.masked_weight(p.weight, p.mask).detach()
    with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        sparse = dense.to_sparse_csr() if p.block == 1 else dense.to_sparse_bsr((p.block, p.block))
    w = sparse.requires_grad_(train)
    b = _leaf(p.bias, train)
    detail = "csr" if p.block == 1 else f"bsr {p.block}x{p.block}"
    return Prepared(_wrap(lambda x: F.linear(x, w, b), (w, b), train), p.mask, masked_dw=False, detail=detail)


def _semi_structured(p: Problem) -> Prepared:
    if p.op != "linear":
        raise Unsupported("torch's 2:4 semi-structured tensors have no conv2d")
    if p.weight.device.type != "cuda":
        raise Unsupported("2:4 semi-structured (CUTLASS/cuSPARSELt) needs a CUDA GPU (sm80+); no CPU kernel")
    if p.mode == "train":
        raise Unsupported("torch's 2:4 tensor has no weight-gradient (dW) path; forward only")
    if abs(p.sparsity - 0.5) > 1e-9:
        raise Unsupported("2:4 is 50% sparsity only (runs in the sparsity=0.5 rows)")
    from torch.sparse import to_sparse_semi_structured

    n, k = p.weight.shape
    generator = torch.Generator().manual_seed(p.seed)
    mask = two_four_mask(n, k, generator).to(p.weight.device)
    try:
        w = to_sparse_semi_structured(reference.masked_weight(p.weight, mask).detach())
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise Unsupported(f"to_sparse_semi_structured: {exc}") from exc
    return Prepared(_wrap(lambda x: F.linear(x, w, p.bias), (), False), mask, detail="2:4 mask, not the row's")


def _lthfast(p: Problem) -> Prepared:
    """The layer users train: lthfast.nn.MaskedLinear / MaskedConv2d (what ``sparsify`` installs), holding the row's
    weight, bias and mask; called the same way every step, as a training loop calls it."""
    from torch import nn

    from lthfast.nn import MaskedConv2d, MaskedLinear

    train = p.mode == "train"
    if p.op == "linear":
        n, k = p.weight.shape
        layer = MaskedLinear(k, n, bias=p.bias is not None, device=p.weight.device, dtype=p.weight.dtype)
    else:
        c = p.conv
        cout, cin_g, kh, kw = p.weight.shape
        layer = MaskedConv2d(cin_g * c["groups"], cout, (kh, kw), c["stride"], c["padding"], c["dilation"],
                             c["groups"], bias=p.bias is not None, device=p.weight.device,
                             dtype=p.weight.dtype)  # fmt: skip
    layer.weight = nn.Parameter(p.weight.detach().clone(), requires_grad=train)
    layer.bias = None if p.bias is None else nn.Parameter(p.bias.detach().clone(), requires_grad=train)
    layer.set_mask_(p.mask)
    return Prepared(_wrap(layer, (layer.weight, layer.bias), train), p.mask)


def _sparseprop(p: Problem, over_width: bool = False) -> Prepared:
    from lthfast.bench import sparseprop_peer as peer

    peer.load()
    if p.weight.device.type != "cpu" or p.weight.dtype != torch.float32:
        raise Unsupported(f"SparseProp runs float32 on the CPU only, got {p.weight.dtype} on {p.weight.device}")
    train = p.mode == "train"
    if p.op == "linear":
        if over_width:
            raise Unsupported("the output-width kernel is SparseConv2d's; SparseLinear has one kernel")
        convert = lambda: peer.build_linear(p.weight, p.mask, p.bias, train)
        detail = "CSR, vectorized over the rows"
    else:
        reason = peer.conv_unsupported(tuple(p.weight.shape), **p.conv)
        if reason:
            raise Unsupported(reason)
        c = p.conv
        convert = lambda: peer.build_conv(p.weight, p.mask, p.bias, c["stride"], c["padding"], over_width, train)
        detail = "vectorized over the output width" if over_width else "vectorized over the batch (default)"
    module = convert()
    dense_outputs = None
    if train:
        dense_outputs = lambda out: (out[0], out[1], peer.dense_weight(module, out[2]), out[3])
    call = _wrap(module, (module.W_val, module.bias), train)
    return Prepared(call, p.mask, detail=detail, convert=convert, dense_outputs=dense_outputs)


PREPARE: dict[str, Callable[[Problem], Prepared]] = {
    "dense": _dense,
    "mask-multiply": _mask_multiply,
    "torch-bsr": _torch_bsr,
    "semi-structured": _semi_structured,
    "lthfast": _lthfast,
    "sparseprop": _sparseprop,
    "sparseprop-width": lambda p: _sparseprop(p, over_width=True),
}


def parse_providers(text: str) -> list[str]:
    """``"dense,lthfast"`` -> ["dense", "lthfast"]; "all" -> every built-in provider (``OPTIONAL`` peers are
    named). Raises on an unknown name."""
    names = list(PROVIDERS) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in PREPARE]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}: expected some of {list(PREPARE)}")
    if "dense" not in names:
        names.insert(0, "dense")  # every ratio is to dense measured in the same run
    return names
