"""CFM-VC staged training: freezing, gradient-flow checks, loss decrease, registry entry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxstab
from jaxstab import registry
from models.cfmvc import STAGES, StageConfig, load_anndata, simulate, train_cfmvc, train_stage
from models.cfmvc.losses import flow_loss
from models.cfmvc.train import (
    ENTRY,
    build_model,
    check_gradient_flow,
    feature_stats,
    stage_optimizer,
)

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
    report = check_gradient_flow(out.model, batch, STAGES["joint"], jax.random.key(5))
    assert report.ok
    assert all(report.norms[g] > 0.0 for g in ("encoder", "decoder", "context_encoder", "flow"))


def test_frozen_groups_get_zero_updates_despite_gradient_and_decay():
    tx = stage_optimizer(STAGES["flow"].trainable, weight_decay=0.1)
    params = {"encoder": {"w": jnp.ones(3)}, "flow": {"w": jnp.ones(3)}}
    grads = {"encoder": {"w": jnp.full(3, 5.0)}, "flow": {"w": jnp.full(3, 5.0)}}
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.all(np.asarray(updates["encoder"]["w"]) == 0.0)
    assert np.all(np.asarray(updates["flow"]["w"]) != 0.0)
    stats = jaxstab.read_stats(state)
    assert float(stats["clip/pre_norm"]) == pytest.approx(np.sqrt(3 * 25.0), rel=1e-6)


def test_wrong_trainable_set_is_refused(data):
    model = build_model(data, CONFIG, nnx.Rngs(0))
    bad = StageConfig("flow-only", ("flow",), flow_loss)  # context gets gradient but is frozen
    with pytest.raises(RuntimeError, match="context_encoder"):
        train_stage(model, data, bad, key=jax.random.key(0), epochs=1)


def test_generation_after_training(trained):
    from models.cfmvc import generate_expression

    out = generate_expression(
        trained[1].model, jnp.array([-1, 0, 1, 2]), jnp.zeros(4, int), jnp.zeros(4, int),
        key=jax.random.key(0),
    )  # fmt: skip
    assert np.all(np.isfinite(out.expression)) and int(out.n_replaced) == 0


def test_registry_entry(data):
    assert registry.get("cfmvc") is ENTRY
    model = ENTRY.build_model(data, {**ENTRY.default_config, **CONFIG}, nnx.Rngs(0))
    batch = {k: jnp.asarray(v[:16]) for k, v in data.arrays.items()}
    loss, aux = nnx.jit(ENTRY.loss_fn)(model, batch, jax.random.key(0))
    assert set(aux) == {"nll", "kl"}
    assert float(loss) == pytest.approx(float(aux["nll"] + aux["kl"]), rel=1e-6)
    tx = ENTRY.optimizer(ENTRY.default_config)
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["flow"]))
    assert ENTRY.default_config["explosion_norm"] > 100.0


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
