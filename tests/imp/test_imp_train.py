"""Learning-rate schedules, optimizers and evaluation of the training loop."""

import json
import math

import pytest
import torch
from torch import nn

from lthfast.imp import Config, run
from lthfast.imp.train import evaluate, lr_at, make_optimizer


def _steps(cfg: Config):
    return cfg.steps(steps_per_epoch=10)


def test_warmup_then_step_schedule():
    cfg = Config(lr=0.1, train_steps="100it", warmup="10it", schedule="step", milestones=("50it", "8ep"), gamma=0.5)
    steps = _steps(cfg)
    assert lr_at(0, cfg, steps) == pytest.approx(0.01)
    assert lr_at(9, cfg, steps) == pytest.approx(0.1)
    assert lr_at(49, cfg, steps) == pytest.approx(0.1)
    assert lr_at(50, cfg, steps) == pytest.approx(0.05)
    assert lr_at(80, cfg, steps) == pytest.approx(0.025)


def test_cosine_schedule():
    cfg = Config(lr=0.2, train_steps="100it", schedule="cosine")
    steps = _steps(cfg)
    assert lr_at(0, cfg, steps) == pytest.approx(0.2)
    assert lr_at(50, cfg, steps) == pytest.approx(0.1)
    assert lr_at(99, cfg, steps) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.99)))


@pytest.mark.parametrize(
    "name, kind, momentum", [("sgd", torch.optim.SGD, 0), ("momentum", torch.optim.SGD, 0.8),
                             ("adam", torch.optim.Adam, None), ("adamw", torch.optim.AdamW, None)]
)  # fmt: skip
def test_optimizers(name, kind, momentum):
    opt = make_optimizer(Config(optimizer=name, momentum=0.8, weight_decay=0.01), nn.Linear(3, 2).parameters())
    assert type(opt) is kind and opt.defaults["weight_decay"] == 0.01
    if momentum is not None:
        assert opt.defaults["momentum"] == momentum


def test_evaluate_matches_manual():
    model = nn.Linear(5, 3)
    x, y = torch.randn(37, 5), torch.randint(0, 3, (37,))
    loss, acc = evaluate(model.train(), x, y, batch=8)
    logits = model(x)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert model.training


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "momentum", "lr": 0.05, "schedule": "cosine", "warmup": "5it", "dropout": 0.3},
        {"optimizer": "adamw", "weight_decay": 0.1, "schedule": "step", "milestones": "20it"},
    ],
)
def test_training_options_keep_pruned_weights_zero(tiny, options):
    result = run({**tiny, **options, "levels": 1, "name": "opts"})
    from safetensors.torch import load_file

    state = load_file(str(result.path / "replicate_0/level_1/model.safetensors"))
    for name in ("fc1", "out"):
        assert not state[f"{name}.weight"][~state[f"{name}.mask"]].any()
    metrics = [json.loads(line) for line in (result.path / "replicate_0/level_0/metrics.jsonl").open()]
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]  # it learned


@pytest.mark.parametrize("rule", ["val_loss", "val_acc"])
def test_early_stop_iteration_follows_the_chosen_rule(tiny, rule):
    """val_loss (the default, Frankle & Carbin's): the first minimum of validation loss; val_acc: the first
    maximum of validation accuracy. The report names the rule."""
    from lthfast.imp import report

    options = {**tiny, "levels": 0, "train_steps": "60it", "eval_every": "5it", "name": rule, "lr": 0.05}
    result = run({**options, "early_stop": rule} if rule != "val_loss" else options)
    metrics = [json.loads(line) for line in (result.path / "replicate_0/level_0/metrics.jsonl").open()]
    if rule == "val_loss":
        expected = min(metrics, key=lambda r: r["val_loss"])  # min() keeps the first of equal values
    else:
        expected = max(metrics, key=lambda r: r["val_acc"])
    (row,) = result.rows
    assert row["early_stop"] == rule and row["early_stop_iteration"] == expected["iteration"]
    assert row["early_stop_test_acc"] == expected["test_acc"]
    assert f"({report.EARLY_STOP[rule]})" in result.table()


def test_runs_made_before_the_option_keep_their_identity():
    from lthfast.imp.config import Config

    assert "early_stop" not in Config(early_stop="val_acc").identity()  # hashes as before: resumes as it was made
    assert Config().identity()["early_stop"] == "val_loss"
