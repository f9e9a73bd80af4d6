"""``jaxstab.Recorder`` on plain optax loops: the CLI's report files, the stop checks, a loop
that raises, scan chunks, and the origin of a NaN replayed from a model file outside the
package."""

from __future__ import annotations

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab
from jaxstab.report import artifacts


def _loop(out, *, steps=30, lr=0.05, clip=1.0, bad_step=None, **kw):
    """A two-layer regression trained with the guard; ``bad_step`` feeds a NaN batch."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    y = x @ jnp.arange(1.0, 5.0)
    params = {"enc": {"w": jnp.full((4, 8), 0.1)}, "head": {"w": jnp.full((8,), 0.1)}}
    tx = jaxstab.stability_guard(optax.adam(lr), clip=clip)
    state = tx.init(params)

    def loss_fn(p, xb, yb):
        return jnp.mean((jnp.tanh(xb @ p["enc"]["w"]) @ p["head"]["w"] - yb) ** 2)

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    with jaxstab.Recorder(out, clip=clip, **kw) as rec:
        for t in range(steps):
            xb = x.at[0, 0].set(jnp.nan) if t == bad_step else x
            params, state, loss = step(params, state, xb, y)
            stats = jax.device_get(jaxstab.read_stats(state))
            rec.record(t, stats, loss=loss, lr=0.05, params=params,
                       inputs={"x_max": jnp.max(xb)})  # fmt: skip
            if rec.should_stop:
                break
    return rec


def test_writes_the_cli_report_files(tmp_path):
    out = tmp_path / "run"
    rec = _loop(out)
    assert set(artifacts.FILES) <= set(os.listdir(out))
    report = json.loads((out / "diagnosis_report.json").read_text())
    assert report["status"] == "ok" and report["steps_recorded"] == 30
    assert report["command"] == "record" and isinstance(report["findings"], list)
    header = (out / "gradient_stats.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "epoch", "loss", "lr", "total_grad_norm"]
    assert {"grad_norm:enc", "grad_norm:head"} <= set(header)
    assert "x_max" in (out / "input_features.csv").read_text().splitlines()[0]
    assert report["weight_changes"] and report["weight_changes"][0]["relative_change"] > 0
    assert rec.report == report


def test_a_nonfinite_loss_stops_and_the_report_says_so(tmp_path):
    rec = _loop(tmp_path / "run", bad_step=7)
    assert rec.should_stop and rec.stop_step == 7 and rec.status == "nonfinite"
    report = json.loads((tmp_path / "run" / "diagnosis_report.json").read_text())
    assert report["status"] == "nonfinite" and report["steps_recorded"] == 8
    assert report["summary"]["nonfinite_loss_steps"] == 1


def test_explosion_level_stops(tmp_path):
    from jaxstab.report.thresholds import Thresholds

    rec = _loop(tmp_path / "run", thresholds=Thresholds(explosion=1e-3))
    assert rec.status == "explosion" and rec.stop_step == 0


def test_a_loop_that_raises_still_leaves_a_readable_report(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyError), jaxstab.Recorder(out) as rec:
        for t in range(5):
            rec.record(t, {"grad/global_norm": 1.0 + t}, loss=1.0 / (t + 1))
        raise KeyError("batch")
    report = json.loads((out / "diagnosis_report.json").read_text())
    assert report["steps_recorded"] == 5 and "KeyError" in report["error"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left


def test_only_the_global_norm_still_gives_a_report(tmp_path):
    with jaxstab.Recorder(tmp_path / "run", record_every=2) as rec:
        for t in range(10):
            rec.record(t, {"grad/global_norm": np.float32(2.0)}, loss=np.float32(1.0))
    assert rec.report["steps_recorded"] == 5
    assert rec.report["recorded_steps"] == [0, 2, 4, 6, 8]


def test_stacked_scan_chunks(tmp_path):
    norms = np.r_[np.ones(8), np.full(4, 1e4)].astype(np.float32)
    with jaxstab.Recorder(tmp_path / "run") as rec:
        for c in range(3):
            chunk = slice(4 * c, 4 * c + 4)
            rec.record(4 * c, {"grad/global_norm": norms[chunk]}, loss=np.ones(4))
            if rec.should_stop:
                break
    assert rec.stop_step == 8 and rec.report["steps_recorded"] == 9


def test_bad_records_name_the_statistic(tmp_path):
    rec = jaxstab.Recorder(tmp_path / "run")
    with pytest.raises(ValueError, match="no 'grad/global_norm'"):
        rec.record(0, {"clip/clipped": True}, loss=1.0)
    with pytest.raises(ValueError, match=r"'grad/norm/a' must be shape \(3,\)"):
        rec.record(0, {"grad/global_norm": np.ones(3), "grad/norm/a": np.ones(2)},
                   loss=np.ones(3))  # fmt: skip
    with pytest.raises(ValueError, match="record_every"):
        jaxstab.Recorder(tmp_path / "other", record_every=0)


def test_an_earlier_report_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "run"
    with jaxstab.Recorder(out) as rec:
        rec.record(0, {"grad/global_norm": 1.0}, loss=1.0)
    with pytest.raises(ValueError, match="already holds a record run"):
        jaxstab.Recorder(out)
    with jaxstab.Recorder(out, overwrite=True) as rec:
        rec.record(0, {"grad/global_norm": 1.0}, loss=2.0)
    assert json.loads((out / "diagnosis_report.json").read_text())["summary"]["final_loss"] == 2.0


MODEL = """
import jax.numpy as jnp


def forward_nan(p, x):
    h = x @ p["w"]
    return jnp.sum(jnp.sqrt(h - 10.0))


def backward_nan(p, x):
    return jnp.linalg.norm(p["w"] * 0.0) + jnp.sum(x)
"""


@pytest.fixture
def user_model(tmp_path):
    import importlib.util

    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(MODEL))
    spec = importlib.util.spec_from_file_location(f"my_model_{tmp_path.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, str(path)


def _line(path: str, text: str) -> int:
    return next(i for i, ln in enumerate(open(path), 1) if text in ln)


@pytest.mark.parametrize(
    ("fn", "text", "pass_"),
    [("forward_nan", "jnp.sqrt", "forward"), ("backward_nan", "jnp.linalg.norm", "backward")],
)
def test_replay_names_the_origin_of_the_nan(tmp_path, user_model, fn, text, pass_):
    mod, path = user_model
    loss_fn = getattr(mod, fn)
    grad_fn = jax.value_and_grad(loss_fn)
    p, x = {"w": jnp.ones((2, 2))}, jnp.ones((3, 2))
    with jaxstab.Recorder(tmp_path / "run", replay=grad_fn) as rec:
        loss, g = grad_fn(p, x)
        norm = optax.tree.norm(g)
        rec.record(0, {"grad/global_norm": norm}, loss=loss, replay_args=(p, x))
    assert rec.status == "nonfinite"
    found = [f for f in rec.report["findings"] if f["code"] == "nonfinite_origin"]
    assert len(found) == 1, rec.report["findings"]
    ev = found[0]["evidence"]
    assert ev["file"] == path and ev["line"] == _line(path, text)
    assert ev["pass"] == pass_
    assert rec.report["nonfinite_origin"]["line"] == ev["line"]
