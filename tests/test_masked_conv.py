"""masked_conv2d: Triton kernels (interpreter on CPU) and the CPU path against float64 F.conv2d on W*M.

Every case checks the forward, dX, dW and db, and that dW is exactly zero where the mask is False.
Shapes are tiny because the interpreter is slow; spatial sizes and channel counts avoid tile multiples.
"""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import lthfast
from lthfast import _backend
from lthfast.nn import MaskedConv2d
from lthfast.ops import conv as conv_op
from lthfast.ops.conv import masked_conv2d

# Allowed error, relative to the largest reference magnitude of the tensor (and per element): about two
# rounding steps of the output dtype; fp32 accumulation adds far less at these sizes.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


def _kernels():
    pytest.importorskip("triton")
    from lthfast.kernels import masked_conv

    return masked_conv


def _mask(kind: str, shape) -> torch.Tensor:
    n, c = shape[:2]
    if kind == "unstructured":
        return torch.rand(shape) < 0.5
    if kind == "sparse":
        return torch.rand(shape) < 0.1
    if kind == "full":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "pruned":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "channel-block":  # 4x4 channel blocks over all taps, the first kernel tile pruned whole
        blocks = torch.rand(-(-n // 4), -(-c // 4)) < 0.4
        m = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)[:n, :c]
        bn, bc = _tiles()
        m[:bn, :bc] = False
        return m[:, :, None, None].expand(shape).contiguous()
    raise ValueError(kind)


def _tiles() -> tuple[int, int]:
    """The kernels' (Cout, Cin) tile on this machine's test device: 16x16 in the interpreter, larger on CUDA."""
    if not _backend.triton_available():
        return 16, 16
    from lthfast.kernels.masked_conv import conv_tiles

    return conv_tiles(torch.empty(0).device)


def _draw(b, cin, cout, hw, kernel, dtype=torch.float32, mask="unstructured", bias=True):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(b, cin, *hw).to(dtype)
    w = (torch.randn(cout, cin, kh, kw) / math.sqrt(cin * kh * kw)).to(dtype)
    bias = torch.randn(cout).to(dtype) if bias else None
    return x, w, _mask(mask, w.shape), bias


def _assert_close(actual, expected, dtype, name):
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _check(x, w, m, b, fn=masked_conv2d, **conv):
    """Run fn forward + backward and compare y, dX, dW, db with float64 autograd of F.conv2d on W*M."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], leaves[1], m, leaves[2], **conv)
    grad = torch.randn(y.shape, device=y.device).to(y.dtype)
    y.backward(grad)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y_ref = F.conv2d(ref[0], torch.where(m, ref[1], 0), ref[2], **conv)
    y_ref.backward(grad.double())
    _assert_close(y, y_ref, x.dtype, "y")
    for name, leaf, r in zip(("dX", "dW", "db"), leaves, ref):
        if leaf is not None:
            _assert_close(leaf.grad, r.grad, x.dtype, name)
    assert (leaves[1].grad[~m] == 0).all(), "dW must be exactly zero where the mask is False"
    return y, leaves


SHAPES = {  # (batch, Cin, Cout, (H, W), kernel, conv kwargs)
    "1x1": (2, 18, 20, (5, 7), 1, {}),
    "1x1-s2": (1, 5, 7, (7, 6), 1, {"stride": 2}),
    "3x3-p1": (2, 5, 7, (6, 7), 3, {"padding": 1}),
    "3x3-s2-p1": (1, 18, 20, (7, 9), 3, {"stride": 2, "padding": 1}),
    "3x3-d2": (1, 4, 5, (9, 8), 3, {"dilation": 2}),
    "5x5-p3-d2": (1, 3, 6, (9, 8), 5, {"padding": 3, "dilation": 2}),
    "7x7-s2-p3": (1, 3, 6, (8, 7), 7, {"stride": 2, "padding": 3}),
    "2x3-same": (1, 3, 5, (6, 7), (2, 3), {"padding": "same"}),
    "3x3-valid-rect": (1, 6, 9, (5, 8), (3, 1), {"padding": "valid", "stride": (1, 2)}),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_shapes_match_float64_reference(backend, shape):
    b, cin, cout, hw, kernel, conv = SHAPES[shape]
    x, w, m, bias = _draw(b, cin, cout, hw, kernel)
    _check(x, w, m, bias, **conv)


@pytest.mark.parametrize("kind", ["full", "pruned", "channel-block", "sparse"])
def test_mask_kinds(backend, kind):
    bn, bc = _tiles()  # 2 x 2 kernel tiles, the last ones partial
    x, w, m, bias = _draw(1, bc + 2, bn + 4, (6, 7), 3, mask=kind)
    w[~m] = float("nan")  # a pruned weight must contribute nothing, even a NaN
    if backend == "triton" and kind == "channel-block":
        index = _kernels().conv_tile_index(m)
        assert 0 < index.alive_tiles < index.tile_alive.numel(), "the mask must leave dead and alive tiles"
    y, (xg, wg, _) = _check(x, w, m, bias, padding=1)
    if kind == "pruned":
        assert torch.equal(wg.grad, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(backend, dtype):
    x, w, m, bias = _draw(2, 18, 20, (5, 6), 3, dtype=dtype)
    _check(x, w, m, bias, padding=1)


def test_batch_of_one_unbatched_input_and_no_bias(backend):
    x, w, m, _ = _draw(1, 5, 7, (6, 5), 3, bias=False)
    _check(x, w, m, None, padding=1)
    y = masked_conv2d(x[0], w, m, None, padding=1)
    assert y.shape == (7, 6, 5)
    torch.testing.assert_close(y, masked_conv2d(x, w, m, None, padding=1)[0])


@pytest.mark.parametrize("which", ["input", "input+weight"])
def test_channels_last(backend, which):
    x, w, m, bias = _draw(2, 18, 9, (5, 7), 3)
    x = x.to(memory_format=torch.channels_last)
    if which == "input+weight":  # as model.to(memory_format=torch.channels_last) leaves a masked layer
        w, m = (t.to(memory_format=torch.channels_last) for t in (w, m))
    y, (xg, _, _) = _check(x, w, m, bias, stride=2, padding=1)
    cl = torch.channels_last
    assert y.is_contiguous(memory_format=cl), "the output is channels_last, as F.conv2d gives"
    assert xg.grad.is_contiguous(memory_format=cl), "dX takes x's memory format"


def test_groups_fall_back_to_dense_with_one_warning_naming_the_layer(backend, monkeypatch):
    monkeypatch.setattr(conv_op, "_warned_groups", set())
    layer = MaskedConv2d(6, 4, 3, padding=1, groups=2)
    layer.set_mask_(torch.rand(layer.weight.shape) < 0.5)
    x = torch.randn(2, 6, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
        layer(x)
    names = [str(c.message) for c in caught if "groups=2" in str(c.message)]
    assert len(names) == (1 if backend == "triton" else 0), names
    if names:
        assert names[0].startswith("MaskedConv2d(6, 4, kernel_size=(3, 3)")
    torch.testing.assert_close(y, F.conv2d(x, layer.masked_weight(), layer.bias, padding=1, groups=2))
    x, w, m, bias = _draw(1, 6, 4, (5, 6), 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check(x, w[:, :3], m[:, :3], bias, padding=1, groups=2)
    names = [str(c.message) for c in caught if "groups=2" in str(c.message)]
    assert names == (["masked_conv2d: " + names[0].split(": ", 1)[1]] if backend == "triton" else []), names


def test_auto_backend_runs_the_kernel_only_below_the_density_crossover(monkeypatch):
    kernels = _kernels()
    if not _backend.triton_runs_on(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    calls = []
    real = kernels.conv2d_forward
    monkeypatch.setattr(kernels, "conv2d_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    # The dispatch mechanism, at a crossover between the two test masks (the shipped value, measured on a GPU,
    # may sit below both: 0.0 while the kernels lose at every density)
    monkeypatch.setattr(conv_op, "DENSE_TILE_DENSITY", 0.5)
    x, w, _, bias = _draw(1, 18, 20, (5, 5), 1)
    sparse = torch.zeros(w.shape, dtype=torch.bool)
    sparse[16:, 16:] = True  # one alive tile of four
    with lthfast.backend("auto"):
        for mask, expect in ((torch.ones_like(sparse), 0), (sparse, 1)):
            dense = kernels.conv_tile_index(mask).tile_density > conv_op.DENSE_TILE_DENSITY
            assert dense == (expect == 0), "the test masks must sit on both sides of the crossover"
            calls.clear()
            torch.testing.assert_close(masked_conv2d(x, w, mask, bias), F.conv2d(x, torch.where(mask, w, 0), bias))
            assert len(calls) == expect


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_dx_and_dw_offsets_int32_and_int64_agree(triton_backend, monkeypatch, layout, stride):
    """The dX and dW kernels index activations in int32 when every offset fits (``offset_type``), else int64: both
    give the same bits, on packed (channels_last) and unpacked (NCHW) dY, at strides 1 and 2."""
    import triton.language as tl

    kernels = _kernels()
    bn, bc = _tiles()
    x, w, m, _ = _draw(2, bc + 3, bn + 5, (9, 7), 3, mask="unstructured")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    conv = ((stride, stride), (1, 1, 1, 1), (1, 1))
    p, q = (9 + 2 - 3) // stride + 1, (7 + 2 - 3) // stride + 1
    grad = torch.randn(2, bn + 5, p, q)
    if layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    runs = []
    for idx in (tl.int32, tl.int64):
        monkeypatch.setattr(kernels, "offset_type", lambda *t, idx=idx: idx)
        dx = kernels.conv2d_grad_input(grad, w, m, torch.empty_like(x), *conv)
        dw = kernels.conv2d_grad_weight(grad, x, m, torch.zeros_like(w), *conv, split=2)
        runs.append((dx, dw))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    F.conv2d(xr, torch.where(m, wr, 0), stride=stride, padding=1).backward(grad.double())
    _assert_close(runs[0][0], xr.grad, torch.float32, "dX")
    _assert_close(runs[0][1], torch.where(m, wr.grad, 0), torch.float32, "dW")


def test_kernels_skip_the_tiles_the_index_leaves_out(triton_backend):
    """Give the kernels the index of a sparser mask: they must compute exactly as if that mask were in force."""
    kernels = _kernels()
    bn, bc = _tiles()
    x, w, m, _ = _draw(1, bc + 2, bn + 4, (5, 6), 3, mask="full")
    sub = _mask("channel-block", w.shape)
    index = kernels.conv_tile_index(sub)
    alive = index.tile_alive.repeat_interleave(bn, 0).repeat_interleave(bc, 1)[: bn + 4, : bc + 2, None, None]
    alive = alive.expand_as(m)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y_ref = F.conv2d(xr, torch.where(alive, wr, 0), padding=1)
    grad = torch.randn(y_ref.shape)
    y_ref.backward(grad.double())
    conv = ((1, 1), (1, 1, 1, 1), (1, 1))
    y = kernels.conv2d_forward(x, w, m, None, torch.empty(y_ref.shape), *conv, index=index)
    dx = kernels.conv2d_grad_input(grad, w, m, torch.empty_like(x), *conv, index=index)
    for split in (1, 3):
        dw = kernels.conv2d_grad_weight(grad, x, m, torch.zeros_like(w), *conv, index=index, split=split)
        _assert_close(dw, torch.where(alive, wr.grad, 0), torch.float32, f"dW split={split}")
    _assert_close(y, y_ref, torch.float32, "y")
    _assert_close(dx, xr.grad, torch.float32, "dX")


def test_mask_copies_and_tile_index_are_cached_until_the_mask_is_edited():
    kernels = _kernels()
    for fmt, other in ((torch.contiguous_format, torch.channels_last), (torch.channels_last, torch.contiguous_format)):
        bn, bc = _tiles()
        mask = (torch.rand(bn + 4, bc + 2, 3, 3) < 0.5).contiguous(memory_format=fmt)
        first, copy = kernels.conv_tile_index(mask), kernels.mask_as(mask, other)
        assert kernels.conv_tile_index(mask) is first and kernels.mask_as(mask, other) is copy
        assert copy.is_contiguous(memory_format=other) and torch.equal(copy, mask)
        mask[:bn] = False
        second = kernels.conv_tile_index(mask)
        assert second is not first and not second.tile_alive[0].any()
        assert torch.equal(kernels.mask_as(mask, other), mask)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mask": "float"}, TypeError, "mask must be bool"),
        ({"mask": "shape"}, ValueError, "mask shape"),
        ({"x": "channels"}, ValueError, "x has 4 channels"),
        ({"x": "dtype"}, TypeError, "one floating dtype"),
        ({"x": "small"}, ValueError, "smaller than the dilated kernel"),
        ({"bias": "shape"}, ValueError, "bias must be"),
        ({"padding": "full"}, ValueError, "'same' or 'valid'"),
        ({"padding": "same", "stride": 2}, ValueError, "strided"),
        ({"padding": -1}, ValueError, "padding must be >= 0"),
        ({"stride": (1, 2, 3)}, TypeError, "stride must be"),
        ({"groups": 4}, ValueError, "not divisible by groups"),
    ],
)
def test_bad_input_is_rejected_naming_the_caller(kwargs, error, match):
    x, w, m, bias = _draw(1, 6, 6, (5, 5), 3)
    bad = {
        ("mask", "float"): m.float(),
        ("mask", "shape"): m[:, :, :2],
        ("x", "channels"): x[:, :4],
        ("x", "dtype"): x.double(),
        ("x", "small"): x[:, :, :2],
        ("bias", "shape"): bias[:5],
    }
    args = {"x": x, "weight": w, "mask": m, "bias": bias}
    args.update({k: bad.get((k, v), v) for k, v in kwargs.items()})
    with pytest.raises(error, match=rf"^layer3\.conv1: .*{re.escape(match)}"):
        masked_conv2d(**args, where="layer3.conv1")


# ---------------------------------------------------------------------------------------------- the module
def test_module_state_dict_and_dense_round_trip(backend):
    conv = torch.nn.Conv2d(5, 7, 3, stride=2, padding=1)
    mask = torch.rand(conv.weight.shape) < 0.5
    layer = MaskedConv2d.from_dense(conv, mask)
    assert set(layer.state_dict()) == {"weight", "bias", "mask"}
    assert layer.weight is conv.weight and layer.bias is conv.bias, "from_dense shares the Parameters"
    x = torch.randn(2, 5, 7, 6)
    y = layer(x)
    torch.testing.assert_close(y, F.conv2d(x, torch.where(mask, conv.weight, 0), conv.bias, 2, 1))
    dense = layer.to_dense()
    assert type(dense) is torch.nn.Conv2d and dense.weight is not layer.weight
    torch.testing.assert_close(dense(x), y)
    clone = MaskedConv2d(5, 7, 3, stride=2, padding=1)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(x), y)


def test_module_sees_a_mask_change_at_the_next_forward(backend):
    layer = MaskedConv2d(18, 20, 3, padding=1)
    x = torch.randn(1, 18, 5, 6)
    before = layer(x)
    torch.testing.assert_close(before, F.conv2d(x, layer.weight, layer.bias, padding=1))
    layer.mask[:16, :16] = False  # in place: kills a whole tile
    expected = F.conv2d(x, layer.masked_weight(), layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected)
    layer.set_mask_(torch.rand(layer.weight.shape) < 0.3)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.masked_weight(), layer.bias, padding=1))


def test_module_in_channels_last(backend):
    layer = MaskedConv2d(6, 9, 3, padding=1, mask=torch.rand(9, 6, 3, 3) < 0.5).to(memory_format=torch.channels_last)
    assert not layer.mask.is_contiguous(), "model.to(channels_last) also converts the mask buffer"
    x = torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv2d(x, layer.masked_weight(), layer.bias, padding=1))
    assert (layer.weight.grad[~layer.mask] == 0).all()


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_module_padding_modes(padding_mode):
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode)
    layer = MaskedConv2d.from_dense(conv, torch.rand(conv.weight.shape) < 0.5)
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        conv.weight.mul_(layer.mask)
    torch.testing.assert_close(layer(x), conv(x))


def test_custom_ops_pass_opcheck():
    x, w, m, bias = _draw(1, 5, 6, (6, 5), 3)
    x.requires_grad_()
    w.requires_grad_()
    conv = ([2, 1], [1, 2, 0, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.lthfast.masked_conv2d, (x, w, m, bias, *conv, "opcheck"))
    y = torch.ops.lthfast.masked_conv2d(x, w, m, bias, *conv, "opcheck").detach()
    grad = torch.randn_like(y)
    for op in (torch.ops.lthfast.masked_conv2d_grad_input, torch.ops.lthfast.masked_conv2d_grad_weight):
        torch.library.opcheck(op, (grad, x.detach(), w.detach(), m, *conv))


# ---------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = {
    "resnet-3x3": (8, 64, 128, (16, 16), 3, {"padding": 1}),
    "resnet-3x3-s2": (8, 128, 96, (15, 17), 3, {"stride": 2, "padding": 1}),
    "stem-7x7": (4, 3, 64, (56, 56), 7, {"stride": 2, "padding": 3}),
    "1x1-s2": (8, 160, 256, (14, 14), 1, {"stride": 2}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=list(GPU_SHAPES))
@pytest.mark.parametrize("kind", ["unstructured", "channel-block"])
def test_gpu_shapes(triton_backend, shape, dtype, kind, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 is checked at fp32 precision
    b, cin, cout, hw, kernel, conv = GPU_SHAPES[shape]
    x, w, m, bias = (t.cuda() for t in _draw(b, cin, cout, hw, kernel, dtype=dtype, mask=kind))
    _check(x, w, m, bias, **conv)
    _check(x.to(memory_format=torch.channels_last), w, m, bias, **conv)


@pytest.mark.parametrize("split", [1, 3])
def test_dw_on_full_partial_and_empty_tiles(triton_backend, split):
    """A mask whose kernel tiles are full (every entry alive: dW stored without reading the mask), partial or empty:
    dW against float64, exactly zero where pruned, stored directly and by the last of several M-splits."""
    from lthfast.bench.masks import mixed_tile_mask
    from lthfast.indexing.tiles import tile_full_flags

    kernels = _kernels()
    bn, bc = _tiles()
    x, w, _, _ = _draw(2, 2 * bc + 3, 2 * bn + 5, (5, 6), 3)
    m = mixed_tile_mask(tuple(w.shape), bn, bc, torch.Generator().manual_seed(1))
    index = kernels.conv_tile_index(m)
    flags = tile_full_flags(index, m)
    assert 0 < int(flags.sum()) < index.alive_tiles, "the case must mix full and partial tiles"
    xr = x.double().requires_grad_()
    wr = w.double().requires_grad_()
    y_ref = F.conv2d(xr, torch.where(m, wr, 0), padding=1)
    grad = torch.randn(y_ref.shape)
    y_ref.backward(grad.double())
    conv = ((1, 1), (1, 1, 1, 1), (1, 1))
    dw = kernels.conv2d_grad_weight(grad, x, m, torch.zeros_like(w), *conv, index=index, split=split)
    _assert_close(dw, torch.where(m, wr.grad, 0), torch.float32, f"dW split={split}")
    assert bool((dw[~m] == 0).all())
