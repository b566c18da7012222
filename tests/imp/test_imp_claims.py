"""lthfast.imp.claims on synthetic run directories: verdicts follow the stated rule (paired differences over
replicates, 95% t interval), margins are printed beside their noise, "within noise" and "no verdict" where that is
the answer, and claim (d) is "not testable" when the early stop is the last evaluation. The report table flags it."""

import json
import math
import statistics

import pytest

from lthfast.imp.claims import ONE_REPLICATE, Margin, check, t_quantile, verdict
from lthfast.imp.report import AT_END, collect, format_table

scipy_stats = pytest.importorskip("scipy.stats")

DENSITY = {0: 1.0, 4: 0.8**4, 8: 0.8**8, 11: 0.8**11, 13: 0.8**13}  # 41%, 16.8%, 8.6%, 5.5%


def fake_run(root, units, iterations=2000):
    """A run directory holding finished units: {(replicate, level, branch): (test_acc, early_stop_iteration)}."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"identity": {}, "config": {"model": "mlp", "dataset": "fake"}}))
    for (r, level, branch), (acc, es) in units.items():
        folder = root / f"replicate_{r}" / f"level_{level}" / ("" if branch == "ticket" else branch)
        folder.mkdir(parents=True, exist_ok=True)
        done = {
            "replicate": r, "level": level, "branch": branch, "density": DENSITY[level],
            "final": {"test_acc": acc, "test_loss": 1.0, "val_acc": acc, "train_acc": acc, "iteration": iterations},
            "early_stop_iteration": es, "early_stop_test_acc": acc, "start_iteration": 0, "iterations": iterations,
            "wall_s": 1.0, "train_s": 1.0, "samples_per_s": 100.0, "peak_mem_mb": 1.0, "backend": "torch",
            "device": "cpu", "early_stop": "val_loss",
        }  # fmt: skip
        (folder / "done.json").write_text(json.dumps(done))
    return root


def units_of(dense, tickets, es_dense, es_ticket, controls=None):
    """Units of len(dense) replicates: dense accuracies, ticket accuracies per level (one per replicate), the
    early-stop iterations of dense and of the level-4 ticket, and {(level, control): accuracies}."""
    units = {}
    for r, acc in enumerate(dense):
        units[(r, 0, "ticket")] = (acc, es_dense[r])
    for level, accs in tickets.items():
        for r, acc in enumerate(accs):
            units[(r, level, "ticket")] = (acc, es_ticket[r] if level == 4 else 500)
    for (level, control), accs in (controls or {}).items():
        for r, acc in enumerate(accs):
            units[(r, level, control)] = (acc, 500)
    return units


def one_shot_run(root, tickets):
    return fake_run(root, units_of(DENSE, tickets, [500] * 3, [500] * 3))


def margin_text(a, b, scale=100, unit="pts", digits=2):
    """The margin as the checker must print it, computed here with SciPy's t quantile."""
    diffs = [x - y for x, y in zip(a, b)]
    half = scipy_stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = f"{scale * statistics.fmean(diffs):+.{digits}f} {unit}"
    return f"{mean} ± {scale * half:.{digits}f} (95% CI, {len(diffs)} replicates)"


