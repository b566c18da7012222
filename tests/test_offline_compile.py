"""The kernels compiled by Triton's GPU compiler for sm_90 on this machine, no GPU needed (lthfast.bench.offline).

CI runs the kernels only in Triton's interpreter, which accepts code the GPU compiler rejects and says nothing of
what the compiler makes of it. Here one training step of the issues' headline layers is compiled for an H100 with
the launchers' own CUDA decisions, and what decides speed is checked: tensor-core instructions, pipelined loads,
no register spills, shared memory within the SM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lthfast.bench import offline

ROOT = Path(__file__).resolve().parents[1]
GEMMS = {
    "linear": (
        "_forward_kernel",
        "_grad_input_kernel",
        "_grad_weight_kernel",
        "_forward_persistent_kernel",
        "_grad_input_persistent_kernel",
    ),
    "conv": (
        "_conv_fwd_kernel",
        "_conv_dx_kernel",
        "_conv_dw_kernel",
        "_conv_fwd_persistent_kernel",
        "_conv_dx_persistent_kernel",
    ),
}
SM90_SHARED = 227 * 1024  # the most shared memory one program may use on sm_90
MAX_ISSUE_PER_HGMMA = 100

needs_tools = pytest.mark.skipif(not offline.available(), reason="triton without its NVIDIA backend tools")

_SCRIPT = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import compile_report
from lthfast.bench import offline
from lthfast.kernels import autotune, dw_split, masked_matmul
before = (autotune.Tuned.launch, masked_matmul._interpreted, dw_split.split_count)
assert compile_report.main(["--first", "--dtype", sys.argv[1], "--json", sys.argv[2], *sys.argv[3:]]) == 0
assert (autotune.Tuned.launch, masked_matmul._interpreted, dw_split.split_count) == before, "patches left behind"
with offline.cuda_target() as grouped:  # the linear dW with 2 tiles of one column per program, 90% in 32x32 blocks
    compile_report.linear_step(getattr(torch, sys.argv[1]), 0.9, group=2)
rows = [dict(r.row(), layer="linear grouped", sparsity=0.9) for r in grouped if r.kernel == "_grad_weight_kernel"]
with open(sys.argv[2]) as f:
    doc = json.load(f)
doc["rows"] += rows
with open(sys.argv[2], "w") as f:
    json.dump(doc, f)
"""


