"""The persistent masked conv2d forward and dX (lthfast.kernels.masked_conv: ``persistent_conv2d_forward`` /
``persistent_conv2d_grad_input``, chosen by ``conv2d_forward`` / ``conv2d_grad_input`` through ``_VARIANTS``) against
float64 F.conv2d on W*M: strides, padding, dilation, NCHW and channels_last, odd shapes, weight tiles full, partial and
empty with NaN under every pruned weight, several program counts, and through the op with autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lthfast import functional

# (atol, rtol) against float64: fp32 sums of a few hundred products; bf16 inputs are exact in float64, products
# accumulate in fp32, and the output is rounded once to bf16.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-3, 1.6e-2)}
CIN, COUT = 35, 37  # 3 C-blocks and 3 N-tiles of 16 (the interpreter's tiles), the last of each partial


def _kernels():
    pytest.importorskip("triton")
    from lthfast.kernels import masked_conv

    return masked_conv


def _mask(kh: int, kw: int, seed: int = 0) -> torch.Tensor:
    """[COUT, CIN, kh, kw] at 16x16 channel tiles: N-tile 0 has a full tile (C-block 0) and empty ones, N-tile 1
    none alive (its outputs are the bias alone), N-tile 2 partial tiles; C-block 2 none alive (its dX is zero)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(COUT, CIN, kh, kw, generator=gen) < 0.5
    mask[:16, :16] = True
    mask[:16, 16:] = False
    mask[16:32] = False
    mask[:, 32:] = False
    return mask


def _operands(b, hw, kernel, stride, padding, dilation, dtype, layout, seed=0):
    """x, weight with NaN under every pruned entry, mask, bias, dY, and the float64 reference y and dX."""
    kh, kw = kernel
    gen = torch.Generator().manual_seed(seed)
    mask = _mask(kh, kw, seed)
    x = torch.randn(b, CIN, *hw, generator=gen).to(dtype)
    w = (torch.randn(COUT, CIN, kh, kw, generator=gen) / (CIN * kh * kw) ** 0.5).to(dtype)
    bias = torch.randn(COUT, generator=gen).to(dtype)
    x64 = x.double().requires_grad_()
    w64 = torch.where(mask, w.double(), 0.0)
    y64 = F.conv2d(x64, w64, bias.double(), stride, padding, dilation)
    g = torch.randn(y64.shape, generator=gen).to(dtype)
    y64.backward(g.double())
    w[~mask] = float("nan")
    if layout == "channels_last":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    return x, w, mask, bias, g, y64.detach(), x64.grad


def _assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


def _run(mc, x, w, mask, bias, g, stride, padding, dilation, programs=None):
    """The persistent forward and dX into outputs laid out like x / dY (NaN-filled: every entry must be written)."""
    pads = (padding[0], padding[0], padding[1], padding[1])
    y = torch.full_like(g, float("nan"))
    dx = torch.full_like(x, float("nan"))
    mc.persistent_conv2d_forward(x, w, mask, bias, y, stride, pads, dilation, programs=programs)
    mc.persistent_conv2d_grad_input(g, w, mask, dx, stride, pads, dilation, programs=programs)
    return y, dx


