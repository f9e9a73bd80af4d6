"""CFM-VC staged training: freezing, gradient-flow checks, loss decrease, plugin entry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxstab
from jaxstab import diagnose, plugin, registry
from jaxstab.models.cfmvc import (
    STAGES,
    CFMVCConfig,
    load_anndata,
    simulate,
    train_cfmvc,
    train_stage,
)
from jaxstab.models.cfmvc.losses import flow_loss
from jaxstab.models.cfmvc.train import ENTRY, build_model, feature_stats
from jaxstab.train.stages import check_gradient_flow, stage_optimizer

CONFIG = {"hidden_vae": 32, "hidden_ctx": 16, "hidden_flow": 32, "n_basis": 4, "dim_int": 8}


@pytest.fixture(scope="module")
def data():
    return load_anndata(simulate(512, 40, n_perturbations=3, seed=0))


@pytest.fixture(scope="module")
def trained(data):
    start = build_model(data, CONFIG, nnx.Rngs(params=1, dropout=2))
    out = train_cfmvc(
        data, stages=("vae", "flow"), epochs={"vae": 4, "flow": 4},
        batch_size=64, key=jax.random.key(0), model=start,
    )  # fmt: skip
    return start, out


def _group(model, name):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param)[name])


def _same(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


def test_training_lowers_the_loss(trained):
    _, out = trained
    for name in ("vae", "flow"):
        res = out.stages[name].fit
        assert res.status == "ok"
        losses = res.epoch_history["train_loss"]
        assert losses[-1] < 0.9 * losses[0], (name, losses)


def test_gradient_flow_reports(trained):
    _, out = trained
    vae, flow = out.stages["vae"].report, out.stages["flow"].report
    assert vae.ok and flow.ok
    assert vae.norms["flow"] == 0.0 and vae.norms["context_encoder"] == 0.0
    assert flow.norms["encoder"] == 0.0 and flow.norms["decoder"] == 0.0
    assert flow.norms["flow"] > 0.0 and flow.norms["context_encoder"] > 0.0


def test_each_stage_moves_only_its_groups(trained):
    start, out = trained
    after1 = out.stages["vae"].fit.model
    after2 = out.stages["flow"].fit.model
    for g in ("flow", "context_encoder"):
        assert _same(_group(start, g), _group(after1, g))
    for g in ("encoder", "decoder"):
        assert not _same(_group(start, g), _group(after1, g))
        assert _same(_group(after1, g), _group(after2, g))  # stage 2: VAE bit-identical
    for g in ("flow", "context_encoder"):
        assert not _same(_group(after1, g), _group(after2, g))


def test_joint_stage_reaches_every_group(trained, data):
    _, out = trained
    batch = {k: jnp.asarray(v[:64]) for k, v in data.arrays.items()}
    joint = STAGES["joint"]
    report = check_gradient_flow(
        out.model, joint.loss_fn, batch, joint.trainable, jax.random.key(5)
    )
    assert report.ok
    assert all(report.norms[g] > 0.0 for g in ("encoder", "decoder", "context_encoder", "flow"))


def test_frozen_groups_get_zero_updates_despite_gradient_and_decay():
    tx = stage_optimizer(optax.adamw(1e-3, weight_decay=0.1), STAGES["flow"].trainable)
    params = {g: {"w": jnp.ones(3)} for g in ("encoder", "context_encoder", "flow")}
    grads = {"encoder": {"w": jnp.full(3, 5.0)}, "context_encoder": {"w": jnp.zeros(3)},
             "flow": {"w": jnp.full(3, 5.0)}}  # fmt: skip
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.all(np.asarray(updates["encoder"]["w"]) == 0.0)
    assert np.all(np.asarray(updates["flow"]["w"]) != 0.0)
    stats = jaxstab.read_stats(state)
    assert float(stats["clip/pre_norm"]) == pytest.approx(np.sqrt(3 * 25.0), rel=1e-6)


def test_wrong_trainable_set_is_refused(data):
    model = build_model(data, CONFIG, nnx.Rngs(0))
    # the context encoder gets gradient from the flow loss but this stage freezes it
    bad = jaxstab.Stage(name="flow-only", trainable=("flow",), loss_fn=flow_loss)
    with pytest.raises(RuntimeError, match="context_encoder"):
        train_stage(model, data, bad, key=jax.random.key(0), epochs=1)


def test_generation_after_training(trained):
    from jaxstab.models.cfmvc import generate_expression

    out = generate_expression(
        trained[1].model, jnp.array([-1, 0, 1, 2]), jnp.zeros(4, int), jnp.zeros(4, int),
        key=jax.random.key(0),
    )  # fmt: skip
    assert np.all(np.isfinite(out.expression)) and int(out.n_replaced) == 0


def test_plugin_entry(data):
    assert registry.get("cfmvc") is ENTRY
    assert set(ENTRY.presets) == {"default", "original", "small"}
    assert [s.name for s in ENTRY.stages] == ["vae", "flow", "joint"]
    model = ENTRY.build_model(data, CFMVCConfig.default().replace(**CONFIG), nnx.Rngs(0))
    batch = {k: jnp.asarray(v[:16]) for k, v in data.arrays.items()}
    loss, aux = nnx.jit(ENTRY.stage().loss_fn)(model, batch, jax.random.key(0))
    assert set(aux) == {"nll", "kl"}
    assert float(loss) == pytest.approx(float(aux["nll"] + aux["kl"]), rel=1e-6)
    assert ENTRY.config.explosion_norm > 100.0


def test_command_line_and_python_train_stage_one_with_the_same_chain(data):
    """``jaxstab diagnose --model cfmvc`` and ``train_stage(..., "vae")``: one optimizer chain,
    the same recorded groups and norms for the same gradient (the guard inside the freezing)."""
    cfg = plugin.run_config(ENTRY) | {"stage": "vae"}
    cli_tx = diagnose.optimizer(ENTRY, cfg, guard=True)
    mc = ENTRY.config
    py_tx = stage_optimizer(
        optax.adamw(mc.lr, weight_decay=mc.weight_decay), STAGES["vae"].trainable, clip=mc.grad_clip
    )
    model = ENTRY.build_model(data, CFMVCConfig.small(), nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    out = []
    for tx in (cli_tx, py_tx):
        updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
        out.append((updates, jaxstab.read_stats(state)))
    (u_cli, s_cli), (u_py, s_py) = out
    assert set(s_cli) == set(s_py)
    groups = {k.removeprefix("grad/norm/") for k in s_cli if k.startswith("grad/norm/")}
    assert groups == {"encoder", "decoder"}  # frozen groups are not part of the clip or report
    n_vae = sum(p.size for g in ("encoder", "decoder") for p in jax.tree.leaves(params[g]))
    expected = 0.5 * np.sqrt(n_vae)
    assert float(s_cli["grad/global_norm"]) == pytest.approx(expected, rel=1e-5)
    for k in s_cli:
        np.testing.assert_array_equal(np.asarray(s_cli[k]), np.asarray(s_py[k]), err_msg=k)
    for a, b in zip(jax.tree.leaves(u_cli), jax.tree.leaves(u_py), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(u_cli["flow"]))


def test_feature_stats(data):
    batch = {k: jnp.asarray(v[:32]) for k, v in data.arrays.items()}
    stats = jax.jit(feature_stats)(batch)
    assert len(stats) <= 36
    x = np.asarray(data.arrays["x"][:32], np.float64)
    assert float(stats["library_mean"]) == pytest.approx(x.sum(1).mean(), rel=1e-5)
    assert float(stats["x_col2_max"]) == pytest.approx(np.log1p(x[:, 2]).max(), rel=1e-5)
    assert float(stats["x_col0_std"]) == pytest.approx(np.log1p(x[:, 0]).std(), rel=1e-4)


def test_default_data_is_small():
    ds = ENTRY.default_data(0)
    assert ds.arrays["x"].shape == (2000, 500)
    assert ds.meta["n_perturbations"] == 5
