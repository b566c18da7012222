"""Speed-up against sparsity, one panel per block size (matplotlib, Agg backend: no display needed).

Each panel: every measured provider's speed-up over dense (log scale), the 1/density ideal, dense at 1.0, and
the crossover sparsity (from ``doc["crossover"]``) marked with a vertical line. Sparsities are spaced evenly
(0.9, 0.95, 0.98 would crowd together on a linear axis). A noisy measurement (``timing.Timing.noisy``) is circled
in grey.
"""

from __future__ import annotations

from pathlib import Path

_STYLE = {
    "lthfast": {"color": "tab:red", "marker": "o", "linewidth": 2.2},
    "mask-multiply": {"color": "tab:blue", "marker": "s"},
    "torch-prune": {"color": "tab:blue", "marker": "s"},
    "torch-bsr": {"color": "tab:green", "marker": "^"},
    "semi-structured": {"color": "tab:purple", "marker": "D"},
}


def title(doc: dict) -> str:
    cfg, dev = doc["config"], doc["device"]
    threads = dev.get("threads", 0)
    where = f"{dev['name']}" + (f", {threads} thread{'s' if threads != 1 else ''}" if dev["type"] == "cpu" else "")
    if doc["kind"] == "train":
        return f"training step: {cfg['model']}, batch {cfg['batch']}, {cfg['dtype']} ({where})"
    shape = "x".join(str(s) for s in cfg["shape"])
    image = "x".join(str(s) for s in cfg["image"])
    extra = f"{cfg['tokens']} tokens" if cfg["op"] == "linear" else f"batch {cfg['batch']}, {image}"
    return f"{cfg['op']} {shape} {cfg['mode']}, {extra}, {cfg['dtype']} ({where})"


def plot_speedup(doc: dict, path: Path) -> Path:
    """Write the figure to ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    blocks = sorted({r["block"] for r in rows})
    sparsities = sorted({r["sparsity"] for r in rows})
    pos = {s: i for i, s in enumerate(sparsities)}
    cross = next(iter(doc["crossover"].values()), {})
    cols = 2 if len(blocks) == 4 else min(3, len(blocks))
    nrows = -(-len(blocks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False, sharey=True)
    any_noisy = False
    for ax, block in zip(axes.flat, blocks):
        block_rows = sorted((r for r in rows if r["block"] == block), key=lambda r: r["sparsity"])
        xs = [pos[r["sparsity"]] for r in block_rows]
        ideal = [1.0 / r["density"] if r["density"] > 0 else float("nan") for r in block_rows]
        ax.plot(xs, ideal, color="0.55", linestyle="--", label="ideal 1/density")
        ax.axhline(1.0, color="black", linewidth=1.0, label="dense")
        names = dict.fromkeys(res["provider"] for r in block_rows for res in r["results"])
        for name in names:
            if name == "dense":
                continue
            pts = [
                (pos[r["sparsity"]], res["speedup_vs_dense"])
                for r in block_rows
                for res in r["results"]
                if res["provider"] == name and res["status"] == "ok" and res.get("speedup_vs_dense")
            ]
            if pts:
                ax.plot(*zip(*pts), label=name, **_STYLE.get(name, {"marker": "x"}))
            noisy = [
                (pos[r["sparsity"]], res["speedup_vs_dense"])
                for r in block_rows
                for res in r["results"]
                if res["provider"] == name
                and res["status"] == "ok"
                and res.get("noisy")
                and res.get("speedup_vs_dense")
            ]
            if noisy:
                any_noisy = True
                ax.plot(*zip(*noisy), linestyle="none", marker="o", ms=12, mfc="none", mec="0.6")
        crossing = cross.get(str(block))
        if crossing is not None:
            ax.axvline(pos[crossing], color="tab:red", linestyle=":", linewidth=1.2)
            ax.annotate(f"crossover {crossing:g}", (pos[crossing], 1.0), textcoords="offset points",
                        xytext=(4, -14), fontsize=8, color="tab:red")  # fmt: skip
        ax.set_title("unstructured (block 1)" if block == 1 else f"block {block}x{block}", fontsize=10)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
        ax.set_xlabel("sparsity")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(blocks) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("speed-up over dense (x)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    note = "\ngrey circles: noisy measurements (repeats spread too far; the machine was busy)" if any_noisy else ""
    fig.suptitle(title(doc) + note, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
