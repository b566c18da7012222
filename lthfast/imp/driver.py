"""``run(config)``: iterative magnitude pruning with rewinding, controls and replicates, resumable.

Per replicate r (its own seeds for init, data order and pruning):
  level 0: train the dense network from its initialization, capturing the rewind state (a deep copy) at the
           rewind point; levels 1..L: prune (magnitude, from the previous level's trained weights, or with
           ``one_shot`` from the dense level's straight to density (1 - f)^k), rewind the weights, train;
  controls at chosen levels, as branches beside the ticket: random reinitialization (same mask, fresh init),
  random pruning (same per-layer counts, random positions), rearranged mask (each layer's mask permuted).
Every step reads its inputs from the run directory and skips finished units, so running again resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lthfast
from lthfast.data import BatchSampler, DataError, Dataset, load_dataset
from lthfast.imp import report, rundir
from lthfast.imp.config import Config, ConfigError
from lthfast.imp.levels import Replicate, derive_seed
from lthfast.imp.progress import Progress
from lthfast.models import ModelError, build_model


@dataclass
class RunResult:
    """Where a run lives and its summary rows (one per replicate, level and branch)."""

    path: Path
    rows: list[dict]

    def table(self) -> str:
        return report.format_table(self.rows)


def run(
    config: Config | dict | str | None = None,
    *,
    model_fn: Callable[[], nn.Module] | None = None,
    data: Dataset | None = None,
    **overrides,
) -> RunResult:
    """Run (or resume) IMP as configured; returns the run directory and its summary.

    config: a Config, a dict of options, or a YAML/JSON file path; ``overrides`` replace options. model_fn: a
    callable returning a fresh nn.Module (called after the init seed is set; nn.Linear / nn.Conv2d weights
    are pruned); data: a ``lthfast.data.Dataset``. Bad options raise ConfigError, unusable data DataError and
    an unusable run directory RunDirError, all before any training.
    """
    cfg = _config(config, overrides)
    cfg.validate(custom_model=model_fn is not None, custom_data=data is not None)
    device = _device(cfg.device)
    out_dir = Path(cfg.out_dir)
    rundir.check_writable(out_dir)
    if data is None:
        cache = cfg.cache_dir or os.path.join(cfg.out_dir, ".cache")
        data = load_dataset(
            cfg.dataset, data_dir=cfg.data_dir, cache_dir=cache, val_size=cfg.val_size,
            num_samples=cfg.num_samples, input_shape=cfg.synthetic_shape,
        )  # fmt: skip
    elif not isinstance(data, Dataset):
        raise DataError(f"data must be a lthfast.data.Dataset, got {type(data).__name__}")
    if cfg.batch_size > len(data.y_train):
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {len(data.y_train)} training examples")
    steps = cfg.steps(len(data.y_train) // cfg.batch_size)
    make_model = model_fn or (
        lambda: build_model(cfg.model, data.input_shape, data.num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    )
    _check_model(make_model, data)
    identity = cfg.identity()
    if model_fn is not None or data.name != cfg.dataset:
        identity["custom"] = {"model_fn": getattr(model_fn, "__qualname__", None), "data": data.describe()}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    name = cfg.name or f"{'custom' if model_fn else cfg.model}-{data.name}-{digest}"
    rd = rundir.RunDir(out_dir / name)
    with rd.lock():
        rd.prepare(identity, cfg.to_dict(), cfg.force)
        rundir.write_json(rd.env, rundir.environment())
        data = data.to(device)
        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            _run_replicates(cfg, steps, rd, make_model, data, device)
        finally:
            torch.set_num_threads(threads)
        rows = report.collect(rd.root)
        report.write_summary(rd.root, rows)
        if cfg.plots:
            report.plot(rd.root, rows)
    return RunResult(rd.root, rows)


def _run_replicates(cfg: Config, steps, rd, make_model, data: Dataset, device: torch.device) -> None:
    with lthfast.backend(cfg.backend), Progress(_unit_count(cfg), quiet=cfg.quiet) as progress:
        progress.done(sum(1 for _ in rd.root.glob("replicate_*/level_*/**/done.json")))
        for r in range(cfg.replicates):
            seeds = {k: derive_seed(cfg.seed, r, k) for k in ("init", "data", "prune", "dropout")}
            sampler = BatchSampler(len(data.y_train), cfg.batch_size, seeds["data"])
            Replicate(cfg, steps, rd, r, seeds, make_model, data, sampler, device, progress).run()


def _config(config, overrides) -> Config:
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = Config.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = Config.from_file(os.fspath(config))
    else:
        raise ConfigError(f"config must be a Config, a dict or a file path, got {type(config).__name__}")
    if overrides:
        merged = cfg.to_dict()
        merged.update(overrides)
        cfg = Config.from_dict(merged, where="run()")
    return cfg


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def _check_model(make_model, data: Dataset) -> None:
    """Build the model once and run two examples through it, so a mismatch fails before any training."""
    try:
        model = make_model()
        with torch.no_grad():
            out = model.eval()(data.x_train[:2].cpu())
    except ModelError as exc:
        raise ConfigError(str(exc)) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"the model cannot take {data.name} input {data.input_shape}: {first}") from None
    if not isinstance(model, nn.Module) or tuple(out.shape) != (2, data.num_classes):
        raise ConfigError(
            f"the model must map [B, *{data.input_shape}] to logits [B, {data.num_classes}], got {tuple(out.shape)}"
        )
    if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules()):
        raise ConfigError("the model has no nn.Linear or nn.Conv2d layer to prune")


def _unit_count(cfg: Config) -> int:
    return cfg.replicates * (cfg.levels + 1 + len(cfg.controls) * len(cfg.controls_at()))
