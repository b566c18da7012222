"""A tiny IMP configuration (an MLP on 8-dimensional synthetic data, a few dozen iterations per level)."""

import pytest


@pytest.fixture
def tiny(tmp_path):
    """Options for a run that takes well under a second per level on one CPU thread."""
    return {
        "model": "mlp", "hidden": [16], "dataset": "synthetic", "synthetic_shape": [8], "num_samples": 240,
        "val_size": 40, "batch_size": 20, "train_steps": "30it", "eval_every": "10it", "checkpoint_every": "10it",
        "levels": 2, "backend": "torch", "threads": 1, "quiet": True, "plots": False, "out_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"),
    }  # fmt: skip


class Interrupted(Exception):
    """What ``cut_training`` raises inside a unit's training loop (a crash mid-unit)."""


@pytest.fixture
def cut_training(monkeypatch):
    """``cut_training(at=25, unit="level_1")``: until ``cut_training.undo()``, runs raise ``cut_training.error``
    (``Interrupted``) before iteration ``at`` of the named unit trained alone (``levels.train_unit``)."""
    from lthfast.imp import levels

    original = levels.train_unit

    def cut(at: int = 25, unit: str = "level_1") -> None:
        def interrupted(model, data, cfg, steps, this, sampler, *, on_iteration=None, **kwargs):
            def hook(it, model, optimizer):
                if this.path.name == unit and it == at:
                    raise Interrupted
                if on_iteration is not None:
                    on_iteration(it, model, optimizer)

            return original(model, data, cfg, steps, this, sampler, on_iteration=hook, **kwargs)

        monkeypatch.setattr(levels, "train_unit", interrupted)

    cut.error = Interrupted
    cut.undo = lambda: monkeypatch.setattr(levels, "train_unit", original)
    return cut
