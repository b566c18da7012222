"""Check the lottery-ticket claims (a)-(d) of the project's issue on finished run directories.

    python -m lthfast.imp.claims ITERATIVE_RUN [ONE_SHOT_RUN]

(a) tickets with <= 20% of the weights reach the dense network's test accuracy or better;
(b) at <= 10%, tickets beat random reinitialization and random pruning of the same sparsity (replicate means);
(c) iterative pruning beats one-shot at ~5% weights remaining (needs ONE_SHOT_RUN);
(d) between 20% and 50% weights remaining, a ticket's early-stop iteration is no later than the dense network's.
Every figure is a mean over the replicates found; nothing is fitted or hard-coded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lthfast.imp.errors import RunDirError
from lthfast.imp.report import aggregate, collect


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _verdict(ok: bool) -> str:
    return "REPRODUCED" if ok else "NOT reproduced"


NO_DATA = "no data: the runs reach no level in this range"


def _run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RunDirError(f"{path} is not an lthfast run directory (no config.json)")
    return path


def check(iterative: str | Path, one_shot: str | Path | None = None) -> str:
    """The claims' figures and verdicts as text; a claim whose range the runs do not reach says so (no verdict).
    Raises RunDirError when a path is not a run directory."""
    iterative = _run_dir(iterative)
    one_shot = None if one_shot is None else _run_dir(one_shot)
    agg = aggregate(collect(iterative))
    if (0, "ticket") not in agg:
        return f"{iterative}: the dense level 0 is not finished"
    dense = agg[(0, "ticket")]
    n = dense["n"]
    tickets = {lv: s for (lv, b), s in agg.items() if b == "ticket" and lv > 0}
    out = [f"{iterative}: {n} replicate(s); dense test accuracy {_pct(dense['test_acc'])}, "
           f"early-stop iteration {dense['early_stop_iteration']:.0f}"]  # fmt: skip

    low = {lv: s for lv, s in tickets.items() if s["weights_remaining_pct"] <= 20}
    out.append("(a) tickets at <= 20% weights vs dense:")
    for lv, s in sorted(low.items()):
        out.append(f"    level {lv:2d} {s['weights_remaining_pct']:6.2f}% weights: ticket {_pct(s['test_acc'])} "
                   f"({'>=' if s['test_acc'] >= dense['test_acc'] else '<'} dense)")  # fmt: skip
    reached = [lv for lv, s in low.items() if s["test_acc"] >= dense["test_acc"]]
    smallest = min((low[lv]["weights_remaining_pct"] for lv in reached), default=None)
    if low:
        out.append(f"    {_verdict(bool(reached))}: smallest ticket at or above dense: "
                   f"{'none' if smallest is None else f'{smallest:.2f}% weights'}")  # fmt: skip
    else:
        out.append(f"    {NO_DATA} (<= 20% weights)")

    out.append("(b) at <= 10% weights, ticket vs random reinit vs random prune:")
    wins = []
    for lv, s in sorted(tickets.items()):
        controls = [agg.get((lv, c)) for c in ("random_reinit", "random_prune")]
        if s["weights_remaining_pct"] > 10 or not all(controls):
            continue
        ok = all(s["test_acc"] > c["test_acc"] for c in controls)
        wins.append(ok)
        out.append(f"    level {lv:2d} {s['weights_remaining_pct']:6.2f}%: ticket {_pct(s['test_acc'])}, reinit "
                   f"{_pct(controls[0]['test_acc'])}, random prune {_pct(controls[1]['test_acc'])}")  # fmt: skip
    out.append(f"    {_verdict(bool(wins) and all(wins))}" if wins else "    no level <= 10% with both controls")

    if one_shot is not None:
        shot = aggregate(collect(one_shot))
        out.append("(c) iterative vs one-shot near 5% weights:")
        # the two levels nearest 5%, within 2.5-10% weights (a run that stops at 64% has no "near 5%")
        near = [lv for lv in tickets if 2.5 <= tickets[lv]["weights_remaining_pct"] <= 10]
        near = sorted(near, key=lambda lv: abs(tickets[lv]["weights_remaining_pct"] - 5))[:2]
        results = []
        for lv in sorted(near):
            if (lv, "ticket") not in shot:
                continue
            it_acc, os_acc = tickets[lv]["test_acc"], shot[(lv, "ticket")]["test_acc"]
            os_weights = shot[(lv, "ticket")]["weights_remaining_pct"]
            results.append(it_acc > os_acc)
            out.append(f"    level {lv:2d} {tickets[lv]['weights_remaining_pct']:6.2f}%: iterative {_pct(it_acc)}, "
                       f"one-shot {_pct(os_acc)} ({os_weights:.2f}% weights)")  # fmt: skip
        out.append(f"    {_verdict(all(results))}" if results else f"    {NO_DATA} (2.5-10% weights, both runs)")

    out.append("(d) early-stop iteration, 20%-50% weights, ticket vs dense:")
    mid = {lv: s for lv, s in tickets.items() if 20 <= s["weights_remaining_pct"] <= 50}
    for lv, s in sorted(mid.items()):
        out.append(f"    level {lv:2d} {s['weights_remaining_pct']:6.2f}%: ticket {s['early_stop_iteration']:.0f}, "
                   f"dense {dense['early_stop_iteration']:.0f}")  # fmt: skip
    ok = all(s["early_stop_iteration"] <= dense["early_stop_iteration"] for s in mid.values())
    out.append(f"    {_verdict(ok)}" if mid else f"    {NO_DATA} (20-50% weights)")
    return "\n".join(out)


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        sys.exit(__doc__)
    try:
        print(check(*sys.argv[1:]))
    except RunDirError as exc:
        sys.exit(f"lthfast.imp.claims: error: {exc}")
