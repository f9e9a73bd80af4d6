"""The seeds' failures, reproduced with their naive formulas and fixed by jaxstab.numerics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import nbinom

import jaxstab.numerics as N
from benchmarks.bench_numerics import seed_nb_log_prob


def _arccos_angle(a, b, c):
    u, v = a - b, c - b
    return jnp.arccos(jnp.dot(u, v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v)))


def test_seed000_angle_at_collinear_atoms():
    a, b, c = jnp.array([1.5, 0.0, 0.0]), jnp.zeros(3), jnp.array([-2.0, 0.0, 0.0])
    naive_grad = jax.jit(jax.grad(_arccos_angle, argnums=(0, 1, 2)))
    rev = jax.jit(jax.value_and_grad(N.bond_angle, argnums=(0, 1, 2)))
    fwd = jax.jit(jax.jacfwd(N.bond_angle, argnums=(0, 1, 2)))
    for end in (c, -c):  # straight (π) and folded back (0)
        assert any(not jnp.isfinite(g).all() for g in naive_grad(a, b, end))
        angle, grads = rev(a, b, end)
        assert all(jnp.isfinite(g).all() for g in (*grads, *fwd(a, b, end)))
        expected = np.pi if end is c else 0.0
        np.testing.assert_allclose(angle, expected, atol=1e-6)
    # A dihedral over the same collinear atoms is finite too.
    d = jnp.array([-2.0, 1.0, 0.0])
    grads = jax.grad(N.dihedral, argnums=(0, 1, 2, 3))(a, b, c, d)
    assert all(jnp.isfinite(g).all() for g in grads)


def testseed_nb_log_prob_loss_at_zero_mean():
    for theta in (1e-8, 1.0, 1e8):
        value, g_mean = jax.value_and_grad(N.nb_log_prob, argnums=1)(0.0, 0.0, theta)
        assert abs(float(value)) < 1e-30
        np.testing.assert_allclose(g_mean, -1.0, rtol=1e-6)  # −θ/(θ+μ) at μ = 0
        # The seed's clamp gives exactly zero gradient at μ = 0.
        assert float(jax.grad(seed_nb_log_prob, argnums=1)(0.0, 0.0, theta)) == 0.0
    # At θ = 1e8 the lgamma difference of the seed loses every digit; ours matches scipy.
    x, mu, theta = 3.0, 5.0, 1e8
    ref = nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(N.nb_log_prob(x, mu, theta), ref, rtol=1e-5)
    assert abs(float(seed_nb_log_prob(x, mu, theta)) - ref) > 1.0


def _seed004_kl(mu, logvar):
    logvar = jnp.minimum(logvar, 20.0)
    mu = jnp.clip(mu, -100.0, 100.0)
    return 0.5 * jnp.sum(mu**2 + jnp.exp(logvar) - 1 - logvar, axis=-1)


def test_seed004_kl_logvar_100():
    mu = jnp.array([[0.0, 1e4, -1e4]])
    lv = jnp.array([[100.0, -100.0, 0.0]])
    value, (g_mu, g_lv) = jax.value_and_grad(
        lambda a, b: N.gaussian_kl(a, b).sum(), argnums=(0, 1)
    )(mu, lv)
    assert jnp.isfinite(value) and jnp.isfinite(g_mu).all() and jnp.isfinite(g_lv).all()
    np.testing.assert_allclose(g_mu, mu, rtol=1e-6)  # exact, not clamped at ±100
    assert float(g_lv[0, 0]) > 1e30 and float(g_lv[0, 1]) == -0.5
    # Naive float32 overflows; the seed's clamp kills both gradients beyond its bounds.
    assert not jnp.isfinite(0.5 * jnp.sum(mu**2 + jnp.exp(lv) - 1 - lv))
    seed_g_mu, seed_g_lv = jax.grad(lambda a, b: _seed004_kl(a, b).sum(), (0, 1))(mu, lv)
    assert float(seed_g_mu[0, 1]) == 0.0 and float(seed_g_lv[0, 0]) == 0.0
    # In float64 the same inputs are exact.
    with jax.enable_x64(True):
        mu64, lv64 = np.asarray(mu, np.float64), np.asarray(lv, np.float64)
        ref = 0.5 * np.sum(mu64**2 + np.exp(lv64) - 1 - lv64)
        np.testing.assert_allclose(N.gaussian_kl(mu64, lv64)[0], ref, rtol=1e-12)


def test_seed004_zscore_constant_feature():
    x = np.stack([np.full(6, 0.1), np.linspace(-1.0, 2.0, 6)], axis=1).astype(np.float32)
    z = N.safe_zscore(x)
    assert (z[:, 0] == 0).all()
    ref = (x[:, 1] - x[:, 1].mean()) / x[:, 1].std()
    np.testing.assert_allclose(z[:, 1], ref, rtol=1e-5, atol=1e-6)
    # The seed's clamp after a one-pass mean turns rounding residue into O(1) values.
    with np.errstate(invalid="ignore", divide="ignore"):
        unclamped = (x - x.mean(0)) / x.std(0)
    clamped = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
    assert np.isnan(unclamped).any() or np.abs(clamped[:, 0]).max() > 1e-3
    # Gradient at the constant column: exactly that of (x − mean)/min_std, checked in float64.
    w = np.random.default_rng(6).normal(size=x.shape)
    with jax.enable_x64(True):
        g = jax.grad(lambda v: jnp.sum(N.safe_zscore(v) * w))(x.astype(np.float64))
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g[:, 0], (w[:, 0] - w[:, 0].mean()) / 1e-8, rtol=1e-6)


def test_seed004_fully_masked_attention_row():
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 2, 8), (5, 2, 8), (5, 2, 8))
    )
    mask = jnp.ones((2, 4, 5), bool).at[1, 2, :].set(False)  # head 1, query 2: nothing
    loss = lambda *a: jnp.sum(N.dot_product_attention(*a, mask) ** 2)
    out, grads = jax.jit(
        lambda *a: (N.dot_product_attention(*a, mask), jax.grad(loss, argnums=(0, 1, 2))(*a))
    )(q, k, v)
    np.testing.assert_array_equal(out[2, 1], np.zeros(8))
    assert all(jnp.isfinite(g).all() for g in grads)
    assert (grads[0][2, 1] == 0).all()
    ref = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=mask)
    keep = np.ones((4, 2), bool)
    keep[2, 1] = False
    np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(ref)[keep], atol=1e-5)
    # The naive -inf masking is NaN on that row.
    logits = jnp.einsum("tnh,snh->nts", q, k) / jnp.sqrt(8.0)
    naive = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    assert jnp.isnan(naive[1, 2]).all()
