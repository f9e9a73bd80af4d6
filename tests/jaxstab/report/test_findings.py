"""Findings, each from a small planted run recorded by ``jaxstab.Recorder`` (a healthy run has
no warning), and the rules' edges on planted tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxstab
from jaxstab.report import findings as F
from jaxstab.report.thresholds import Thresholds

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(64, 4)), jnp.float32)
Y = jnp.tanh(X @ jnp.asarray([0.5, -0.3, 0.2, 0.1]))


def _params(scale: float = 0.1) -> dict:
    return {"enc": {"w": jnp.full((4, 8), scale)}, "head": {"w": jnp.full((8,), scale)}}


def _mlp(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["enc"]["w"]) @ p["head"]["w"] - y) ** 2)


def _run(tmp_path, *, loss_fn=_mlp, params=None, tx=None, steps=40, batch=None, name="run",
         **rec_kw):  # fmt: skip
    """Trains ``loss_fn`` with ``tx`` (default the guard around Adam, no clip) for ``steps``
    steps, recording every one; ``batch(t)`` gives step t's inputs. Returns the codes found."""
    params = _params() if params is None else params
    tx = tx or jaxstab.stability_guard(optax.adam(1e-2), clip=None)
    state = tx.init(params)

    @jax.jit
    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    with jaxstab.Recorder(tmp_path / name, **rec_kw) as rec:
        for t in range(steps):
            x, y = batch(t) if batch else (X, Y)
            params, state, loss = step(params, state, x, y)
            stats = jax.device_get(jaxstab.read_stats(state))
            rec.record(t, stats, loss=loss, params=params, inputs={"x_absmax": jnp.abs(x).max()})
            if rec.should_stop:
                break
    return rec.report, {f["code"]: f for f in rec.report["findings"]}


def test_a_healthy_run_has_no_warning(tmp_path):
    report, found = _run(tmp_path, clip=100.0)
    assert report["status"] == "ok"
    assert not [f for f in found.values() if f["severity"] != "info"], found


def test_always_clipped(tmp_path):
    tx = jaxstab.stability_guard(optax.adam(1e-2), clip=1e-4)
    _, found = _run(tmp_path, tx=tx)  # the clip level is read off the clip's statistics
    ev = found["always_clipped"]["evidence"]
    assert ev["share"] == 1.0 and ev["median_norm"] > 1e-4
    np.testing.assert_allclose(ev["clip"], 1e-4, rtol=1e-5)
    assert ev["suggested_clip"] >= ev["median_norm"]
    assert "clip=None" in found["always_clipped"]["message"]


def test_dead_group(tmp_path):
    params = {**_params(), "unused": {"w": jnp.ones(3)}}
    _, found = _run(tmp_path, params=params)
    assert found["dead_group"]["evidence"] == {"group": "unused", "zero_share": 1.0}
    # A group that does not train in this stage is not dead.
    _, found = _run(tmp_path / "b", params=params, trainable=["enc", "head"])
    assert "dead_group" not in found


def test_frozen_group_moves(tmp_path):
    _, found = _run(tmp_path, frozen=["head"])
    f = found["frozen_group_moves"]
    assert f["severity"] == "critical" and f["evidence"]["group"] == "head"
    assert f["evidence"]["relative_change"] > 0
    # Frozen for real: the optimizer masks it, and nothing is found.
    masked = optax.multi_transform(
        {"train": jaxstab.stability_guard(optax.adam(1e-2), clip=None),
         "frozen": optax.set_to_zero()},
        {"enc": {"w": "train"}, "head": {"w": "frozen"}},
    )  # fmt: skip
    _, found = _run(tmp_path / "b", tx=masked, frozen=["head"])
    assert "frozen_group_moves" not in found


def test_group_dominates(tmp_path):
    def lopsided(p, x, y):
        return _mlp(p, x, y) + 10.0 * jnp.sum(p["enc"]["w"])  # a constant, large enc gradient

    _, found = _run(tmp_path, loss_fn=lopsided)
    f = found["group_dominates"]
    assert f["severity"] == "info" and f["evidence"]["group"] == "enc"
    assert f["evidence"]["share"] > 0.9