CONVS = {  # (batch, (H, W), kernel, stride, padding, dilation)
    "3x3-p1": (2, (7, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    "3x3-s2-p1": (2, (9, 7), (3, 3), (2, 2), (1, 1), (1, 1)),
    "3x3-p2-d2": (1, (8, 9), (3, 3), (1, 1), (2, 2), (2, 2)),
    "3x2-s12-p10": (1, (7, 9), (3, 2), (1, 2), (1, 0), (1, 1)),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("conv", CONVS, ids=list(CONVS))
def test_forward_and_grad_input_match_float64(triton_backend, conv, layout):
    mc = _kernels()
    b, hw, kernel, stride, padding, dilation = CONVS[conv]
    x, w, mask, bias, g, ref_y, ref_dx = _operands(b, hw, kernel, stride, padding, dilation, torch.float32, layout)
    y, dx = _run(mc, x, w, mask, bias, g, stride, padding, dilation)
    _assert_close(y, ref_y, torch.float32)
    _assert_close(dx, ref_dx, torch.float32)
    # N-tile 1 has no alive tile: the bias alone; C-block 2 none either: dX zeros
    assert torch.equal(y[:, 16:32], bias[16:32, None, None].expand_as(y[:, 16:32]))
    assert not dx[:, 32:].any()
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_bf16(triton_backend):
    mc = _kernels()
    b, hw, kernel, stride, padding, dilation = CONVS["3x3-s2-p1"]
    x, w, mask, bias, g, ref_y, ref_dx = _operands(b, hw, kernel, stride, padding, dilation, torch.bfloat16, "nchw")
    y, dx = _run(mc, x, w, mask, bias, g, stride, padding, dilation)
    _assert_close(y, ref_y, torch.bfloat16)
    _assert_close(dx, ref_dx, torch.bfloat16)


@pytest.mark.parametrize("programs", [1, 8])
def test_program_counts_give_the_classic_kernels_result(triton_backend, programs):
    """One program looping over every tile, and more programs than the 6 tiles (the extra ones loop zero times):
    the same per-tile body, so bit for bit the one-program-per-tile kernels' result."""
    mc = _kernels()
    b, hw, kernel, stride, padding, dilation = 1, (5, 6), (3, 3), (1, 1), (1, 1), (1, 1)
    x, w, mask, bias, g, ref_y, ref_dx = _operands(b, hw, kernel, stride, padding, dilation, torch.float32, "nchw", 3)
    y, dx = _run(mc, x, w, mask, bias, g, stride, padding, dilation, programs=programs)
    pads = (padding[0], padding[0], padding[1], padding[1])
    y0 = mc.conv2d_forward(x, w, mask, bias, torch.empty_like(g), stride, pads, dilation)
    dx0 = mc.conv2d_grad_input(g, w, mask, torch.empty_like(x), stride, pads, dilation)
    assert torch.equal(y, y0) and torch.equal(dx, dx0)
    _assert_close(y, ref_y, torch.float32)


def _spy(monkeypatch, mc) -> list[str]:
    """Record which forward / dX kernels launch."""
    calls: list[str] = []
    for name in ("_fwd", "_dx", "_fwd_persistent", "_dx_persistent"):
        tuned = getattr(mc, name)

        def launch(*args, _launch=tuned.launch, _name=name, **kwargs):
            calls.append(_name)
            return _launch(*args, **kwargs)

        monkeypatch.setattr(tuned, "launch", launch)
    return calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_op_with_autograd_runs_the_persistent_kernels_when_forced(triton_backend, monkeypatch, layout):
    mc = _kernels()
    monkeypatch.setenv("LTHFAST_PERSISTENT", "1")
    calls = _spy(monkeypatch, mc)
    b, hw, kernel, stride, padding, dilation = CONVS["3x3-s2-p1"]
    x, w, mask, bias, g, ref_y, ref_dx = _operands(b, hw, kernel, stride, padding, dilation, torch.float32, layout, 5)
    x = x.requires_grad_()
    w = torch.where(mask, w, 0.0).requires_grad_()  # autograd's dW is the dense path's business: no NaN there
    y = functional.masked_conv2d(x, w, mask, bias, stride=stride, padding=padding, dilation=dilation)
    y.backward(g)
    _assert_close(y, ref_y, torch.float32)
    _assert_close(x.grad, ref_dx, torch.float32)
    assert "_fwd_persistent" in calls and "_dx_persistent" in calls, calls
    assert "_fwd" not in calls and "_dx" not in calls, calls


@pytest.mark.parametrize("forced", [None, "0"])
def test_classic_kernels_run_unforced_in_the_interpreter_and_when_forced(triton_backend, monkeypatch, forced):
    mc = _kernels()
    if forced is None:
        monkeypatch.delenv("LTHFAST_PERSISTENT", raising=False)
    else:
        monkeypatch.setenv("LTHFAST_PERSISTENT", forced)
    calls = _spy(monkeypatch, mc)
    b, hw, kernel, stride, padding, dilation = CONVS["3x3-p1"]
    x, w, mask, bias, g, ref_y, ref_dx = _operands(b, hw, kernel, stride, padding, dilation, torch.float32, "nchw", 7)
    pads = (padding[0], padding[0], padding[1], padding[1])
    y = mc.conv2d_forward(x, w, mask, bias, torch.empty_like(g), stride, pads, dilation)
    dx = mc.conv2d_grad_input(g, w, mask, torch.empty_like(x), stride, pads, dilation)
    _assert_close(y, ref_y, torch.float32)
    _assert_close(dx, ref_dx, torch.float32)
    assert calls == ["_fwd", "_dx"]
