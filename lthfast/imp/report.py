"""Reading a run directory back: summary rows, ``summary.csv``, the printed table, and the plots."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from pathlib import Path

from lthfast.imp import rundir
from lthfast.imp.config import CONTROLS
from lthfast.imp.errors import ImpError, RunDirError

BRANCHES = ("ticket", *CONTROLS)
COLUMNS = (
    "replicate", "level", "branch", "weights_remaining_pct", "density", "test_acc", "test_loss", "val_acc",
    "train_acc", "early_stop_iteration", "early_stop_test_acc", "start_iteration", "iterations", "wall_s",
    "train_s", "samples_per_s", "peak_mem_mb", "backend", "device", "early_stop",
)  # fmt: skip
# What the early-stop iteration is (Config.early_stop); runs made before the option existed used best accuracy.
NO_ROWS = "(no finished levels yet)"
EARLY_STOP = {"val_loss": "minimum validation loss", "val_acc": "best validation accuracy"}
AT_END = "early stop at the last evaluation (in at least one replicate): training was too short to see it"


def collect(root: str | Path) -> list[dict]:
    """One row per finished unit (replicate, level, branch), sorted; unfinished units are left out."""
    root = Path(root)
    rows = []
    for done in root.glob("replicate_*/level_*/**/" + rundir.DONE):
        rec = rundir.load_json(done)
        final = rec["final"]
        rows.append({
            "replicate": rec["replicate"], "level": rec["level"], "branch": rec["branch"],
            "weights_remaining_pct": 100 * rec["density"], "density": rec["density"],
            "test_acc": final["test_acc"], "test_loss": final["test_loss"], "val_acc": final["val_acc"],
            "train_acc": final["train_acc"], "early_stop_iteration": rec["early_stop_iteration"],
            "early_stop_test_acc": rec["early_stop_test_acc"], "start_iteration": rec["start_iteration"],
            "iterations": rec["iterations"], "wall_s": rec["wall_s"], "train_s": rec["train_s"],
            "samples_per_s": rec["samples_per_s"], "peak_mem_mb": rec["peak_mem_mb"],
            "backend": rec["backend"], "device": rec["device"], "early_stop": rec.get("early_stop", "val_acc"),
        })  # fmt: skip
    order = {b: i for i, b in enumerate(BRANCHES)}
    rows.sort(key=lambda r: (r["replicate"], r["level"], order.get(r["branch"], len(order)), r["branch"]))
    return rows


def write_summary(root: str | Path, rows: list[dict]) -> Path:
    """``summary.csv`` at the top of the run directory (atomic)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in COLUMNS} for row in rows)
    path = Path(root) / "summary.csv"
    rundir.write_text(path, buf.getvalue())
    return path


def aggregate(rows: list[dict]) -> dict[tuple[int, str], dict]:
    """(level, branch) -> means and standard deviations over replicates of the main figures."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["level"], row["branch"]), []).append(row)
    out = {}
    for key, group in groups.items():
        stats = {"n": len(group)}
        for field in ("weights_remaining_pct", "test_acc", "early_stop_test_acc", "early_stop_iteration",
                      "samples_per_s"):  # fmt: skip
            values = [g[field] for g in group if g[field] is not None and not _isnan(g[field])]
            stats[field] = statistics.fmean(values) if values else float("nan")
            stats[field + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        stats["early_stop_at_end"] = sum(stopped_at_end(g) for g in group)
        out[key] = stats
    return out


def stopped_at_end(row: dict) -> bool:
    """The unit's early-stop iteration is its last evaluation: training ended before the criterion's optimum."""
    return row["early_stop_iteration"] >= row["iterations"]


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _acc(stats: dict | None, field: str = "test_acc") -> str:
    if stats is None:
        return "-"
    text = f"{100 * stats[field]:.2f}"
    return text + (f"±{100 * stats[field + '_std']:.2f}" if stats["n"] > 1 else "")


def _iteration(stats: dict | None) -> str:
    if stats is None:
        return "-"
    text = f"{stats['early_stop_iteration']:.0f}"
    text += f"±{stats['early_stop_iteration_std']:.0f}" if stats["n"] > 1 else ""
    return text + ("*" if stats["early_stop_at_end"] else "")


def early_stop_rule(rows: list[dict]) -> str:
    """How the rows' early-stop iterations were chosen, in words ("minimum validation loss", ...)."""
    rules = sorted({EARLY_STOP[r.get("early_stop", "val_acc")] for r in rows})
    return " / ".join(rules)


