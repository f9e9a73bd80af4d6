"""``jaxstab diagnose / train / compare`` end to end on a toy model registered in-process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from jaxstab import registry
from jaxstab.cli import main
from jaxstab.plugin import Dataset, ModelEntry

N, DIN = 96, 4
PNGS = ("diagnostics.png", "gradient_heatmap.png", "feature_changes.png")


class Toy(nnx.Module):
    def __init__(self, din: int, rngs: nnx.Rngs) -> None:
        self.encoder = nnx.Linear(din, 16, rngs=rngs)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.encoder(x)))


def _dataset(arrays) -> Dataset:
    for name, v in arrays.items():
        bad = np.nonzero(~np.isfinite(v).reshape(len(v), -1).all(axis=1))[0]
        if bad.size:
            raise ValueError(f"field {name!r} has a non-finite value at index {bad[0]}")
    return Dataset({k: np.asarray(v, np.float32) for k, v in arrays.items()}, {"din": DIN})


def _default_data(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, DIN))
    return _dataset({"x": x, "y": np.sin(x @ rng.normal(size=(DIN, 1)))})


def _load(path: str) -> Dataset:
    with np.load(path) as f:
        return _dataset({k: f[k] for k in ("x", "y")})


def _loss(model, batch, key):
    err = model(batch["x"]) - batch["y"]
    mse = jnp.mean(err**2)
    return mse + 1e-3 * jnp.mean(jnp.abs(err)), {"mse": mse, "l1": jnp.mean(jnp.abs(err))}


def _features(batch):
    out = {}
    for j in range(2):
        col = batch["x"][:, j]
        out |= {
            f"x_col{j}_min": col.min(),
            f"x_col{j}_max": col.max(),
            f"x_col{j}_mean": col.mean(),
            f"x_col{j}_std": col.std(),
        }
    return out


TOY = ModelEntry(
    "toy_regression",
    lambda ds, cfg, rngs: Toy(ds.meta["din"], rngs),
    _loss,
    _default_data,
    load_data=_load,
    config={"epochs": 3, "batch_size": 16, "lr": 1e-2, "grad_clip": 1.0},
    feature_stats=_features,
)
registry.register(TOY)
BASE = ["--model", "toy_regression", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A healthy run and a planted explosion, shared by the tests that read them."""
    root = tmp_path_factory.mktemp("runs")
    ok = root / "healthy"
    bad = root / "exploding"
    rc_ok = main(["diagnose", *BASE, "--output-dir", str(ok)])
    rc_bad = main(
        [
            "diagnose",
            *BASE,
            "--lr",
            "1000",
            "--no-guard",
            "--epochs",
            "20",
            "--output-dir",
            str(bad),
        ]
    )
    return {"root": root, "ok": ok, "bad": bad, "rc_ok": rc_ok, "rc_bad": rc_bad}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_diagnose_writes_every_artifact(runs):
    out = runs["ok"]
    assert runs["rc_ok"] == 0
    assert set(os.listdir(out)) == {
        "gradient_stats.csv",
        "input_features.csv",
        "diagnosis_report.json",
        *PNGS,
        "checkpoints",
        "jaxstab_run.json",
    }
    rows = _rows(out / "gradient_stats.csv")
    head = [
        "step",
        "epoch",
        "loss",
        "lr",
        "total_grad_norm",
        "max_grad_norm",
        "num_nan_grads",
        "num_inf_grads",
        "clipped",
        "skipped",
    ]
    n_train = N - N // 10  # 10 % held out for evaluation
    steps = 3 * int(np.ceil(n_train / 16))
    assert list(rows[0])[: len(head)] == head
    assert {"grad_norm:encoder", "grad_norm:head"} <= set(rows[0])
    assert len(rows) == steps
    assert [int(r["step"]) for r in rows] == list(range(steps))
    norms = np.array([[float(r["grad_norm:encoder"]), float(r["grad_norm:head"])] for r in rows])
    np.testing.assert_allclose([float(r["max_grad_norm"]) for r in rows], norms.max(1))
    # Global norm² = sum of group norm² (two groups, no other parameters).
    np.testing.assert_allclose(
        [float(r["total_grad_norm"]) for r in rows], np.sqrt((norms**2).sum(1)), rtol=1e-4
    )
    assert all(float(r["lr"]) == 1e-2 for r in rows)

    feats = _rows(out / "input_features.csv")
    assert len(feats) == steps
    assert {"x_col0_min", "x_col0_max", "x_col0_mean", "x_col1_std", "suspicious_features"} <= set(
        feats[0]
    )
    assert all(r["suspicious_features"] == "" for r in feats)

    report = json.loads((out / "diagnosis_report.json").read_text())
    assert report["status"] == "ok" and report["stopped_early"] is False
    assert report["steps_recorded"] == steps
    assert {
        "config",
        "first_anomaly_step",
        "offending_groups",
        "weight_changes",
        "thresholds",
        "loss_terms",
        "summary",
    } <= set(report)
    assert report["thresholds"]["total_danger"] == 10.0
    assert report["config"]["lr"] == 1e-2 and report["config"]["guard"] is True
    assert {w["param"] for w in report["weight_changes"]} == {
        "encoder/kernel",
        "encoder/bias",
        "head/kernel",
        "head/bias",
    }
    rel = [w["relative_change"] for w in report["weight_changes"]]
    assert rel == sorted(rel, reverse=True)
    assert set(report["loss_terms"]) == {"loss", "mse", "l1"}

    for name in PNGS:
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and float(img[..., :3].var()) > 0
    assert os.path.isdir(out / "checkpoints" / "best")
    # Nothing left behind next to the output directory.
    assert not [p for p in os.listdir(runs["root"]) if p.startswith(".")]


