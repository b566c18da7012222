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
