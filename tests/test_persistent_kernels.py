"""The persistent, TMA-fed forward and dX kernels (lthfast.kernels.persistent) against float64 math: TMA loads and
the pointer fallback, masks mixing full, partial and empty tiles with NaN under every pruned weight, several program
counts, the full-tile loops switched off; and their sm_90 compile (tensor cores, TMA, no spills)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lthfast.bench import offline
from lthfast.bench.masks import block_mask

ROOT = Path(__file__).resolve().parents[1]

# (atol, rtol) against float64, as tests/test_masked_linear.py: fp32 sums of K products (IEEE); fp16/bf16 inputs are
# exact in float64, products accumulate in fp32, and the output is rounded once to 16 bits (rtol one ulp).
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-3, 8e-3)}

# Odd sizes: no dimension a multiple of the tile, several partial edge tiles. Rows [BAND) of the mask and columns
# [BAND) are pruned whole: a tile row (column) with no alive tile at 16- and 32-wide tiles.
M, N, K = 37, 75, 90
BAND = slice(32, 64)


def _tile() -> int:
    """The weight tile the tests index at: the interpreter's 16, or 32 on a GPU (as wide as TMA boxes go small)."""
    from lthfast.kernels.masked_matmul import INTERPRETER_TILE

    return 32 if torch.cuda.is_available() else INTERPRETER_TILE


def _mask(n: int = N, k: int = K, seed: int = 0) -> torch.Tensor:
    """Blocks of the tile pruned whole, scattered pruning inside half the others, and the pruned bands."""
    gen = torch.Generator().manual_seed(seed)
    tile = _tile()
    alive = block_mask(n, k, 0.3, tile, gen)
    full = block_mask(n, k, 0.5, tile, gen)
    mask = alive & (full | (torch.rand(n, k, generator=gen) < 0.6))
    mask[BAND, :] = False
    mask[:, BAND] = False
    return mask


def _index(mask: torch.Tensor):
    from lthfast.indexing.tiles import tile_index

    return tile_index(mask, _tile(), _tile())