def test_norm_growth_before_the_stop(tmp_path):
    def quadratic(p, x, y):  # gradient descent on 10 w² with lr 0.12 doubles w every step
        return 10.0 * jnp.sum(p["w"] ** 2) + 0.0 * jnp.sum(x)

    report, found = _run(tmp_path, loss_fn=quadratic, params={"w": jnp.ones(4)},
                         tx=jaxstab.stability_guard(optax.sgd(0.12), clip=None), steps=60,
                         thresholds=Thresholds(explosion=1e9))  # fmt: skip
    assert report["status"] == "explosion"
    assert found["norm_growth"]["evidence"]["factor"] > 100


def test_input_jump_at_the_first_anomaly(tmp_path):
    def batch(t):
        return (X * 1e3, Y) if t == 25 else (X, Y)

    report, found = _run(tmp_path, batch=batch, steps=30)
    assert report["first_anomaly_step"] == 25
    ev = found["input_jump"]["evidence"]
    assert ev == {"step": 25, "features": ["x_absmax"]}


def test_lr_too_high_from_a_run_with_too_large_a_learning_rate(tmp_path):
    # log_update_ratio, last in the chain, records the step's size relative to the params.
    def tx(lr):
        return optax.chain(
            jaxstab.stability_guard(optax.adam(lr), clip=None), jaxstab.log_update_ratio()
        )

    _, found = _run(tmp_path, tx=tx(0.5), name="high")
    assert found["lr_too_high"]["evidence"]["median_ratio"] > F.LR_RATIO
    _, found = _run(tmp_path, tx=tx(1e-3), name="usual")
    assert "lr_too_high" not in found


def test_lr_too_high_reads_the_update_parameter_ratio():
    table = {"total_grad_norm": np.ones(20)}
    assert F.lr_too_high({F.UPDATE_PARAM_RATIO: np.full(20, 1e-3)}) == []
    (f,) = F.find_findings(table, history={F.UPDATE_PARAM_RATIO: np.full(20, 0.3)})
    assert f["code"] == "lr_too_high" and f["evidence"]["median_ratio"] == 0.3


def test_rules_need_enough_steps_and_order_by_severity():
    short = {"total_grad_norm": np.full(5, 40.0), "clipped": np.ones(5, int)}
    assert F.always_clipped(short, 1.0) == []
    table = {"total_grad_norm": np.full(30, 40.0), "clipped": np.ones(30, int),
             "grad_norm:a": np.full(30, 40.0), "grad_norm:b": np.full(30, 0.1)}  # fmt: skip
    found = F.find_findings(table, clip=1.0, frozen_moves={"b": 0.5})
    assert [f["code"] for f in found] == ["frozen_group_moves", "always_clipped",
                                          "group_dominates"]  # fmt: skip
    assert {f["code"] for f in found} <= set(F.CODES)
    assert all(set(f) == {"code", "severity", "message", "evidence"} for f in found)


def test_compare_lists_the_findings_of_each_run(tmp_path):
    from rich.console import Console

    from jaxstab.report import compare

    params = {**_params(), "unused": {"w": jnp.ones(3)}}
    _run(tmp_path, params=params, steps=12, name="dead")
    _run(tmp_path, steps=12, clip=100.0, name="fine")
    console = Console(record=True, width=300)
    runs = compare.compare([tmp_path / "dead", tmp_path / "fine"], tmp_path / "c.png",
                           console=console)  # fmt: skip
    text = console.export_text()
    row = next(ln for ln in text.splitlines() if "finding: dead_group" in ln)
    assert [c.strip() for c in row.split("│")[1:-1]] == ["finding: dead_group", "warning", "-"]
    text = compare.findings_text(runs)
    assert "dead:\n  [warning] dead_group: Group 'unused'" in text
    assert "dead_group" not in text.split("fine:")[1]


def test_findings_are_drawn_on_the_diagnostics_figure(tmp_path, monkeypatch):
    from jaxstab.report import plots

    drawn = []
    original = plots._mark_findings

    def spy(axes, found):
        drawn.append(list(found))
        original(axes, found)

    monkeypatch.setattr(plots, "_mark_findings", spy)

    def batch(t):
        return (X * 1e3, Y) if t == 25 else (X, Y)

    report, found = _run(tmp_path, batch=batch, steps=30)
    assert [f["code"] for f in drawn[0]] == [f["code"] for f in report["findings"]]
    assert (tmp_path / "run" / "diagnostics.png").stat().st_size > 0
    assert found["input_jump"]["evidence"]["step"] == 25
