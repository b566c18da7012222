"""The unstructured sparse CPU route of the masked linear and conv: lthfast._C's kernels (csrc/sparse_matmul.cpp)
read the dense weight at its alive entries only, through the mask's cached ``AliveIndex`` (CSR and CSC).

Every product is vectorized over the batch, so activations are handed over "lanes last": X [M, K] as X^T
[K, lanes] with ``lanes`` = M rounded up to 16 (zero-padded), a conv input [B, C, H, W] as [C, H + pads, W + pads,
lanes]. The forward makes Y^T [N, lanes] (one pass over the alive weights per output row), dX makes dX^T through
the CSC, dW is an SDDMM at the alive entries of a zeroed dense gradient (exact zeros where pruned).
float32 only (the routing sends every other dtype elsewhere); the caller has validated shapes and devices.
"""

from __future__ import annotations

import torch

from lthfast import _backend
from lthfast.indexing.alive import alive_index
from lthfast.indexing.tiles import cached_on_mask
from lthfast.ops import crossover

LANE_MULTIPLE = 16  # csrc/sparse_matmul.h kSparseLaneMultiple
# Tests turn the route off to compare against the others.
ENABLED = True


def available() -> bool:
    """Whether lthfast._C has the sparse kernels."""
    ext = _backend.ext()
    return ext is not None and hasattr(ext, "sparse_rows")


def density(mask: torch.Tensor) -> float:
    """The fraction of ``mask`` that is alive, cached on the mask."""
    return cached_on_mask(mask, ("density",), lambda: int(mask.count_nonzero()) / max(1, mask.numel()))


def _eligible(x: torch.Tensor, mask: torch.Tensor) -> bool:
    return (
        ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0 and mask.numel() > 0
        and available()
    )  # fmt: skip