def _padded(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """randn [rows, cols] as a view into rows padded to 16 bytes: odd logical shape, TMA-addressable."""
    pad = -(-cols * dtype.itemsize // 16) * 16 // dtype.itemsize
    return torch.randn(rows, pad, device=device).to(dtype)[:, :cols]


def _operands(layout: str, dtype: torch.dtype, mask: torch.Tensor, device):
    """x [M, K], weight [N, K] with NaN under every pruned entry, dY [M, N], bias [N]: TMA-addressable ("tma"), or
    contiguous with rows of an odd byte length, which TMA cannot address ("pointer")."""
    n, k = mask.shape
    if layout == "tma":
        x, w, g = _padded(M, k, dtype, device), _padded(n, k, dtype, device), _padded(M, n, dtype, device)
    else:
        x, w, g = (torch.randn(shape, device=device).to(dtype) for shape in ((M, k), (n, k), (M, n)))
    w[~mask.to(device)] = float("nan")
    return x, w, g, torch.randn(n, device=device).to(dtype)


def _expected(x, w, g, mask, bias):
    w64 = torch.where(mask.to(w.device), w.double(), 0.0)
    y = x.double() @ w64.t() + (0 if bias is None else bias.double())
    return y, g.double() @ w64


def _assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("layout", ["tma", "pointer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_grad_input_match_float64(triton_backend, device, layout, dtype):
    from lthfast.indexing.tiles import full_partial
    from lthfast.kernels import persistent

    mask = _mask().to(device)
    index = _index(mask)
    lists = full_partial(index, mask)
    assert lists.full_tiles > 0 and lists.partial_tiles > 0 and index.alive_tiles < index.tile_alive.numel()
    x, w, g, b = _operands(layout, dtype, mask, device)
    reasons = [persistent.tma_unsupported(t) for t in (x, w, g)]
    assert all(r is None for r in reasons) if layout == "tma" else all(r is not None for r in reasons), reasons
    y = persistent.persistent_linear_forward(x, w, mask, b, index)
    dx = persistent.persistent_linear_grad_input(g, w, mask, index)
    ref_y, ref_dx = _expected(x, w, g, mask, b)
    _assert_close(y, ref_y, dtype)
    _assert_close(dx, ref_dx, dtype)
    # the pruned bands: output columns with no alive tile in their row get the bias alone, dX columns zeros
    assert torch.equal(y[:, BAND], b[BAND].expand(M, -1)) and not dx[:, BAND].any()


def test_no_bias_and_a_transposed_input(triton_backend, device):
    from lthfast.kernels import persistent

    mask = _mask(seed=1).to(device)
    index = _index(mask)
    x = torch.randn(K, M, device=device).t()  # column-major: last stride M, no TMA
    w = _padded(N, K, torch.float32, device)
    w[~mask] = float("nan")
    assert persistent.tma_unsupported(x) == f"last stride {M}, not 1"
    y = persistent.persistent_linear_forward(x, w, mask, None, index)
    _assert_close(y, x.double() @ torch.where(mask, w.double(), 0.0).t(), torch.float32)
    assert not y[:, BAND].any()


@pytest.mark.parametrize("programs", [1, 2, 7, 40])
def test_every_program_count_writes_every_tile(triton_backend, device, programs):
    """One program looping over all tiles, a few striding over them, and more programs than tiles (some idle)."""
    from lthfast.kernels import persistent

    mask = _mask(seed=2).to(device)
    index = _index(mask)
    x, w, g, b = _operands("tma", torch.float32, mask, device)
    ref_y, ref_dx = _expected(x, w, g, mask, b)
    _assert_close(persistent.persistent_linear_forward(x, w, mask, b, index, programs=programs), ref_y, torch.float32)
    _assert_close(persistent.persistent_linear_grad_input(g, w, mask, index, programs=programs), ref_dx, torch.float32)


def test_offsets_int32_and_int64_agree(triton_backend, device, monkeypatch):
    """The pointer fallback indexes in int64 where offsets need it: the same bits as int32."""
    import triton.language as tl

    from lthfast.kernels import persistent

    mask = _mask(seed=3).to(device)
    index = _index(mask)
    x, w, g, b = _operands("pointer", torch.float32, mask, device)
    runs = []
    for idx in (tl.int32, tl.int64):
        monkeypatch.setattr(persistent, "offset_type", lambda *tensors, idx=idx: idx)
        runs.append((persistent.persistent_linear_forward(x, w, mask, b, index),
                     persistent.persistent_linear_grad_input(g, w, mask, index)))  # fmt: skip
    for narrow, wide in zip(*runs):
        assert torch.equal(narrow, wide)


@pytest.mark.parametrize("full", [True, False])
def test_full_tiles_skip_the_mask_only_when_on(triton_backend, device, monkeypatch, full):
    """With tile lists that call every tile full, a pruned entry reaches y and dX through the mask-free loops;
    with those loops off (FULL_TILES, as inside a CUDA graph capture) every tile reads the mask and it does not."""
    from lthfast.indexing.tiles import build_tile_index, full_partial
    from lthfast.kernels import persistent

    monkeypatch.setattr(persistent, "full_tiles", lambda t: full)
    n = k = 2 * _tile()
    alive = torch.ones(n, k, dtype=torch.bool, device=device)
    pruned = alive.clone()
    pruned[1, 2] = False
    index = build_tile_index(alive, _tile(), _tile())
    full_partial(index, alive)  # stale lists: every tile full
    x, w, g = torch.randn(9, k, device=device), torch.randn(n, k, device=device), torch.randn(9, n, device=device)
    w_used = w if full else w * pruned
    y = persistent.persistent_linear_forward(x, w, pruned, None, index)
    dx = persistent.persistent_linear_grad_input(g, w, pruned, index)
    torch.testing.assert_close(y.double(), x.double() @ w_used.double().t(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dx.double(), g.double() @ w_used.double(), atol=1e-4, rtol=1e-5)


def test_all_pruned_and_empty_shapes(triton_backend, device):
    """Every tile pruned: y is the bias, dX zeros (NaN stored everywhere in W); and masked_matmul's empty shapes."""
    from lthfast.kernels import persistent

    mask = torch.zeros(20, 24, dtype=torch.bool, device=device)
    index = _index(mask)
    x, g, b = torch.randn(5, 24, device=device), torch.randn(5, 20, device=device), torch.randn(20, device=device)
    w = torch.full((20, 24), float("nan"), device=device)
    assert torch.equal(persistent.persistent_linear_forward(x, w, mask, b, index), b.expand(5, 20))
    assert torch.equal(persistent.persistent_linear_grad_input(g, w, mask, index), torch.zeros(5, 24, device=device))

    def empty(n, k):
        return torch.ones(n, k, dtype=torch.bool, device=device)

    assert persistent.persistent_linear_forward(x[:0], w, mask, b, index).shape == (0, 20)
    assert persistent.persistent_linear_grad_input(g[:0], w, mask, index).shape == (0, 24)
    m0 = empty(0, 24)
    assert persistent.persistent_linear_forward(x, w[:0], m0, None, _index(m0)).shape == (5, 0)
    dx = persistent.persistent_linear_grad_input(g[:, :0], w[:0], m0, _index(m0))
    assert torch.equal(dx, torch.zeros(5, 24, device=device))
    k0 = empty(20, 0)
    assert torch.equal(persistent.persistent_linear_forward(x[:, :0], w[:, :0], k0, b, _index(k0)), b.expand(5, 20))
    assert persistent.persistent_linear_grad_input(g, w[:, :0], k0, _index(k0)).shape == (5, 0)


def test_tma_unsupported_names_the_reason():
    from lthfast.kernels import persistent

    x = torch.randn(8, 40)
    assert persistent.tma_unsupported(x) is None
    assert persistent.tma_unsupported(x.double()) == "dtype torch.float64"
    assert persistent.tma_unsupported(x[:, :0]) == "shape (8, 0)"
    assert persistent.tma_unsupported(x[:, ::2]) == "last stride 2, not 1"
    assert "not 16-byte aligned" in persistent.tma_unsupported(x.view(-1)[1:-7].view(8, 39)[:, :38])
    assert persistent.tma_unsupported(x[:, :30].contiguous()) == "row stride of 120 bytes, not a multiple of 16"


def test_cuda_grid_is_one_wave_and_sets_the_slab_rows(monkeypatch):
    """On CUDA the grid is min(output tiles, SMs x PROGRAMS_PER_SM), and the X (dY) descriptor's block takes the
    launched config's BLOCK_M (here the CUDA decisions taken on CPU tensors, as lthfast.bench.offline does)."""
    from lthfast.kernels import persistent

    monkeypatch.setattr(persistent, "_interpreted", lambda t: False)
    monkeypatch.setattr(persistent, "_sm_count", lambda device: 132)
    x = torch.empty(8192, 64, dtype=torch.bfloat16)
    slab = persistent._descriptor(x, 32)
    grid = persistent._programs_grid(x, 8192, 128, slab, None)
    assert grid({"BLOCK_M": 128, "PROGRAMS_PER_SM": 2}) == (264,) and slab.block_shape == [128, 32]
    assert grid({"BLOCK_M": 64, "PROGRAMS_PER_SM": 4}) == (528,) and slab.block_shape == [64, 32]
    assert persistent._programs_grid(x, 100, 4, slab, None)({"BLOCK_M": 64, "PROGRAMS_PER_SM": 4}) == (8,)
    key = (8192, 4096, 4096, 128, 128, 16, torch.bfloat16)
    wide = persistent._prune_configs(persistent.CUDA_CONFIGS, key)  # 128x128 weight tiles: 8 warps, one per SM
    assert wide == [{"BLOCK_M": 128, "PROGRAMS_PER_SM": 1, "num_warps": 8, "num_stages": 3}]


_COMPILE = """
import json, sys, torch
from lthfast.bench import offline
from lthfast.bench.masks import block_mask
from lthfast.indexing.tiles import tile_index
from lthfast.kernels import persistent
mask = block_mask(512, 512, 0.5, 32, torch.Generator().manual_seed(0)) & (torch.rand(512, 512) < 0.9)
index = tile_index(mask, 32, 32)
x, w, g = (torch.empty(shape, dtype=torch.bfloat16) for shape in ((1024, 512), (512, 512), (1024, 512)))
cuda = [(persistent, "_interpreted", lambda t: False), (persistent, "_sm_count", lambda device: offline.H100_SMS),
        (persistent, "_tma_capable", lambda device: True)]
with offline.cuda_target(all_configs=False) as compiled, offline.patched(cuda):
    persistent.persistent_linear_forward(x, w, mask, None, index)
    persistent.persistent_linear_grad_input(g, w, mask, index)
with open(sys.argv[1], "w") as f:
    json.dump([c.row() for c in compiled], f)
"""


@pytest.mark.skipif(not offline.available(), reason="triton without its NVIDIA backend tools")
@pytest.mark.slow
def test_sm90_compile_uses_tma_and_wgmma_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {"_forward_persistent_kernel", "_grad_input_persistent_kernel"}
    for r in rows:
        assert r["wgmma"] > 0, f"{r['kernel']}: the dot does not run on Hopper's tensor cores"
        assert r["tma"] > 0, f"{r['kernel']}: no TMA (cp.async.bulk) loads"
        assert r["local"] == 0, f"{r['kernel']}: {r['local']} bytes of local memory per thread (register spills)"
        assert r["programs_per_sm"] >= r["PROGRAMS_PER_SM"], f"{r['kernel']}: the grid is more than one wave"
