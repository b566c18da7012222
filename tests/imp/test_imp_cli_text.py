"""What a user reads: `imp --help` (one default per option, no duplicated alias, no developer docstring), the
claims checker's --help, the load warning, and the plots' titles, legends and axes."""

import pytest

from lthfast.cli import build_parser, main
from lthfast.imp import cli as imp_cli
from lthfast.imp import plots


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_imp_help_shows_each_default_once(capsys):
    text = _help(capsys, "imp")
    flat = " ".join(text.split())
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["imp"]
    listed = [a for a in sub._actions if a.help != "==SUPPRESS==" and a.dest not in ("help", "config")]
    assert len(listed) > 40
    for action in listed:
        assert action.help.count("(default:") == 1, action.option_strings
    assert "(default: )" not in flat and "(default: False)" not in flat and "(default: None)" not in flat
    assert "--replicate " not in flat and "--replicate," not in flat  # the alias is hidden, not listed twice
    assert text.startswith("usage: lthfast imp [--config FILE] [OPTIONS]")
    assert "OMP_WAIT_POLICY=PASSIVE" in flat and "load average" in flat  # the thread rule


def test_top_level_help_is_for_users(capsys):
    text = _help(capsys)
    assert "argparse" not in text and "lthfast demo" in text and "lthfast bench" in text


def test_the_hidden_alias_still_sets_the_option():
    args = build_parser().parse_args(["imp", "--replicate", "3"])
    assert imp_cli.config_from_args(args).replicates == 3


def test_claims_help_and_errors(capsys, tmp_path):
    from lthfast.imp import claims

    with pytest.raises(SystemExit) as exc:
        claims.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lthfast.imp.claims") and "ITERATIVE_RUN" in out and "(d)" in out
    assert claims.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lthfast.imp.claims: error: ") and "not an lthfast run directory" in err


def test_imp_warns_when_the_machine_is_loaded_and_not_before_a_refusal(tiny, monkeypatch, capsys):
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0))
    argv = ["imp", "--out-dir", tiny["out_dir"], "--name", "w", "--no-plots", "--threads", "1"]
    argv += ["--dataset", "synthetic", "--synthetic-shape", "8", "--num-samples", "240", "--val-size", "40"]
    argv += ["--batch-size", "20", "--train-steps", "10it", "--eval-every", "10it", "--levels", "0", "--hidden", "8"]
    argv += ["--device", "cpu", "--cache-dir", tiny["cache_dir"]]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("lthfast: warning: ")]
    assert len(warnings) == 1 and "load average 64.00" in warnings[0] and "1 thread:" in warnings[0]
    assert main([*argv, "--model", "alexnet"]) == 2  # a refused run says only why
    assert capsys.readouterr().err.startswith("lthfast: error: unknown model")


# ---- plots -----------------------------------------------------------------------------------------------------
def _agg(weights: list[float], n: int) -> dict:
    agg = {}
    for level, w in enumerate(weights):
        for branch in ("ticket", "random_reinit") if level else ("ticket",):
            agg[(level, branch)] = {
                "n": n, "weights_remaining_pct": w, "test_acc": 0.9 - 0.01 * level, "test_acc_std": 0.01,
                "early_stop_iteration": 500.0 + level, "early_stop_iteration_std": 20.0, "early_stop_test_acc": 0.9,
                "early_stop_test_acc_std": 0.0, "samples_per_s": 1000.0, "samples_per_s_std": 0.0,
                "early_stop_at_end": 0,
            }  # fmt: skip
    return agg


@pytest.fixture
def figures(monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.setdefault(path.name, fig) and path)
    return drawn


def _axes(fig):
    return fig.axes[0]


@pytest.mark.parametrize("one_shot", [False, True])
def test_plots_name_the_run_and_the_method_and_explain_the_error_bars(figures, tmp_path, one_shot):
    weights = [100.0, 51.2, 26.2144, 13.4217728]
    agg = _agg(weights, n=3)
    rows = [{"backend": "torch", "weights_remaining_pct": w, "samples_per_s": 900.0 + i, "early_stop": "val_loss"}
            for i, w in enumerate(weights)]  # fmt: skip
    config = {"model": "lenet", "dataset": "mnist1d", "one_shot": one_shot, "prune_fraction": 0.49, "rewind": "0it"}
    plots.draw_all(tmp_path / "run-x" / "plots", rows, agg, config, "run-x")
    assert set(figures) == {"accuracy.png", "early_stop.png", "throughput.png"}
    method = "one-shot pruning" if one_shot else "iterative pruning"
    for name, fig in figures.items():
        ax = _axes(fig)
        title = ax.get_title()
        assert "run-x" in title and "lenet on mnist1d" in title and method in title, name
        assert ax.get_xscale() == "log" and ax.get_xlabel().startswith("weights remaining (%)"), name
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["100", "51.2", "26.2", "13.4"], name
        assert ax.get_xlim()[0] > ax.get_xlim()[1], name  # 100% on the left
    for name in ("accuracy.png", "early_stop.png"):
        legend = _axes(figures[name]).get_legend()
        assert legend.get_title().get_text() == "mean ± std over 3 replicates"
        texts = [t.get_text() for t in legend.get_texts()]
        assert f"winning ticket ({'one-shot' if one_shot else 'IMP'})" in texts


def test_one_replicate_says_there_are_no_error_bars(figures, tmp_path):
    plots.accuracy_plot(tmp_path / "a.png", _agg([100.0, 80.0], n=1), {}, "r")
    assert _axes(figures["a.png"]).get_legend().get_title().get_text() == "1 replicate (no error bars)"


def test_many_levels_are_thinned_to_readable_ticks():
    weights = [100 * 0.8**k for k in range(21)]
    ticks = plots.level_ticks(weights)
    assert len(ticks) <= plots.MAX_TICKS and ticks[0] == 100 and ticks[-1] == pytest.approx(weights[-1], rel=1e-6)
    assert ticks == sorted(ticks, reverse=True)
    assert (
        plots.tick_label(8.589934) == "8.59"
        and plots.tick_label(0.1152) == "0.115"
        and plots.tick_label(100.0) == "100"
    )


def test_early_stops_at_the_last_evaluation_are_circled(figures, tmp_path):
    agg = _agg([100.0, 80.0, 64.0], n=2)
    agg[(2, "ticket")]["early_stop_at_end"] = 1
    plots.early_stop_plot(tmp_path / "e.png", agg, "minimum validation loss", {}, "r")
    ax = _axes(figures["e.png"])
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "early stop at the last evaluation" in texts
    (ring,) = [line for line in ax.get_lines() if line.get_label() == "early stop at the last evaluation"]
    assert list(ring.get_xdata()) == [64.0] and list(ring.get_ydata()) == [agg[(2, "ticket")]["early_stop_iteration"]]
    agg[(2, "ticket")]["early_stop_at_end"] = 0
    figures.clear()
    plots.early_stop_plot(tmp_path / "e.png", agg, "minimum validation loss", {}, "r")
    assert "early stop at the last evaluation" not in [
        t.get_text() for t in _axes(figures["e.png"]).get_legend().get_texts()
    ]
