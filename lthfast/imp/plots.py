"""The run's PNG plots, drawn with matplotlib's Agg canvas (no display, no global backend switch).

Every plot has weights remaining (%) on a log axis, ticked at the levels' own values; its title names the run, the
model, the data and the method; error bars are the standard deviation over replicates, and the legend says so.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path

from lthfast.imp.config import CONTROLS
from lthfast.imp.report import early_stop_rule, granularity_text

STYLE = {
    "ticket": ("C0", "o", "winning ticket"),
    "random_reinit": ("C3", "s", "random reinit"),
    "random_prune": ("C2", "^", "random prune"),
    "rearrange": ("C4", "v", "rearranged mask"),
}
MAX_TICKS = 10  # more levels than this: every other (third, ...) level is labelled


def describe_run(name: str, config: dict) -> str:
    """``"<run>: mlp on mnist1d, iterative pruning (20% per level), init rewind"`` for plot titles."""
    method = "one-shot pruning" if config.get("one_shot") else "iterative pruning"
    if config.get("prune_fraction") is not None:
        method += f" ({100 * float(config['prune_fraction']):g}% per level)"
    method += granularity_text(config)
    rewind = re.sub(r"^0(it|ep)$", "init", str(config.get("rewind", "0it")))
    return f"{name}: {config.get('model', '?')} on {config.get('dataset', '?')}, {method}, {rewind} rewind"


def ticket_label(config: dict) -> str:
    return f"winning ticket ({'one-shot' if config.get('one_shot') else 'IMP'})"


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.8, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def _series(agg: dict, branch: str, field: str):
    keys = sorted(lv for lv, b in agg if b == branch)
    xs = [agg[(lv, branch)]["weights_remaining_pct"] for lv in keys]
    ys = [agg[(lv, branch)][field] for lv in keys]
    es = [agg[(lv, branch)][field + "_std"] for lv in keys]
    return xs, ys, es


def tick_label(value: float) -> str:
    return f"{value:.3g}"


def level_ticks(values) -> list[float]:
    """The distinct weights-remaining values, largest first, thinned to at most ``MAX_TICKS`` (first and last kept)."""
    distinct = sorted({round(v, 6) for v in values}, reverse=True)
    if len(distinct) <= MAX_TICKS:
        return distinct
    step = math.ceil((len(distinct) - 1) / (MAX_TICKS - 1))
    picked = distinct[::step]
    if picked[-1] != distinct[-1]:
        picked.append(distinct[-1])
    return picked


def _weights_axis(ax, values, labelled=None) -> None:
    """Log weights-remaining axis over ``values``, labelled at ``labelled`` (default: every value, thinned)."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    ticks = level_ticks(values if labelled is None else labelled)
    ax.set_xscale("log")
    if ticks:
        ax.set_xlim(max(values) * 1.12, min(values) / 1.12)  # largest on the left: weights fall as pruning goes on
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([tick_label(t) for t in ticks]))
    ax.xaxis.set_minor_locator(FixedLocator(sorted({round(v, 6) for v in values})))  # every level, labelled or not
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("weights remaining (%), log scale")
    ax.grid(True, which="both", alpha=0.3)


def _error_note(agg: dict) -> str:
    n = max((s["n"] for s in agg.values()), default=1)
    return f"mean ± std over {n} replicates" if n > 1 else "1 replicate (no error bars)"


def _title(ax, what: str, run: str) -> None:
    ax.set_title(f"{what}\n{run}", fontsize=9)


def accuracy_plot(path: Path, agg: dict, config: dict | None = None, run: str = "") -> Path:
    config = config or {}
    fig, ax = _figure()
    xs_all = []
    for branch in ("ticket", *CONTROLS):
        xs, ys, es = _series(agg, branch, "test_acc")
        if xs:
            color, marker, label = STYLE[branch]
            label = ticket_label(config) if branch == "ticket" else label
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], color=color, marker=marker,
                        label=label, capsize=3, ms=4)  # fmt: skip
            xs_all += xs
    dense = agg.get((0, "ticket"))
    if dense:
        ax.axhline(100 * dense["test_acc"], color="k", ls="--", lw=1, label="dense network")
    _weights_axis(ax, xs_all)
    ax.set_ylabel("test accuracy (%)")
    _title(ax, "Test accuracy at the end of training", run)
    ax.legend(fontsize=8, title=_error_note(agg), title_fontsize=8)
    return _save(fig, path)


def early_stop_plot(path: Path, agg: dict, rule: str, config: dict | None = None, run: str = "") -> Path:
    config = config or {}
    fig, ax = _figure()
    xs_all, at_end = [], []
    for branch in ("ticket", *CONTROLS):
        xs, ys, es = _series(agg, branch, "early_stop_iteration")
        if xs:
            color, marker, label = STYLE[branch]
            label = ticket_label(config) if branch == "ticket" else label
            ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, label=label, capsize=3, ms=4)
            xs_all += xs
            keys = sorted(lv for lv, b in agg if b == branch)
            at_end += [(x, y) for lv, x, y in zip(keys, xs, ys) if agg[(lv, branch)].get("early_stop_at_end")]
    if at_end:  # the criterion's optimum was not reached: the iteration is a lower bound (report.stopped_at_end)
        ax.plot(*zip(*at_end), linestyle="none", marker="o", ms=11, mfc="none", mec="0.3",
                label="early stop at the last evaluation")  # fmt: skip
    _weights_axis(ax, xs_all)
    ax.set_ylabel(f"early-stop iteration ({rule})")
    _title(ax, "Early-stop iteration", run)
    ax.legend(fontsize=8, title=_error_note(agg), title_fontsize=8)
    return _save(fig, path)


