"""``lthfast ablate``: the same IMP run at several pruning granularities, and what each costs in accuracy and gains
in speed.

    lthfast ablate --block 1,16,32,64 [any lthfast imp option]

One ``lthfast imp`` run per granularity (a block size, or N:M written like 2:4), with the same options and seeds,
into sibling run directories OUT_DIR/<name>-b<B> (N:M: <name>-nm<N>-<M>), each resumable as an imp run is: running
the command again skips every finished unit. <name> is --name, else <model>-<dataset>-<hash of the options>
(the granularity left out). Then OUT_DIR/<name>-ablation/ gets ablation.md (the table), ablation.json (every
figure) and two plots: accuracy.png (ticket test accuracy against weights remaining, one line per granularity, the
dense network and the controls where run) and speed.png (training speed against weights remaining, dense = 1).

Speed: each level's training samples/s over its own run's level 0 (the dense network, same process and machine),
mean ± std over replicates; with ``--layer-bench``, also the layer benchmark at replicate 0's masks of each level
(``lthfast.imp.layer_speed``). Accuracy lost: the unstructured run's ticket accuracy minus this granularity's at the
same level, paired by replicate, ± the half-width of its 95% confidence interval (``lthfast.imp.claims.Margin``).
Pareto: at each level, a granularity is on the front when no other is at least as accurate and as fast and better
in one (speed: the layer benchmark where measured at every granularity of the level, else the run's own).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from lthfast.distributed import env_rank
from lthfast.imp import report, rundir
from lthfast.imp.claims import CONFIDENCE, Margin
from lthfast.imp.config import CONTROLS, Config
from lthfast.imp.errors import ConfigError


@dataclass(frozen=True)
class Granularity:
    """One run of the ablation: ``block`` (1 = single weights) or ``nm`` ("2:4")."""

    block: int = 1
    nm: str | None = None

    @property
    def label(self) -> str:
        if self.nm is not None:
            return self.nm
        return "unstructured" if self.block == 1 else f"{self.block}x{self.block}"

    @property
    def suffix(self) -> str:
        return f"nm{self.nm.replace(':', '-')}" if self.nm is not None else f"b{self.block}"

    @property
    def unstructured(self) -> bool:
        return self.block == 1 and self.nm is None


def parse_granularities(text: str) -> list[Granularity]:
    """ "1,16,32" / "1,2:4" -> Granularities (each checked as imp checks --block / --nm); ConfigError when bad."""
    out = []
    for item in (s.strip() for s in str(text).split(",")):
        if ":" in item:
            out.append(Granularity(nm=item))
            Config(nm=item, levels=0).validate()
        elif item.isdigit():
            out.append(Granularity(block=int(item)))
            Config(block=int(item)).validate()
        else:
            raise ConfigError(f"--block {text}: {item!r} is not a block size or N:M (e.g. 1,16,32,64 or 1,2:4)")
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"--block {text}: list each granularity once, e.g. 1,16,32,64")
    return out


@dataclass
class Ablation:
    """The ablation's folder, its runs (granularity -> run directory) and summary rows."""

    path: Path
    runs: dict[Granularity, Path]
    rows: list[dict]

    def table(self) -> str:
        return (self.path / "ablation.md").read_text()


def base_name(cfg: Config, custom: bool = False) -> str:
    return cfg.name or f"{'custom' if custom else cfg.model}-{cfg.dataset}-{cfg.replace(block=1, nm=None).short_hash()}"


