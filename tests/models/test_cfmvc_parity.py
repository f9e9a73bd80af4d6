"""The Flax port against the PyTorch version: same weights, same inputs, same numbers."""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks.torch_ref import cfmvc as tref
from jaxstab import numerics
from jaxstab.models.cfmvc import CFMVC, CFMVCConfig, load_anndata, simulate
from jaxstab.models.cfmvc.losses import flow_terms, nb_log_prob_eps, vae_terms

N_GENES, N_BATCH, N_CT, N_PERT, B = 60, 2, 3, 4, 16
SIZES = {"hidden_vae": 64, "hidden_ctx": 32, "hidden_flow": 48, "n_basis": 6}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module", params=["default", "original"])
def pair(request):
    config = getattr(CFMVCConfig, request.param)().replace(**SIZES)
    torch.manual_seed(0)
    tm = tref.CFMVCModel(N_GENES, N_BATCH, N_CT, N_PERT, config, spatial_dim=2)
    tm.eval()  # dropout off on both sides
    # Non-zero biases and dispersions, so the converter's handling of every leaf matters.
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("bias") or name.endswith("log_theta"):
                p.normal_(0.0, 0.1)
    model = CFMVC(N_GENES, N_BATCH, N_CT, N_PERT, config, rngs=nnx.Rngs(1), spatial_dim=2)
    tref.torch_state_dict_to_nnx(tm.state_dict(), model)
    model.eval()
    data = load_anndata(simulate(64, N_GENES, N_PERT, N_BATCH, N_CT, spatial=True, seed=3))
    batch = {k: v[:B] for k, v in data.arrays.items()}
    batch["p"][0] = 0.0  # a control cell
    return tm, model, batch


def torch_batch(batch):
    return (
        torch.tensor(batch["x"]),
        torch.tensor(batch["p"]),
        torch.tensor(batch["batch"], dtype=torch.long),
        torch.tensor(batch["cell_type"], dtype=torch.long),
        torch.tensor(batch["spatial"]),
    )


def fixed_noise(seed: int):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(B, 32)).astype(np.float32),
        rng.normal(size=(B, 8)).astype(np.float32),
        rng.normal(size=(B, 32)).astype(np.float32),
        rng.uniform(size=B).astype(np.float32),
    )


def test_soft_clip_is_the_same_function():
    x = np.linspace(-80, 80, 1001, dtype=np.float32)
    ours = np.asarray(numerics.soft_clip(jnp.asarray(x), -10.0, 10.0))
    theirs = tref.soft_clip(torch.tensor(x), -10.0, 10.0).numpy()
    assert rel_err(theirs, ours) < 1e-6


def test_converter_copies_every_parameter(pair):
    tm, model, _ = pair
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    sd = tm.state_dict()
    assert len(flat) == len(sd)
    np.testing.assert_array_equal(
        np.asarray(flat[("encoder", "fc1", "kernel")][...]), sd["encoder.fc1.weight"].numpy().T
    )
    np.testing.assert_array_equal(
        np.asarray(flat[("context_encoder", "spatial_mlp", "layers", 2, "bias")][...]),
        sd["context_encoder.spatial_mlp.2.bias"].numpy(),
    )
    np.testing.assert_array_equal(
        np.asarray(flat[("encoder", "ct_emb", "embedding")][...]),
        sd["encoder.ct_emb.weight"].numpy(),
    )


def test_converter_rejects_mismatches(pair):
    tm, model, _ = pair
    sd = dict(tm.state_dict())
    missing = {k: v for k, v in sd.items() if k != "flow.alpha_head.weight"}
    with pytest.raises(KeyError, match=r"flow\.alpha_head\.weight"):
        tref.torch_state_dict_to_nnx(missing, copy.deepcopy(model))
    extra = {**sd, "flow.extra.weight": torch.zeros(2)}
    with pytest.raises(KeyError, match=re.escape("flow.extra.weight")):
        tref.torch_state_dict_to_nnx(extra, copy.deepcopy(model))
    wrong = {**sd, "decoder.log_theta": torch.zeros(N_GENES + 1)}
    with pytest.raises(ValueError, match=re.escape("decoder.log_theta")):
        tref.torch_state_dict_to_nnx(wrong, copy.deepcopy(model))


