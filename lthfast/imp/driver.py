"""``run(config)``: iterative magnitude pruning with rewinding, controls and replicates, resumable.

Per replicate r (its own seeds for init, data order and pruning):
  level 0: train the dense network from its initialization, capturing the rewind state (a deep copy) at the
           rewind point; levels 1..L: prune (magnitude, from the previous level's trained weights, or with
           ``one_shot`` from the dense level's straight to density (1 - f)^k), rewind the weights, train;
  controls at chosen levels, as branches beside the ticket: random reinitialization (same mask, fresh init),
  random pruning (same per-layer counts, random positions), rearranged mask (each layer's mask permuted).
With ``block`` > 1 or ``nm``, levels prune whole blocks or towards N:M and the controls keep that granularity
(``lthfast.imp.granularity``).
Every step reads its inputs from the run directory and skips finished units, so running again resumes.

Started by ``torchrun --nproc-per-node N -m lthfast imp ...``, every level trains with DistributedDataParallel
(gloo on CPU, NCCL on CUDA; ``batch_size`` is the global batch, split evenly over the ranks). Rank 0 takes the
run directory's lock and writes every file; the other ranks read the same files, so the run directory must be on
a filesystem all ranks see (one node, or a shared filesystem). See ``lthfast.distributed`` and docs/scaling-out.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lthfast
from lthfast import _backend, distributed, units
from lthfast.data import BatchSampler, DataError, Dataset, load_dataset
from lthfast.imp import batched, report, rundir
from lthfast.imp.batched import train_units
from lthfast.imp.config import EXTENT, Config, ConfigError, digest
from lthfast.imp.errors import ImpError, RunDirError
from lthfast.imp.levels import Replicate, derive_seed
from lthfast.imp.progress import Progress
from lthfast.imp.train import checkpoint_iteration
from lthfast.models import ModelError, build_model
from lthfast.pruning import prunable
from lthfast.pruning.layers import matches


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
    an unusable run directory RunDirError, all before any training. Under torchrun (WORLD_SIZE > 1), or in a
    process group the caller initialized, every rank calls ``run`` with the same arguments and gets the same
    result; ranks that disagree (masks, a run directory they cannot see) raise ``DistributedError`` on every
    rank, and a sharded model (FSDP) is refused with it.
    """
    cfg = _config(config, overrides)
    cfg.validate(custom_model=model_fn is not None, custom_data=data is not None)
    return _run(cfg, distributed.setup(_device(cfg.device)), model_fn, data)