def format_table(rows: list[dict]) -> str:
    """The report table: per level, weights remaining, ticket test accuracy (final and at the early-stop
    iteration), each control's test accuracy, the ticket's early-stop iteration and samples/s.

    Accuracies in percent, mean ± standard deviation over replicates when there are several.
    """
    if not rows:
        return NO_ROWS
    agg = aggregate(rows)
    levels = sorted({lv for lv, _ in agg})
    controls = [c for c in CONTROLS if any(b == c for _, b in agg)]
    head = ["level", "weights %", "ticket acc", "ticket@ES", *[c.replace("_", " ") for c in controls],
            "ES iter", "samples/s"]  # fmt: skip
    body = []
    for lv in levels:
        t = agg.get((lv, "ticket"))
        weights = t["weights_remaining_pct"] if t else agg[next(k for k in agg if k[0] == lv)]["weights_remaining_pct"]
        body.append([
            str(lv), f"{weights:.2f}", _acc(t), _acc(t, "early_stop_test_acc"),
            *[_acc(agg.get((lv, c))) for c in controls],
            _iteration(t), f"{t['samples_per_s']:.0f}" if t else "-",
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    n = max(s["n"] for s in agg.values())
    lines.append(
        f"test accuracy in %{' (mean±std over ' + str(n) + ' replicates)' if n > 1 else ''}; ticket acc = at the end "
        f"of training, ticket@ES = at the early-stop iteration ({early_stop_rule(rows)}); controls at the end."
    )
    if any(s["early_stop_at_end"] for (_, b), s in agg.items() if b == "ticket"):
        lines.append(f"* {AT_END}")
    return "\n".join(lines)


def granularity_text(config: dict) -> str:
    """ ", in 16x16 blocks" / ", towards N:M 2:4" for a structured run's titles; "" for unstructured runs."""
    if config.get("nm"):
        return f", towards N:M {config['nm']}"
    block = int(config.get("block") or 1)
    return f", in {block}x{block} blocks" if block != 1 else ""


def plot(root: str | Path, rows: list[dict]) -> list[Path]:
    """Redraw ``plots/*.png`` from ``rows``; returns the files written."""
    from lthfast.imp.plots import draw_all

    root = Path(root)
    return draw_all(root / "plots", rows, aggregate(rows), _config(root), root.name)


def _config(root: Path) -> dict:
    config = rundir.load_json(root / "config.json").get("config", {})
    return config if isinstance(config, dict) else {}


def unit_order(config: dict) -> list[tuple[int, int, str]]:
    """(replicate, level, branch) of every unit the config asks for, in the order the driver trains them."""
    levels, replicates = int(config.get("levels", 0)), int(config.get("replicates", 1))
    controls = list(config.get("controls") or [])
    controls = list(CONTROLS) if controls == ["all"] else controls
    at = set(config.get("control_levels") or range(1, levels + 1)) if controls else set()
    order = []
    for r in range(replicates):
        order.append((r, 0, "ticket"))
        for level in range(1, levels + 1):
            order.append((r, level, "ticket"))
            order += [(r, level, c) for c in controls] if level in at else []
    return order


def checkpoint_iteration(unit: Path) -> int | None:
    """The iteration of ``unit``'s last checkpoint (None without one)."""
    path = Path(unit) / "checkpoint.pt"
    if not path.is_file():
        return None
    return int(json.loads(rundir.load_torch(path)["state"])["iteration"])


def where_stopped(root: str | Path, config: dict) -> str | None:
    """One line on an unfinished run: how many units are finished and where training stopped; None when every
    unit the config asks for is finished."""
    root = Path(root)
    rd = rundir.RunDir(root)
    order = unit_order(config)
    pending = [u for u in order if not rundir.is_done(rd.unit(*u))]
    if not pending:
        return None
    r, level, branch = pending[0]
    try:
        iteration = checkpoint_iteration(rd.unit(r, level, branch))
        at = f"at iteration {iteration} (its last checkpoint)" if iteration is not None else "before it started"
    except (ImpError, KeyError, TypeError, ValueError):
        at = "with an unreadable checkpoint.pt"
    return (
        f"unfinished: {len(order) - len(pending)} of {len(order)} units finished; stopped at replicate {r}, level "
        f"{level} ({branch.replace('_', ' ')}) {at}. The same lthfast imp command resumes it."
    )


def report(root: str | Path, plots: bool = True) -> str:
    """Rebuild ``summary.csv`` (and the plots) of a run directory and return the table as text."""
    root = Path(root)
    if not (root / "config.json").is_file():
        raise RunDirError(f"{root} is not an lthfast run directory (no config.json)")
    rows = collect(root)
    write_summary(root, rows)
    if plots and rows:
        plot(root, rows)
    config = _config(root)
    title = f"{root}: {config.get('model')} on {config.get('dataset')}"
    if config.get("one_shot"):
        title += ", one-shot"
    title += granularity_text(config)
    title += f", {re.sub(r'^0(it|ep)$', 'init', str(config.get('rewind', '0it')))} rewind"
    stopped = where_stopped(root, config)
    return title + "\n" + (stopped + "\n" if stopped else "") + format_table(rows)
