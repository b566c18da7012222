"""Config parsing, validation and the CLI's one-line errors (all raised before any training)."""

import json
from pathlib import Path

import pytest

from lthfast.cli import main
from lthfast.imp import Config, ConfigError, run
from lthfast.imp.cli import config_from_args
from lthfast.imp.config import CONTROLS


def test_from_dict_coerces_strings_and_lists():
    cfg = Config.from_dict({"hidden": "64,32", "layer-fractions": "out.weight=x0.5,fc1.weight=0.3",
                            "controls": ["random_reinit"], "one_shot": "true", "levels": "3"})  # fmt: skip
    assert cfg.hidden == (64, 32) and cfg.levels == 3 and cfg.one_shot is True
    assert cfg.layer_fractions == {"out.weight": "x0.5", "fc1.weight": "0.3"}
    assert cfg.controls == ("random_reinit",)
    assert Config.from_dict({"controls": "all"}).controls == CONTROLS
    cfg.validate()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"model": "alexnet"}, "unknown model 'alexnet'"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"prune_fraction": 1.5}, "prune_fraction must be in"),
        ({"prune_fraction": 0}, "prune_fraction must be in"),
        ({"layer_fractions": {"out.weight": "1.2"}}, "layer_fractions"),
        ({"layer_fractions": {"out.weight": "x6"}}, r"'x6' \(x prune_fraction 0.2 = 1.2\)"),
        ({"layer_fractions": {"out.weight": "x5"}}, r"'x5' \(x prune_fraction 0.2 = 1\)"),  # all pruned at level 1
        ({"controls": ["random_everything"]}, "unknown control"),
        ({"control_levels": [5], "levels": 2, "controls": ["rearrange"]}, "control_levels"),
        ({"rewind": "five"}, "not a duration"),
        ({"optimizer": "lion"}, "unknown optimizer"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_validation_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(options).validate()


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        Config.from_dict({"learning_rate": 0.1})


def test_rewind_past_end_of_training():
    assert Config.from_dict({"train_steps": "2ep"}).steps(steps_per_epoch=50).train == 100
    cfg = Config.from_dict({"train_steps": "2ep", "rewind": "3ep"})
    with pytest.raises(ConfigError, match="past the end of training"):
        cfg.steps(steps_per_epoch=50)
    steps = Config.from_dict({"train_steps": "2ep", "rewind": "0.5ep", "milestones": "1ep"}).steps(50)
    assert (steps.rewind, steps.milestones) == (25, (50,))


def test_rewind_past_end_raises_before_training(tiny):
    with pytest.raises(ConfigError, match="past the end"):
        run({**tiny, "rewind": "30it"})
    assert not list(Path(tiny["out_dir"]).glob("*/replicate_0"))


def test_identity_ignores_bookkeeping():
    a = Config(out_dir="x", quiet=True, threads=1)
    b = Config(out_dir="y", quiet=False)
    assert a.short_hash() == b.short_hash()
    assert Config(lr=0.1).short_hash() != Config().short_hash()


def test_config_file_and_flags(tmp_path):
    from lthfast.cli import build_parser

    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nlevels: 1\nhidden: [8, 4]\none-shot: true\n")
    args = build_parser().parse_args(["imp", "--config", str(path), "--lr", "0.01", "--replicate", "3"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.levels, cfg.hidden, cfg.one_shot, cfg.replicates) == (0.01, 1, (8, 4), True, 3)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"model": "lenet", "controls": ["random_prune"]}))
    args = build_parser().parse_args(["imp", "--config", str(js), "--no-one-shot"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.controls, cfg.one_shot) == ("lenet", ("random_prune",), False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "alexnet"], "unknown model 'alexnet'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--prune-fraction", "2"], "prune_fraction"),
        (["--rewind", "500it", "--train-steps", "100it"], "past the end of training"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent"], "missing file train-images-idx3-ubyte"),
        (["--levels", "many"], "levels"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys, tiny, tmp_path):
    argv = ["imp", "--out-dir", str(tmp_path / "runs"), "--quiet", "--dataset", "synthetic", "--synthetic-shape",
            "8", "--num-samples", "100", "--batch-size", "10", *argv]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lthfast: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["imp", "--out-dir", str(blocker / "runs"), "--dataset", "synthetic", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot write to output directory" in err and str(blocker) in err


def test_cli_corrupt_config_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [unclosed\n")
    assert main(["imp", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lthfast: error: config file {path}: cannot parse") and "\n" not in err


def test_config_file_values_are_read_like_flags(tmp_path):
    from lthfast.cli import build_parser

    path = tmp_path / "c.yaml"
    path.write_text("hidden: 64\nlevels: 2\ncontrols: random_prune\ncontrol_levels: 2\n")
    cfg = config_from_args(build_parser().parse_args(["imp", "--config", str(path)]))
    assert (cfg.hidden, cfg.control_levels) == ((64,), (2,))  # as --hidden 64 --control-levels 2


@pytest.mark.parametrize("text", ["levels: yes\n", "lr: true\n", "hidden: [64, false]\n"])
def test_config_file_booleans_are_not_numbers(text, tmp_path):
    from lthfast.cli import build_parser

    path = tmp_path / "c.yaml"
    path.write_text(text)
    option = text.split(":")[0]
    with pytest.raises(ConfigError, match=rf"{path}: option {option}=.*expected a number, got a boolean"):
        config_from_args(build_parser().parse_args(["imp", "--config", str(path)]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layer-fractions", "fc9.weight=0.3"], "layer_fractions: 'fc9.weight' matches no layer of the model"),
        (["--leave-dense", "nosuch"], "leave_dense: 'nosuch' matches no layer of the model"),
        (["--layer-fractions", "out.weight=x5"], "layer_fractions[out.weight]='x5'"),
        (["--backend", "triton", "--device", "cpu"], "backend triton cannot run on device cpu"),
        (["--dataset", "mnist1d", "--cache-dir", "FILE/c"], "cannot use cache_dir FILE/c"),
        (["--dataset", "mnist1d", "--cache-dir", "FILE"], "cannot use cache_dir FILE"),
    ],
)
def test_cli_refuses_before_the_run_directory(argv, message, capsys, tmp_path, monkeypatch):
    """Each of these used to fail after training had begun in the run directory (a traceback, exit status 1)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no CPU interpreter: triton cannot run on the CPU
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    runs = tmp_path / "runs"
    argv = ["imp", "--out-dir", str(runs), "--name", "r", "--quiet", "--no-plots", "--threads", "1", "--dataset",
            "synthetic", "--synthetic-shape", "8", "--num-samples", "100", "--batch-size", "10", "--hidden", "16",
            "--train-steps", "20it", "--levels", "2", *[a.replace("FILE", str(blocker)) for a in argv]]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lthfast: error: ") and message.replace("FILE", str(blocker)) in err and "\n" not in err
    assert not (runs / "r").exists()