def use_linear(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the masked linear of x [M, K] with ``mask`` [N, K] runs the sparse kernels (``crossover``)."""
    if not _eligible(x, mask):
        return False
    n, k = mask.shape
    return density(mask) <= crossover.linear_limit(x.shape[0], n, k, torch.get_num_threads())


def use_conv(x: torch.Tensor, mask: torch.Tensor, groups: int) -> bool:
    """Whether the masked conv of x [B, C, H, W] with ``mask`` [Cout, Cin/groups, kh, kw] runs the sparse kernels."""
    if not _eligible(x, mask):
        return False
    return density(mask) <= crossover.conv_limit(x.shape, mask.shape, groups, torch.get_num_threads())


def lanes_for(m: int) -> int:
    return max(LANE_MULTIPLE, -(-m // LANE_MULTIPLE) * LANE_MULTIPLE)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _lanes(to: bool, src: torch.Tensor, dst: torch.Tensor, tensor: torch.Tensor, pads=(0, 0, 0, 0)) -> None:
    """lthfast._C.lanes between ``tensor`` (a float32 [B, C, H, W] or [B, C] view) and a lanes buffer."""
    dims, strides = list(tensor.shape), list(tensor.stride())
    if len(dims) == 2:
        dims, strides = dims + [1, 1], strides + [0, 0]
    _backend.ext().lanes(to, src.data_ptr(), dst.data_ptr(), dims, strides, list(pads), (dst if to else src).shape[-1],
                         torch.get_num_threads())  # fmt: skip


_F32 = torch.float32


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype is _F32 else t.float()


def _dense(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight.is_contiguous() else weight.contiguous()


# ------------------------------------------------------------------------------------------------------ linear


def linear_forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, index=None):
    """Y [M, N] = x [M, K] (W ⊙ M)^T + bias, float32 CPU, contiguous: one lthfast._C call (the lanes layouts in its
    reused scratch). ``index``: the mask's ``AliveIndex`` when the caller has it. Called outside autograd (no
    tensor op here records a graph); written lean, since on small layers its Python was as long as the product."""
    index = alive_index(mask) if index is None else index
    if x.dtype is not _F32:
        x = x.float()
    if weight.dtype is not _F32 or not weight.is_contiguous():
        weight = _dense(_float32(weight))
    if bias is not None and (bias.dtype is not _F32 or not bias.is_contiguous()):
        bias = _float32(bias).contiguous()
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=_F32)
    sx0, sx1 = x.stride()
    rows, cols, _, _ = index.addresses
    _backend.ext().sparse_linear_forward(x.data_ptr(), sx0, sx1, m, n, k, weight.data_ptr(), rows, cols,
                                         0 if bias is None else bias.data_ptr(), y.data_ptr(),
                                         torch.get_num_threads())  # fmt: skip
    return y


def linear_backward(grad, x, weight, mask, need_x: bool, need_w: bool, need_b: bool = False, index=None):
    """(dX [M, K], dW [N, K]) of ``linear_forward`` for grad [M, N], and with ``need_b`` the bias gradient [N] (the
    sum of grad over its rows) as a third item; None where not needed; dW exactly 0 where the mask is False."""
    index = alive_index(mask) if index is None else index
    if x.dtype is not _F32:
        x = x.float()
    if grad.dtype is not _F32:
        grad = grad.float()
    if weight.dtype is not _F32 or not weight.is_contiguous():
        weight = _dense(_float32(weight))
    (m, k), n = x.shape, weight.shape[0]
    grad_x = torch.empty(m, k, dtype=_F32) if need_x else None
    grad_w = torch.empty(n, k, dtype=_F32) if need_w else None
    grad_b = torch.empty(n, dtype=_F32) if need_b else None
    (sx0, sx1), (sg0, sg1) = x.stride(), grad.stride()
    _backend.ext().sparse_linear_backward(x.data_ptr(), sx0, sx1, m, n, k, weight.data_ptr(), *index.addresses,
                                          grad.data_ptr(), sg0, sg1, _ptr(grad_x), _ptr(grad_w), _ptr(grad_b),
                                          torch.get_num_threads())  # fmt: skip
    return (grad_x, grad_w, grad_b) if need_b else (grad_x, grad_w)


# ------------------------------------------------------------------------------------------------------ conv


def _conv_out(t: torch.Tensor, shape, dtype: torch.dtype, memory_format: torch.memory_format, pads=(0, 0, 0, 0)):
    """A new [B, C, H, W] tensor in ``dtype`` and ``memory_format`` from the lanes buffer ``t`` [C][H + pads][W +
    pads][lanes] (its crop at ``pads``: a conv's dX)."""
    out = torch.empty(shape, dtype=torch.float32, memory_format=memory_format)
    _lanes(False, t, out, out, pads)
    return out if dtype == torch.float32 else out.to(dtype)


def conv_geometry(x_shape, weight_shape, stride, padding, dilation):
    """(OH, OW, padded H, padded W) of a conv; padding is (top, bottom, left, right)."""
    _, _, h, w = x_shape
    _, _, kh, kw = weight_shape
    top, bottom, left, right = padding
    hp, wp = h + top + bottom, w + left + right
    oh = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow, hp, wp


def conv_to_lanes(x: torch.Tensor, padding) -> torch.Tensor:
    """x [B, C, H, W] (any memory format) -> [C, H + top + bottom, W + left + right, lanes] float32, zero-padded."""
    x = _float32(x)
    b, c, h, w = x.shape
    top, bottom, left, right = padding
    out = torch.empty(c, h + top + bottom, w + left + right, lanes_for(b), dtype=torch.float32)
    _lanes(True, x, out, x, padding)
    return out


@torch.no_grad()
def conv_forward(x, weight, mask, bias, stride, padding, dilation, groups, memory_format, keep_lanes: bool = False):
    """F.conv2d(x, W ⊙ M, bias, ...) with (top, bottom, left, right) padding, float32 CPU, in ``memory_format``;
    with ``keep_lanes``, (Y, the padded input in the lanes layout) for ``conv_backward``'s ``xl``."""
    index = alive_index(mask)
    b = x.shape[0]
    cout, cin_g, kh, kw = weight.shape
    weight = weight.float()  # a no-op for the float32 weights the route takes, a copy under a mixed-dtype call
    bias = None if bias is None else bias.float()
    oh, ow, hp, wp = conv_geometry(x.shape, weight.shape, stride, padding, dilation)
    xl = conv_to_lanes(x, padding)
    lanes = xl.shape[-1]
    yl = torch.empty(cout, oh, ow, lanes, dtype=torch.float32)
    w = _dense(weight)
    bias = None if bias is None else bias.contiguous()
    _backend.ext().sparse_conv(0, xl.data_ptr(), hp, wp, yl.data_ptr(), oh, ow, cout, cin_g, cout // groups, kh, kw,
                               stride[0], stride[1], dilation[0], dilation[1], index.row_ptr.data_ptr(),
                               index.cols.data_ptr(), w.data_ptr(), _ptr(bias), lanes, 0,
                               torch.get_num_threads())  # fmt: skip
    y = _conv_out(yl, (b, cout, oh, ow), x.dtype, memory_format)
    return (y, xl) if keep_lanes else y


@torch.no_grad()
def conv_backward(grad, x, weight, mask, stride, padding, dilation, groups, need_x: bool, need_w: bool, xl=None):
    """(dX like x, dW [Cout, Cin/groups, kh, kw]) of ``conv_forward``; None where not needed; dW exactly 0 where
    the mask is False. dX comes back in x's memory format. ``xl``: the forward's kept lanes layout of x."""
    index = alive_index(mask)
    b, cin, h, w_in = x.shape
    cout, cin_g, kh, kw = weight.shape
    weight = weight.float()
    oh, ow, hp, wp = conv_geometry(x.shape, weight.shape, stride, padding, dilation)
    gl = conv_to_lanes(grad, (0, 0, 0, 0))  # [Cout, OH, OW, lanes]
    lanes = gl.shape[-1]
    threads = torch.get_num_threads()
    ext = _backend.ext()
    w = _dense(weight)
    grad_x = grad_w = None
    common = (hp, wp, gl.data_ptr(), oh, ow, cout, cin_g, cout // groups, kh, kw, stride[0], stride[1],
              dilation[0], dilation[1])  # fmt: skip
    if need_x:
        dxl = torch.zeros(cin, hp, wp, lanes, dtype=torch.float32)
        ext.sparse_conv(1, 0, *common, index.col_ptr.data_ptr(), index.col_rows.data_ptr(), w.data_ptr(), 0, lanes,
                        dxl.data_ptr(), threads)  # fmt: skip
        top, _, left, _ = padding
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format  # fmt: skip
        grad_x = _conv_out(dxl, x.shape, x.dtype, fmt, padding)
    if need_w:
        xl = conv_to_lanes(x, padding) if xl is None else xl
        grad_w = torch.zeros(weight.shape, dtype=torch.float32)
        ext.sparse_conv(2, xl.data_ptr(), *common[:2], gl.data_ptr(), *common[3:], index.row_ptr.data_ptr(),
                        index.cols.data_ptr(), w.data_ptr(), 0, lanes, grad_w.data_ptr(), threads)  # fmt: skip
    return grad_x, grad_w
