"""Weight gradients in one launch (lthfast.kernels.dw_split): the M-splits finished by the last split to arrive,
and the dead tiles zeroed by the same launch, so dW is allocated uninitialized.

Each dW is checked against float64 on mixed full / partial / empty tiles at odd shapes, with dW's fresh memory
pre-filled with NaN (``torch.empty`` patched for the call: an entry the kernel leaves unwritten stays NaN), NaN in
X and dY under pruned weights, and the arrival counters back at 0 afterwards.
"""

import pytest
import torch
import torch.nn.functional as F

from lthfast.bench.masks import mixed_tile_mask
from lthfast.indexing.tiles import tile_full

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from lthfast.kernels.dw_split import finish_split  # noqa: E402 (after the check that triton is there)

# (atol relative to the largest reference magnitude, rtol) per dtype, against float64: fp32 sums in fp32; bf16
# inputs are exact in float64 and accumulate in fp32, so the error is dW's rounding to bf16 (one ulp: 2^-7).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 8e-3)}
SPLITS = (1, 2, 3, 1000)  # 1000: more splits than rows, cut to one row per split


def _mm():
    from lthfast.kernels import masked_matmul

    return masked_matmul


def _mc():
    from lthfast.kernels import masked_conv

    return masked_conv


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` / ``torch.empty_like`` return floating tensors full of NaN; yields the data pointers of
    those they made."""
    made = []
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
            made.append(t.data_ptr())
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
    return made


def _counters_at_rest():
    from lthfast.kernels import dw_split

    return all(not bool(c.any()) for c in dw_split._counters.values())


def _check(dw, expected, mask, dtype, where):
    atol, rtol = TOL[dtype]
    assert dw.dtype == dtype, where
    assert bool((dw[~mask] == 0).all()), f"{where}: dW is not exactly zero where the mask is False (dead tiles too)"
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(dw.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{where}: {m}")


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _mixed_mask(shape, block_n, block_c, seed):
    with torch.device("cpu"):
        return mixed_tile_mask(shape, block_n, block_c, torch.Generator().manual_seed(seed)).to(_device())


def _linear_problem(dtype, n=70, k=53, m=41):
    mm = _mm()
    block = mm.INTERPRETER_TILE if _device().type == "cpu" else 32
    mask = _mixed_mask((n, k), block, block, 3)
    mask[:, 7] = False  # an input feature and an output feature no alive weight reads
    mask[9, :] = False
    x, g = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    expected = torch.where(mask, g.double().t() @ x.double(), 0)
    x[3, 7] = float("nan")  # under pruned weights only: must reach no entry of dW
    g[5, 9] = float("inf")
    return mask, x, g, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_dw_writes_every_entry_for_every_split_and_group(triton_backend, nan_empty, dtype):
    mm = _mm()
    mask, x, g, expected = _linear_problem(dtype)
    index = mm.mask_tile_index(mask)
    alive, full = int(index.tile_alive.sum()), int(tile_full(mask, index.block_n, index.block_k).sum())
    assert 0 < full < alive < index.tile_alive.numel(), "the case must mix full, partial and dead tiles"
    for split in SPLITS:
        for group in (1, 2, 4):
            dw = mm.masked_linear_grad_weight(g, x, mask, index, split=split, group=group)
            assert dw.data_ptr() in nan_empty, "dW must come from torch.empty (NaN-filled here)"
            _check(dw, expected, mask, dtype, f"split={split} group={group}")
            assert _counters_at_rest(), f"split={split} group={group}: arrival counters left nonzero"


def test_linear_dw_twice_on_the_same_counters_gives_the_same_bits(triton_backend):
    from lthfast.kernels import dw_split

    mm = _mm()
    mask, x, g, expected = _linear_problem(torch.float32, n=50, k=37, m=29)
    index = mm.mask_tile_index(mask)
    first = mm.masked_linear_grad_weight(g, x, mask, index, split=3, group=1)
    arrays = {key: c.data_ptr() for key, c in dw_split._counters.items()}
    second = mm.masked_linear_grad_weight(g, x, mask, index, split=3, group=1)
    assert {key: c.data_ptr() for key, c in dw_split._counters.items()} == arrays, "the counters are reused"
    assert torch.equal(first, second)
    _check(second, expected, mask, torch.float32, "second call")


def test_linear_dw_of_an_all_pruned_mask_or_no_tokens_is_zeros(triton_backend, nan_empty):
    mm = _mm()
    mask = torch.zeros(40, 33, dtype=torch.bool)
    x, g = torch.randn(9, 33), torch.randn(9, 40)
    dw = mm.masked_linear_grad_weight(g, x, mask, mm.mask_tile_index(mask), split=2)
    assert dw.shape == (40, 33) and not bool(dw.any()) and not bool(dw.isnan().any())
    mask[3, 4] = True
    dw = mm.masked_linear_grad_weight(g[:0], x[:0], mask, mm.mask_tile_index(mask))
    assert dw.shape == (40, 33) and not bool(dw.any()) and not bool(dw.isnan().any())


def _conv_problem(dtype, stride, padding, dilation, kernel=(3, 2)):
    mc = _mc()
    bn, bc = mc.conv_tiles(_device())
    n, c = 2 * bn + 5, 2 * bc + 3
    mask = _mixed_mask((n, c, *kernel), bn, bc, 5)
    mask[:, 4] = False  # an input channel and an output channel no alive weight reads
    mask[6] = False
    x = torch.randn(2, c, 7, 6).to(dtype)
    w = torch.randn(n, c, *kernel, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x.double(), w, stride=stride, padding=padding, dilation=dilation)
    g = torch.randn(y.shape).to(dtype)
    y.backward(g.double())
    expected = torch.where(mask, w.grad, 0)
    x[1, 4] = float("nan")
    g[0, 6, 1] = float("inf")
    return mask, x, g, expected


# (stride, padding, dilation, dtype, splits); 3x2 taps. 8 splits: more than the 5 BLOCK_M steps of the first case's
# 70 output pixels (the interpreter's conv dW is slow: each case runs every split of every (tile, tap) program).
CONV_CASES = [
    ((1, 1), (1, 0), (1, 1), torch.float32, (1, 2, 3, 8)),
    ((2, 1), (0, 1), (1, 1), torch.bfloat16, (1, 3)),
    ((1, 2), (1, 1), (2, 1), torch.float32, (2,)),
]


@pytest.mark.parametrize("stride, padding, dilation, dtype, splits", CONV_CASES)
def test_conv_dw_writes_every_entry_for_every_split(triton_backend, stride, padding, dilation, dtype, splits):
    mc = _mc()
    mask, x, g, expected = _conv_problem(dtype, stride, padding, dilation)
    index = mc.conv_tile_index(mask)
    assert 0 < index.alive_tiles < index.tile_alive.numel(), "the case must have alive and dead tiles"
    pads = (padding[0], padding[0], padding[1], padding[1])
    for split in splits:
        grad_w = torch.full(mask.shape, float("nan")).to(dtype)  # no entry may be left as it was
        dw = mc.conv2d_grad_weight(g, x, mask, grad_w, stride, pads, dilation, split=split)
        assert dw is grad_w
        _check(dw, expected, mask, dtype, f"split={split}")
        assert _counters_at_rest(), f"split={split}: arrival counters left nonzero"


def test_conv_dw_through_the_op_in_channels_last(triton_backend, nan_empty):
    """The op allocates dW with ``torch.empty_like`` (NaN-filled here), in the weight's channels_last layout."""
    from lthfast.ops.conv import masked_conv2d

    mask, x, g, expected = _conv_problem(torch.float32, (1, 1), (1, 1), (1, 1), kernel=(3, 3))
    x = torch.nan_to_num(x).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(mask.shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.nan_to_num(g, posinf=0.0)
    y = masked_conv2d(x, w, mask, None, padding=1)
    (dw,) = torch.autograd.grad(y, (w,), g)
    xr, wr = x.detach().double(), w.detach().double().requires_grad_()
    F.conv2d(xr, torch.where(mask, wr, 0), padding=1).backward(g.double())
    assert dw.data_ptr() in nan_empty, "dW must come from torch.empty_like (NaN-filled here)"
    _check(dw, torch.where(mask, wr.grad, 0), mask, torch.float32, "op")


def test_conv_dw_of_an_all_pruned_mask_is_zeros(triton_backend):
    mc = _mc()
    mask = torch.zeros(7, 5, 3, 3, dtype=torch.bool)
    x, g = torch.randn(2, 5, 6, 6), torch.randn(2, 7, 6, 6)
    grad_w = torch.full(mask.shape, float("nan"))
    dw = mc.conv2d_grad_weight(g, x, mask, grad_w, (1, 1), (1, 1, 1, 1), (1, 1), split=2)
    assert not bool(dw.any()) and not bool(dw.isnan().any())


def test_dead_tiles_list_the_tiles_without_an_alive_entry_once():
    from lthfast.indexing.tiles import build_tile_index, dead_tiles

    mask = torch.rand(70, 53) < 0.3
    mask[16:48] = False
    index = build_tile_index(mask, 16, 16)
    rows, cols = dead_tiles(index)
    assert rows.dtype == cols.dtype == torch.int32
    expected = (~index.tile_alive).nonzero()
    assert torch.equal(torch.stack((rows, cols), 1).long().cpu(), expected.cpu())  # row-major, each once
    assert dead_tiles(index)[0] is rows  # cached on the index


# The shared split fixup on its own: every program loads its partial sum from ``parts`` [SPLIT, P, ROWS, COLS].
# SHIFT rotates which M-split each program along grid dim 1 plays, so that every split index is the last to arrive
# in the interpreter (which runs a program's splits in grid order).
@triton.jit
def _fixup_kernel(parts, ws, counters, m_ptr, dw_ptr, full_ptr, N, C, SHIFT: tl.constexpr, FULL_TILES: tl.constexpr,
                  ROWS: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    split = (tl.program_id(1) + SHIFT) % tl.num_programs(1)
    block = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    acc = tl.load(parts + (split * tl.num_programs(0) + pid) * (ROWS * COLS) + block)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    full = tl.load(full_ptr + pid) != 0
    finish_split(acc, ws, counters, pid, split, full, m_ptr, dw_ptr, rows, cols, rows < N, cols < C, C, 1, C, 1,
                 FULL_TILES, ROWS, COLS)  # fmt: skip


@pytest.mark.parametrize("full_tiles", [False, True])
def test_split_fixup_sums_in_split_order_whichever_split_arrives_last(triton_backend, full_tiles):
    """The last split to arrive sums the partials in split order: the same bits whichever it is, those of a
    sequential fp32 sum (checked sensitive to the order), exact zeros where the mask is False, counters back at 0."""
    from lthfast.kernels import dw_split

    splits, programs, rows, cols = 3, 2, 16, 16
    n, c = programs * rows - 5, cols - 3  # edge rows and columns outside dW
    scale = 10.0 ** torch.randint(-6, 7, (splits, programs, rows, cols))
    parts = (torch.randn(splits, programs, rows, cols, dtype=torch.float64) * scale).float()
    mask = torch.rand(n, c) < 0.7
    mask[:rows] = True  # program 0's tile is full: stored without reading the mask when FULL_TILES
    mask[rows:, 1] = False  # program 1's is partial
    full = torch.tensor([1, 0], dtype=torch.int8)
    ordered = torch.zeros(programs, rows, cols)
    for s in range(splits):
        ordered += parts[s]
    reverse = torch.zeros(programs, rows, cols)
    for s in reversed(range(splits)):
        reverse += parts[s]
    assert not torch.equal(ordered, reverse), "the partial sums must be sensitive to the summation order"
    expected = torch.where(mask, ordered.reshape(-1, cols)[:n, :c], 0)
    counters = dw_split.counters(programs, parts.device)
    for shift in range(splits):
        ws = torch.full((programs * splits * rows * cols,), float("nan"))
        dw = torch.full((n, c), float("nan"))
        _fixup_kernel[(programs, splits)](parts, ws, counters, mask.view(torch.uint8), dw, full, n, c, shift,
                                          full_tiles, rows, cols)  # fmt: skip
        assert torch.equal(dw, expected), f"shift {shift}: not the split-order sum"
        assert not bool(counters.any()), f"shift {shift}: counters left nonzero"


def test_dead_tiles_per_program_fill_the_gpu(monkeypatch):
    from lthfast.kernels import dw_split

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(dw_split, "_sm_count", lambda index: 132)
    monkeypatch.setattr(dw_split._backend, "interpreter_enabled", lambda: False)
    assert dw_split.dead_per_program(16056, torch.device("cpu")) == dw_split.INTERPRETER_DEAD_PER_PROGRAM
    assert dw_split.dead_per_program(16056, cuda) == 31  # 518 programs for 4 * 132 wanted
    assert dw_split.dead_per_program(100, cuda) == 1


def test_counters_are_cached_per_device_and_grown_zeroed():
    from lthfast.kernels import dw_split

    cpu = torch.device("cpu")
    first = dw_split.counters(10, cpu)
    assert first.dtype == torch.int32 and first.numel() >= max(10, dw_split.MIN_COUNTERS) and not bool(first.any())
    assert dw_split.counters(first.numel(), cpu) is first
    grown = dw_split.counters(first.numel() + 1, cpu)
    assert grown.numel() >= 2 * first.numel() and not bool(grown.any())
    assert dw_split.counters(5, cpu) is grown
