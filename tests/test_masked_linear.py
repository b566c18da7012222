"""Masked linear: Triton kernels (interpreter on CPU), the torch path (dense and block-sparse), autograd,
the custom ops, and MaskedLinear's behaviour. Every result is compared in float64 with lthfast.reference."""

import copy

import pytest
import torch

import lthfast
from lthfast import functional, reference
from lthfast.bench.masks import block_mask
from lthfast.nn import MaskedLinear
from lthfast.ops import linear as linear_op
from lthfast.ops import linear_torch

# (atol, rtol) per dtype against the float64 reference. fp32: K-term sums in fp32 (|err| ~ K * 2^-24 * |terms|).
# fp16/bf16: the inputs are exact in float64 and products accumulate in fp32, so the error is the rounding of
# each output to 16 bits: rtol = one ulp (fp16 2^-10, bf16 2^-7), i.e. two round-to-nearest steps (torch's bf16
# GEMM, then + bias) or one truncation (the Triton interpreter truncates fp32 -> bf16; GPUs round to nearest).
# atol covers outputs that cancel to near zero, where only the fp32 accumulation error remains.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-3, 8e-3),
}


@pytest.fixture(params=["torch", "triton"])
def any_backend(request):
    """The torch path and the Triton kernels (interpreter on CPU)."""
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


@pytest.fixture(params=["cpp", "torch"])
def block_path(request, monkeypatch):
    """Force the torch path's block-sparse route on small problems (32x32 tiles, any density), once on the C++
    block kernels (fp32 compute; the torch block products would fail the test) and once on the torch ones."""
    monkeypatch.setattr(linear_torch, "CPU_MIN_MACS", 0)
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER", {32: 2.0})
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER_TORCH", {32: 2.0})
    if request.param == "torch":
        monkeypatch.setattr(linear_torch, "USE_EXT", False)
        return request.param
    if linear_torch._block_ext(torch.float32) is None:
        pytest.skip("lthfast._C has no block kernels here (not built, or no AVX2 + FMA)")
    gathered = linear_torch._gathered

    def torch_products_only_off_fp32(t, tiles, b, index, dtype):
        assert dtype != torch.float32, "fp32 compute must run on the C++ block kernels"
        return gathered(t, tiles, b, index, dtype)

    monkeypatch.setattr(linear_torch, "_gathered", torch_products_only_off_fp32)
    return request.param


def _random_mask(n, k, density):
    return torch.rand(n, k) < density


def _check(x_shape, mask, dtype=torch.float32, bias=True, poison=False):
    """Run forward + backward and compare y, dX, dW, db with the float64 reference; dW exactly 0 off-mask."""
    n, k = mask.shape
    x = torch.randn(*x_shape, k, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype)
    if poison:
        w[~mask] = float("nan")  # a value stored under a pruned entry must never reach the result
    w.requires_grad_()
    b = torch.randn(n, dtype=dtype, requires_grad=True) if bias else None
    y = functional.masked_linear(x, w, mask, b)
    grad = torch.randn_like(y)
    y.backward(grad)

    x64, w64 = x.detach().double(), w.detach().double()
    b64 = None if b is None else b.detach().double()
    ref_y = reference.masked_linear(x64, w64, mask, b64)
    ref_dx, ref_dw, ref_db = reference.masked_linear_backward(grad.double(), x64, w64, mask, bias)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref_y.shape
    torch.testing.assert_close(y.double(), ref_y, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), ref_dx, atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), ref_dw, atol=atol, rtol=rtol)
    assert bool((w.grad[~mask] == 0).all()), "dW must be exactly zero where the mask is False"
    if bias:
        torch.testing.assert_close(b.grad.double(), ref_db, atol=atol, rtol=rtol)
    return y, x, w, b


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
    "x_shape,n,k",
    [
        ((37,), 29, 45),  # no dimension a multiple of the 16-tile
        ((1,), 33, 17),  # batch 1
        ((6,), 20, 1),  # K = 1
        ((2, 3), 19, 23),  # 3-D input
        ((), 18, 21),  # 1-D input
    ],
)
@pytest.mark.parametrize("density", [0.1, 0.6])
def test_matches_reference_on_odd_shapes(any_backend, x_shape, n, k, density):
    _check(x_shape, _random_mask(n, k, density))


