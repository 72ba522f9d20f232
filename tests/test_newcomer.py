"""The rough edges a newcomer hits first: which store a command opens from another folder, read-only commands
that must not create one, the runs table in an 80- or 120-column terminal, the experiment kind the MLflow UI
reads, and the one convention for numbers (fractions in MLflow, percent in the terminal). Real SQLite stores."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from maskssd import tracking
from maskssd.cli import console, main
from maskssd.runtime import project_root
from maskssd.tracking import runs as tracking_runs
from maskssd.tracking.runs import EXPERIMENT_TAGS, MlflowRun


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (pyproject.toml marks it) with one finished run of long names and three classes."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MASKSSD_OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MASKSSD_PROJECT_DIR", raising=False)
    root = tmp_path / "proj"
    (root / "experiments").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    monkeypatch.chdir(root)
    c = tracking.client()
    run = MlflowRun.start(
        c, "cpu_effnet_lite0_pan_s4_rfs", run_name="cpu_effnet_lite0_pan_s4_rfs-a-long-name"
    )
    metrics = {"val_map": 0.694, "val_map_ci_low": 0.579, "val_map_ci_high": 0.804, "test_map": 0.696}
    metrics.update(test_map_ci_low=0.597, test_map_ci_high=0.823)
    for cls in ("with_mask", "without_mask", "mask_weared_incorrect"):
        metrics.update({f"val_ap_{cls}": 0.5, f"val_ap_{cls}_ci_low": 0.3, f"val_ap_{cls}_ci_high": 0.7})
    run.log_metrics(metrics, step=0)
    run.log_params({"model.name": "ssdlite_effnet_lite0", "optim.lr": 0.002, "loss.alpha": 1.0})
    run.finish()
    return root


def test_the_project_store_is_found_from_a_subfolder(project, monkeypatch, capsys):
    monkeypatch.chdir(project / "experiments")
    assert project_root() == project
    assert main(["runs", "--experiment", "cpu_effnet_lite0_pan_s4_rfs"]) == 0
    assert "69.4 [57.9, 80.4]" in capsys.readouterr().out
    assert not (project / "experiments" / "mlruns").exists()


def test_read_only_commands_never_create_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MASKSSD_OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MASKSSD_PROJECT_DIR", raising=False)
    empty = tmp_path / "nowhere"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for argv in (
        ["runs"],
        ["promote", "--run", "0123456789abcdef"],
        ["study-report", "s"],
        ["compare", "0123456789abcdef", "fedcba9876543210"],
    ):
        assert main(argv) == 2, argv
        msg = " ".join(capsys.readouterr().err.split())
        assert f"{empty}/mlruns/" in msg and "--" in msg, (argv, msg)  # the store it looked for, what to pass
    assert list(empty.iterdir()) == []


def test_runs_fit_80_and_120_columns_and_wide_shows_every_column(project, monkeypatch, capsys):
    for width in (80, 120):
        buf = io.StringIO()
        monkeypatch.setattr(console, "out", Console(file=buf, width=width))
        monkeypatch.setattr("maskssd.cli.commands.out", console.out)
        assert main(["runs"]) == 0
        lines = buf.getvalue().splitlines()
        assert max(map(len, lines)) <= width, width
        text = buf.getvalue()
        assert "69.4 [57.9, 80.4]" in text and "69.6 [59.7, 82.3]" in text  # numbers whole, never "6…"
        assert "finished" in text and "metrics in %" in text
        hidden = capsys.readouterr().err
        assert "--wide shows all" in hidden
        if width == 120:
            assert "weared" in text and "incorrect" in text  # the rare class's AP fits at 120
    buf = io.StringIO()
    monkeypatch.setattr("maskssd.cli.commands.out", Console(file=buf, width=80))
    assert main(["runs", "--wide"]) == 0
    assert "neg/pos" not in capsys.readouterr().err
    wide = " ".join(buf.getvalue().split())  # printed for a pager: every column, the name whole
    assert "ssdlite_effnet_lite0" in wide and "cpu_effnet_lite0_pan_s4_rfs-a-long-name" in wide


def test_experiments_open_as_model_training_and_state_the_number_convention(project):
    c = tracking_runs.client(create=False)
    exp = c.get_experiment_by_name("cpu_effnet_lite0_pan_s4_rfs")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "fractions" in exp.tags["mlflow.note.content"] and "percent" in exp.tags["mlflow.note.content"]
    # an experiment made before (no kind) gets the kind when maskssd next uses it; its own note is kept
    old = c.create_experiment("made-by-hand", tags={"mlflow.note.content": "mine"})
    MlflowRun.start(c, "made-by-hand").finish()
    tags = c.get_experiment(old).tags
    assert tags["mlflow.experimentKind"] == EXPERIMENT_TAGS["mlflow.experimentKind"]
    assert tags["mlflow.note.content"] == "mine"


def test_every_command_teaches_by_example():
    """``maskssd COMMAND --help`` (and every ``data`` subcommand) ends with an example to copy."""
    import argparse

    from maskssd.cli.parser import build_parser

    def commands(p: argparse.ArgumentParser, path: str):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, p
        for name, child in subs[0].choices.items() if subs else []:
            yield from commands(child, f"{path} {name}")

    for path, p in commands(build_parser(), "maskssd"):
        if path.count(" ") == 2 and "example" not in p.format_help():  # a data subcommand: its group's
            p = build_parser()._subparsers._group_actions[0].choices[path.split()[1]]
        assert "example" in p.format_help(), f"{path} --help has no example"
