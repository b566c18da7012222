"""``--amp`` and ``--compile`` in the IMP driver: what runs, how far the results move from float32 eager training,
the run identity, and exact resume with the fp16 GradScaler.

Bounds, for the tiny MLP (Adam, lr 1e-3, 30 steps per level; measured on the 2-core CI machine): bf16 autocast moves
the trained weights by up to 2e-3 from float32 training (u = 2^-8 rounding of activations changes each Adam step's
direction a little; each step moves a weight by ~lr), fp16 by up to 1e-4 (u = 2^-11); the tests allow 1e-2 and 1e-3.
torch.compile (inductor) only fuses the float32 elementwise ops around the custom ops: within 3e-8 measured, 1e-6
allowed, and the same masks.
"""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from lthfast.cli import main
from lthfast.imp import Config, levels, run
from lthfast.imp.cli import config_from_args, register
from lthfast.pruning import Masks

UNITS = ("level_0", "level_1", "level_2")


def _weights(result, unit):
    return load_file(str(result.path / "replicate_0" / unit / "model.safetensors"))


def _spy_training_dtypes(monkeypatch) -> set:
    """Record the dtype of the logits of every training forward (a hook on each model the driver builds)."""
    seen = set()
    original = levels.Replicate._fresh_model

    def fresh_model(self, seed):
        model = original(self, seed)
        model.register_forward_hook(lambda m, args, out: seen.add(out.dtype) if m.training else None)
        return model

    monkeypatch.setattr(levels.Replicate, "_fresh_model", fresh_model)
    return seen


@pytest.mark.parametrize("amp,bound", [("bf16", 1e-2), ("fp16", 1e-3)])
def test_amp_trains_in_the_autocast_dtype_near_float32(tiny, tmp_path, monkeypatch, amp, bound):
    eager = run({**tiny, "out_dir": str(tmp_path / "fp32")})
    dtypes = _spy_training_dtypes(monkeypatch)
    mixed = run({**tiny, "out_dir": str(tmp_path / "amp"), "amp": amp})
    assert dtypes == {torch.bfloat16 if amp == "bf16" else torch.float16}
    assert mixed.path.name != eager.path.name, "amp changes the results, so it is part of the run's identity"
    for unit in UNITS:
        a, b = _weights(eager, unit), _weights(mixed, unit)
        done = json.loads((mixed.path / "replicate_0" / unit / "done.json").read_text())
        assert done["amp"] == amp and b["fc1.weight"].dtype == torch.float32
        for name, value in a.items():
            assert value.dtype != torch.float32 or (b[name] - value).abs().max() <= bound, (unit, name)
        masks = Masks.load(mixed.path / "replicate_0" / unit / "mask.safetensors")
        assert all(bool((b[n][~m] == 0).all()) for n, m in masks.items()), "pruned weights must stay zero"


def test_fp16_run_resumes_exactly_with_its_grad_scaler(tiny, tmp_path, cut_training):
    options = {**tiny, "amp": "fp16", "name": "r"}
    reference = run({**options, "out_dir": str(tmp_path / "ref")})
    cut_training(at=25)
    with pytest.raises(cut_training.error):
        run({**options, "out_dir": str(tmp_path / "cut")})
    cut_training.undo()
    checkpoint = torch.load(tmp_path / "cut" / "r" / "replicate_0" / "level_1" / "checkpoint.pt", weights_only=True)
    assert json.loads(checkpoint["state"])["iteration"] == 20 and checkpoint["scaler"]["scale"] > 0
    resumed = run({**options, "out_dir": str(tmp_path / "cut")})
    for unit in UNITS:
        a, b = _weights(reference, unit), _weights(resumed, unit)
        assert all(torch.equal(a[k], b[k]) for k in a), unit


def test_compile_trains_one_graph_equal_to_eager(tiny, tmp_path):
    torch._dynamo.reset()
    eager = run({**tiny, "out_dir": str(tmp_path / "eager")})
    captured = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run({**tiny, "out_dir": str(tmp_path / "compiled"), "compile": True})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == captured + 1, "one graph for every unit"
    assert compiled.path.name == eager.path.name, "compile is not part of the identity: a run may resume without it"
    for unit in UNITS:
        a, b = _weights(eager, unit), _weights(compiled, unit)
        for name, value in a.items():
            if value.dtype == torch.bool:
                assert torch.equal(b[name], value), (unit, name)
            else:
                assert (b[name] - value).abs().max() <= 1e-6, (unit, name)


def test_cli_flags_and_identity(tmp_path, capsys):
    assert "amp" not in Config().identity() and "compile" not in Config().identity()
    assert Config(amp="bf16").identity()["amp"] == "bf16"
    assert Config(compile=True).identity() == Config().identity()
    assert main(["imp", "--amp", "fp8", "--out-dir", str(tmp_path)]) == 2
    assert "unknown amp 'fp8': expected one of none, bf16, fp16" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(["imp", "--amp", "bf16", "--compile"]))
    assert (cfg.amp, cfg.compile) == ("bf16", True)