@pytest.mark.parametrize("density", [0.02, 0.3, 0.9])
def test_unstructured_masks(any_backend, density):
    _check((24,), _random_mask(40, 50, density), bias=False)


@pytest.mark.parametrize("block", [8, 16, 32])
def test_block_masks(any_backend, block):
    _check((20,), block_mask(70, 90, 0.7, block))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(any_backend, dtype):
    _check((21,), _random_mask(35, 40, 0.5), dtype=dtype)


def test_all_pruned_mask(any_backend):
    mask = torch.zeros(30, 40, dtype=torch.bool)
    y, x, w, b = _check((9,), mask, poison=True)
    torch.testing.assert_close(y, b.detach().expand_as(y), rtol=0, atol=0)
    assert bool((x.grad == 0).all()) and bool((w.grad == 0).all())


def test_full_mask(any_backend):
    _check((13,), torch.ones(30, 40, dtype=torch.bool))


def test_full_mask_skips_the_mask_products_on_the_dense_route(monkeypatch):
    monkeypatch.setattr(linear_op, "_eager_route", lambda *a: (False, linear_op._UNSET))  # the Function's dense route
    calls = []
    scratch, mask_ = linear_torch._scratch_masked_weight, linear_torch.mask_
    monkeypatch.setattr(linear_torch, "_scratch_masked_weight", lambda w, m: calls.append("w") or scratch(w, m))
    monkeypatch.setattr(linear_torch, "mask_", lambda g, m: calls.append("g") or mask_(g, m))
    mask = torch.ones(30, 40, dtype=torch.bool)
    _check((13,), mask)  # exact against the reference, no mask product
    assert calls == []
    mask[3, 7] = False  # in place: the cached "full" answer must not survive the version change
    _check((13,), mask, poison=True)
    assert sorted(set(calls)) == ["g", "w"]


def test_nan_under_pruned_entries_does_not_leak(any_backend):
    y, x, w, _ = _check((17,), block_mask(40, 48, 0.5, 16) & _random_mask(40, 48, 0.7), poison=True)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(w.grad).all())


def test_empty_batch_and_k0(any_backend):
    x = torch.randn(0, 7, requires_grad=True)
    y = functional.masked_linear(x, torch.randn(5, 7), torch.ones(5, 7, dtype=torch.bool))
    assert y.shape == (0, 5)
    b = torch.randn(5)
    y = functional.masked_linear(torch.randn(3, 0), torch.randn(5, 0), torch.ones(5, 0, dtype=torch.bool), b)
    torch.testing.assert_close(y, b.expand(3, 5), rtol=0, atol=0)


def test_non_contiguous_inputs(any_backend):
    mask = _random_mask(24, 30, 0.4)
    x = torch.randn(30, 11).t()  # [11, 30], column-major
    w = torch.randn(24, 60)[:, ::2]  # strided weight
    y = functional.masked_linear(x, w, mask)
    torch.testing.assert_close(y.double(), reference.masked_linear(x.double(), w.double(), mask), **_tol32())


def _tol32():
    atol, rtol = TOL[torch.float32]
    return {"atol": atol, "rtol": rtol}


# ------------------------------------------------------------------------------------- the torch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_block_path_matches_reference(block_path, dtype):
    mask = block_mask(75, 70, 0.6, 32) & _random_mask(75, 70, 0.8)  # ragged edge tiles, holes inside tiles
    assert linear_torch.plan(mask, 9) is not None
    _check((9,), mask, dtype=dtype, poison=True)