def _run(cfg: Config, world: distributed.World, model_fn, data) -> RunResult:
    device = world.device
    _check_backend(cfg.backend, device)
    out_dir = Path(cfg.out_dir)
    world.on_main(lambda: rundir.check_writable(out_dir))
    if data is None:
        data = _load_data(cfg, world)
    elif not isinstance(data, Dataset):
        raise DataError(f"data must be a lthfast.data.Dataset, got {type(data).__name__}")
    if cfg.batch_size > len(data.y_train):
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {len(data.y_train)} training examples")
    if cfg.batch_size % world.size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} (the global batch) does not split evenly over the {world.size} processes"
        )
    steps = cfg.steps(len(data.y_train) // cfg.batch_size)
    make_model = model_fn or (
        lambda: build_model(cfg.model, data.input_shape, data.num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    )
    _check_model(make_model, data, cfg)
    identity = cfg.identity()
    if model_fn is not None or data.name != cfg.dataset:
        identity["custom"] = {"model_fn": getattr(model_fn, "__qualname__", None), "data": data.describe()}
    name = cfg.name or _default_name(out_dir, f"{'custom' if model_fn else cfg.model}-{data.name}", identity, cfg)
    rd = rundir.RunDir(out_dir / name)
    with _main_lock(rd, cfg.force, world):

        def prepare() -> None:
            if not cfg.force:
                _check_extent(rd, cfg)
            rd.prepare(identity, cfg.to_dict(), cfg.force)
            env = rundir.environment()
            env.update(world_size=str(world.size), dist_backend=distributed.backend_name())
            rundir.write_json(rd.env, env)

        world.on_main(prepare)
        _check_visible(rd, identity, world)
        data = data.to(device)
        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            _run_replicates(cfg, steps, rd, make_model, data, world)
        finally:
            torch.set_num_threads(threads)

        def finish() -> list[dict]:
            rows = report.collect(rd.root)
            report.write_summary(rd.root, rows)
            if cfg.plots:
                report.plot(rd.root, rows)
            return rows

        rows = world.on_main(finish)
    return RunResult(rd.root, rows)


def _default_name(out_dir: Path, prefix: str, identity: dict, cfg: Config) -> str:
    """``<prefix>-<digest of the identity>``. A run made before levels and replicates left the identity was named
    with them in the digest: the same command finds it under that name and resumes it (extending such a run with
    more levels or replicates takes ``--name`` with its folder's name)."""
    current = f"{prefix}-{digest(identity)}"
    legacy = f"{prefix}-{digest({**identity, **{k: getattr(cfg, k) for k in EXTENT}})}"
    if not (out_dir / current).exists() and (out_dir / legacy / "config.json").is_file():
        return legacy
    return current


def _check_extent(rd: rundir.RunDir, cfg: Config) -> None:
    """Refuse fewer levels or replicates than the run directory holds (before anything is written): its
    config.json would then misstate what it holds. More levels or replicates extend the run."""
    for option, pattern, asked in (("levels", "replicate_*/level_*", cfg.levels),
                                   ("replicates", "replicate_*", cfg.replicates - 1)):  # fmt: skip
        present = [int(p.name.rsplit("_", 1)[1]) for p in rd.root.glob(pattern) if p.name.rsplit("_", 1)[1].isdigit()]
        if present and max(present) > asked:
            held = f"levels 0-{max(present)}" if option == "levels" else f"{max(present) + 1} replicates"
            raise RunDirError(
                f"{rd.root} holds {held} and this run asks for {option}={getattr(cfg, option)}: ask for as many or "
                f"more to resume or extend it (lthfast report {rd.root} prints it as it is), or use --force to start "
                "it over"
            )


def load_data(cfg: Config) -> Dataset:
    """The configured dataset (generated data cached in ``cache_dir``, default OUT_DIR/.cache)."""
    cache = cfg.cache_dir or os.path.join(cfg.out_dir, ".cache")
    return load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, cache_dir=cache, val_size=cfg.val_size,
        num_samples=cfg.num_samples, input_shape=cfg.synthetic_shape,
    )  # fmt: skip


def _load_data(cfg: Config, world: distributed.World) -> Dataset:
    """The configured dataset; under DDP rank 0 loads first (generating the cache), then the others read it."""
    load = lambda: load_data(cfg)  # noqa: E731
    data, error = None, None
    if world.is_main:
        try:
            data = load()
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
            error = exc
    world.agree(error)
    return data if data is not None else load()


@contextlib.contextmanager
def _main_lock(rd: rundir.RunDir, force: bool, world: distributed.World):
    """Rank 0 holds the run directory's lock (the other ranks of the job write nothing); errors reach every rank."""
    handle, error = None, None
    if world.is_main:
        try:
            handle = rd.lock(force)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
            error = exc
    world.agree(error)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def _check_visible(rd: rundir.RunDir, identity: dict, world: distributed.World) -> None:
    """Every rank must read the config.json rank 0 has just written: the ranks share the run directory's files."""
    error = None
    if not world.is_main:
        try:
            seen = rundir.load_json(rd.config) if rd.config.exists() else None
        except ImpError:
            seen = None
        if not isinstance(seen, dict) or seen.get("identity") != identity:
            error = distributed.DistributedError(
                f"rank {world.rank} does not see {rd.config} as rank 0 wrote it: the run directory must be on a "
                "filesystem every rank shares (the ranks read the files rank 0 writes)"
            )
    world.agree(error)


def _run_replicates(cfg: Config, steps, rd, make_model, data: Dataset, world: distributed.World) -> None:
    quiet = cfg.quiet or not world.is_main
    with lthfast.backend(cfg.backend), Progress(_unit_count(cfg), quiet=quiet) as progress:
        progress.done(sum(1 for _ in rd.root.glob("replicate_*/level_*/**/done.json")))
        replicates = []
        for r in range(cfg.replicates):
            seeds = {k: derive_seed(cfg.seed, r, k) for k in ("init", "data", "prune", "dropout")}
            sampler = BatchSampler(len(data.y_train), cfg.batch_size, seeds["data"])
            replicates.append(Replicate(cfg, steps, rd, r, seeds, make_model, data, sampler, world, progress))
        if batched.enabled(cfg, world):
            _run_waves(replicates, cfg, steps, make_model, data, progress)
        else:
            for replicate in replicates:
                replicate.run()


def _run_waves(replicates: list[Replicate], cfg: Config, steps, make_model, data: Dataset, progress: Progress) -> None:
    """Batched mode: train in waves. A wave is every unit that is ready (not finished, and the unit it is made from
    finished: every replicate's level 0; a ticket once the previous level's ticket is; a control once its level's
    ticket is, so level-L controls share a wave with level-(L+1) tickets). Ready units that start at the same
    iteration and resume from the same checkpoint iteration (or none) train together (``batched.train_units``), in
    as few groups of at most ``batched.group_size`` units as hold them, of near-equal sizes; a group of one trains as
    in sequential mode."""
    device = data.x_train.device
    per_unit, stackable = None, True
    while True:
        keyed: dict[tuple, list] = {}
        for replicate in replicates:
            for level, branch in replicate.units():
                if replicate.ready(level, branch):
                    checkpoint = replicate.path(level, branch) / "checkpoint.pt"
                    key = (replicate.start(level), checkpoint_iteration(checkpoint))
                    keyed.setdefault(key, []).append((replicate, level, branch))
        if not keyed:
            return
        if cfg.max_parallel == 1:
            size = 1
        else:
            if per_unit is None:
                per_unit = batched.working_set(lthfast.sparsify(make_model().to(device)), cfg, data)
            size = batched.group_size(cfg, device, per_unit)
        for ready in keyed.values():
            count = -(-len(ready) // size)  # groups
            bounds = [len(ready) * g // count for g in range(count + 1)]
            for lo, hi in zip(bounds, bounds[1:]):
                stackable = _train_group(ready[lo:hi], cfg, steps, data, progress, stackable)


def _train_group(members: list, cfg: Config, steps, data: Dataset, progress: Progress, stackable: bool) -> bool:
    """Prepare and train ``members`` (replicate, level, branch) together, then write their files; one at a time when
    there is one, or once a model could not be stacked (warned once). Returns whether models still stack."""
    group = [replicate.prepare(level, branch) for replicate, level, branch in members]
    if len(group) > 1 and stackable:
        try:
            results = train_units(group, data, cfg, steps, progress=progress.iterations)
        except units.StackError as exc:
            batched.warn_sequential(str(exc))
            stackable = False
        else:
            for prepared, result in zip(group, results):
                prepared.replicate.finish(prepared, result, together=len(group))
            return stackable
    for prepared in group:
        prepared.replicate.finish(prepared, prepared.replicate.train(prepared))
    return stackable


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


def _check_backend(name: str, device: torch.device) -> None:
    """A forced triton backend that cannot run on the device would fail at the first forward pass, mid-run."""
    if name == "triton" and not _backend.triton_runs_on(device):
        why = "triton is not importable" if not _backend.triton_available() else "set TRITON_INTERPRET=1 for the CPU"
        raise ConfigError(f"backend triton cannot run on device {device}: {why}")


def _check_model(make_model, data: Dataset, cfg: Config) -> None:
    """Build the model once and run two examples through it, so a mismatch fails before any training; check that
    layer_fractions and leave_dense name its prunable layers (the pruning at level 1 would refuse them).

    A sharded model (FSDP) is refused with DistributedError before it runs (``lthfast.distributed``)."""
    try:
        model = make_model()
        distributed.refuse_sharded(model, "model_fn")
        with torch.no_grad():
            out = model.eval()(data.x_train[:2].cpu())
    except ModelError as exc:
        raise ConfigError(str(exc)) from None
    except distributed.DistributedError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"the model cannot take {data.name} input {data.input_shape}: {first}") from None
    if not isinstance(model, nn.Module) or tuple(out.shape) != (2, data.num_classes):
        raise ConfigError(
            f"the model must map [B, *{data.input_shape}] to logits [B, {data.num_classes}], got {tuple(out.shape)}"
        )
    if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules()):
        raise ConfigError("the model has no nn.Linear or nn.Conv2d layer to prune")
    names = list(prunable(model))
    for option, patterns in (("layer_fractions", cfg.layer_fractions), ("leave_dense", cfg.leave_dense)):
        for pattern in patterns:
            if not any(matches(pattern, name) for name in names):
                raise ConfigError(f"{option}: {pattern!r} matches no layer of the model ({', '.join(names)})")


def _unit_count(cfg: Config) -> int:
    return cfg.replicates * (cfg.levels + 1 + len(cfg.controls) * len(cfg.controls_at()))
