"""Check the lottery-ticket claims (a)-(d) of the project's issue on finished run directories.

    python -m lthfast.imp.claims ITERATIVE_RUN [ONE_SHOT_RUN]

(a) tickets with <= 20% of the weights reach the dense network's test accuracy or better;
(b) at <= 10%, tickets beat random reinitialization and random pruning of the same sparsity;
(c) iterative pruning beats one-shot at ~5% weights remaining (needs ONE_SHOT_RUN);
(d) between 20% and 50% weights remaining, a ticket's early-stop iteration is no later than the dense network's.

The rule: every comparison is paired by replicate (replicate r's ticket against replicate r's dense network, control
or one-shot ticket, which share its seeds). The margin is the mean of the per-replicate differences; its noise is
the half-width of the margin's 95% confidence interval (Student's t with n - 1 degrees of freedom times the
standard error, n the replicates finished on both sides). A margin beyond its noise is a clear result in its
direction; otherwise it is "within noise". With one replicate the noise cannot be estimated and no verdict is
given. REPRODUCED / NOT reproduced are said only when every comparison a claim needs is clear ((a) needs one
ticket clearly above dense, or all clearly below for NOT). Claim (d) is "not testable" when the early stop is the
last evaluation for most dense units or most ticket units in its range: training was too short to see it.
Nothing is fitted or hard-coded; every figure comes from the runs' done.json files.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from lthfast.imp.errors import RunDirError
from lthfast.imp.report import collect, stopped_at_end

CONFIDENCE = 0.95
NO_DATA = "no data: the runs reach no level in this range"
ONE_REPLICATE = "no verdict: the noise cannot be estimated from one replicate (run --replicates 3 or more)"


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t distribution with ``df`` degrees of freedom: bisection on its
    CDF, integrated by Simpson's rule (accurate to about 1e-9; no SciPy needed)."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: scale * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        inner = sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
        return 0.5 + (pdf(0) + inner + pdf(x)) * h / 3

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Margin:
    """Mean of the per-replicate differences ``a - b`` and the half-width of its confidence interval."""

    mean: float
    noise: float | None  # None: one replicate
    n: int

    @classmethod
    def paired(cls, a: dict[int, float], b: dict[int, float]) -> Margin:
        common = sorted(set(a) & set(b))
        diffs = [a[r] - b[r] for r in common]
        if len(diffs) < 2:
            return cls(diffs[0] if diffs else math.nan, None, len(diffs))
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        return cls(statistics.fmean(diffs), t_quantile((1 + CONFIDENCE) / 2, len(diffs) - 1) * se, len(diffs))

    def side(self) -> int | None:
        """+1 clearly above zero, -1 clearly below, 0 within noise, None when the noise cannot be estimated."""
        if self.noise is None:
            return None
        return 0 if abs(self.mean) <= self.noise else (1 if self.mean > 0 else -1)

    def text(self, scale: float, unit: str) -> str:
        """ "+0.09 pts ± 0.31 (95% CI, 3 replicates)" (``scale`` turns the differences into ``unit``)."""
        digits = 2 if unit == "pts" else 0
        head = f"{scale * self.mean:+.{digits}f} {unit}"
        if self.noise is None:
            return f"{head} (1 replicate: noise not estimated)"
        return f"{head} ± {scale * self.noise:.{digits}f} ({100 * CONFIDENCE:.0f}% CI, {self.n} replicates)"


def verdict(sides: list[int | None], *, every: bool) -> str:
    """The claim's verdict from its comparisons' sides (+1 for the claim, -1 against, 0 within noise). ``every``:
    the claim needs all of them (else: one clear success suffices, and NOT reproduced needs all clearly against)."""
    if every:
        if -1 in sides:
            return "NOT reproduced"
        if all(s == 1 for s in sides):
            return "REPRODUCED"
    else:
        if 1 in sides:
            return "REPRODUCED"
        if all(s == -1 for s in sides):
            return "NOT reproduced"
    return ONE_REPLICATE if None in sides else "within noise"


def _run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RunDirError(f"{path} is not an lthfast run directory (no config.json)")
    return path


def _units(root: Path) -> dict[tuple[int, str], dict[int, dict]]:
    """(level, branch) -> {replicate: summary row} of the finished units."""
    units: dict[tuple[int, str], dict[int, dict]] = {}
    for row in collect(root):
        units.setdefault((row["level"], row["branch"]), {})[row["replicate"]] = row
    return units


def _values(unit: dict[int, dict], field: str) -> dict[int, float]:
    return {r: row[field] for r, row in unit.items()}


def _mean(unit: dict[int, dict], field: str, scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * v for v in _values(unit, field).values()]
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f"±{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _weights(unit: dict[int, dict]) -> float:
    return statistics.fmean(row["weights_remaining_pct"] for row in unit.values())


def check(iterative: str | Path, one_shot: str | Path | None = None) -> str:
    """The claims' figures, margins and verdicts as text; a claim whose range the runs do not reach says so.
    Raises RunDirError when a path is not a run directory."""
    iterative = _run_dir(iterative)
    one_shot = None if one_shot is None else _run_dir(one_shot)
    units = _units(iterative)
    if (0, "ticket") not in units:
        return f"{iterative}: the dense level 0 is not finished"
    dense = units[(0, "ticket")]
    tickets = {lv: u for (lv, b), u in units.items() if b == "ticket" and lv > 0}
    out = [
        f"{iterative}: {len(dense)} replicate(s); dense test accuracy {_mean(dense, 'test_acc', 100)}%, "
        f"early-stop iteration {_mean(dense, 'early_stop_iteration', digits=0)}"
        + (" (mean±sd)" if len(dense) > 1 else ""),
        f"margins: the mean of the differences paired by replicate ± half its {100 * CONFIDENCE:.0f}% confidence "
        "interval (paired t); a margin inside that noise is 'within noise'",
    ]
    out += _claim_a(dense, tickets)
    out += _claim_b(units, tickets)
    if one_shot is not None:
        out += _claim_c(tickets, _units(one_shot))
    out += _claim_d(dense, tickets)
    return "\n".join(out)


def _claim_a(dense, tickets) -> list[str]:
    out = ["(a) tickets at <= 20% weights vs dense (test accuracy):"]
    low = {lv: u for lv, u in tickets.items() if _weights(u) <= 20}
    if not low:
        return [*out, f"    {NO_DATA} (<= 20% weights)"]
    words = {1: ": above dense", 0: ": matches dense within noise", -1: ": below dense", None: ""}
    sides = {}
    for lv, u in sorted(low.items()):
        margin = Margin.paired(_values(u, "test_acc"), _values(dense, "test_acc"))
        sides[lv] = margin.side()
        out.append(f"    level {lv:2d} {_weights(u):6.2f}% weights: ticket {_mean(u, 'test_acc', 100)}%, "
                   f"{margin.text(100, 'pts')}{words[sides[lv]]}")  # fmt: skip
    result = verdict(list(sides.values()), every=False)
    smallest = lambda wanted: min((_weights(low[lv]) for lv, s in sides.items() if s in wanted), default=None)  # noqa: E731
    above, matched = smallest({1}), smallest({0, 1})
    if result == "REPRODUCED":
        result += f": clearly above dense down to {above:.2f}% weights"
        if matched < above:
            result += f", within noise of it down to {matched:.2f}%"
    elif result == "within noise":
        result += f": tickets down to {matched:.2f}% weights match dense within noise; none is clearly above it"
    elif result == "NOT reproduced":
        result += ": every ticket at <= 20% weights is clearly below dense"
    return [*out, f"    {result}"]


def _claim_b(units, tickets) -> list[str]:
    out = ["(b) at <= 10% weights, ticket vs random reinit and random prune (test accuracy):"]
    sides = []
    for lv, u in sorted(tickets.items()):
        controls = [units.get((lv, c)) for c in ("random_reinit", "random_prune")]
        if _weights(u) > 10 or not all(controls):
            continue
        margins = [Margin.paired(_values(u, "test_acc"), _values(c, "test_acc")) for c in controls]
        sides += [m.side() for m in margins]
        reinit, shuffled = (_mean(c, "test_acc", 100) for c in controls)
        out.append(f"    level {lv:2d} {_weights(u):6.2f}%: ticket {_mean(u, 'test_acc', 100)}%, "
                   f"reinit {reinit}%, random prune {shuffled}%")  # fmt: skip
        out.append(f"        ticket - reinit {margins[0].text(100, 'pts')}; "
                   f"ticket - random prune {margins[1].text(100, 'pts')}")  # fmt: skip
    out.append(f"    {verdict(sides, every=True)}" if sides else "    no level <= 10% with both controls")
    return out


def _claim_c(tickets, shot) -> list[str]:
    out = ["(c) iterative vs one-shot near 5% weights (test accuracy):"]
    # the two levels nearest 5%, within 2.5-10% weights (a run that stops at 64% has no "near 5%")
    near = [lv for lv in tickets if 2.5 <= _weights(tickets[lv]) <= 10]
    near = sorted(near, key=lambda lv: abs(_weights(tickets[lv]) - 5))[:2]
    sides = []
    for lv in sorted(near):
        if (lv, "ticket") not in shot:
            continue
        it, os_ = tickets[lv], shot[(lv, "ticket")]
        margin = Margin.paired(_values(it, "test_acc"), _values(os_, "test_acc"))
        sides.append(margin.side())
        shot_acc = f"{_mean(os_, 'test_acc', 100)}% ({_weights(os_):.2f}% weights)"
        out.append(f"    level {lv:2d} {_weights(it):6.2f}%: iterative {_mean(it, 'test_acc', 100)}%, one-shot "
                   f"{shot_acc}: {margin.text(100, 'pts')}")  # fmt: skip
    out.append(f"    {verdict(sides, every=True)}" if sides else f"    {NO_DATA} (2.5-10% weights, both runs)")
    return out


def _claim_d(dense, tickets) -> list[str]:
    out = ["(d) early-stop iteration, 20%-50% weights, ticket vs dense (* early stop at the last evaluation):"]
    mid = {lv: u for lv, u in tickets.items() if 20 <= _weights(u) <= 50}
    if not mid:
        return [*out, f"    {NO_DATA} (20-50% weights)"]
    sides = []
    for lv, u in sorted(mid.items()):
        margin = Margin.paired(_values(u, "early_stop_iteration"), _values(dense, "early_stop_iteration"))
        side = margin.side()
        sides.append(None if side is None else -side)  # the claim: earlier (a negative margin)
        flag = "*" if any(stopped_at_end(row) for row in u.values()) else ""
        out.append(f"    level {lv:2d} {_weights(u):6.2f}%: ticket {_mean(u, 'early_stop_iteration', digits=0)}{flag}, "
                   f"ticket - dense {margin.text(1, 'it')}")  # fmt: skip
    dense_end = sum(stopped_at_end(row) for row in dense.values())
    ticket_rows = [row for u in mid.values() for row in u.values()]
    ticket_end = sum(stopped_at_end(row) for row in ticket_rows)
    if dense_end or ticket_end:
        out.append(f"    early stop at the last evaluation: {dense_end} of {len(dense)} dense units, "
                   f"{ticket_end} of {len(ticket_rows)} ticket units")  # fmt: skip
    if 2 * dense_end > len(dense) or 2 * ticket_end > len(ticket_rows):
        who = "the dense network stops" if 2 * dense_end > len(dense) else "most tickets stop"
        out.append(f"    not testable: {who} at the last evaluation: training was too short to see the early "
                   "stop (train longer: --train-steps)")  # fmt: skip
    else:
        out.append(f"    {verdict(sides, every=True)}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lthfast.imp.claims ITERATIVE_RUN [ONE_SHOT_RUN]``: print the figures and verdicts; a path that is
    not a run directory is one line on stderr and exit status 2."""
    import argparse

    title, _usage, claims = __doc__.split("\n\n", 2)
    parser = argparse.ArgumentParser(
        prog="python -m lthfast.imp.claims",
        description=f"{title}\n\n{claims}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("iterative", metavar="ITERATIVE_RUN", help="run directory of an iterative lthfast imp run")
    parser.add_argument(
        "one_shot", metavar="ONE_SHOT_RUN", nargs="?", default=None,
        help="run directory of the same run with --one-shot (for claim (c))",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        print(check(args.iterative, args.one_shot))
    except RunDirError as exc:
        print(f"lthfast.imp.claims: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