def test_block_path_is_chosen_by_measured_crossover():
    n = k = 512
    sparse = block_mask(n, k, 0.95, 32)
    chosen = linear_torch.plan(sparse, 64)
    assert chosen is not None and chosen.rows.numel() == round(0.05 * (n // 32) * (k // 32))
    assert linear_torch.plan(torch.ones(n, k, dtype=torch.bool), 64) is None  # dense wins when all is alive
    assert linear_torch.plan(sparse, 1) is None  # too little work to pay for the block path's extra ops
    _check((64,), sparse)


def test_block_path_splits_work_without_changing_results(block_path, monkeypatch):
    mask = block_mask(150, 140, 0.6, 32) & _random_mask(150, 140, 0.9)
    p = linear_torch.plan(mask, 6)
    for key, starts in (("rows", p.row_starts), ("cols", p.col_starts)):
        parts = p.parts(key, 3)
        assert parts[0][0] == 0 and parts[-1][1] == len(starts) - 1
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    x, w, g = (torch.randn(shape, dtype=torch.float64) for shape in ((6, 140), (150, 140), (6, 150)))
    runs = []
    for workers in (1, 3):
        monkeypatch.setattr(linear_torch, "MAX_WORKERS", workers)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
        runs.append((linear_torch.forward(x, w, mask, None), *linear_torch.backward(g, x, w, mask, True, True)))
    for single, split in zip(*runs):  # the same products; only BLAS's intra-op threading may differ
        torch.testing.assert_close(single, split, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64_dense_path():
    mask = _random_mask(6, 7, 0.5)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: functional.masked_linear(x, w, mask, b), (x, w, b))


def test_gradcheck_float64_block_path(block_path):
    mask = block_mask(40, 36, 0.5, 32) & _random_mask(40, 36, 0.7)
    x = torch.randn(3, 36, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 36, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert linear_torch.plan(mask, 3) is not None
    # fast_mode checks random projections of the Jacobian: the full one (1,600 inputs) takes ~40 s here
    fn = lambda x, w, b: functional.masked_linear(x, w, mask, b)
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


# ------------------------------------------------------------------------------------- ops and dispatch


def test_custom_ops_pass_opcheck():
    mask = _random_mask(10, 20, 0.5)
    args = (torch.randn(3, 20, requires_grad=True), torch.randn(10, 20, requires_grad=True), mask, torch.randn(10))
    torch.library.opcheck(torch.ops.lthfast.masked_linear_fwd.default, args)
    for need_x, need_w in ((True, True), (False, True), (True, False)):
        bwd_args = (torch.randn(3, 10), torch.randn(3, 20), torch.randn(10, 20), mask, need_x, need_w)
        torch.library.opcheck(torch.ops.lthfast.masked_linear_bwd.default, bwd_args)


def test_auto_backend_falls_back_to_dense_when_most_tiles_are_alive(triton_backend, monkeypatch):
    from lthfast.kernels import masked_matmul

    calls = []
    real = masked_matmul.masked_linear_forward
    monkeypatch.setattr(masked_matmul, "masked_linear_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(linear_op, "CUDA_DENSE_ABOVE", 0.5)  # the mechanism; the shipped value is measured
    x, w = torch.randn(5, 64), torch.randn(48, 64)
    with lthfast.backend("auto"):
        functional.masked_linear(x, w, torch.ones(48, 64, dtype=torch.bool))
        assert not calls, "a full mask must run dense"
        sparse = block_mask(48, 64, 0.9, 16)
        y = functional.masked_linear(x, w, sparse)
        assert calls, "a sparse mask must run the kernels"
    torch.testing.assert_close(y.double(), reference.masked_linear(x.double(), w.double(), sparse), **_tol32())


def test_cuda_tile_shape_follows_the_mask_granularity(triton_backend):
    from lthfast.kernels.masked_matmul import choose_tile_shape

    assert choose_tile_shape(torch.ones(256, 256, dtype=torch.bool)) == (128, 128)  # all alive: coarsest tile
    assert choose_tile_shape(block_mask(512, 512, 0.75, 128)) == (128, 128)
    assert choose_tile_shape(block_mask(256, 256, 0.9, 64)) == (64, 64)  # 128x128 would be ~3.4x the alive area
    assert choose_tile_shape(block_mask(256, 256, 0.9, 32)) == (32, 32)  # 64x64 would be ~3x the alive area


def test_cuda_kernel_index_is_one_cached_choice_and_never_stale(monkeypatch):
    """On CUDA the ops look the kernels' index up once per call: the shape choice is cached with the indices,
    and dropped with them when the mask changes in place (here the CUDA route runs on a CPU mask)."""
    from lthfast.indexing import tiles as ti
    from lthfast.kernels import masked_matmul as mm

    monkeypatch.setattr(mm, "_interpreted", lambda t: False)
    mask = block_mask(256, 256, 0.9, 32)
    first = mm.mask_tile_index(mask)
    assert (first.block_n, first.block_k) == (32, 32)
    lookups = []
    monkeypatch.setattr(ti, "build_tile_index", lambda *a: lookups.append(a) or pytest.fail("rebuilt"))
    assert mm.mask_tile_index(mask) is first and not lookups

    monkeypatch.undo()
    monkeypatch.setattr(mm, "_interpreted", lambda t: False)
    mask.fill_(True)  # in place: every tile alive, so the coarsest tile wins now
    second = mm.mask_tile_index(mask)
    assert (second.block_n, second.block_k) == (128, 128) and second.alive_tiles == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_is_the_same_for_every_m_split_and_column_group(triton_backend, dtype):
    """dW over M-splits (fp32 partial sums finished by the last split: lthfast.kernels.dw_split) and over 1, 2 or 4
    tiles of one column per program, against the float64 reference: splits that divide M unevenly, more splits than
    BLOCK_M steps, columns whose alive tiles do not fill a group, a NaN under a pruned weight's gradient."""
    from lthfast.kernels import masked_matmul as mm

    mask = block_mask(100, 72, 0.5, 32) & _random_mask(100, 72, 0.7)  # dead tiles at 16x16 (CPU) and 32x32 (CUDA)
    mask[:16, :16] = True  # the first tile stays alive ...
    mask[:, 5] = False  # ... with a column that no alive weight reads
    index = mm.mask_tile_index(mask)
    assert 0 < index.alive_tiles < index.tile_alive.numel()
    x, g = torch.randn(53, 72).to(dtype), torch.randn(53, 100).to(dtype)
    x[0, 5] = float("nan")  # read by the alive tile's dot products; must not reach dW anywhere
    expected = torch.where(mask, g.double().t() @ x.double(), 0)
    atol, rtol = TOL[dtype]
    counts = index.tile_alive.sum(0)
    assert (counts % 4 != 0).any() and (counts > 1).any()  # padded groups, and groups of several tiles
    scale = expected.abs().max().item()
    for split in (1, 2, 3, 7):
        for group in (1, 2, 4):
            dw = mm.masked_linear_grad_weight(g, x, mask, index, split=split, group=group)
            where = f"split={split}, group={group}"
            assert dw.dtype == dtype and not dw[~mask].any(), f"{where}: dW leaks where the mask is False"
            torch.testing.assert_close(dw.double(), expected, atol=atol * scale, rtol=rtol, msg=where)
    with pytest.raises(ValueError, match="group must divide 4"):
        mm.masked_linear_grad_weight(g, x, mask, index, group=3)


def test_offsets_int32_and_int64_agree(triton_backend, monkeypatch):
    """The kernels index in int32 when every offset fits (``offset_type``), else int64: both give the same bits
    for y, dX and dW (with and without an M-split)."""
    import triton.language as tl

    from lthfast.kernels import masked_matmul as mm

    mask = block_mask(100, 72, 0.5, 32) & _random_mask(100, 72, 0.7)
    index = mm.mask_tile_index(mask)
    x, w, g, b = torch.randn(53, 72), torch.randn(100, 72), torch.randn(53, 100), torch.randn(100)
    runs = []
    for idx in (tl.int32, tl.int64):
        monkeypatch.setattr(mm, "offset_type", lambda *t, idx=idx: idx)
        y = mm.masked_linear_forward(x, w, mask, b, index)
        dx = mm.masked_linear_grad_input(g, w, mask, index)
        dws = [mm.masked_linear_grad_weight(g, x, mask, index, split=split) for split in (1, 3)]
        runs.append((y, dx, *dws))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_compiles_with_fullgraph():
    mask = _random_mask(12, 20, 0.5)
    x = torch.randn(2, 3, 20, requires_grad=True)
    w = torch.randn(12, 20, requires_grad=True)
    step = lambda x, w: functional.masked_linear(x, w, mask).square().sum()
    torch.compile(step, fullgraph=True, backend="aot_eager")(x, w).backward()
    expected = torch.autograd.grad(reference.masked_linear(x, w, mask).square().sum(), (x, w))
    torch.testing.assert_close((x.grad, w.grad), expected, **_tol32())


def test_float64_is_refused_by_the_forced_triton_backend(triton_backend):
    with pytest.raises(TypeError, match="Triton kernels"):
        functional.masked_linear(torch.randn(2, 4).double(), torch.randn(3, 4).double(), torch.ones(3, 4).bool())


@pytest.mark.parametrize(
    "change,error",
    [
        (lambda a: a.update(mask=a["mask"].float()), "bool"),
        (lambda a: a.update(mask=a["mask"][:, :3]), "mask shape"),
        (lambda a: a.update(x=a["x"][:, :3]), "does not end in K"),
        (lambda a: a.update(x=a["x"].double()), "x is torch.float64"),
        (lambda a: a.update(bias=torch.randn(7)), "bias"),
        (lambda a: a.update(weight=a["weight"][0]), "2-D"),
        (lambda a: a.update(weight=a["weight"].int(), x=a["x"].int()), "dtype"),
    ],
)
def test_bad_input_raises_a_clear_error(change, error):
    args = {
        "x": torch.randn(2, 4),
        "weight": torch.randn(3, 4),
        "mask": torch.ones(3, 4, dtype=torch.bool),
        "bias": None,
    }
    change(args)
    with pytest.raises((TypeError, ValueError), match=error):
        functional.masked_linear(args["x"], args["weight"], args["mask"], args["bias"])
    with pytest.raises((TypeError, ValueError), match="^fc1: "):  # the caller's name leads the message
        linear_op.masked_linear(args["x"], args["weight"], args["mask"], args["bias"], where="fc1")


# ------------------------------------------------------------------------------------------- MaskedLinear


def test_masked_linear_module_state_dict_and_dense_round_trip():
    layer = MaskedLinear(20, 12, mask=_random_mask(12, 20, 0.5))
    assert list(layer.state_dict()) == ["weight", "bias", "mask"]
    assert layer.state_dict()["mask"].dtype == torch.bool
    x = torch.randn(4, 20)
    dense = layer.to_dense()
    torch.testing.assert_close(dense(x), layer(x), **_tol32())
    plain = torch.nn.Linear(20, 12)
    wrapped = MaskedLinear.from_dense(plain)
    assert wrapped.weight is plain.weight and wrapped.bias is plain.bias
    torch.testing.assert_close(wrapped(x), plain(x), **_tol32())


def test_tile_index_follows_in_place_mask_changes(any_backend):
    layer = MaskedLinear(40, 36)
    x = torch.randn(7, 40)
    layer(x)  # builds and caches the tile index of the full mask
    with torch.no_grad():
        layer.mask[:, 16:] = False  # in place: same tensor, new version
    expected = reference.masked_linear(x.double(), layer.weight.double(), layer.mask, layer.bias.double())
    torch.testing.assert_close(layer(x).double(), expected, **_tol32())
    layer.set_mask_(torch.zeros(36, 40, dtype=torch.bool))
    torch.testing.assert_close(layer(x), layer.bias.expand(7, 36), rtol=0, atol=0)


def test_module_errors_name_the_layer():
    layer = MaskedLinear(31, 4)
    with pytest.raises(ValueError, match=r"^MaskedLinear\(in_features=31, out_features=4\): x shape \(2, 32\)"):
        layer(torch.randn(2, 32))
    with pytest.raises(TypeError, match=r"^MaskedLinear\(in_features=31, out_features=4\): x is torch.float64"):
        layer(torch.randn(2, 31, dtype=torch.float64))


def test_deepcopy_is_independent(any_backend):
    layer = MaskedLinear(24, 16, mask=_random_mask(16, 24, 0.5))
    x = torch.randn(5, 24)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    clone.set_mask_(torch.zeros(16, 24, dtype=torch.bool))
    assert bool(layer.mask.any())
    expected = reference.masked_linear(x.double(), layer.weight.double(), layer.mask, layer.bias.double())
    torch.testing.assert_close(layer(x).double(), expected, **_tol32())


# ------------------------------------------------------------------------------------------- GPU (CUDA only)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block,sparsity", [(1, 0.5), (32, 0.9), (64, 0.98)])
def test_gpu_large_shapes(triton_backend, dtype, block, sparsity):
    n, k, m = 1536, 2048, 1000
    mask = block_mask(n, k, sparsity, block).cuda()
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    y = functional.masked_linear(x, w, mask, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64, w64, b64 = x.detach().double(), w.detach().double(), b.detach().double()
    ref_dx, ref_dw, ref_db = reference.masked_linear_backward(grad.double(), x64, w64, mask, True)
    atol, rtol = TOL[dtype]
    scale = k**0.5  # outputs and gradients are sums of ~K unit-variance terms
    for out, ref in ((y, reference.masked_linear(x64, w64, mask, b64)), (x.grad, ref_dx), (w.grad, ref_dw)):
        torch.testing.assert_close(out.double(), ref, atol=atol * scale, rtol=rtol)
    torch.testing.assert_close(b.grad.double(), ref_db, atol=atol * m**0.5, rtol=rtol)
    assert bool((w.grad[~mask] == 0).all())


@pytest.mark.gpu
def test_gpu_fp32_does_not_use_tf32_by_default(triton_backend):
    assert not torch.backends.cuda.matmul.allow_tf32
    x = torch.randn(256, 512, device="cuda")
    w = torch.randn(384, 512, device="cuda")
    mask = block_mask(384, 512, 0.5, 32).cuda()
    y = functional.masked_linear(x, w, mask)
    ref = reference.masked_linear(x.double(), w.double(), mask)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)  # TF32 would err by ~1e-2


def test_block_path_with_worker_threads_and_autograd(block_path, monkeypatch):
    """Workers run on pool threads, where grad mode is not inherited: inputs that require grad must still work."""
    monkeypatch.setattr(linear_torch, "MAX_WORKERS", 3)
    monkeypatch.setattr(linear_torch.torch, "get_num_threads", lambda: 3)
    _check((7,), block_mask(128, 96, 0.5, 32) & _random_mask(128, 96, 0.8))  # no padding copy of the bias


def test_dw_split_count_fills_the_gpu(monkeypatch):
    from lthfast.kernels import dw_split

    cuda = torch.device("cuda", 0)  # a descriptor only: nothing below touches a GPU
    monkeypatch.setattr(dw_split, "_sm_count", lambda index: 132)
    monkeypatch.setattr(dw_split._backend, "interpreter_enabled", lambda: False)
    assert dw_split.split_count(8192, 328, torch.device("cpu")) == 1
    assert dw_split.split_count(8192, 328, cuda) == 2  # 4 * 132 programs wanted, 328 tiles
    assert dw_split.split_count(8192, 64, cuda) == 4  # capped: at least 2048 rows per split
    assert dw_split.split_count(8192, 4096, cuda) == 1  # enough tiles already
    assert dw_split.split_count(1000, 8, cuda) == 1  # too few rows to split


def _tile_mix_mask(n, k, tile, seed=0):
    from lthfast.bench.masks import mixed_tile_mask

    return mixed_tile_mask((n, k), tile, tile, torch.Generator().manual_seed(seed), density=0.4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(48, 64), (45, 71)])
def test_kernels_on_full_partial_and_empty_tiles(triton_backend, dtype, n, k):
    """Masks mixing full, partial and empty kernel tiles (the full ones take the mask-free loops), NaN stored under
    every pruned weight: y, dX, dW and db against the float64 reference, dW exactly zero where pruned."""
    from lthfast.indexing.tiles import full_partial
    from lthfast.kernels.masked_matmul import INTERPRETER_TILE, mask_tile_index

    mask = _tile_mix_mask(n, k, INTERPRETER_TILE if not torch.cuda.is_available() else 64)
    lists = full_partial(mask_tile_index(mask), mask)
    assert lists.full_tiles > 0 and lists.partial_tiles > 0
    _check((19,), mask, dtype=dtype, poison=True)


def test_full_tiles_do_not_read_the_mask(triton_backend):
    """The mechanism itself: with tile lists that call every tile full, the kernels never read the mask, so a
    pruned entry passed in the mask (but not in the lists' mask) reaches y, dX and dW; with lists built from that
    mask they do not."""
    from lthfast.indexing.tiles import build_tile_index, full_partial, group_full
    from lthfast.kernels import masked_matmul as mm

    n = k = 2 * mm.INTERPRETER_TILE if not torch.cuda.is_available() else 128
    full = torch.ones(n, k, dtype=torch.bool)
    pruned = full.clone()
    pruned[1, 2] = False
    x, w, g = torch.randn(8, k), torch.randn(n, k), torch.randn(8, n)
    for lists_from, reaches in ((full, True), (pruned, False)):
        index = build_tile_index(full, *mm.pick_tile_shape(full))
        full_partial(index, lists_from)
        group_full(index, lists_from, mm.DW_GROUP_ALIGN)
        y = mm.masked_linear_forward(x, w, pruned, None, index)
        dx = mm.masked_linear_grad_input(g, w, pruned, index)
        dw = mm.masked_linear_grad_weight(g, x, pruned, index, split=1)
        w_used = w if reaches else w * pruned
        torch.testing.assert_close(y, x @ w_used.t(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(dx, g @ w_used, atol=1e-4, rtol=1e-5)
        assert (float(dw[1, 2]) != 0.0) == reaches


def test_a_graph_capture_reads_the_mask_on_every_tile(triton_backend, monkeypatch):
    """Inside a CUDA graph capture (``dw_split.full_tiles`` False) the kernels read the mask on full tiles too, so
    a graph replayed after an in-place prune stays exact: stale lists calling every tile full must not matter."""
    from lthfast.indexing.tiles import build_tile_index, full_partial, group_full
    from lthfast.kernels import masked_matmul as mm

    monkeypatch.setattr(mm, "full_tiles", lambda t: False)
    n = k = 2 * mm.INTERPRETER_TILE if not torch.cuda.is_available() else 128
    full = torch.ones(n, k, dtype=torch.bool)
    pruned = full.clone()
    pruned[1, 2] = False
    x, w, g = torch.randn(8, k), torch.randn(n, k), torch.randn(8, n)
    index = build_tile_index(full, *mm.pick_tile_shape(full))
    full_partial(index, full)  # stale lists: every tile full
    group_full(index, full, mm.DW_GROUP_ALIGN)
    w_used = w * pruned
    torch.testing.assert_close(
        mm.masked_linear_forward(x, w, pruned, None, index), x @ w_used.t(), atol=1e-4, rtol=1e-5
    )
    torch.testing.assert_close(mm.masked_linear_grad_input(g, w, pruned, index), g @ w_used, atol=1e-4, rtol=1e-5)
    for split in (1, 2):
        assert float(mm.masked_linear_grad_weight(g, x, pruned, index, split=split)[1, 2]) == 0.0


@pytest.mark.parametrize("tile", [32, 64, 128])
def test_kernels_at_the_cuda_tile_sizes(triton_backend, tile):
    """The kernels at each CUDA weight-tile size (the interpreter's own is 16), on a mask in blocks of that size
    (full tiles) with a partial and an empty tile and odd edges, NaN under every pruned weight: y, dX and dW (direct
    and split) against float64."""
    from lthfast.indexing.tiles import tile_index
    from lthfast.kernels import masked_matmul as mm

    if torch.cuda.is_available():
        pytest.skip("the interpreter's case; on CUDA the tile sizes are covered by the gpu tests")
    n, k = 2 * tile + 5, 2 * tile + 3
    mask = block_mask(n, k, 0.25, tile)
    mask[:tile, :tile] = True
    mask[:tile, tile : 2 * tile] = torch.rand(tile, tile) < 0.5  # a partial tile beside a full one
    mask[tile : 2 * tile, :tile] = False  # an empty one
    x, w, g = torch.randn(9, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64), torch.randn(9, n)
    w64 = torch.where(mask, w, 0)
    w = w.float().masked_fill(~mask, float("nan"))
    index = tile_index(mask, tile, tile)
    y = mm.masked_linear_forward(x.float(), w, mask, None, index)
    dx = mm.masked_linear_grad_input(g, w, mask, index)
    torch.testing.assert_close(y.double(), x @ w64.t(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dx.double(), g.double() @ w64, atol=1e-4, rtol=1e-5)
    for split in (1, 2):
        dw = mm.masked_linear_grad_weight(g, x.float(), mask, index, split=split, group=1)
        torch.testing.assert_close(dw.double(), torch.where(mask, g.double().t() @ x, 0), atol=1e-4, rtol=1e-5)
        assert bool((dw[~mask] == 0).all())
