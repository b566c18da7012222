"""Predicted GPU times of the masked linear kernels (issue 22's targets), from the L2-feed model of
``lthfast.bench.floor`` and the tile decisions the CUDA launchers take (``choose_tile_shape``, ``full_partial``),
for a GPU run to confirm or refute. No GPU needed.

    python benchmarks/predict_gpu.py [--out benchmarks/results/gpu-predictions-h200.md]

Linear 4096x4096 at 8192 tokens, bf16, the layer of the H200 run (benchmarks/results/h200-notes.md); masks as
``device_run.sh`` draws them (``lthfast.bench.masks.block_mask``). The dense step is the H200's measured cuBLAS sum
of the three GEMMs (0.97-1.03 ms), so a predicted speed-up is that over the kernels' predicted sum (a graphed step:
no host time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lthfast.bench.floor import L2_FEED_TBPS, predict_gemm_ms
from lthfast.bench.masks import block_mask
from lthfast.indexing.tiles import full_partial, tile_index
from lthfast.kernels.masked_matmul import DW_GROUP_MAX_ROWS, choose_tile_shape

TOKENS, FEATURES, ITEMSIZE, PEAK_TFLOPS = 8192, 4096, 2, 989.0
BLOCK_M = 128  # the first kept config of every tile shape on CUDA
DENSE_MS = 1.0  # the H200's cuBLAS fwd + dX + dW, bf16, this layer: 0.97-1.03 ms measured
# (mask, sparsity) -> (target speed-up, H200 measured fwd / dX / dW ms where the run had the row)
ROWS = {
    ("32x32 blocks", 0.9): (2.5, (0.185, 0.183, 0.294)),
    ("32x32 blocks", 0.98): (5.0, (0.162, 0.160, 0.110)),
    ("64x64 blocks", 0.9): (4.0, None),
    ("64x64 blocks", 0.98): (6.0, None),
    ("128x128 blocks", 0.9): (5.0, None),
    ("128x128 blocks", 0.98): (7.0, None),
    ("dense", 0.0): (0.97, (1.149, 1.166, 0.826)),
}


# Fewer alive tiles per row than this: the programs run too few iterations for the L2 model to hold (the H200's 98%
# row in 32x32 blocks, 2.6 per row, took 4.4x the model of the kernels it ran): the prediction is then a lower bound.
LATENCY_ROWS = 4.0


PROSE = """# Predicted GPU times of the masked linear kernels (issue 22), for the next GPU run to confirm or refute

No GPU was lent for issue 22 (2026-12-07). These are predictions from the L2-feed model in `lthfast.bench.floor`:
the one GPU run (H200, `h200-notes.md`) fits "a masked GEMM kernel loads at ~6.4 TB/s from L2 into the SMs", and
the model's per-kernel bytes per flop reproduce its 90% row (forward 0.185 measured / 0.185 modelled, dX 0.183 /
0.185, dW 0.294 / 0.268 ms) and its 0% forward (1.149 / 1.174 ms). Two things it does not hold for, both seen on
the H200: rows with few alive tiles per tile row (98% in 32x32 blocks ran 4.4x the model of the kernels it ran:
per-program latency), and the 0% dW
(0.826 ms measured against 1.342 modelled: it loaded at ~10 TB/s, so the 6.4 TB/s is a fit to the forward and dX,
not a hard limit).

What changed since the H200 run and is in the model: full tiles read no mask (forward and dX: 1/BN + 1/BM instead
of 1/BN + 1.5/BM bytes per flop in bf16), dW over 2 or 4 tiles of a column (GROUP), and 128x128 tiles for masks
pruned in 128x128 blocks. Dense step = the H200's cuBLAS fwd + dX + dW on this layer (~1.0 ms); speed-ups are
graphed-step figures (no host time). A GPU run confirms a row when `benchmarks/gpu_profile.py`'s kernel times are
within ~15% of the model column, and refutes it otherwise.

Not in the model, built since and untimed: persistent, TMA-fed forward and dX kernels (`lthfast.kernels.persistent`,
one wave of programs looping over the output tiles; the launcher times them against the kernels above once per
shape and keeps the faster), and the dW's M-splits finished inside its one launch (no zero-fill, no reduce launch).
Prediction for them: no change in the rows the L2 model holds for (the same bytes per flop: X / dY slabs and weight
tiles per alive tile), and the 98% rows in 32x32 blocks closer to the model than the H200's 4.4x, since a resident
program's next tile no longer waits for a new program to launch; the dW at 98% saves its reduce launch and the
zero-fill pass over the 32 MB weight (~7 us at 4.8 TB/s).

