"""Side-chain model: shapes, equivariance, masking, losses, gradients, training, config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxstab.models.sidechain.config import (
    DEVIATIONS,
    SideChainConfig,
    atom_weight_table,
)
from jaxstab.models.sidechain.crop import center_crop
from jaxstab.models.sidechain.data import default_data
from jaxstab.models.sidechain.losses import TERMS, loss_terms, sidechain_loss
from jaxstab.models.sidechain.model import SideChainModel, design_mask
from jaxstab.models.sidechain.rigid import quaternion_to_rotation

L = 24


@pytest.fixture(scope="module")
def batch():
    arrays = {k: v[:2] for k, v in default_data("val").arrays.items()}
    out = {k: jnp.asarray(v) for k, v in center_crop(arrays, L).items()}
    out["design_mask"] = design_mask(jax.random.key(1), out["residue_mask"], 0.5, 1.0)
    return out


@pytest.fixture(scope="module")
def model():
    return SideChainModel(SideChainConfig.small(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    # Perturbed weights: at initialisation the zero-initialised heads and updates put every
    # designed atom on its CA, which would make the geometric tests trivial.
    graphdef, state = nnx.split(model)

    @jax.jit
    def perturb(state):
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        leaves = [
            x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x
            for x, k in zip(leaves, keys, strict=True)
        ]  # fmt: skip
        return jax.tree.unflatten(treedef, leaves)

    state = perturb(state)

    @jax.jit
    def fwd(state, batch):
        return nnx.merge(graphdef, state)(batch)

    return lambda b: fwd(state, b)


def _rotation(seed: int) -> jax.Array:
    q = jax.random.normal(jax.random.key(seed), (4,))
    return quaternion_to_rotation(q)


def test_output_shapes_and_backbone_copied(forward, batch):
    out = forward(batch)
    assert out["atom14_pos"].shape == (2, L, 14, 3)
    assert out["aatype_logits"].shape == (2, L, 21)
    assert out["sidechain_local"].shape == (2, L, 10, 3)
    assert out["gaussian"].local_mean.shape == (2, L, 3)
    assert bool(jnp.all(jnp.isfinite(out["atom14_pos"])))
    res = batch["residue_mask"][..., None, None] > 0
    ok = batch["atom14_mask"][..., :4, None] > 0
    np.testing.assert_array_equal(
        jnp.where(res & ok, out["atom14_pos"][..., :4, :], 0),
        jnp.where(res & ok, batch["atom14_pos"][..., :4, :], 0),
    )


def test_equivariance(forward, batch):
    out = forward(batch)
    rot, shift = _rotation(3), jnp.array([12.0, -30.0, 7.5])
    moved = {**batch, "atom14_pos": batch["atom14_pos"] @ rot.T + shift}
    out2 = forward(moved)
    valid = (batch["residue_mask"] > 0)[..., None, None]
    expect = out["atom14_pos"] @ rot.T + shift
    err = jnp.max(jnp.abs(jnp.where(valid, out2["atom14_pos"] - expect, 0)))
    assert float(err) < 1e-3
    # the predicted atoms really moved off the CA (not a trivially equivariant output)
    side = out["sidechain_local"][batch["design_mask"]]
    assert float(jnp.max(jnp.abs(side))) > 0.1
    lerr = jnp.max(
        jnp.abs(jnp.where(valid[..., 0], out2["aatype_logits"] - out["aatype_logits"], 0))
    )
    assert float(lerr) < 1e-4


def test_padding_invariance(forward, batch):
    n = 20
    short = {k: (v[:, :n] if v.ndim >= 2 and v.shape[1] == L else v) for k, v in batch.items()}
    short["chain_length"] = jnp.minimum(batch["chain_length"], n)
    # L - n padded slots holding garbage positions, masked out
    padded = {}
    for k, v in short.items():
        if v.ndim >= 2 and v.shape[1] == n:
            pad = [(0, 0), (0, L - n)] + [(0, 0)] * (v.ndim - 2)
            padded[k] = jnp.pad(v, pad)
        else:
            padded[k] = v
    padded["atom14_pos"] = padded["atom14_pos"].at[:, n:].set(5.0)
    padded["aatype"] = padded["aatype"].at[:, n:].set(3)
    a, b = forward(short), forward(padded)
    valid = (short["residue_mask"] > 0)[..., None, None]
    np.testing.assert_allclose(
        jnp.where(valid, b["atom14_pos"][:, :n], 0), jnp.where(valid, a["atom14_pos"], 0),
        atol=2e-4,
    )  # fmt: skip
    np.testing.assert_allclose(
        jnp.where(valid[..., 0], b["aatype_logits"][:, :n], 0),
        jnp.where(valid[..., 0], a["aatype_logits"], 0), atol=1e-4,
    )  # fmt: skip
    assert bool(jnp.all(b["atom14_pos"][:, n:] == 0))


def test_designed_side_chains_do_not_leak(forward, batch):
    out = forward(batch)
    des = batch["design_mask"][..., None, None]
    noise = jax.random.normal(jax.random.key(5), batch["atom14_pos"].shape) * 3.0
    sc = jnp.arange(14)[None, None, :, None] >= 4
    changed = {
        **batch,
        "atom14_pos": jnp.where(des & sc, batch["atom14_pos"] + noise, batch["atom14_pos"]),
    }
    changed["aatype"] = jnp.where(batch["design_mask"], (batch["aatype"] + 7) % 20, batch["aatype"])
    out2 = forward(changed)
    np.testing.assert_array_equal(out["aatype_logits"], out2["aatype_logits"])
    np.testing.assert_array_equal(out["sidechain_local"], out2["sidechain_local"])
    # and the context residues' side chains do matter
    ctx = {
        **batch,
        "atom14_pos": jnp.where(~des & sc, batch["atom14_pos"] + noise, batch["atom14_pos"]),
    }
    assert float(jnp.max(jnp.abs(forward(ctx)["sidechain_local"] - out["sidechain_local"]))) > 0


def test_loss_terms_gradients_and_training(model, batch):
    cfg = model.config
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, batch):
        return sidechain_loss(nnx.merge(graphdef, params), batch, jax.random.key(0))

    opt = optax.adamw(3e-3)

    @jax.jit
    def train(params):
        # one compiled program: first loss, metrics and gradients, then 10 AdamW steps
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)

        def step(carry, _):
            params, opt_state = carry
            (value, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
            updates, opt_state = opt.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=10)
        return loss, metrics, grads, losses, loss_fn(params, batch)[0]

    loss, metrics, grads, losses, last = train(params)
    assert bool(jnp.isfinite(loss))
    weights = {n: getattr(cfg, f"w_{n}") for n in TERMS}
    total = 0.0
    for name in TERMS:
        assert bool(jnp.isfinite(metrics[name]))
        assert name == "nll" or float(metrics[name]) >= 0
        np.testing.assert_allclose(metrics[f"{name}_weighted"], weights[name] * metrics[name],
                                   rtol=1e-6)  # fmt: skip
        total += float(metrics[f"{name}_weighted"])
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    for i in range(4, 14):
        assert f"atom{i:02d}_mse" in metrics
    assert 0.0 <= float(metrics["seq_recovery"]) <= 1.0
    leaves = jax.tree.leaves_with_path(grads)
    bad = [jax.tree_util.keystr(p) for p, g in leaves if not bool(jnp.all(jnp.isfinite(g)))]
    assert not bad
    assert float(optax.tree.norm(grads)) > 0

    np.testing.assert_allclose(losses[0], loss, rtol=1e-5)
    assert float(last) < 0.9 * float(loss)


def test_loss_terms_reference_values(forward, batch, model):
    out = forward(batch)
    terms = jax.jit(loss_terms, static_argnums=2)
    # a perfect prediction of the coordinates gives mse = pair = huber = 0
    from jaxstab.models.sidechain.model import input_geometry

    rigid, _, pos, _, _ = input_geometry(batch, model.config)
    perfect = {**out, "sidechain_local": rigid.expand().invert_apply(pos[..., 4:14, :])}
    _, m = terms(perfect, batch, model.config)
    for name in ("mse", "pair", "huber"):
        assert float(m[name]) < 1e-8
    # atom weights: "exp" weighs far atoms more
    w = atom_weight_table("exp")
    assert w[-1] > w[0] > 1
    _, m_exp = terms(out, batch, model.config.replace(atom_weights="exp"))
    assert float(m_exp["mse"]) != float(terms(out, batch, model.config)[1]["mse"])


def test_per_atom_gaussians_and_esm(batch):
    cfg = SideChainConfig.small().replace(per_atom_gaussians=True, use_esm=True, n_blocks=1)
    model = SideChainModel(cfg, rngs=nnx.Rngs(1))
    b = dict(batch)
    b["esm_single"] = jnp.ones((2, L, cfg.esm_single_dim))
    b["esm_pair"] = jnp.ones((2, L, L, cfg.esm_pair_dim))
    loss, metrics = jax.jit(lambda b: sidechain_loss(model, b, jax.random.key(0)))(b)
    assert bool(jnp.isfinite(loss)) and bool(jnp.isfinite(metrics["nll"]))


def test_design_mask_share():
    res = jnp.ones((64, 50), bool).at[:, 40:].set(False)
    m = design_mask(jax.random.key(0), res, 0.5, 1.0)
    assert not bool(jnp.any(m[:, 40:]))
    share = jnp.mean(m[:, :40], axis=1)
    assert float(share.min()) > 0.3 and float(share.mean()) > 0.6


def test_config_presets():
    default, original, small = (SideChainConfig.default(), SideChainConfig.original(),
                                SideChainConfig.small())  # fmt: skip
    assert (default.c_s, default.c_z, default.n_blocks, default.n_heads) == (384, 128, 6, 8)
    assert (default.w_offset, default.w_nll, default.w_ce, default.lr) == (5.0, 3e-4, 0.01, 1e-4)
    diff = original.differences(default)
    assert set(diff) == set(DEVIATIONS)
    assert small.c_s == 32 and small.n_blocks == 2
    assert SideChainConfig.from_dict(small.to_dict()) == small
    with pytest.raises(ValueError):
        SideChainConfig(atom_weights="cubic")
    with pytest.raises(ValueError):
        SideChainConfig(mask_min=0.9, mask_max=0.5)
    with pytest.raises(KeyError):
        default.replace(c_q=3)
    assert default.replace(thickness_scale=2.0).thickness == (5.0, 1.0)
    assert dataclasses.is_dataclass(default)
