"""SparseProp as a benchmark provider (`--providers ...,sparseprop`): skipped with the reason when the package is
missing, checked against the float64 reference before it is timed (its default conv kernel is wrong when the batch
is not a multiple of 8), its conversion from W and M timed on its own. Tests that need the package importorskip it;
the others run without it."""

from __future__ import annotations

import sys

import pytest
import torch

from lthfast.bench import layer, providers, sparseprop_peer, train
from lthfast.cli import main

FAST = {"min_run_time": 0.002, "repeats": 1, "warmup": 1, "buffers": 3}


def quiet(_line: str) -> None:
    pass


def conv_config(batch: int, **kw) -> layer.LayerConfig:
    base = {"shape": (16, 8, 3, 3), "batch": batch, "image": (6, 7), "sparsities": [0.9], "blocks": [1]}
    return layer.LayerConfig(op="conv", **({"mode": "train"} | base | FAST | kw))


def linear_config(**kw) -> layer.LayerConfig:
    base = {"shape": (24, 40), "tokens": 12, "sparsities": [0.9], "blocks": [1]}
    return layer.LayerConfig(op="linear", **({"mode": "train"} | base | FAST | kw))


def results_of(body: dict) -> dict[str, dict]:
    return {r["provider"]: r for r in body["rows"][0]["results"]}