def _compile_step(dtype: str, tmp_path: Path, *flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / f"{dtype}.json"
    done = subprocess.run([sys.executable, "-c", _SCRIPT, dtype, str(out), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


@needs_tools
@pytest.mark.slow
def test_bf16_step_compiles_to_pipelined_tensor_core_code_without_spills(tmp_path):
    rows = _compile_step("bfloat16", tmp_path)
    grouped = [r for r in rows if r["layer"] == "linear grouped"]
    assert len(grouped) == 1 and grouped[0]["GROUP"] == 2 and grouped[0]["BLOCK_M"] == 128
    for layer, kernels in GEMMS.items():
        for sparsity in (0.0, 0.9, 0.98):
            names = {r["kernel"] for r in rows if r["layer"] == layer and r["sparsity"] == sparsity}
            assert set(kernels) <= names, (layer, sparsity, names)
    for r in rows:
        where = f"{r['layer']} {r['sparsity']} {r['kernel']}"
        assert r["local"] == 0, f"{where}: {r['local']} bytes of local memory per thread (register spills)"
        assert r["shared"] <= SM90_SHARED and r["programs_per_sm"] >= 1, where
        assert r["wgmma"] + r["mma"] > 0, f"{where}: the dot does not run on the tensor cores"
        assert r["cp_async"] > 0, f"{where}: no asynchronous copies, the loop's loads are not pipelined"
    # Every kernel whose accumulator has 64 rows per warpgroup gets Hopper's wgmma: all but the linear dW of one
    # 32-wide weight tile per program (a [32, 32] accumulator, below wgmma's 64 rows: Ampere-style mma.sync); two
    # tiles of one column per program (GROUP 2) make it [64, 32].
    for r in rows:
        one_narrow_tile = r["kernel"] == "_grad_weight_kernel" and r["sparsity"] > 0 and r["GROUP"] == 1
        if not one_narrow_tile:
            assert r["wgmma"] > 0, f"{r['layer']} {r['sparsity']} {r['kernel']}: no wgmma"
            # Issue per main-loop step: at most MAX_ISSUE_PER_HGMMA instructions per warp per HGMMA. An HGMMA
            # (m64n32k16 to m64n64k16) keeps an SM's tensor cores 16-32 cycles; each warp issues one instruction per
            # cycle. Measured (triton 3.9 / 3.6): 37-78 per HGMMA; the conv dW was 129 / 125 before its pixel
            # decomposition left the loop (three vector divisions per row and step).
            per = r["loop_instructions"] / max(1, r["loop_mma"])
            assert r["loop_mma"] > 0 and per <= MAX_ISSUE_PER_HGMMA, f"{r['layer']} {r['kernel']}: {per:.0f} per HGMMA"
    # The linear forward and dX run the full tiles in a loop of their own that reads no mask (full / partial tile
    # lists): fewer instructions per step than the partial-tile loop (triton 3.9, bf16: 107 vs 138 at 32x32 tiles).
    for r in rows:
        if r["layer"] == "linear" and r["kernel"] in GEMMS["linear"] and "weight" not in r["kernel"]:
            assert 0 < r["full_loop_instructions"] < r["loop_instructions"], r
    # The persistent linear forward and dX load their X / dY slabs and weight tiles by TMA (descriptors in the
    # launch); the persistent conv ones gather by pointer (no im2col mode in Triton's descriptors), in the same
    # per-tile loop as their one-program-per-tile twins (the tile body is shared): as many tensor-core instructions
    # per step (triton 3.9, bf16: 196 / 4 forward, 297 / 8 dX instructions / HGMMA per step, both schedules).
    for r in rows:
        if "persistent" in r["kernel"] and r["layer"] == "linear":
            assert r["tma"] > 0, r
        elif "persistent" in r["kernel"] and r["layer"] == "conv":
            classic = [c for c in rows if c["layer"] == "conv" and c["sparsity"] == r["sparsity"]
                       and c["kernel"] == r["kernel"].replace("_persistent", "")]  # fmt: skip
            assert r["tma"] == 0 and len(classic) == 1 and r["loop_mma"] == classic[0]["loop_mma"], r


@needs_tools
@pytest.mark.slow
def test_fp32_step_compiles_with_torchs_default_precision(tmp_path):
    # the one-program-per-tile kernels only: the persistent ones run the same tile body (bf16 test above), and each
    # fp32 variant costs minutes of ptxas on a cold cache
    rows = _compile_step("float32", tmp_path, "--classic")
    classic = {k for k in GEMMS["linear"] + GEMMS["conv"] if "persistent" not in k}
    assert {r["kernel"] for r in rows} == classic
    for r in rows:
        assert r["local"] == 0, r
        # torch's defaults: matmuls in IEEE fp32 (allow_tf32 False: FMAs, no tensor cores); cuDNN convolutions
        # may use TF32 (cudnn.allow_tf32 True), and so do the conv kernels (TF32 wgmma)
        if r["kernel"] in GEMMS["linear"]:
            assert r["wgmma"] + r["mma"] == 0, r
        elif r["kernel"] in GEMMS["conv"]:
            assert r["wgmma"] > 0, r


def test_programs_per_sm_takes_the_tightest_limit():
    # 4 warps at 128 registers: 16K registers per program -> 4 by registers; 40 KB shared -> 5 by shared memory
    assert offline.programs_per_sm(128, 40 * 1024, 4) == 4
    assert offline.programs_per_sm(64, 100 * 1024, 4) == 2  # shared memory binds
    assert offline.programs_per_sm(32, 0, 8) == 8  # 64 warps per SM bind
    assert offline.programs_per_sm(33, 0, 4) == 12  # 33 registers are allocated as 40


def test_cuda_target_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with offline.cuda_target():
            pass