def claim(text, letter):
    """The lines of one claim."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"({letter})"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("(")), len(lines))
    return "\n".join(lines[start:end])


DENSE = [0.700, 0.712, 0.705]


def test_t_quantile_is_students():
    for df in (1, 2, 4, 30):
        assert t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)


def test_clearly_reproduced(tmp_path):
    above = [a + d for a, d in zip(DENSE, (0.020, 0.022, 0.019))]
    tickets = {4: DENSE, 8: above, 11: [0.69, 0.70, 0.695], 13: [0.68, 0.69, 0.685]}
    controls = {(11, "random_reinit"): [0.55, 0.56, 0.57], (11, "random_prune"): [0.53, 0.52, 0.55]}
    es_ticket = [1000, 1100, 1050]
    it = fake_run(tmp_path / "it", units_of(DENSE, tickets, [1300, 1450, 1350], es_ticket, controls))
    shot = one_shot_run(tmp_path / "os", {11: [0.60, 0.62, 0.58], 13: [0.55, 0.57, 0.56]})
    text = check(it, shot)
    for letter in "abcd":
        assert "REPRODUCED" in claim(text, letter) and "NOT" not in claim(text, letter), claim(text, letter)
    assert margin_text(above, DENSE) in claim(text, "a")
    assert f"clearly above dense down to {100 * DENSITY[8]:.2f}% weights" in claim(text, "a")
    assert margin_text(tickets[11], controls[(11, "random_prune")]) in claim(text, "b")
    assert margin_text(tickets[13], [0.55, 0.57, 0.56]) in claim(text, "c")
    assert margin_text(es_ticket, [1300, 1450, 1350], scale=1, unit="it", digits=0) in claim(text, "d")


def test_clearly_not_reproduced(tmp_path):
    below = [a - d for a, d in zip(DENSE, (0.030, 0.033, 0.028))]
    tickets = {4: DENSE, 8: below, 11: [a - 0.05 for a in DENSE], 13: [a - 0.08 for a in DENSE]}
    controls = {(11, "random_reinit"): [0.70, 0.71, 0.72], (11, "random_prune"): [0.71, 0.72, 0.70]}
    it = fake_run(tmp_path / "it", units_of(DENSE, tickets, [1000, 1050, 1100], [1500, 1600, 1580], controls))
    shot = one_shot_run(tmp_path / "os", {11: [0.70, 0.71, 0.70], 13: [0.69, 0.70, 0.70]})
    text = check(it, shot)
    for letter in "abcd":
        assert "NOT reproduced" in claim(text, letter), claim(text, letter)
    assert "every ticket at <= 20% weights is clearly below dense" in claim(text, "a")
    assert margin_text(below, DENSE) in claim(text, "a")


def test_within_noise_where_the_margin_is_inside_the_noise(tmp_path):
    """The issue's case: +0.09 pts and a later mean early stop that both sit inside replicate noise."""
    near = [a + d for a, d in zip(DENSE, (0.004, -0.003, 0.002))]
    tickets = {4: DENSE, 8: near, 11: [a - 0.002 for a in near], 13: near}
    controls = {(11, "random_reinit"): [a + d for a, d in zip(tickets[11], (0.01, -0.01, 0.002))],
                (11, "random_prune"): [a + d for a, d in zip(tickets[11], (-0.01, 0.012, 0.0))]}  # fmt: skip
    es_dense, es_ticket = [1300, 1150, 1500], [1400, 1200, 1400]  # ticket mean later by 17 iterations
    it = fake_run(tmp_path / "it", units_of(DENSE, tickets, es_dense, es_ticket, controls))
    text = check(it)
    assert "within noise: tickets down to" in claim(text, "a") and "matches dense within noise" in claim(text, "a")
    assert margin_text(near, DENSE) in claim(text, "a")
    for letter in "abd":
        assert "REPRODUCED" not in claim(text, letter) and "NOT reproduced" not in claim(text, letter)
        assert claim(text, letter).splitlines()[-1].strip().startswith("within noise"), claim(text, letter)
    assert margin_text(es_ticket, es_dense, scale=1, unit="it", digits=0) in claim(text, "d")


def test_one_replicate_gives_no_verdict(tmp_path):
    units = units_of([0.70], {4: [0.70], 8: [0.75], 11: [0.70]}, [1300], [900],
                     {(11, "random_reinit"): [0.50], (11, "random_prune"): [0.50]})  # fmt: skip
    text = check(fake_run(tmp_path / "one", units))
    assert "REPRODUCED" not in text and "NOT reproduced" not in text
    assert text.count(ONE_REPLICATE) == 3  # (a), (b), (d)
    assert "+5.00 pts (1 replicate: noise not estimated)" in claim(text, "a")


@pytest.mark.parametrize("who", ["dense", "tickets"])
def test_early_stop_at_the_last_evaluation_is_not_testable_and_flagged(tmp_path, who):
    """The demo's case: every early stop at the last evaluation (1000 of 1000) must not read as reproduced."""
    es_dense, es_ticket = ([1000, 1000, 900], [700, 750, 800]) if who == "dense" else ([800, 900, 850], [1000] * 3)
    units = units_of(DENSE, {4: DENSE, 8: DENSE}, es_dense, es_ticket)
    root = fake_run(tmp_path / who, units, iterations=1000)
    text = claim(check(root), "d")
    assert "not testable" in text and "REPRODUCED" not in text and "NOT reproduced" not in text
    assert ("2 of 3 dense units" if who == "dense" else "3 of 3 ticket units") in text
    table = format_table(collect(root)).splitlines()
    row = {line.split()[0]: line for line in table[2:] if line.split()[0].isdigit()}
    assert "*" in row["0" if who == "dense" else "4"] and "*" not in row["8"]
    assert table[-1] == f"* {AT_END}"


def test_no_flag_when_early_stop_is_before_the_end(tmp_path):
    root = fake_run(tmp_path / "r", units_of(DENSE, {4: DENSE}, [900, 950, 990], [800, 850, 870]), iterations=1000)
    assert "*" not in format_table(collect(root)) and "not testable" not in check(root)


def test_verdict_rule():
    assert verdict([1, 1], every=True) == "REPRODUCED" and verdict([1, 0], every=True) == "within noise"
    assert verdict([1, -1], every=True) == "NOT reproduced" and verdict([1, None], every=True) == ONE_REPLICATE
    assert verdict([0, 1], every=False) == "REPRODUCED" and verdict([-1, 0], every=False) == "within noise"
    assert verdict([-1, -1], every=False) == "NOT reproduced"


def test_margins_pair_the_replicates_both_sides_finished():
    margin = Margin.paired({0: 0.5, 1: 0.6, 2: 0.9}, {0: 0.4, 1: 0.3})
    assert margin.n == 2 and margin.mean == pytest.approx(0.2)
    assert margin.noise == pytest.approx(scipy_stats.t.ppf(0.975, 1) * statistics.stdev([0.1, 0.3]) / math.sqrt(2))
