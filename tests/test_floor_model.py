"""lthfast.bench.floor's per-kernel L2-feed model: its bytes per flop, and its fit to the one GPU run (H200, bf16,
Linear 4096x4096 at 8192 tokens; benchmarks/results/h200-notes.md)."""

import pytest

from lthfast.bench.floor import gemm_bytes_per_flop, predict_gemm_ms

TILES = (4096 // 32) ** 2


def test_bytes_per_flop():
    # the forward at 32x32 tiles, BLOCK_M 128, bf16: 1/32 + 1.5/128 with the mask, 1/32 + 1/128 without
    assert gemm_bytes_per_flop("forward", 128, 32, 32, 2, partial=True) == pytest.approx(1 / 32 + 1.5 / 128)
    assert gemm_bytes_per_flop("forward", 128, 32, 32, 2) == pytest.approx(1 / 32 + 1 / 128)
    assert gemm_bytes_per_flop("dX", 128, 64, 32, 2) == gemm_bytes_per_flop("forward", 128, 32, 64, 2)
    assert gemm_bytes_per_flop("dW", 128, 32, 32, 2) == pytest.approx(1 / 16)
    assert gemm_bytes_per_flop("dW", 128, 32, 32, 2, group=4) == pytest.approx(1 / 32 + 1 / 128)


@pytest.mark.parametrize(
    "kernel, sparsity, tile, measured_ms",
    [("forward", 0.9, (32, 32), 0.185), ("dX", 0.9, (32, 32), 0.183), ("dW", 0.9, (32, 32), 0.294),
     ("forward", 0.0, (64, 64), 1.149), ("dX", 0.0, (64, 64), 1.166)],
)  # fmt: skip
def test_model_fits_the_h200_rows_it_was_drawn_from(kernel, sparsity, tile, measured_ms):
    """The H200's kernels read the mask on every tile (all partial) and ran dW one tile per program."""
    tiles = (4096 // tile[0]) * (4096 // tile[1])
    alive = round(tiles * (1 - sparsity))
    ms = predict_gemm_ms(kernel, 8192, alive, alive, tile, 128, 2, 989.0)
    assert ms == pytest.approx(measured_ms, rel=0.1)


def test_full_tiles_and_wider_tiles_load_less():
    args = (8192, TILES // 10)
    partial = predict_gemm_ms("forward", *args, TILES // 10, (32, 32), 128, 2, 989.0)
    full = predict_gemm_ms("forward", *args, 0, (32, 32), 128, 2, 989.0)
    assert full < partial
    wide = predict_gemm_ms("forward", 8192, TILES // 160, 0, (128, 128), 128, 2, 989.0)  # the same alive area
    assert wide < full
    # compute-bound where the loads are few: the flops at the peak are the floor
    assert predict_gemm_ms("forward", 8192, 1, 0, (128, 128), 128, 2, 989.0, l2_tbps=1e6) == pytest.approx(
        2 * 8192 * 128 * 128 / 989e12 * 1e3
    )
