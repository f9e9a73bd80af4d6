"""The plugin API from a user's side: a model file outside the repository, ``--model`` specs,
presets and ``--set``, defaults for the optional fields, one place for thresholds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

import jaxstab
from jaxstab import diagnose as diag
from jaxstab import plugin, registry
from jaxstab.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
USER_MODEL = next(
    b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "# my_model.py" in b
)


def _cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "jaxstab", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": ""},
    )


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    assert not str(d).startswith(str(ROOT))
    (d / "my_model.py").write_text(USER_MODEL)
    return d


def test_readme_user_model_trains_from_a_file_outside_the_repository(user_dir):
    cmd = re.search(r"jaxstab (diagnose --model my_model\.py:ENTRY[^\n]*)", README).group(1)
    proc = _cli([*cmd.split(), "--no-progress"], user_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((user_dir / "runs/mine/diagnosis_report.json").read_text())
    assert report["status"] == "ok"
    assert report["config"]["hidden"] == 16 and report["config"]["epochs"] == 2  # --set, preset
    assert report["config"]["preset"] == "small" and report["config"]["model"] == "my_model"
    params = {row["param"] for row in report["weight_changes"]}
    assert params == {"body/kernel", "body/bias", "head/kernel", "head/bias"}
    steps = 2 * int(np.ceil((512 - 51) / 32))  # 10 % held out, batch 32, 2 epochs
    assert report["steps_recorded"] == steps


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown model 'nosuch'; known models: cfmvc"),
        ("missing.py:ENTRY", "no such file missing.py"),
        ("my_model.py:NOPE", "no attribute 'NOPE'"),
        ("my_model.py:Config", "Config (a type) is not a jaxstab.ModelEntry"),
        ("no_such_package.mod:ENTRY", "no module named 'no_such_package'"),
        ("my_model.py:", "name the ModelEntry after the colon"),
    ],
)
def test_a_bad_model_spec_is_one_line_and_exit_2(user_dir, spec, message, capsys, monkeypatch):
    monkeypatch.chdir(user_dir)
    rc = main(["diagnose", "--model", spec, "--no-progress", "--output-dir", "out"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1, err
    assert not (user_dir / "out").exists()


def test_module_spec_and_name_give_the_same_entry():
    assert registry.get("jaxstab.models.cfmvc.train:ENTRY") is registry.get("cfmvc")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "hiden=3"],
            "--set hiden: unknown key; valid keys: batch_size, epochs, explosion_norm, grad_clip, "
            "hidden, lr, seed, weight_decay",
        ),
        (["--set", "hidden=big"], "--set hidden=big: not a valid int"),
        (["--set", "hidden"], "expected key=value"),
        (["--preset", "huge"], "has no preset 'huge'; presets: default, small"),
        (["--stage", "flow"], "has no stage 'flow'; it has: all"),
        (["--set", "lr=-1"], "--lr must be a finite number > 0"),
    ],
)
def test_bad_preset_set_or_stage_is_refused_before_any_step(user_dir, args, message, capsys):
    out = user_dir / "refused"
    rc = main(["diagnose", "--model", f"{user_dir}/my_model.py:ENTRY", *args,
               "--no-progress", "--output-dir", str(out)])  # fmt: skip
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def _user_module() -> dict:
    ns: dict = {}
    exec(USER_MODEL, ns)
    return ns


def _four_field_entry(**kw) -> jaxstab.ModelEntry:
    ns = _user_module()
    return jaxstab.ModelEntry("four", ns["build_model"], ns["loss_fn"], ns["default_data"], **kw)


def test_missing_optional_fields_get_defaults():
    entry = _four_field_entry()
    cfg = plugin.run_config(entry)
    assert {k: cfg[k] for k in plugin.TRAIN_DEFAULTS} == plugin.TRAIN_DEFAULTS
    inner = plugin.inner_optimizer(entry, cfg)
    ref = optax.adamw(cfg["lr"], weight_decay=cfg["weight_decay"])
    params = {"w": np.ones(3, np.float32)}
    grads = {"w": np.full(3, 0.5, np.float32)}
    ours, _ = inner.update(grads, inner.init(params), params)
    theirs, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_array_equal(np.asarray(ours["w"]), np.asarray(theirs["w"]))
    th = plugin.thresholds(entry, cfg)
    assert (th.total_warning, th.total_danger, th.group_warning) == (5.0, 10.0, 3.0)
    assert entry.stage().name == "all" and entry.stage().trainable is None


def test_python_diagnose_uses_the_entrys_thresholds_as_the_command_line_does(tmp_path):
    config = _user_module()["Config"].small()
    entry = _four_field_entry(
        config=config, thresholds={"total_warning": 0.25, "group_danger": 7.0}
    )
    job = diag.prepare(entry, None, str(tmp_path / "run"), {"epochs": 1})
    report = diag.diagnose(job, progress=False)
    assert report["thresholds"]["total_warning"] == 0.25
    assert report["thresholds"]["group_danger"] == 7.0
    cli = plugin.thresholds(entry, job.config, total_danger=None)
    assert report["thresholds"] == cli.as_dict()


def test_cfmvc_thresholds_come_from_its_config():
    entry = registry.get("cfmvc")
    th = plugin.thresholds(entry, plugin.run_config(entry))
    assert (th.total_warning, th.total_danger, th.explosion) == (1e3, 1e4, 1e5)


def test_model_entry_checks_its_fields():
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        jaxstab.ModelEntry("bad", print, None, print)
    with pytest.raises(TypeError, match="config must be a dataclass instance or a mapping"):
        jaxstab.ModelEntry("bad", print, print, print, config=3)


def test_a_stage_whose_frozen_group_gets_gradient_is_refused_before_training(tmp_path):
    ns = _user_module()
    head = jaxstab.Stage(name="head", trainable=("head",))  # the body still gets gradient
    entry = _four_field_entry(config=ns["Config"].small(), stages=(head,))
    job = diag.prepare(entry, None, str(tmp_path / "run"), {"epochs": 1})
    with pytest.raises(RuntimeError, match=r"stage 'head': gradient flow is wrong"):
        diag.diagnose(job, progress=False)
    assert not (tmp_path / "run").exists()
    fine_tune = jaxstab.Stage(name="head", trainable=("head",), check_flow=False)
    entry = _four_field_entry(config=ns["Config"].small(), stages=(fine_tune,))
    job = diag.prepare(entry, None, str(tmp_path / "run"), {"epochs": 1})
    report = diag.diagnose(job, progress=False)
    assert report["status"] == "ok"
    moved = {row["param"] for row in report["weight_changes"] if row["abs_change"] > 0}
    assert moved == {"head/kernel", "head/bias"}  # the frozen body did not move


def test_a_stage_trains_on_the_data_its_prepare_builds_from_the_model(tmp_path):
    from jaxstab.train import batching

    ns = _user_module()
    seen = []

    def first_32(model, dataset):
        seen.append(type(model).__name__)
        return jaxstab.Dataset({k: v[:32] for k, v in dataset.arrays.items()}, dataset.meta)

    stage = jaxstab.Stage(name="part", prepare=first_32)
    entry = _four_field_entry(config=ns["Config"].small(), stages=(stage,))
    job = diag.prepare(entry, None, str(tmp_path / "run"), {"epochs": 1, "batch_size": 8})
    assert len(job.dataset) > 50
    report = diag.diagnose(job, progress=False)
    assert seen and seen[0] != "NoneType"
    assert report["steps_applied"] == batching.steps_per_epoch(32, 8)  # 32 < 50: no eval split
    bad = jaxstab.Stage(name="bad", prepare=lambda model, dataset: dict(dataset.arrays))
    with pytest.raises(TypeError, match="stage 'bad': prepare must return a Dataset"):
        bad.data(None, job.dataset)