def throughput_plot(path: Path, rows: list[dict], run: str = "") -> Path:
    """Training samples/s of every finished unit (one point each, no averaging) against weights remaining."""
    fig, ax = _figure()
    for backend in sorted({r["backend"] for r in rows}):
        pts = sorted((r["weights_remaining_pct"], r["samples_per_s"]) for r in rows if r["backend"] == backend)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=3, label=f"backend {backend}")
    _weights_axis(ax, [r["weights_remaining_pct"] for r in rows])
    ax.set_ylabel("training samples / s")
    _title(ax, "Training throughput (one point per unit)", run)
    ax.legend(fontsize=8)
    return _save(fig, path)


def draw_all(folder: Path, rows: list[dict], agg: dict, config: dict | None = None, name: str = "") -> list[Path]:
    """accuracy.png, early_stop.png and throughput.png in ``folder``. ``config``: the run's options (config.json),
    ``name``: the run's name, both for the titles and legends."""
    if not rows:
        return []
    config = config or {}
    run = describe_run(name or Path(folder).parent.name, config)
    return [
        accuracy_plot(folder / "accuracy.png", agg, config, run),
        early_stop_plot(folder / "early_stop.png", agg, early_stop_rule(rows), config, run),
        throughput_plot(folder / "throughput.png", rows, run),
    ]


# ---- lthfast ablate: one line per granularity ---------------------------------------------------------------
GRANULARITY_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")
CONTROL_MARKERS = {"random_reinit": "s", "random_prune": "^", "rearrange": "v"}


def _by_granularity(rows: list[dict], label: str) -> list[dict]:
    return sorted((r for r in rows if r["granularity"] == label), key=lambda r: r["level"])


def ablation_accuracy_plot(path: Path, rows: list[dict], controls: list[dict], labels: list[str], name: str) -> Path:
    """Ticket test accuracy against weights remaining (log), one line per granularity (error bars: std over
    replicates), the dense level 0 as a dashed line, the controls where run as dotted lines in the granularity's
    colour."""
    fig, ax = _figure()
    xs_all = []
    for color, label in zip(GRANULARITY_COLORS * 3, labels):
        pts = [r for r in _by_granularity(rows, label) if r["level"] > 0]
        if pts:
            ax.errorbar([r["weights_remaining_pct"] for r in pts], [100 * r["test_acc"] for r in pts],
                        yerr=[100 * r["test_acc_std"] for r in pts], color=color, marker="o", ms=4, capsize=3,
                        label=label)  # fmt: skip
            xs_all += [r["weights_remaining_pct"] for r in pts]
        for control, marker in CONTROL_MARKERS.items():
            cs = sorted((c for c in controls if c["granularity"] == label and c["branch"] == control),
                        key=lambda c: c["level"])  # fmt: skip
            if cs:
                ax.plot([c["weights_remaining_pct"] for c in cs], [100 * c["test_acc"] for c in cs], ls=":",
                        marker=marker, color=color, ms=4, label=f"{label}: {control.replace('_', ' ')}")  # fmt: skip
                xs_all += [c["weights_remaining_pct"] for c in cs]
    dense = [r for r in rows if r["level"] == 0]
    if dense:
        ax.axhline(100 * statistics.fmean(r["test_acc"] for r in dense), color="k", ls="--", lw=1,
                   label="dense network (level 0)")  # fmt: skip
    _weights_axis(ax, xs_all or [100.0], [r["weights_remaining_pct"] for r in _by_granularity(rows, labels[0])])
    ax.set_ylabel("ticket test accuracy (%)")
    n = max((r["n"] for r in rows), default=1)
    _title(ax, "Accuracy by pruning granularity", name)
    ax.legend(fontsize=7, title=f"mean ± std over {n} replicates" if n > 1 else "1 replicate", title_fontsize=7)
    return _save(fig, path)


def ablation_speed_plot(path: Path, rows: list[dict], labels: list[str], name: str) -> Path:
    """Training speed-up against dense (= 1) by weights remaining (log), one line per granularity: the run's own
    samples/s over its level 0 (solid, error bars: std over replicates) and the layer benchmark where measured
    (dashed)."""
    fig, ax = _figure()
    xs_all = []
    for color, label in zip(GRANULARITY_COLORS * 3, labels):
        pts = _by_granularity(rows, label)
        if not pts:
            continue
        xs = [r["weights_remaining_pct"] for r in pts]
        ax.errorbar(xs, [r["run_speedup"] for r in pts], yerr=[r["run_speedup_std"] for r in pts], color=color,
                    marker="o", ms=4, capsize=3, label=f"{label}: run samples/s")  # fmt: skip
        bench = [r for r in pts if r["layer_speedup"] is not None]
        if bench:
            ax.plot([r["weights_remaining_pct"] for r in bench], [r["layer_speedup"] for r in bench], ls="--",
                    marker="x", color=color, ms=5, label=f"{label}: layer benchmark")  # fmt: skip
        xs_all += xs
    ax.axhline(1.0, color="k", ls="--", lw=1, label="dense = 1")
    _weights_axis(ax, xs_all or [100.0], [r["weights_remaining_pct"] for r in _by_granularity(rows, labels[0])])
    ax.set_ylabel("training speed-up over dense")
    _title(ax, "Training speed by pruning granularity", name)
    ax.legend(fontsize=7)
    return _save(fig, path)