def run_ablation(
    cfg: Config, granularities: list[Granularity], *, layer_bench: bool = False, model_fn=None, data=None
) -> Ablation:
    """Run (or resume) one imp run per granularity, then write the table, JSON and plots. Every run's options are
    checked before the first one starts (ConfigError)."""
    from lthfast.imp.driver import run

    name = base_name(cfg, model_fn is not None)
    if cfg.sequential is None:  # the speed column times each granularity's layers; stacked units take the dense route
        cfg = cfg.replace(sequential=True)
    configs = {g: cfg.replace(block=g.block, nm=g.nm, name=f"{name}-{g.suffix}") for g in granularities}
    for c in configs.values():
        c.validate(custom_model=model_fn is not None, custom_data=data is not None)
    runs = {g: run(c, model_fn=model_fn, data=data).path for g, c in configs.items()}
    folder = Path(cfg.out_dir) / f"{name}-ablation"
    if env_rank() != 0:  # under torchrun every rank trains; rank 0 alone benchmarks and writes
        return Ablation(folder, runs, [])
    rows, controls = summarize(runs)
    if layer_bench:
        bench_levels(cfg, runs, rows, folder, model_fn=model_fn, data=data)
    mark_pareto(rows)
    write(folder, name, runs, rows, controls)
    return Ablation(folder, runs, rows)


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict[Granularity, Path]) -> tuple[list[dict], list[dict]]:
    """(ticket rows, control rows): per granularity and level, means and stds over replicates; the accuracy lost
    against the unstructured run (paired by replicate) and the run's own speed-up against its level 0."""
    units = {}
    for g, path in runs.items():
        for row in report.collect(path):
            units.setdefault((g, row["level"], row["branch"]), {})[row["replicate"]] = row
    reference = next((g for g in runs if g.unstructured), None)
    rows, controls = [], []
    for (g, level, branch), unit in sorted(units.items(), key=lambda kv: (kv[0][1], list(runs).index(kv[0][0]))):
        acc = {r: row["test_acc"] for r, row in unit.items()}
        weights, _ = _stats([row["weights_remaining_pct"] for row in unit.values()])
        base = {"granularity": g.label, "block": g.block, "nm": g.nm, "level": level, "weights_remaining_pct": weights,
                "n": len(unit)}  # fmt: skip
        mean, std = _stats(list(acc.values()))
        if branch != "ticket":
            controls.append({**base, "branch": branch, "test_acc": mean, "test_acc_std": std})
            continue
        dense = units.get((g, 0, "ticket"), {})
        speed = [row["samples_per_s"] / dense[r]["samples_per_s"] for r, row in unit.items() if r in dense]
        speed_mean, speed_std = _stats(speed)
        lost = None
        if reference is not None and g != reference and (reference, level, "ticket") in units:
            ref = {r: row["test_acc"] for r, row in units[(reference, level, "ticket")].items()}
            margin = Margin.paired(ref, acc)
            lost = {"mean": margin.mean, "noise": margin.noise, "n": margin.n}
        rows.append({**base, "test_acc": mean, "test_acc_std": std, "acc_lost": lost, "run_speedup": speed_mean,
                     "run_speedup_std": speed_std, "layer_speedup": None})  # fmt: skip
    return rows, controls


def bench_levels(cfg: Config, runs, rows: list[dict], folder: Path, *, model_fn=None, data=None) -> None:
    """The layer benchmark at replicate 0's masks of every finished level (``lthfast.imp.layer_speed``), cached in
    ``layer_bench.json`` by the mask file's hash: running the ablation again times only new masks."""
    from lthfast import backend
    from lthfast.imp.driver import load_data
    from lthfast.imp.layer_speed import layer_inputs, masks_speedup
    from lthfast.models import build_model

    data = data if data is not None else load_data(cfg)
    model = model_fn() if model_fn is not None else build_model(
        cfg.model, data.input_shape, data.num_classes, hidden=cfg.hidden, dropout=cfg.dropout
    )  # fmt: skip
    shapes = layer_inputs(model, torch.zeros(cfg.batch_size, *data.input_shape))
    cache_path = folder / "layer_bench.json"
    cache = rundir.load_json(cache_path) if cache_path.is_file() else {}
    by_label = {g.label: g for g in runs}
    log = (lambda text: None) if cfg.quiet else (lambda text: print(text, flush=True))  # noqa: E731
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        with backend(cfg.backend):
            for row in rows:
                mask_file = rundir.RunDir(runs[by_label[row["granularity"]]]).unit(0, row["level"]) / "mask.safetensors"
                if not mask_file.is_file():
                    continue
                key = hashlib.sha1(mask_file.read_bytes()).hexdigest()
                if key not in cache:
                    log(f"layer bench: {row['granularity']} level {row['level']}")
                    cache[key] = masks_speedup(shapes, rundir.load_masks(mask_file), log=log)
                    rundir.write_json(cache_path, cache)
                row["layer_speedup"] = cache[key]["speedup"]
    finally:
        torch.set_num_threads(threads)


