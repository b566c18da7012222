"""Fast tests of the benchmark method (`lthfast bench`): masks, providers checked against the reference, timing,
skipped/failed providers, the JSON schema, the table, the plot and the CLI. Tiny shapes; timings are not checked."""

from __future__ import annotations

import json

import pytest
import torch

from lthfast import reference
from lthfast.bench import check, layer, plots, providers, results, timing, train
from lthfast.bench.masks import block_mask, conv_block_mask, two_four_mask
from lthfast.cli import main

FAST = {"min_run_time": 0.002, "repeats": 1, "warmup": 1, "buffers": 3}
FAST_T = {"warmup": 1, "min_run_time": 0.002}


def tiny_layer(op: str = "linear", mode: str = "forward", **kw) -> layer.LayerConfig:
    base = {"shape": (24, 40), "tokens": 12} if op == "linear" else {"shape": (8, 6, 3, 3), "batch": 2, "image": (5, 7)}
    base |= {"sparsities": [0.0, 0.75], "blocks": [1, 8]} | FAST | kw
    return layer.LayerConfig(op=op, mode=mode, **base)


def quiet(_line: str) -> None:
    pass


# ---- masks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,cols,sparsity,block", [(37, 50, 0.5, 16), (64, 64, 0.9, 1), (30, 18, 0.3, 4), (8, 8, 0.98, 4), (8, 8, 1.0, 4)]
)
def test_block_mask_prunes_exact_tile_count_in_whole_tiles(rows, cols, sparsity, block):
    mask = block_mask(rows, cols, sparsity, block, torch.Generator().manual_seed(1))
    tiles_r, tiles_c = -(-rows // block), -(-cols // block)
    pruned = 0
    for i in range(tiles_r):
        for j in range(tiles_c):
            tile = mask[i * block : (i + 1) * block, j * block : (j + 1) * block]  # edge tiles are partial
            assert bool(tile.all()) or not bool(tile.any()), f"tile ({i}, {j}) is partly pruned"
            pruned += not bool(tile.any())
    total = tiles_r * tiles_c
    assert pruned == (total if sparsity == 1.0 else min(round(sparsity * total), total - 1))  # one tile stays alive


def test_block_mask_is_random_and_rejects_bad_input():
    a = block_mask(32, 32, 0.5, 4, torch.Generator().manual_seed(1))
    b = block_mask(32, 32, 0.5, 4, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="sparsity"):
        block_mask(4, 4, 1.5, 1)
    with pytest.raises(ValueError, match="block"):
        block_mask(4, 4, 0.5, 0)


def test_conv_block_mask_prunes_whole_kernels_per_channel_tile():
    mask = conv_block_mask((16, 8, 3, 3), 0.5, 4, torch.Generator().manual_seed(0))
    per_pair = mask.flatten(2)
    assert bool((per_pair.all(-1) | (~per_pair).all(-1)).all())
    assert int((~mask).sum()) == 16 * 8 * 9 // 2
    unstructured = conv_block_mask((16, 8, 3, 3), 0.9, 1, torch.Generator().manual_seed(0))
    assert int((~unstructured).sum()) == round(0.9 * 16 * 8 * 9)


def test_two_four_mask_keeps_two_of_every_four():
    mask = two_four_mask(6, 16, torch.Generator().manual_seed(0))
    assert bool((mask.view(6, 4, 4).sum(-1) == 2).all())


# ---- providers and the output check --------------------------------------------------------------------------

# (op, provider, mode) that torch cannot run on CPU; mode None = both modes.
CPU_SKIPS = {("linear", "semi-structured", None), ("conv", "semi-structured", None), ("conv", "torch-bsr", None)}
CPU_SKIPS |= {("linear", "torch-bsr", "train")}  # no CPU kernel for dX with a BSR weight (block > 1)


def _problem(op: str, mode: str, sparsity: float = 0.6, block: int = 4) -> tuple[providers.Problem, tuple, dict]:
    cfg = tiny_layer(op, mode)
    shapes = layer.shapes(cfg)
    weight = torch.randn(cfg.shape)
    mask = block_mask(*cfg.shape, sparsity, block) if op == "linear" else conv_block_mask(cfg.shape, sparsity, block)
    conv = cfg.conv_args() if op == "conv" else {}
    problem = providers.Problem(op, mode, weight, mask, torch.randn(cfg.shape[0]), sparsity, block, conv)
    x = torch.randn(shapes["x"]).requires_grad_(mode == "train")
    inputs = (x, torch.randn(shapes["y"])) if mode == "train" else (x,)
    return problem, inputs, conv


@pytest.mark.parametrize("op", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_every_provider_matches_the_reference_or_is_skipped_with_a_reason(op, mode):
    problem, inputs, conv = _problem(op, mode)
    rotation = timing.Rotation([inputs])
    expected = lambda m: check.reference_outputs(op, mode == "train", problem.weight, m, problem.bias, conv, *inputs)
    ran = []
    for name in providers.PROVIDERS:
        entry, prepared = layer.prepare_provider(name, problem, rotation, expected)
        if entry["status"] == "skipped":
            assert {(op, name, None), (op, name, mode)} & CPU_SKIPS, entry
            assert len(entry["reason"]) > 10
            continue
        assert entry["status"] == "ok", entry
        outputs = prepared.call(*inputs)
        assert len(outputs) == (4 if mode == "train" else 1)
        # independent of check.compare: y against the reference op in float32
        ref_y = (reference.masked_linear if op == "linear" else reference.masked_conv2d)(
            inputs[0].detach(), problem.weight, problem.mask, problem.bias, **conv
        )
        torch.testing.assert_close(outputs[0].detach(), ref_y, rtol=1e-4, atol=1e-4)
        ran.append(name)
    assert {"dense", "mask-multiply", "lthfast"} <= set(ran)


def test_compare_rejects_a_wrong_output_and_a_dw_leak():
    problem, inputs, conv = _problem("linear", "train")
    expected = check.reference_outputs("linear", True, problem.weight, problem.mask, problem.bias, conv, *inputs)
    y, dx, dw, db = providers.PREPARE["mask-multiply"](problem).call(*inputs)
    with pytest.raises(check.CheckFailed, match="dX"):
        check.compare((y, dx * 1.01, dw, db), expected, problem.mask, torch.float32, True)
    leaky = dw + (~problem.mask) * 0.5
    with pytest.raises(check.CheckFailed, match="nonzero where the mask is False"):
        check.compare((y, dx, leaky, db), expected, problem.mask, torch.float32, True)


def test_parse_providers():
    assert providers.parse_providers("lthfast") == ["dense", "lthfast"]
    assert providers.parse_providers("all") == list(providers.PROVIDERS)
    with pytest.raises(ValueError, match="cusparse"):
        providers.parse_providers("dense,cusparse")


def test_classify_separates_unsupported_from_errors():
    assert layer.classify_failure(NotImplementedError("x"))[0] == "skipped"
    assert layer.classify_failure(RuntimeError("addmm: computation on CPU is not implemented for X"))[0] == "skipped"
    assert layer.classify_failure(RuntimeError("index out of range"))[0] == "error"


# ---- timing --------------------------------------------------------------------------------------------------


def test_measure_rotates_inputs_and_orders_percentiles():
    sets = [(torch.randn(16, 16),) for _ in range(5)]
    rotation = timing.Rotation(sets)
    seen = set()
    t = timing.measure(lambda: seen.add(id(next(rotation)[0])) or sets[0][0].sum(), torch.device("cpu"), **FAST_T)
    assert seen == {id(s[0]) for s in sets}
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms and t.runs >= 1
    merged = timing.merge([t, t])
    assert merged.rounds == 2 and merged.runs == 2 * t.runs and len(merged.samples) == 2 * len(t.samples)


def test_buffer_count_covers_the_rotation_bytes():
    assert timing.buffer_count(2**30) == timing.MIN_BUFFERS
    assert timing.buffer_count(1) == timing.MAX_BUFFERS
    assert timing.buffer_count(8 * 2**20) * 8 * 2**20 >= timing.ROTATION_BYTES


# ---- rows, skipped and failed providers, JSON, table, plot ------------------------------------------------------


def _wrong_provider(p: providers.Problem) -> providers.Prepared:
    """Forgets the mask: must be reported as an error and never timed."""
    w = p.weight.clone()
    return providers.Prepared(lambda x: (torch.nn.functional.linear(x, w, p.bias),), p.mask)


def test_a_wrong_provider_is_an_error_and_is_not_timed(monkeypatch):
    monkeypatch.setitem(providers.PREPARE, "lthfast", _wrong_provider)
    timed = []
    real_measure = timing.measure
    monkeypatch.setattr(timing, "measure", lambda fn, *a, **k: timed.append(fn) or real_measure(fn, *a, **k))
    body = layer.run_layer(tiny_layer(sparsities=[0.75], blocks=[1]), log=quiet)
    by_name = {r["provider"]: r for r in body["rows"][0]["results"]}
    assert by_name["lthfast"]["status"] == "error" and "output check failed" in by_name["lthfast"]["reason"]
    assert "median_ms" not in by_name["lthfast"]
    ok = [n for n, r in by_name.items() if r["status"] == "ok"]
    assert len(timed) == len(ok) + 1  # one per timed provider, plus the tile-index build


@pytest.mark.parametrize("op,mode", [("linear", "forward"), ("conv", "train")])
def test_layer_document_schema_table_and_plot(op, mode, tmp_path):
    body = layer.run_layer(tiny_layer(op, mode), log=quiet)
    doc = results.document("layer", body, torch.device("cpu"), "lthfast bench layer", "test run", "lthfast")
    assert [(r["sparsity"], r["block"]) for r in doc["rows"]] == [(0.0, 1), (0.0, 8), (0.75, 1), (0.75, 8)]
    for row in doc["rows"]:
        by_name = {r["provider"]: r for r in row["results"]}
        assert list(by_name) == list(providers.PROVIDERS)  # skipped ones are listed, not dropped
        semi = by_name["semi-structured"]
        assert semi["status"] == "skipped" and ("CUDA" if op == "linear" else "conv2d") in semi["reason"]
        dense = by_name["dense"]
        assert dense["speedup_vs_dense"] == 1.0
        assert dense["tflops_dense_equiv"] == pytest.approx(body["shapes"]["flops"] / dense["median_ms"] / 1e9)
        lth = by_name["lthfast"]
        assert lth["tflops_useful"] == pytest.approx(lth["tflops_dense_equiv"] * row["density"])
    assert set(doc["crossover"]["lthfast"]) == {"1", "8"}
    json.loads(json.dumps(doc))  # serialisable
    table = results.format_table(doc)
    assert "skipped: semi-structured (all rows)" in table and "tile index build after a prune" in table
    assert "crossover" in table
    png = plots.plot_speedup(doc, tmp_path / "speed.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_floor_from_given_peaks():
    cfg = tiny_layer(sparsities=[0.75], blocks=[8], providers=["dense", "lthfast"], peak_tflops=1.0, peak_gbps=10.0)
    body = layer.run_layer(cfg, log=quiet)
    s, row = body["shapes"], body["rows"][0]
    by_name = {r["provider"]: r for r in row["results"]}
    x, y, w = 12 * 40, 12 * 24, 24 * 40  # tiny_layer: tokens 12, weight 24x40, float32
    for name, work in (("dense", 1.0), ("lthfast", row["density"])):
        expected = max(s["flops"] * work / 1e12, (x + y + w * work) * 4 / 10e9) * 1e3
        assert by_name[name]["floor_ms"] == pytest.approx(expected)
        assert by_name[name]["of_floor"] == pytest.approx(expected / by_name[name]["median_ms"])
    no_peaks = layer.run_layer(tiny_layer(sparsities=[0.5], blocks=[1]), log=quiet)
    assert no_peaks["rows"][0]["results"][0]["floor_ms"] is None


def test_validate_names_the_broken_key():
    body = layer.run_layer(tiny_layer(sparsities=[0.5], blocks=[1], providers=["dense"]), log=quiet)
    doc = results.document("layer", body, torch.device("cpu"), "cmd", "", "lthfast")
    broken = json.loads(json.dumps(doc))
    del broken["rows"][0]["results"][0]["median_ms"]
    with pytest.raises(results.SchemaError, match="median_ms"):
        results.validate(broken)
    broken = json.loads(json.dumps(doc))
    broken["rows"][0]["results"][0]["status"] = "fine"
    with pytest.raises(results.SchemaError, match="status"):
        results.validate(broken)


def _row(sparsity, block, lthfast_ms, spread=0.01):
    """dense takes 10 ms (p20..p80 = 10 -+ spread*10); lthfast takes lthfast_ms with the same relative spread."""

    def res(name, ms):
        lo, hi = ms * (1 - spread), ms * (1 + spread)
        return {"provider": name, "status": "ok", "median_ms": ms, "p20_ms": lo, "p80_ms": hi}

    results_ = [res("dense", 10.0)]
    if lthfast_ms is not None:
        results_.append(res("lthfast", lthfast_ms))
    return {"sparsity": sparsity, "block": block, "results": results_}


def test_crossover_is_the_lowest_sparsity_from_which_lthfast_keeps_winning_clearly():
    rows = [_row(0.0, 16, 9.0), _row(0.5, 16, 11.0), _row(0.9, 16, 7.0), _row(0.95, 16, 5.0)]
    rows += [_row(0.5, 1, 12.0), _row(0.9, 1, 10.5)]
    rows += [_row(0.5, 32, 8.0), _row(0.9, 32, None)]
    rows += [_row(0.9, 64, 9.0, spread=0.1), _row(0.98, 64, 5.0, spread=0.1)]  # 9 ms: faster, within the noise
    assert results.crossover(rows) == {"1": None, "16": 0.9, "32": 0.5, "64": 0.98}


# ---- training steps and the CLI ------------------------------------------------------------------------------


def test_train_variants_agree_and_are_timed():
    cfg = train.TrainConfig(model="lenet300", batch=8, sparsities=[0.9], blocks=[16], **FAST)
    body = train.run_train(cfg, log=quiet)
    row = body["rows"][0]
    assert [r["provider"] for r in row["results"]] == list(train.VARIANTS)
    for r in row["results"]:
        assert r["status"] == "ok", r
        assert r["samples_per_s"] == pytest.approx(8 / (r["median_ms"] * 1e-3))
    assert 0.05 < row["density"] < 0.15 and row["tile_index_ms"] > 0


def test_train_reports_a_variant_whose_pruned_gradients_leak(monkeypatch):
    real = train.build_variant

    def leaky(name, base, masks):  # lthfast built with full masks: same logits, gradients leak into pruned weights
        return real(name, base, {k: torch.ones_like(m) for k, m in masks.items()} if name == "lthfast" else masks)

    monkeypatch.setattr(train, "build_variant", leaky)
    cfg = train.TrainConfig(model="lenet300", batch=8, sparsities=[0.5], blocks=[1], **FAST)
    by_name = {r["provider"]: r for r in train.run_train(cfg, log=quiet)["rows"][0]["results"]}
    assert by_name["lthfast"]["status"] == "error" and "nonzero where the mask is False" in by_name["lthfast"]["reason"]
    assert by_name["torch-prune"]["status"] == "ok"


def test_cli_bench_layer_writes_json_and_png(tmp_path, capsys):
    argv = ["bench", "layer", "--shape", "16x24", "--tokens", "8", "--sparsity", "0,0.5", "--block", "1,8"]
    argv += ["--min-run-time", "0.002", "--repeats", "1", "--buffers", "2", "--device", "cpu", "--out", str(tmp_path)]
    argv += ["--providers", "lthfast,semi-structured", "--tag", "t", "--notes", "unit test"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "semi-structured" in out and "wrote" in out
    (json_path,) = tmp_path.glob("bench_layer-linear-forward-cpu-*-t.json")
    doc = json.loads(json_path.read_text())
    results.validate(doc)
    assert doc["notes"] == "unit test" and doc["config"]["shape"] == [16, 24]
    assert doc["command"].startswith("lthfast bench layer --kind linear --shape 16x24")
    assert json_path.with_suffix(".png").stat().st_size > 1000


def test_cli_bench_train_writes_json_and_png(tmp_path, capsys):
    argv = ["bench", "train", "--model", "lenet300", "--batch", "8", "--sparsity", "0.9", "--block", "16"]
    argv += ["--min-run-time", "0.002", "--repeats", "1", "--buffers", "2", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "samples/s" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("bench_train-lenet300-cpu-*.json")
    doc = json.loads(json_path.read_text())
    results.validate(doc)
    assert doc["kind"] == "train" and doc["command"].startswith("lthfast bench train --model lenet300 --batch 8")
    assert [r["provider"] for r in doc["rows"][0]["results"]] == list(train.VARIANTS)
    assert json_path.with_suffix(".png").stat().st_size > 1000


def test_git_info_names_the_checkout_or_the_commit_it_is_told(monkeypatch):
    monkeypatch.delenv("LTHFAST_GIT_COMMIT", raising=False)
    here = results.git_info()
    assert here["commit"] is None or len(here["commit"]) == 40
    monkeypatch.setenv("LTHFAST_GIT_COMMIT", "f" * 40)  # a copy whose .git is missing or stale
    assert results.git_info() == {"commit": "f" * 40, "dirty": None}


# ---- CUDA graphs -------------------------------------------------------------------------------------------------


def test_cuda_graph_timing_is_refused_off_cuda():
    with pytest.raises(ValueError, match="cuda_graph needs device 'cuda'"):
        tiny_layer(cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_layer_rows_time_every_provider_as_graphs(op):
    cfg = tiny_layer(op, "train", device="cuda", cuda_graph=True, warmup_ms=1.0, rep_ms=3.0)
    cfg.providers = ["dense", "mask-multiply", "lthfast"]
    doc = layer.run_layer(cfg, log=quiet)
    for row in doc["rows"]:
        for r in row["results"]:
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0


# ---- benchmarks/host_overhead.py ---------------------------------------------------------------------------------


def test_host_overhead_script_measures_and_restores_the_kernels():
    import importlib.util
    from pathlib import Path

    from lthfast import _backend
    from lthfast.kernels import autotune, masked_conv, masked_matmul

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    spec = importlib.util.spec_from_file_location("host_overhead", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = (masked_matmul._forward.kernel, masked_conv._dw.kernel, masked_matmul._interpreted, autotune.enabled)
    tuner = script.tuner(calls=20, repeat=1)
    layers = script.layers(calls=5, repeat=1)
    assert set(tuner) == {"triton Autotuner.run", "lthfast Tuned.launch"} and all(v > 0 for v in tuner.values())
    assert len(layers) == 8 and all(v > 0 for v in layers.values())
    after = (masked_matmul._forward.kernel, masked_conv._dw.kernel, masked_matmul._interpreted, autotune.enabled)
    assert after == before and _backend.triton_runs_on.__module__ == "lthfast._backend"


# ---- bad settings, failures while timed, the recorded command --------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["layer", "--sparsity", "0,0.5,1.5", "--block", "1,32"], "sparsities must be in [0, 1], got [1.5]"),
        (["layer", "--block", "1,0"], "blocks must be >= 1"),
        (["layer", "--sparsity", ","], "at least one value"),
        (["layer", "--repeats", "0"], "repeats must be >= 1"),
        (["layer", "--providers", "dense,lthfsat"], "unknown provider(s) ['lthfsat']"),
        (["train", "--sparsity", "-0.5"], "sparsities must be in [0, 1]"),
        (["train", "--providers", "lthfast,foo"], "unknown training variant(s) ['foo']"),
    ],
)
def test_cli_refuses_a_bad_setting_before_any_row_is_measured(argv, message, monkeypatch, capsys):
    def never(*_a, **_k):
        raise AssertionError("a row was measured before the bad setting was refused")

    monkeypatch.setattr(layer, "run_layer", never)
    monkeypatch.setattr(train, "run_train", never)
    assert main(["bench", *argv, "--device", "cpu", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lthfast: error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_without_a_device(capsys):
    assert main(["bench", "train", "--device", "cuda", "--no-save"]) == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_train_config_adds_dense():
    assert train.TrainConfig(providers=["lthfast"]).providers == ["dense", "lthfast"]


def test_a_provider_that_fails_while_timed_is_an_error_and_the_others_keep_their_times(monkeypatch):
    real = providers.PREPARE["lthfast"]

    def faulty(p: providers.Problem) -> providers.Prepared:
        prepared = real(p)
        calls = []

        def call(*args):
            calls.append(1)
            if len(calls) > 1:  # the output check passes; a later call fails (out of memory, a device fault)
                raise RuntimeError("simulated device fault")
            return prepared.call(*args)

        return providers.Prepared(call, prepared.mask, detail=prepared.detail, masked_dw=prepared.masked_dw)

    monkeypatch.setitem(providers.PREPARE, "lthfast", faulty)
    cfg = tiny_layer(sparsities=[0.75], blocks=[8], repeats=2, providers=["dense", "mask-multiply", "lthfast"])
    by_name = {r["provider"]: r for r in layer.run_layer(cfg, log=quiet)["rows"][0]["results"]}
    assert by_name["lthfast"]["status"] == "error"
    assert "while timed: RuntimeError: simulated device fault" in by_name["lthfast"]["reason"]
    assert "median_ms" not in by_name["lthfast"]
    for name in ("dense", "mask-multiply"):
        assert by_name[name]["status"] == "ok" and by_name[name]["median_ms"] > 0


def test_cli_command_reruns_the_same_layer(tmp_path):
    """The JSON's command, run again, measures the same configuration (groups and buffers included)."""
    import shlex

    argv = ["bench", "layer", "--kind", "conv", "--shape", "8x3x3x3", "--groups", "2", "--batch", "2"]
    argv += ["--image", "6x6", "--sparsity", "0.5", "--block", "1", "--buffers", "2", "--providers", "lthfast"]
    argv += ["--min-run-time", "0.002", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    (first,) = (tmp_path / "a").glob("*.json")
    doc = json.loads(first.read_text())
    again = shlex.split(doc["command"])[1:] + ["--out", str(tmp_path / "b")]
    assert "--groups" in again and "--buffers" in again
    assert main(again) == 0
    (second,) = (tmp_path / "b").glob("*.json")
    assert json.loads(second.read_text())["config"] == doc["config"]
    assert doc["config"]["groups"] == 2 and doc["config"]["buffers"] == 2


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_steps_lthfast_with_its_fused_optimizer(optimizer):
    """The lthfast variant steps with lthfast's fused masked optimizer (alive weights only), the others with torch's."""
    cfg = train.TrainConfig(model="lenet300", batch=8, sparsities=[0.9], blocks=[1], optimizer=optimizer, **FAST)
    body = train.run_train(cfg, log=quiet)
    entries = {e["provider"]: e for e in body["rows"][0]["results"]}
    assert all(e["status"] == "ok" for e in entries.values()), entries
    expected = {"sgd": ("SGD", "MaskedSGD"), "adam": ("Adam", "MaskedAdam")}[optimizer]
    assert entries["dense"]["optimizer"] == expected[0]
    assert entries["lthfast"]["optimizer"] == expected[1]


def test_train_config_refuses_an_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        train.TrainConfig(optimizer="lbfgs")


def test_train_times_stacked_units_checked_per_unit(monkeypatch):
    """``lthfast-unitsU``: U copies stacked by lthfast.units, checked against the float64 reference (every unit's
    logits, unit 0's gradients, no gradient where pruned) and timed as one step that trains U batches."""
    cfg = train.TrainConfig(
        model="mlp-mnist1d", batch=8, sparsities=[0.5], blocks=[1], providers=["lthfast", "lthfast-units3"], **FAST
    )
    entries = {e["provider"]: e for e in train.run_train(cfg, log=quiet)["rows"][0]["results"]}
    units3 = entries["lthfast-units3"]
    assert units3["status"] == "ok" and units3["units"] == 3 and units3["optimizer"] == "MaskedSGD", units3
    assert units3["samples_per_s"] == pytest.approx(3 * 8 / (units3["median_ms"] * 1e-3))
    assert units3["speedup_vs_dense"] == pytest.approx(units3["samples_per_s"] / entries["dense"]["samples_per_s"])

    real = train.build_variant  # a stack whose masks are all alive: same logits, gradients leak into pruned weights
    monkeypatch.setattr(
        train, "build_variant",
        lambda name, base, masks: real(name, base, {k: torch.ones_like(m) for k, m in masks.items()})
        if name.startswith("lthfast-units") else real(name, base, masks),
    )  # fmt: skip
    entries = {e["provider"]: e for e in train.run_train(cfg, log=quiet)["rows"][0]["results"]}
    assert entries["lthfast-units3"]["status"] == "error"
    assert "nonzero where the mask is False" in entries["lthfast-units3"]["reason"]


def test_train_config_takes_units_providers_only_with_a_positive_count():
    assert train.units_of("lthfast-units4") == 4 and train.units_of("lthfast-units0") is None
    with pytest.raises(ValueError, match="lthfast-units0"):
        train.TrainConfig(providers=["lthfast-units0"])


def test_cli_bench_train_units(tmp_path, capsys):
    argv = ["bench", "train", "--model", "mlp-mnist1d", "--batch", "8", "--sparsity", "0.5", "--block", "1"]
    argv += ["--providers", "lthfast", "--units", "2", "--repeats", "1", "--min-run-time", "0.002", "--buffers", "3"]
    argv += ["--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    (json_path,) = tmp_path.glob("bench_train-mlp-mnist1d-cpu-*.json")
    doc = json.loads(json_path.read_text())
    providers = [r["provider"] for r in doc["rows"][0]["results"]]
    assert providers == ["dense", "lthfast", "lthfast-units2"]
    assert "lthfast-units2" in doc["command"] and "lthfast-units2" in capsys.readouterr().out