def test_planted_explosion_is_reported_and_stops_early(runs):
    out = runs["bad"]
    assert runs["rc_bad"] == 3
    report = json.loads((out / "diagnosis_report.json").read_text())
    assert report["status"] in ("explosion", "nonfinite")
    total_steps = 20 * int(np.ceil((N - N // 10) / 16))
    assert report["steps_recorded"] < total_steps
    rows = _rows(out / "gradient_stats.csv")
    last = float(rows[-1]["total_grad_norm"])
    assert not np.isfinite(last) or last > 100 or not np.isfinite(float(rows[-1]["loss"]))
    assert report["first_anomaly_step"] is not None
    assert report["offending_groups"], "the groups that blew up are named"
    assert report["offending_groups"][0]["group"] in ("encoder", "head")
    assert report["config"]["guard"] is False
    assert all(r["clipped"] == "0" and r["skipped"] == "0" for r in rows)


def test_compare_two_runs(runs, tmp_path, capsys):
    fig = tmp_path / "cmp.png"
    assert main(["compare", str(runs["ok"]), str(runs["bad"]), "--output", str(fig)]) == 0
    printed = capsys.readouterr().out
    assert "healthy" in printed and "exploding" in printed
    img = matplotlib.image.imread(fig)
    assert float(img[..., :3].var()) > 0


def test_compare_rejects_a_directory_without_a_report(runs, tmp_path, capsys):
    fig = tmp_path / "cmp.png"
    assert main(["compare", str(runs["ok"]), str(tmp_path), "--output", str(fig)]) == 2
    assert "diagnosis_report.json" in capsys.readouterr().err
    assert not fig.exists()


def test_console_script_in_a_subprocess(runs, tmp_path):
    exe = shutil.which("jaxstab", path=os.path.dirname(sys.executable)) or shutil.which("jaxstab")
    assert exe, "the console script is installed"
    fig = tmp_path / "c.png"
    done = subprocess.run(
        [exe, "compare", str(runs["ok"]), str(runs["bad"]), "--output", str(fig)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert fig.exists()
    bad = subprocess.run(
        [exe, "diagnose", "--model", "no_such_model"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "unknown model" in bad.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("jaxstab 0.")


@pytest.mark.parametrize("command", ["diagnose", "train", "compare"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: jaxstab " + command in capsys.readouterr().out


def _bad_npz(tmp_path):
    x = np.random.default_rng(0).normal(size=(N, DIN))
    x[7, 2] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.zeros((N, 1)))
    return str(path)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("unknown_model", "unknown model"),
        ("missing_data", "not found"),
        ("invalid_data", "index 7"),
        ("not_a_run_dir", "did not write (precious.txt)"),
        ("bad_epochs", "--epochs"),
    ],
)
def test_bad_input_fails_cleanly_and_writes_nothing(case, needle, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["diagnose", *BASE, "--output-dir", str(out)]
    if case == "unknown_model":
        args[args.index("toy_regression")] = "nope"
    elif case == "missing_data":
        args += ["--data", str(tmp_path / "missing.npz")]
    elif case == "invalid_data":
        args += ["--data", _bad_npz(tmp_path)]
    elif case == "not_a_run_dir":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    elif case == "bad_epochs":
        args += ["--epochs", "0"]
    before = sorted(os.listdir(tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxstab: error:") and "\n" not in err and needle in err
    assert sorted(os.listdir(tmp_path)) == before
    if case == "not_a_run_dir":
        assert os.listdir(out) == ["precious.txt"]


def test_overwrite_replaces_a_previous_report_and_keeps_the_users_files(runs, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(runs["ok"], out)
    (out / "notes.txt").write_text("the user's own notes")
    first = json.loads((out / "diagnosis_report.json").read_text())["steps_recorded"]
    args = ["diagnose", *BASE, "--epochs", "1", "--output-dir", str(out)]
    assert main([*args, "--overwrite"]) == 0
    second = json.loads((out / "diagnosis_report.json").read_text())["steps_recorded"]
    assert 3 * second == first
    assert (out / "notes.txt").read_text() == "the user's own notes"
    assert sorted(os.listdir(tmp_path)) == ["again"]


def test_train_command_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "train"
    assert main(["train", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    one = json.loads((out / "train_summary.json").read_text())
    assert main(["train", *BASE, "--epochs", "2", "--resume", "--output-dir", str(out)]) == 0
    two = json.loads((out / "train_summary.json").read_text())
    assert two["epochs_completed"] == 2 and two["steps"] == 2 * one["steps"]
    assert sorted(os.listdir(out / "checkpoints")) == ["best", "latest"]
    # The resumed run equals an uninterrupted two-epoch run.
    ref = tmp_path / "ref"
    assert main(["train", *BASE, "--epochs", "2", "--output-dir", str(ref)]) == 0
    ref_summary = json.loads((ref / "train_summary.json").read_text())
    assert ref_summary["final_loss"] == two["final_loss"]
    assert ref_summary["epoch_history"] == two["epoch_history"]


@pytest.mark.slow  # ~2 min of XLA compilation on 2 cores; the toy-model tests cover the CLI
def test_cfmvc_end_to_end(tmp_path):
    out = tmp_path / "cfmvc"
    args = [
        "diagnose",
        "--model",
        "cfmvc",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--no-progress",
        "--output-dir",
        str(out),
    ]
    assert main(args) == 0
    report = json.loads((out / "diagnosis_report.json").read_text())
    assert report["status"] == "ok" and report["config"]["model"] == "cfmvc"
    assert {"loss", "nll", "kl"} <= set(report["loss_terms"])
    rows = _rows(out / "gradient_stats.csv")
    assert len(rows) == report["steps_recorded"] > 0
    assert {"grad_norm:encoder", "grad_norm:decoder"} <= set(rows[0])
    feats = _rows(out / "input_features.csv")
    assert {"library_mean", "x_col0_max", "suspicious_features"} <= set(feats[0])
    for name in PNGS:
        assert float(matplotlib.image.imread(out / name)[..., :3].var()) > 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "-1"),
        ("--grad-clip", "-1"),
        ("--grad-clip", "nan"),
        ("--explosion-norm", "-1"),
        ("--warn-norm", "0"),
        ("--danger-norm", "inf"),
        ("--steps-per-call", "0"),
        ("--batch-size", "0"),
    ],
)
def test_bad_numeric_option_is_refused_before_any_step(flag, value, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["diagnose", *BASE, flag, value, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxstab: error:") and "\n" not in err and flag in err
    assert os.listdir(tmp_path) == []


def test_train_twice_and_resume_without_checkpoint_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", *BASE, "--epochs", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already holds a train run; --resume continues it" in err
    missing = tmp_path / "never"
    assert main(["train", *BASE, "--resume", "--output-dir", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not exist" in err and not missing.exists()


_CRASH_RUNNER = (
    "import runpy, sys; runpy.run_path(sys.argv[1]); "
    "from jaxstab.cli import main; sys.exit(main(sys.argv[2:]))"
)


def test_killed_train_resumes_bit_for_bit(tmp_path):
    """The process dies right after epoch 1's checkpoint (the loop's testing hook)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = [sys.executable, "-c", _CRASH_RUNNER, os.path.abspath(__file__), "train", *BASE]
    env = {**os.environ, "PYTHONPATH": repo}
    out, ref = tmp_path / "crash", tmp_path / "ref"
    killed = subprocess.run(
        [*run, "--output-dir", str(out)],
        env={**env, "JAXSTAB_EXIT_AFTER_EPOCH": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == 137, killed.stderr
    assert not (out / "train_summary.json").exists()
    assert (out / "jaxstab_run.json").exists()
    assert main(["train", *BASE, "--resume", "--output-dir", str(out)]) == 0
    assert main(["train", *BASE, "--output-dir", str(ref)]) == 0
    got = json.loads((out / "train_summary.json").read_text())
    want = json.loads((ref / "train_summary.json").read_text())
    assert got["steps"] == want["steps"] and got["epochs_completed"] == 3
    assert got["final_loss"] == want["final_loss"]
    assert got["epoch_history"] == want["epoch_history"]


_DEVICE_ERRORS = [
    (["--devices", "3", "--batch-size", "64"], ["--batch-size 64", "--devices 3"]),
    (["--devices", "two"], ["--devices", "'two'"]),
    (["--shard-params"], ["--shard-params needs --devices"]),
]
_DISTRIBUTED_ERRORS = [(["--process-id", "1"], ["need --distributed"])]  # train only


@pytest.mark.parametrize(
    ("command", "extra", "needles"),
    [(c, e, n) for c in ("train", "diagnose") for e, n in _DEVICE_ERRORS]
    + [("train", e, n) for e, n in _DISTRIBUTED_ERRORS],
)
def test_bad_device_options_are_one_line_errors_before_any_step(
    command, extra, needles, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main([command, *BASE, *extra, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxstab: error:") and "\n" not in err
    assert all(n in err for n in needles), err
    assert os.listdir(tmp_path) == []


def test_devices_all_with_sharded_params_trains_like_one_device(tmp_path):
    """``--devices all --shard-params`` reaches ``fit`` (one CPU device here: a 1-device mesh;
    tests/jaxstab/train/test_mesh.py checks 8 devices)."""
    runs = {}
    for name, extra in (("plain", []), ("mesh", ["--devices", "all", "--shard-params"])):
        out = tmp_path / name
        assert main(["train", *BASE, "--epochs", "1", *extra, "--output-dir", str(out)]) == 0
        runs[name] = json.loads((out / "train_summary.json").read_text())
    assert runs["mesh"]["steps"] == runs["plain"]["steps"] > 0
    np.testing.assert_allclose(runs["mesh"]["final_loss"], runs["plain"]["final_loss"], rtol=1e-6)


def test_diagnose_reports_and_prints_its_findings(runs, tmp_path, capsys):
    # The healthy run has no warning; a clip far below the gradient norm is named, with
    # the suggested level, in the report and on the console.
    healthy = json.loads((runs["ok"] / "diagnosis_report.json").read_text())
    assert healthy["status"] == "ok"
    assert not [f for f in healthy["findings"] if f["severity"] == "warning"]
    out = tmp_path / "tight"
    capsys.readouterr()
    assert main(["diagnose", *BASE, "--grad-clip", "1e-4", "--output-dir", str(out)]) == 0
    report = json.loads((out / "diagnosis_report.json").read_text())
    codes = [f["code"] for f in report["findings"]]
    assert report["status"] == "ok" and "always_clipped" in codes
    printed = capsys.readouterr().out
    assert "Findings:" in printed and "always_clipped" in printed