def mark_pareto(rows: list[dict]) -> None:
    """``pareto``: True where no other granularity at the same level is at least as accurate and as fast, and better
    in one of the two (``speed_for_pareto`` says which speed was used)."""
    for level in {r["level"] for r in rows}:
        same = [r for r in rows if r["level"] == level]
        field = "layer_speedup" if all(r["layer_speedup"] is not None for r in same) else "run_speedup"
        for r in same:
            r["speed_for_pareto"] = field
            r["pareto"] = not any(
                o is not r and o["test_acc"] >= r["test_acc"] and o[field] >= r[field]
                and (o["test_acc"] > r["test_acc"] or o[field] > r[field])
                for o in same
            )  # fmt: skip


def _pm(mean: float, std: float, n: int, scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


def format_table(rows: list[dict], controls: list[dict]) -> str:
    """The markdown table: per level and granularity, weights remaining, ticket accuracy, the accuracy lost against
    unstructured, the speed-ups against dense and the Pareto mark; then the controls' accuracies, if any."""
    bench = any(r["layer_speedup"] is not None for r in rows)
    head = ["level", "granularity", "weights %", "test acc %", "lost vs unstructured (pts)", "speed-up (run)"]
    head += ["speed-up (layers)"] if bench else []
    lines = ["| " + " | ".join([*head, "Pareto"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        lost = r["acc_lost"]
        if lost is None:
            lost_text = "reference" if r["block"] == 1 and r["nm"] is None else "-"
        else:
            noise = lost["noise"]
            lost_text = f"{100 * lost['mean']:+.2f}" + (f" ± {100 * noise:.2f}" if noise is not None else "")
        cells = [str(r["level"]), r["granularity"], f"{r['weights_remaining_pct']:.2f}",
                 _pm(r["test_acc"], r["test_acc_std"], r["n"], 100), lost_text,
                 _pm(r["run_speedup"], r["run_speedup_std"], r["n"])]  # fmt: skip
        if bench:
            cells.append("-" if r["layer_speedup"] is None else f"{r['layer_speedup']:.2f}")
        lines.append("| " + " | ".join([*cells, "yes" if r["pareto"] else ""]) + " |")
    n = max((r["n"] for r in rows), default=1)
    lines += [
        "",
        f"Test accuracy at the end of training, mean ± std over {n} replicate(s). Lost vs unstructured: the "
        "unstructured ticket's accuracy minus this one's at the same level, paired by replicate, ± the half-width of "
        f"its {100 * CONFIDENCE:.0f}% confidence interval (Student's t); positive = accuracy lost. Speed-up (run): "
        "training samples/s over the same run's dense level 0."
        + (" Speed-up (layers): the layer benchmark (forward, dX, dW of every prunable layer) at replicate 0's "
           "masks, dense over lthfast, timed back to back." if bench else "")
        + " Pareto: no other granularity at the level is at least as accurate and as fast, and better in one "
        f"(speed: {'the layer benchmark' if bench else 'the run'}'s).",
    ]  # fmt: skip
    if controls:
        lines += ["", "| level | granularity | control | weights % | test acc % |", "|---|---|---|---|---|"]
        order = {c: i for i, c in enumerate(CONTROLS)}
        for c in sorted(controls, key=lambda c: (c["level"], order.get(c["branch"], 9))):  # (stable: granularities)
            acc = _pm(c["test_acc"], c["test_acc_std"], c["n"], 100)
            branch = c["branch"].replace("_", " ")
            lines.append(f"| {c['level']} | {c['granularity']} | {branch} | {c['weights_remaining_pct']:.2f} | {acc} |")
    return "\n".join(lines)


def write(folder: Path, name: str, runs: dict, rows: list[dict], controls: list[dict]) -> list[Path]:
    """ablation.md, ablation.json, accuracy.png and speed.png in ``folder``; returns the files written."""
    from lthfast.imp.plots import ablation_accuracy_plot, ablation_speed_plot

    rundir.check_writable(folder)
    table = format_table(rows, controls)
    rundir.write_text(folder / "ablation.md", f"# Granularity ablation: {name}\n\n{table}\n")
    document = {
        "name": name,
        "runs": {g.label: {"block": g.block, "nm": g.nm, "run_dir": str(p)} for g, p in runs.items()},
        "rows": rows,
        "controls": controls,
        "confidence": CONFIDENCE,
    }
    rundir.write_json(folder / "ablation.json", json.loads(json.dumps(document, default=str)))
    labels = [g.label for g in runs]
    return [
        folder / "ablation.md",
        folder / "ablation.json",
        ablation_accuracy_plot(folder / "accuracy.png", rows, controls, labels, name),
        ablation_speed_plot(folder / "speed.png", rows, labels, name),
    ]