def test_forward_parity(pair):
    tm, model, batch = pair
    x, p, b, c, s = torch_batch(batch)
    eps_i, eps_t, z0, t = fixed_noise(0)
    with torch.no_grad():
        enc_t = tm.encoder(x, b, c)
        loss_t, nll_t, kl_t = tm.vae_forward(x, b, c, torch.tensor(eps_i), torch.tensor(eps_t))
        ctx_t, alpha_t = tm.context_encoder(p, b, c, s)
        zero = torch.zeros(B, 32)  # a 'sample' target with eps = 0 is the mean
        _, v_t = tm.flow_step(x, p, b, c, torch.tensor(z0), torch.tensor(t), s, zero)
        mu = enc_t[0] + torch.tensor(eps_i) * torch.exp(0.5 * enc_t[1])
        sig = enc_t[2] + torch.tensor(eps_t) * torch.exp(0.5 * enc_t[3])
        mean_t, theta_t = tm.decoder(mu, sig)
        exact = model.config.nb_likelihood == "exact"
        ll_t = tref.nb_log_likelihood(x, mean_t, theta_t, exact=exact)

    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    @nnx.jit
    def forward(model, jb, mu, sig, eps_i, eps_t, z0, t):
        enc = model.encoder(jb["x"], jb["batch"], jb["cell_type"])
        mean, theta = model.decoder(mu, sig)
        nb = numerics.nb_log_prob if model.config.nb_likelihood == "exact" else nb_log_prob_eps
        ll = jnp.sum(nb(jb["x"], mean, theta), -1)
        ctx, alpha = model.context_encoder(jb["p"], jb["batch"], jb["cell_type"], jb["spatial"])
        loss, aux = vae_terms(model, jb, eps_i, eps_t)
        z_t = (1 - t)[:, None] * z0 + t[:, None] * enc.int_mean
        v = model.velocity(z_t, t, jb["p"], jb["batch"], jb["cell_type"], jb["spatial"])
        return enc, mean, ll, ctx, alpha, loss, aux, v

    args = [mu.numpy(), sig.numpy(), eps_i, eps_t, z0, t]
    enc, mean, ll, ctx, alpha, loss, aux, v = forward(model, jb, *map(jnp.asarray, args))
    for ours, theirs in zip(enc, enc_t, strict=True):
        assert rel_err(ours, theirs.numpy()) < 1e-5
    assert rel_err(mean, mean_t.numpy()) < 1e-5
    assert rel_err(ll, ll_t.numpy()) < 1e-5
    assert rel_err(ctx, ctx_t.numpy()) < 1e-5
    assert rel_err(alpha, alpha_t.numpy()) < 1e-5
    if model.config.alpha_gating and model.config.control_encoding == "zero":
        assert float(jnp.abs(alpha[0]).max()) == 0.0  # control row, both sides
        assert float(alpha_t[0].abs().max()) == 0.0
    assert rel_err(loss, loss_t.numpy()) < 1e-5
    assert rel_err(aux["nll"], nll_t.numpy()) < 1e-5
    assert rel_err(aux["kl"], kl_t.numpy()) < 1e-5
    assert rel_err(v, v_t.numpy()) < 1e-5


def _assert_grads_close(ours, theirs, groups):
    ours = dict(nnx.to_flat_state(ours))
    checked = 0
    for path, g_t in theirs.items():
        if path[0] not in groups:
            continue
        err = rel_err(ours[path][...], g_t[...])
        assert err < 1e-4, (path, err)
        checked += 1
    assert checked > 0


def test_vae_loss_and_gradient_parity(pair):
    tm, model, batch = pair
    x, _, b, c, _ = torch_batch(batch)
    eps_i, eps_t, _, _ = fixed_noise(1)
    tm.zero_grad()
    loss_t, _, _ = tm.vae_forward(x, b, c, torch.tensor(eps_i), torch.tensor(eps_t))
    loss_t.backward()
    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(m):
        return vae_terms(m, jb, jnp.asarray(eps_i), jnp.asarray(eps_t))[0]

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    assert rel_err(loss, loss_t.detach().numpy()) < 1e-5
    _assert_grads_close(grads, tref.torch_grads_to_nnx(tm, model), {"encoder", "decoder"})


def test_flow_loss_and_gradient_parity(pair):
    tm, model, batch = pair
    x, p, b, c, s = torch_batch(batch)
    _, _, z0, t = fixed_noise(2)
    tm.zero_grad()
    eps = np.random.default_rng(5).normal(size=(B, 32)).astype(np.float32)
    loss_t, _ = tm.flow_step(x, p, b, c, torch.tensor(z0), torch.tensor(t), s, torch.tensor(eps))
    loss_t.backward()
    assert all(q.grad is None or not q.grad.any() for q in tm.encoder.parameters())
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    z0_j, t_j = jnp.asarray(z0), jnp.asarray(t)
    eps_j = jnp.asarray(eps)
    loss, grads = nnx.jit(nnx.value_and_grad(lambda m: flow_terms(m, jb, z0_j, t_j, eps_j)[0]))(
        model
    )
    assert rel_err(loss, loss_t.detach().numpy()) < 1e-5
    _assert_grads_close(grads, tref.torch_grads_to_nnx(tm, model), {"context_encoder", "flow"})
    enc_grads = jax.tree.leaves(grads["encoder"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in enc_grads)