"""


def _mask(kind: str, sparsity: float) -> torch.Tensor:
    if kind == "dense":
        return torch.ones(FEATURES, FEATURES, dtype=torch.bool)
    return block_mask(FEATURES, FEATURES, sparsity, int(kind.split("x")[0]), torch.Generator().manual_seed(0))


def predict(mask: torch.Tensor, tile: tuple[int, int], partial_all: bool = False, groups=(1, 2, 4)) -> dict:
    """The model's kernel times for ``mask`` at ``tile``; ``partial_all``: every tile reads its mask (the kernels
    the H200 ran, before full tiles), dW over the ``groups`` allowed."""
    index = tile_index(mask, *tile)
    partial = index.alive_tiles if partial_all else full_partial(index, mask).partial_tiles
    args = (TOKENS, index.alive_tiles, partial, tile, BLOCK_M, ITEMSIZE, PEAK_TFLOPS)
    allowed = [g for g in groups if g * tile[0] <= DW_GROUP_MAX_ROWS]
    ms = (
        predict_gemm_ms("forward", *args), predict_gemm_ms("dX", *args),
        min(predict_gemm_ms("dW", *args, group=g) for g in allowed),
    )  # fmt: skip
    full = index.alive_tiles - partial
    return {"alive": index.alive_tiles / index.tile_alive.numel(), "full": full / max(1, index.alive_tiles),
            "per_row": index.alive_tiles / index.tiles_n, "ms": ms, "sum": sum(ms)}  # fmt: skip


def _ms(values) -> str:
    return " / ".join(f"{t:.3f}" for t in values)


def table() -> str:
    lines = [
        "| mask | sparsity | tile | alive tiles (full) | alive tiles per row | model fwd / dX / dW ms | sum | speed-up "
        "if the model holds | target | H200 measured fwd / dX / dW ms (model of the kernels it ran) |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for (kind, sparsity), (target, measured) in ROWS.items():
        mask = _mask(kind, sparsity)
        tile = choose_tile_shape(mask)
        p = predict(mask, tile)
        speed = DENSE_MS / p["sum"]
        if kind == "dense":
            verdict = "met by routing: auto takes cuBLAS above 5% alive tiles"
        elif p["per_row"] < LATENCY_ROWS:
            verdict = f"{'met' if speed >= target else 'short'} only as a lower bound: few tiles per row"
        else:
            verdict = "met" if speed >= target else "short"
        seen = "not run"
        if measured:  # the H200 ran all-partial tiles, dW GROUP 1, at most 64x64 tiles
            old = choose_tile_shape(mask, shapes=((64, 64), (64, 32), (32, 32)))
            seen = f"{_ms(measured)} ({_ms(predict(mask, old, partial_all=True, groups=(1,))['ms'])})"
        lines.append(
            f"| {kind} | {sparsity:.0%} | {tile[0]}x{tile[1]} | {p['alive']:.1%} ({p['full']:.0%}) | "
            f"{p['per_row']:.1f} | {_ms(p['ms'])} | {p['sum']:.3f} | {speed:.2f}x | {target}x: {verdict} | {seen} |"
        )
    return "\n".join(lines)


# The dense route's mask products on this layer, W ⊙ M before the forward and dW ⊙ M after it: each reads a bf16
# weight and a bool mask and writes bf16, 5 bytes per weight, at the H200's ~4.8 TB/s of HBM.
MASK_MS = 2 * 5 * FEATURES * FEATURES / 4.8e12 * 1e3


def crossover() -> str:
    """The "auto" crossover for graphed steps the model predicts: the alive-tile fraction below which the kernels'
    step beats cuBLAS on W ⊙ M (plus the mask products). The L2 model is linear in alive tiles, so it is the dense
    route's time over the kernels' time with every tile alive."""
    lines = [
        "| tile | alive tiles | model kernels ms, all tiles alive | predicted crossover (alive-tile fraction) |",
        "| --- | --- | ---: | ---: |",
    ]
    for tile in ((32, 32), (64, 64), (128, 128)):
        for what, partial in (("full (block masks)", False), ("partial (unstructured)", True)):
            mask = torch.ones(FEATURES, FEATURES, dtype=torch.bool)
            index = tile_index(mask, *tile)
            args = (TOKENS, index.alive_tiles, index.alive_tiles if partial else 0, tile, BLOCK_M, ITEMSIZE,
                    PEAK_TFLOPS)  # fmt: skip
            allowed = [g for g in (1, 2, 4) if g * tile[0] <= DW_GROUP_MAX_ROWS]
            ms = predict_gemm_ms("forward", *args) + predict_gemm_ms("dX", *args)
            ms += min(predict_gemm_ms("dW", *args, group=g) for g in allowed)
            lines.append(f"| {tile[0]}x{tile[1]} | {what} | {ms:.3f} | {(DENSE_MS + MASK_MS) / ms:.2f} |")
    return "\n".join(lines)


CROSSOVER_PROSE = """
## The "auto" crossover for graphed steps (issue 22, deliverable 4)

`CUDA_DENSE_ABOVE` (0.05) was measured on the H200 in eager steps, where the step was bound by host time. In a
graphed step (what `lthfast imp` now runs on CUDA) only GPU time counts, so the model predicts the crossover from
kernel times alone: the alive-tile fraction below which the kernels beat cuBLAS on W ⊙ M plus the two mask products
({mask_ms:.3f} ms). It stays 0.05 until a GPU run measures it: `STAGES=crossover bash benchmarks/device_run.sh`
(graphed since this change). The model's low-density caveat (rows of few tiles, above) does not reach crossovers
this high; its 6.4 TB/s feed is a fit to the 32x32 kernels, so the 128x128 rows are the least certain.

"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    text = table() + "\n" + CROSSOVER_PROSE.format(mask_ms=MASK_MS) + crossover()
    print(text)
    if args.out:
        head = (
            f"Predicted with `python benchmarks/predict_gpu.py --out {args.out}` (L2 feed {L2_FEED_TBPS} TB/s, bf16 "
            f"peak {PEAK_TFLOPS:.0f} TFLOP/s, BLOCK_M {BLOCK_M}, dW at its best GROUP).\n\n"
        )
        Path(args.out).write_text(PROSE + head + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
