"""Graphed training steps in the IMP driver (``--cuda-graph``, on by default on CUDA; lthfast.imp.graphed).

On a machine without a GPU the driver's graph bookkeeping runs with a stand-in capture that replays the step on
the static buffers it was captured with (what a CUDA graph does): one capture per unit after the warm-up, every
later iteration a replay, the learning-rate schedule read from a tensor, checkpoints in the eager form and resumes
across modes. The GPU tests capture for real and compare graphed training with eager training.

Bounds: the graph-ready optimizer reads its learning rate from a float32 tensor where eager training has a Python
float, so the two differ by float32 rounding of lr (measured on the tiny MLP's weights over 3 levels of 30 steps on
the CPU: 0 with SGD and momentum, 1.2e-7 with Adam); 1e-6 allowed. On CUDA, fused SGD and capturable Adam may round
differently from torch's foreach kernels (not yet measured on a GPU): 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lthfast.imp import Config, graphed, run, train
from lthfast.pruning import Masks

UNITS = ("level_0", "level_1", "level_2")


@pytest.fixture
def fake_graphs(monkeypatch):
    """Graphs on the CPU: ``use_cuda_graph`` follows the option alone, and a capture replays the step on its static
    buffers. Yields the list of captures (one (x, y) per capture) and the replay count."""
    monkeypatch.setenv("LTHFAST_FUSED_OPTIMIZER", "0")  # torch's optimizers, as on CUDA
    monkeypatch.setattr(train, "use_cuda_graph", lambda cfg, device, world: cfg.cuda_graph)
    record = {"captures": [], "replays": 0}

    def capture(step, x, y):
        record["captures"].append((x, y))

        def replay():
            record["replays"] += 1
            step(x, y)

        return replay

    monkeypatch.setattr(graphed, "_cuda_capture", capture)
    return record


def _weights(result, unit):
    return load_file(str(result.path / "replicate_0" / unit / "model.safetensors"))


def _assert_close_runs(a, b, bound):
    for unit in UNITS:
        wa, wb = _weights(a, unit), _weights(b, unit)
        assert wa.keys() == wb.keys()
        for name in wa:
            if wa[name].is_floating_point():
                assert (wa[name] - wb[name]).abs().max() <= bound, (unit, name)
            else:
                assert torch.equal(wa[name], wb[name]), (unit, name)
        ma = Masks.load(a.path / "replicate_0" / unit / "mask.safetensors")
        mb = Masks.load(b.path / "replicate_0" / unit / "mask.safetensors")
        assert all(torch.equal(ma[n], mb[n]) for n in ma), unit


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_graphed_units_capture_once_replay_the_rest_and_train_as_eager(tiny, tmp_path, fake_graphs, optimizer):
    options = {**tiny, "optimizer": optimizer, "lr": 0.05 if optimizer == "momentum" else 1e-2, "warmup": "5it"}
    eager = run({**options, "out_dir": str(tmp_path / "eager"), "cuda_graph": False})
    assert not fake_graphs["captures"]
    graph = run({**options, "out_dir": str(tmp_path / "graph")})
    assert graph.path.name == eager.path.name, "graphs change no result: not part of the run's identity"
    assert len(fake_graphs["captures"]) == len(UNITS), "one capture per unit: after every prune"
    assert fake_graphs["replays"] == len(UNITS) * (30 - graphed.WARMUP_STEPS)
    x, y = fake_graphs["captures"][0]
    assert x.shape == (20, 8) and y.shape == (20,)
    _assert_close_runs(eager, graph, 1e-6)
    for unit in UNITS:  # the training loss and accuracy sums come out of the graph too
        first = (eager.path / "replicate_0" / unit / "metrics.jsonl").read_text().splitlines()
        second = (graph.path / "replicate_0" / unit / "metrics.jsonl").read_text().splitlines()
        assert len(first) == len(second)


def test_the_schedule_reaches_the_graph_through_the_lr_tensor(tiny, tmp_path, fake_graphs, monkeypatch):
    seen = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(float(self.param_groups[0]["lr"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    run({**tiny, "optimizer": "momentum", "lr": 0.1, "warmup": "10it", "levels": 0})
    # warm-up from 0.01 to 0.1 over the first 10 iterations, then constant; replays read the refilled tensor
    assert seen[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)], rel=1e-6)
    assert seen[10:] == pytest.approx([0.1] * 20, rel=1e-6)


@pytest.mark.parametrize("first,second", [(True, False), (False, True)])
def test_a_run_interrupted_in_one_mode_resumes_in_the_other(tiny, tmp_path, fake_graphs, cut_training, first, second):
    options = {**tiny, "optimizer": "adam", "lr": 1e-2, "name": "r"}
    reference = run({**options, "out_dir": str(tmp_path / "ref"), "cuda_graph": first})
    cut_training(at=25)
    with pytest.raises(cut_training.error):
        run({**options, "out_dir": str(tmp_path / "cut"), "cuda_graph": first})
    ckpt = torch.load(tmp_path / "cut" / "r" / "replicate_0" / "level_1" / "checkpoint.pt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in groups), "checkpoints hold the eager form"
    cut_training.undo()
    resumed = run({**options, "out_dir": str(tmp_path / "cut"), "cuda_graph": second})
    _assert_close_runs(reference, resumed, 1e-6)


def test_graph_ready_and_eager_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adam([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    graphed.graph_ready(opt, torch.device("cpu"))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["lr"].dtype == torch.float32
    graphed.set_lr(opt, 0.25)
    assert float(opt.param_groups[0]["lr"]) == 0.25
    sd = graphed.eager_state_dict(opt)
    assert sd["param_groups"][0]["lr"] == 0.25 and sd["param_groups"][0]["capturable"] is False
    fresh = torch.optim.Adam([torch.nn.Parameter(w.detach().clone())], lr=1.0)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == 0.25
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"], opt.state[w]["exp_avg"])
    eager = torch.optim.SGD([w], lr=0.5)
    assert graphed.eager_state_dict(eager) == eager.state_dict(), "an eager optimizer's state is written as it is"


def test_blockers_name_what_is_not_capturable():
    from lthfast.distributed import World

    cuda, single = torch.device("cuda"), World(device=torch.device("cpu"))
    assert graphed.blocker(Config(), cuda, single) is None
    assert "GradScaler" in graphed.blocker(Config(amp="fp16"), cuda, single)
    assert "--compile" in graphed.blocker(Config(compile=True), cuda, single)
    assert "cpu" in graphed.blocker(Config(), torch.device("cpu"), single)
    assert not train.use_cuda_graph(Config(), torch.device("cpu"), single), "CPU steps are never graphed"
    assert not train.use_cuda_graph(Config(cuda_graph=False), cuda, single)


def test_the_cli_turns_graphs_off():
    import argparse

    from lthfast.imp.cli import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert config_from_args(parser.parse_args(["imp"])).cuda_graph is True
    assert config_from_args(parser.parse_args(["imp", "--no-cuda-graph"])).cuda_graph is False


# ----------------------------------------------------------------------------------------------- on a GPU


def _cuda_options(tiny, tmp_path, optimizer):
    return {**tiny, "device": "cuda", "backend": "triton", "model": "mlp", "hidden": [64, 32], "optimizer": optimizer,
            "lr": 0.05 if optimizer == "momentum" else 1e-2, "warmup": "5it", "out_dir": str(tmp_path)}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_graphed_and_eager_cuda_training_give_the_same_weights(tiny, tmp_path, monkeypatch, optimizer):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    captures = []
    original = graphed._cuda_capture
    monkeypatch.setattr(graphed, "_cuda_capture", lambda *a: captures.append(1) or original(*a))
    options = _cuda_options(tiny, tmp_path, optimizer)
    eager = run({**options, "name": "eager", "cuda_graph": False})
    assert not captures
    graph = run({**options, "name": "graph"})
    assert len(captures) == len(UNITS)
    _assert_close_runs(eager, graph, 1e-5)


@pytest.mark.gpu
def test_a_replayed_step_equals_the_same_step_run_eagerly():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lthfast.nn import MaskedLinear

    torch.manual_seed(0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        layer = MaskedLinear(96, 40).cuda()
        with torch.no_grad():
            layer.mask.copy_(torch.rand_like(layer.weight) > 0.7)
            layer.weight.mul_(layer.mask)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        graphed.graph_ready(opt, torch.device("cuda"))
        models.append((layer, opt))

    def make_step(layer, opt):
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(layer(x), y).backward()
            opt.step()

        return step

    eager_step = make_step(*models[0])
    graph_step = graphed.GraphedStep(make_step(*models[1]), lambda: models[1][1].zero_grad(set_to_none=True))
    for i in range(8):
        x, y = torch.randn(33, 96, device="cuda"), torch.randint(0, 40, (33,), device="cuda")
        graphed.set_lr(models[0][1], 0.1 / (i + 1))
        graphed.set_lr(models[1][1], 0.1 / (i + 1))
        eager_step(x, y)
        graph_step(x, y)
    torch.cuda.synchronize()
    assert graph_step.replays == 8 - graphed.WARMUP_STEPS
    torch.testing.assert_close(models[1][0].weight, models[0][0].weight, atol=1e-6, rtol=1e-6)
    assert bool((models[1][0].weight[~models[1][0].mask] == 0).all())
