"""The run's PNG plots, drawn with matplotlib's Agg canvas (no display, no global backend switch)."""

from __future__ import annotations

import os
from pathlib import Path

from lthfast.imp.config import CONTROLS
from lthfast.imp.report import early_stop_rule

STYLE = {
    "ticket": ("C0", "o", "winning ticket (IMP)"),
    "random_reinit": ("C3", "s", "random reinit"),
    "random_prune": ("C2", "^", "random prune"),
    "rearrange": ("C4", "v", "rearranged mask"),
}


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
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
    keys = sorted((lv for lv, b in agg if b == branch), reverse=False)
    xs = [agg[(lv, branch)]["weights_remaining_pct"] for lv in keys]
    ys = [agg[(lv, branch)][field] for lv in keys]
    es = [agg[(lv, branch)][field + "_std"] for lv in keys]
    return xs, ys, es


def _weights_axis(ax) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_major_locator(FixedLocator([100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("weights remaining (%)")
    ax.grid(True, which="both", alpha=0.3)


def accuracy_plot(path: Path, agg: dict) -> Path:
    fig, ax = _figure()
    for branch in ("ticket", *CONTROLS):
        xs, ys, es = _series(agg, branch, "test_acc")
        if xs:
            color, marker, label = STYLE[branch]
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], color=color, marker=marker,
                        label=label, capsize=3, ms=4)  # fmt: skip
    dense = agg.get((0, "ticket"))
    if dense:
        ax.axhline(100 * dense["test_acc"], color="k", ls="--", lw=1, label="dense network")
    _weights_axis(ax)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy at the end of training")
    ax.legend(fontsize=8)
    return _save(fig, path)


def early_stop_plot(path: Path, agg: dict, rule: str) -> Path:
    fig, ax = _figure()
    for branch in ("ticket", *CONTROLS):
        xs, ys, es = _series(agg, branch, "early_stop_iteration")
        if xs:
            color, marker, label = STYLE[branch]
            ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, label=label, capsize=3, ms=4)
    _weights_axis(ax)
    ax.set_ylabel(f"early-stop iteration ({rule})")
    ax.set_title("Early-stop iteration")
    ax.legend(fontsize=8)
    return _save(fig, path)


def throughput_plot(path: Path, rows: list[dict]) -> Path:
    fig, ax = _figure()
    for backend in sorted({r["backend"] for r in rows}):
        pts = sorted((100 * (1 - r["density"]), r["samples_per_s"]) for r in rows if r["backend"] == backend)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=3, label=f"backend {backend}")
    ax.set_xlabel("sparsity (% weights pruned)")
    ax.set_ylabel("training samples / s")
    ax.set_title("Training throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def draw_all(folder: Path, rows: list[dict], agg: dict) -> list[Path]:
    """accuracy.png, early_stop.png and throughput.png in ``folder``."""
    if not rows:
        return []
    return [
        accuracy_plot(folder / "accuracy.png", agg),
        early_stop_plot(folder / "early_stop.png", agg, early_stop_rule(rows)),
        throughput_plot(folder / "throughput.png", rows),
    ]