def no_sparseprop(monkeypatch) -> None:
    """Make ``import sparseprop`` fail as it does where the package is not installed."""
    for name in [m for m in sys.modules if m == "sparseprop" or m.startswith("sparseprop.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sparseprop", None)


# ---- without the package ------------------------------------------------------------------------------------


def test_sparseprop_is_named_not_in_all():
    assert "sparseprop" not in providers.parse_providers("all")
    assert providers.parse_providers("lthfast,sparseprop") == ["dense", "lthfast", "sparseprop"]
    assert train.TrainConfig(providers=["sparseprop"]).providers == ["dense", "sparseprop"]


def test_missing_package_is_skipped_with_the_reason_in_the_row_and_the_output(monkeypatch, capsys):
    no_sparseprop(monkeypatch)
    lines = []
    body = layer.run_layer(linear_config(providers=["dense", "sparseprop", "sparseprop-width"]), log=lines.append)
    for name in ("sparseprop", "sparseprop-width"):
        entry = results_of(body)[name]
        assert entry["status"] == "skipped" and "median_ms" not in entry
        assert "sparseprop is not installed" in entry["reason"] and "make bench-deps" in entry["reason"]
        assert "\n" not in entry["reason"]
        assert any(name in line and "not installed" in line for line in lines)
    assert results_of(body)["dense"]["status"] == "ok"

    cfg = train.TrainConfig(model="lenet300", batch=8, sparsities=[0.9], blocks=[1], providers=["sparseprop"], **FAST)
    entry = results_of(train.run_train(cfg, log=quiet))["sparseprop"]
    assert entry["status"] == "skipped" and "sparseprop is not installed" in entry["reason"]

    argv = ["bench", "layer", "--shape", "16x24", "--tokens", "8", "--sparsity", "0.9", "--block", "1"]
    argv += ["--min-run-time", "0.002", "--repeats", "1", "--buffers", "2", "--device", "cpu", "--no-save"]
    assert main(argv + ["--providers", "sparseprop"]) == 0
    out = capsys.readouterr()
    assert "skipped: sparseprop" in out.out and "not installed" in out.out


def _fake_sparseprop(p: providers.Problem, wrong: str | None) -> providers.Prepared:
    """A provider shaped like SparseProp's (compressed dW, a conversion step), computing with the masked weight.
    ``wrong``: "tail" forgets the batch entries past the last multiple of 8 (the bug SparseProp's conv kernel
    has), "dw" permutes its stored weight gradient; None is right."""
    alive = p.mask.nonzero(as_tuple=True)
    values = p.weight[alive].clone().requires_grad_(True)
    bias = p.bias.detach().clone().requires_grad_(True)

    def forward(x):
        w = torch.zeros_like(p.weight).index_put(alive, values)
        y = providers._layer(p.op, x, w, bias, p.conv)
        if wrong == "tail" and x.shape[0] % 8:
            y = torch.cat([y[: x.shape[0] // 8 * 8], torch.zeros_like(y[x.shape[0] // 8 * 8 :])])
        return y

    def dense_outputs(out):
        dw = out[2].flip(0) if wrong == "dw" else out[2]
        return out[0], out[1], torch.zeros_like(p.weight).index_put(alive, dw), out[3]

    convert = lambda: p.weight[p.mask.nonzero(as_tuple=True)].clone()
    call = providers._wrap(forward, (values, bias), True)
    return providers.Prepared(call, p.mask, convert=convert, dense_outputs=dense_outputs)


@pytest.mark.parametrize(
    "wrong,batch,message", [("tail", 6, "y: normalised error"), ("dw", 8, "dW: normalised error"), (None, 6, None)]
)
def test_the_check_marks_a_wrong_provider_and_times_only_a_right_one(monkeypatch, wrong, batch, message):
    monkeypatch.setitem(providers.PREPARE, "sparseprop", lambda p: _fake_sparseprop(p, wrong))
    body = layer.run_layer(conv_config(batch, providers=["dense", "sparseprop"]), log=quiet)
    entry = results_of(body)["sparseprop"]
    if message is None:  # the same fake without its flaw passes, and its conversion is timed on its own
        assert entry["status"] == "ok" and entry["median_ms"] > 0 and entry["convert_ms"] > 0, entry
        return
    assert entry["status"] == "error" and entry["reason"].startswith("output check failed: " + message), entry
    assert "median_ms" not in entry and "convert_ms" not in entry


def test_conv_shapes_sparseprop_has_no_kernel_for_are_named():
    ok = {"stride": 1, "padding": 1, "dilation": 1, "groups": 1}
    assert sparseprop_peer.conv_unsupported((8, 4, 3, 3), **ok) is None
    assert sparseprop_peer.conv_unsupported((8, 4, 1, 1), **(ok | {"stride": 2, "padding": 0})) is None
    cases = [
        ((8, 2, 3, 3), {"groups": 2}, "groups"),
        ((8, 4, 3, 3), {"dilation": 2}, "dilation"),
        ((8, 4, 3, 3), {"stride": 3}, "stride 1 and 2"),
        ((8, 4, 3, 5), {}, "square kernel"),
        ((8, 4, 3, 3), {"padding": (1, 0)}, "square kernel"),
        ((8, 4000, 3, 3), {}, "index types"),
    ]
    for shape, change, message in cases:
        assert message in sparseprop_peer.conv_unsupported(shape, **(ok | change))


def test_train_check_compares_weight_gradients_with_the_reference(monkeypatch):
    """A variant whose alive gradients are 10% off (pruned ones still zero, logits right) is an error."""
    real = train.build_variant

    def off(name, base, masks):
        model = real(name, base, masks)
        if name == "lthfast":
            model.get_submodule(next(iter(masks))).weight.register_hook(lambda g: g * 1.1)
        return model

    monkeypatch.setattr(train, "build_variant", off)
    cfg = train.TrainConfig(model="lenet300", batch=8, sparsities=[0.5], blocks=[1], **FAST)
    by_name = results_of(train.run_train(cfg, log=quiet))
    assert by_name["lthfast"]["status"] == "error", by_name["lthfast"]
    assert "weight gradient normalised error" in by_name["lthfast"]["reason"]
    assert by_name["torch-prune"]["status"] == "ok"


# ---- with the package ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,status", [(6, "error"), (8, "ok")])
def test_sparseprop_default_conv_is_an_error_unless_the_batch_is_a_multiple_of_8(batch, status):
    pytest.importorskip("sparseprop")
    body = layer.run_layer(conv_config(batch, providers=["dense", "sparseprop", "sparseprop-width"]), log=quiet)
    entry = results_of(body)["sparseprop"]
    assert entry["status"] == status, entry
    if status == "error":
        assert entry["reason"].startswith("output check failed: y: normalised error") and "median_ms" not in entry
    else:
        assert entry["median_ms"] > 0 and entry["convert_ms"] > 0 and entry["max_err"] < 1e-5
    width = results_of(body)["sparseprop-width"]  # vectorized over the output width: right at any batch
    assert width["status"] == "ok" and width["convert_ms"] > 0, width


def test_sparseprop_linear_matches_the_reference_and_reports_its_conversion():
    pytest.importorskip("sparseprop")
    cfg = linear_config(providers=["dense", "sparseprop", "sparseprop-width"])
    entries = results_of(layer.run_layer(cfg, log=quiet))
    sp = entries["sparseprop"]
    assert sp["status"] == "ok" and sp["max_err"] < 1e-5 and sp["convert_ms"] > 0 and sp["median_ms"] > 0, sp
    assert entries["sparseprop-width"]["status"] == "skipped"
    assert "SparseConv2d" in entries["sparseprop-width"]["reason"]
    forward = results_of(layer.run_layer(linear_config(mode="forward", providers=["sparseprop"]), log=quiet))
    assert forward["sparseprop"]["status"] == "ok", forward["sparseprop"]


def test_sparseprop_module_gradient_is_zero_where_pruned_and_steps_only_alive_values():
    pytest.importorskip("sparseprop")
    weight, bias = torch.randn(12, 20), torch.randn(12)
    mask = torch.rand(12, 20) > 0.7
    module = sparseprop_peer.build_linear(weight, mask, bias)
    assert module.W_val.numel() == int(mask.sum())
    x = torch.randn(5, 20)
    module(x).square().sum().backward()
    dw = sparseprop_peer.dense_weight(module, module.W_val.grad)
    w = (weight * mask).requires_grad_(True)
    torch.nn.functional.linear(x, w, bias).square().sum().backward()
    torch.testing.assert_close(dw, w.grad * mask, rtol=1e-4, atol=1e-4)
    assert bool((dw[~mask] == 0).all())


def test_sparseprop_trains_lenet_with_its_own_parameters():
    pytest.importorskip("sparseprop")
    cfg = train.TrainConfig(model="lenet300", batch=8, sparsities=[0.9], blocks=[1], **FAST)
    cfg.providers = ["dense", "sparseprop"]
    by_name = results_of(train.run_train(cfg, log=quiet))
    sp = by_name["sparseprop"]
    assert sp["status"] == "ok" and sp["convert_ms"] > 0 and sp["detail"].startswith("3 of 3 layers"), sp
    assert abs(sp["loss_after"] - by_name["dense"]["loss_after"]) < 0.5  # both took SGD steps on the same data


def test_sparseprop_keeps_a_layer_it_cannot_compute_masked():
    pytest.importorskip("sparseprop")
    base = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1, groups=2), torch.nn.Flatten(), torch.nn.Linear(8 * 25, 3)
    )
    masks = {n: torch.rand_like(m.weight) > 0.5 for n, m in train.prunable(base)}
    with torch.no_grad():
        for n, m in train.prunable(base):
            m.weight.mul_(masks[n])
    model = train.build_variant("sparseprop", base, masks)
    assert hasattr(model[0], "weight_orig") and sparseprop_peer.is_sparseprop(model[2])
    reference = train.copy.deepcopy(base).double()
    x, y = torch.randn(8, 4, 5, 5), torch.randint(0, 3, (8,))
    assert train.check_variant(model, "sparseprop", reference, masks, x, y, torch.float32) < 1e-5
