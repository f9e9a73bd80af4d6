"""The run-directory contract: nothing is replaced, mixed or lost without being asked for."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxstab import diagnose as diag
from jaxstab import rundir
from jaxstab.cli import main
from jaxstab.plugin import Dataset, ModelEntry
from jaxstab.registry import register
from tests.jaxstab.test_cli import BASE, TOY, _default_data


def _snapshot(path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``path``."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxstab: error:") and "\n" not in err, err
    assert needle in err, err


@pytest.fixture(scope="module")
def diag_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "run"
    assert main(["diagnose", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "run"
    assert main(["train", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    return out


def test_the_marker_names_command_config_data_and_version(diag_run, train_run):
    d = json.loads((diag_run / rundir.MARKER).read_text())
    t = json.loads((train_run / rundir.MARKER).read_text())
    assert d["command"] == "diagnose" and t["command"] == "train"
    assert t["model"] == "toy_regression" and t["config"]["batch_size"] == 16
    assert t["data_fingerprint"] == rundir.fingerprint(_default_data(0).arrays)
    assert t["jaxstab_version"] and t["created"]


@pytest.mark.parametrize(
    ("command", "extra", "needle"),
    [
        ("diagnose", [], "already holds a diagnose run; --overwrite replaces it"),
        ("train", [], "already holds a diagnose run; --overwrite"),
        ("train", ["--resume"], "holds a diagnose run, not a train run"),
    ],
)
def test_an_existing_diagnose_run_is_never_replaced_silently(
    diag_run, command, extra, needle, capsys
):
    (diag_run / "notes.txt").write_text("mine")
    before = _snapshot(diag_run)
    assert main([command, *BASE, *extra, "--output-dir", str(diag_run)]) == 2
    _one_line_error(capsys, needle)
    assert _snapshot(diag_run) == before


def test_an_existing_train_run_needs_resume_or_overwrite(train_run, capsys):
    before = _snapshot(train_run)
    for command in ("train", "diagnose"):
        assert main([command, *BASE, "--output-dir", str(train_run)]) == 2
        _one_line_error(capsys, "already holds a train run")
    assert _snapshot(train_run) == before


def test_train_overwrite_into_a_diagnose_run_leaves_no_old_report(tmp_path):
    out = tmp_path / "run"
    assert main(["diagnose", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["train", *BASE, "--epochs", "1", "--overwrite", "--output-dir", str(out)]) == 0
    names = set(os.listdir(out))
    assert names == {"notes.txt", rundir.MARKER, "train_summary.json", "checkpoints"}
    assert json.loads((out / rundir.MARKER).read_text())["command"] == "train"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--batch-size", "32"], "batch_size was 16 in the first run, now 32"),
        (["--lr", "0.5"], "lr was 0.01 in the first run, now 0.5"),
        (["--no-guard"], "guard was True in the first run, now False"),
        (["--seed", "3"], "seed was 0"),
    ],
)
def test_resume_with_another_setting_names_the_field(train_run, flags, needle, capsys):
    before = _snapshot(train_run)
    args = ["train", *BASE, "--resume", "--epochs", "2", *flags, "--output-dir", str(train_run)]
    assert main(args) == 2
    _one_line_error(capsys, needle)
    assert _snapshot(train_run) == before


def test_resume_with_other_data_is_refused(train_run, tmp_path, capsys):
    data = _default_data(0).arrays
    path = tmp_path / "other.npz"
    np.savez(path, x=data["x"] + 1.0, y=data["y"])
    before = _snapshot(train_run)
    args = ["train", *BASE, "--resume", "--data", str(path), "--output-dir", str(train_run)]
    assert main(args) == 2
    _one_line_error(capsys, "the training data differ")
    assert _snapshot(train_run) == before


def test_resume_may_change_epochs(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    args = ["train", *BASE, "--epochs", "2", "--steps-per-call", "2", "--resume"]
    assert main([*args, "--output-dir", str(out)]) == 0
    assert json.loads((out / "train_summary.json").read_text())["epochs_completed"] == 2


def test_a_folder_that_cannot_be_written_is_refused_before_any_step(capsys):
    # /proc takes no new files, for root too (chmod would not stop root).
    assert main(["diagnose", *BASE, "--output-dir", "/proc/jaxstab-run"]) == 2
    _one_line_error(capsys, "is not writable")


def test_an_output_path_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["diagnose", *BASE, "--output-dir", str(tmp_path / "f" / "run")]) == 2
    _one_line_error(capsys, "is not a directory")


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_temporary_folders_of_a_killed_run_are_cleaned_and_reported(tmp_path, capsys):
    pid = _dead_pid()
    stale = tmp_path / f".run.tmp-{pid}-abc"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "checkpoints" / "big").write_bytes(b"0" * 1000)
    live = tmp_path / f".run.tmp-{os.getpid()}-live"  # a run still going: left alone
    live.mkdir()
    out = tmp_path / "run"
    assert main(["diagnose", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    assert not stale.exists() and live.exists()
    assert f"removed .run.tmp-{pid}-abc" in capsys.readouterr().err


def test_an_interrupted_diagnose_leaves_the_earlier_report_intact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["diagnose", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    before = _snapshot(out)

    def interrupted(directory, *args, **kwargs):
        with open(os.path.join(directory, "gradient_stats.csv"), "w") as f:
            f.write("half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(diag, "write_artifacts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["diagnose", *BASE, "--overwrite", "--output-dir", str(out)])
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_killed_diagnose_leaves_the_earlier_report_intact(tmp_path):
    """SIGKILL during training: the earlier report stays, the next run cleans up."""
    out = tmp_path / "run"
    assert main(["diagnose", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    before = _snapshot(out)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = (
        "import runpy, sys; runpy.run_path(sys.argv[1]); "
        "from jaxstab.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    test_cli = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_cli.py")
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            test_cli,
            "diagnose",
            *BASE,
            "--overwrite",
            "--output-dir",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": repo, "JAXSTAB_EXIT_AFTER_EPOCH": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == 137, killed.stderr
    assert _snapshot(out) == before
    assert any(n.startswith(".run.tmp-") for n in os.listdir(tmp_path))
    assert main(["diagnose", *BASE, "--epochs", "1", "--overwrite", "--output-dir", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["run"]


def _entry_with_warning() -> ModelEntry:
    def load(path):
        ds = TOY.load_data(path)
        return Dataset(ds.arrays, {**ds.meta, "warnings": ["no control label found in 'p'"]})

    return dataclasses.replace(TOY, name="toy_warned", load_data=load)


def test_data_warnings_reach_the_console_and_the_report(tmp_path, capsys):
    register(_entry_with_warning())
    data = _default_data(0).arrays
    path = tmp_path / "d.npz"
    np.savez(path, **data)
    out = tmp_path / "run"
    args = ["diagnose", "--model", "toy_warned", "--no-progress", "--epochs", "1"]
    assert main([*args, "--data", str(path), "--output-dir", str(out)]) == 0
    assert "jaxstab: warning: no control label found in 'p'" in capsys.readouterr().err
    report = json.loads((out / "diagnosis_report.json").read_text())
    assert report["data_warnings"] == ["no control label found in 'p'"]


def test_control_needs_a_loader_that_takes_it(tmp_path, capsys):
    path = tmp_path / "d.npz"
    np.savez(path, **_default_data(0).arrays)
    out = tmp_path / "run"
    assert main(["diagnose", *BASE, "--control", "ctrl", "--output-dir", str(out)]) == 2
    _one_line_error(capsys, "--control names the control label of a --data file")
    args = ["diagnose", *BASE, "--data", str(path), "--control", "ctrl", "--output-dir", str(out)]
    assert main(args) == 2
    _one_line_error(capsys, "data loader takes no --control")
    assert not out.exists()


def test_cfmvc_control_label_from_the_command_line(tmp_path):
    from jaxstab.models.cfmvc import simulate

    adata = simulate(120, 20, n_perturbations=2, seed=0)
    labels = adata.obs["perturbation"].astype(str)
    codes = {name: i for i, name in enumerate(sorted(set(labels)))}
    adata.obs["perturbation"] = labels.map(codes).astype(int).to_numpy()  # integer labels
    control_code = codes["control"]
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    out = str(tmp_path / "run")
    guessed = diag.prepare("cfmvc", str(path), out, {})
    assert guessed.dataset.meta["control"] is None and guessed.dataset.meta["warnings"]
    named = diag.prepare("cfmvc", str(path), out, {}, control=str(control_code))
    assert str(named.dataset.meta["control"]) == str(control_code)
    assert not np.asarray(named.dataset.arrays["p"])[labels.to_numpy() == "control"].any()
