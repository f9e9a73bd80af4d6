"""NB, ZINB, Gaussian KL and the 3-D Gaussian NLL against scipy / float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, nbinom, special_ortho_group

import jaxstab.numerics as N

_nb_vg = jax.jit(jax.vmap(jax.value_and_grad(N.nb_log_prob, argnums=(1, 2))))
_zinb = jax.jit(jax.vmap(N.zinb_log_prob))


def _nb_ref(x, mu, theta):
    return nbinom.logpmf(x, theta, theta / (theta + mu))


def _log_uniform(lo, hi):
    return st.floats(np.log(lo), np.log(hi)).map(lambda v: np.float32(np.exp(v)))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(0, 300), min_size=6, max_size=6),
    st.lists(_log_uniform(1e-2, 1e3), min_size=6, max_size=6),
    st.lists(_log_uniform(1e-2, 1e3), min_size=6, max_size=6),
)
def test_nb_matches_scipy_value_and_gradient(xs, mus, thetas):
    x = np.array(xs, np.float32)
    mu, th = np.array(mus, np.float32), np.array(thetas, np.float32)
    value, (g_mu, g_th) = _nb_vg(jnp.asarray(x), jnp.asarray(mu), jnp.asarray(th))
    x64, mu64, th64 = x.astype(np.float64), mu.astype(np.float64), th.astype(np.float64)
    ref = _nb_ref(x64, mu64, th64)
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=2e-5)
    # Gradients: exact ∂/∂μ, and central differences of scipy in θ.
    np.testing.assert_allclose(g_mu, th64 * (x64 - mu64) / (mu64 * (th64 + mu64)), rtol=1e-4)
    h = 1e-6 * th64
    fd_th = (_nb_ref(x64, mu64, th64 + h) - _nb_ref(x64, mu64, th64 - h)) / (2 * h)
    np.testing.assert_allclose(g_th, fd_th, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("theta", [1e-8, 1e-3, 1.0, 1e4, 1e8])
@pytest.mark.parametrize("mu", [0.0, 1e-6, 5.0, 1e3])
def test_nb_extremes_finite_and_accurate(mu, theta):
    x = np.array([0.0, 1.0, 3.0, 50.0], np.float32)
    n = len(x)
    value, (g_mu, g_th) = _nb_vg(jnp.asarray(x), jnp.full(n, mu), jnp.full(n, theta))
    assert jnp.isfinite(value).all() and jnp.isfinite(g_mu).all() and jnp.isfinite(g_th).all()
    mu32, th32 = float(np.float32(mu)), float(np.float32(theta))
    if mu == 0:
        assert float(value[0]) == pytest.approx(0.0, abs=1e-30)  # NB(0 | μ = 0) = 1
        assert float(g_mu[0]) == pytest.approx(-1.0)
        assert (value[1:] < -50).all()  # impossible counts are very unlikely, not -inf
        return
    ref = _nb_ref(x.astype(np.float64), mu32, th32)
    np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-5)
    ref_g_mu = th32 * (x - mu32) / (mu32 * (th32 + mu32))
    np.testing.assert_allclose(g_mu, ref_g_mu, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("lo", "hi"), [(1e-3, 1.0), (1.0, 100.0), (100.0, 1e4), (1e4, 1e5)])
def test_nb_float32_largest_error_on_nb_counts(lo, hi):
    # NB-sampled counts (0 to 1e5) over a decade range of means and θ in 1e-2 … 1e4: the
    # largest relative error against scipy at the float32-rounded inputs stays ≤ 2e-5.
    rng = np.random.default_rng(int(np.log10(lo) + 10))
    n = 20_000
    mu = np.float32(np.exp(rng.uniform(np.log(lo), np.log(hi), n)))
    th = np.float32(np.exp(rng.uniform(np.log(1e-2), np.log(1e4), n)))
    x = np.minimum(rng.negative_binomial(th, th / (th + mu)), 100_000).astype(np.float32)
    got = np.asarray(jax.jit(N.nb_log_prob)(x, mu, th), np.float64)
    ref = _nb_ref(x.astype(np.float64), mu.astype(np.float64), th.astype(np.float64))
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)
    assert np.isfinite(got).all() and rel.max() <= 2e-5, rel.max()


def test_nb_float64_matches_scipy_tightly():
    x = np.array([0.0, 1.0, 7.0, 40.0, 1000.0])
    mu = np.array([0.3, 2.5, 7.0, 100.0, 900.0])
    th = np.array([1e-6, 3.0, 9.0, 1e6, 20.0])
    with jax.enable_x64(True):
        value = N.nb_log_prob(x, mu, th)
        assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, _nb_ref(x, mu, th), rtol=1e-8)


def _zinb_ref(x, mu, th, g):
    log_pi = -np.logaddexp(0, -g)
    log_1m_pi = -np.logaddexp(0, g)
    nb = _nb_ref(x, mu, th)
    zero = logsumexp(np.stack([log_pi, log_1m_pi + nb]), axis=0)
    return np.where(x == 0, zero, log_1m_pi + nb)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=6, max_size=6),
    st.lists(_log_uniform(1e-2, 1e2), min_size=6, max_size=6),
    st.lists(_log_uniform(1e-2, 1e2), min_size=6, max_size=6),
    st.lists(st.floats(-20, 20, width=32, allow_subnormal=False), min_size=6, max_size=6),
)
def test_zinb_matches_mixture_reference(xs, mus, thetas, gates):
    x, mu = np.array(xs, np.float32), np.array(mus, np.float32)
    th, g = np.array(thetas, np.float32), np.array(gates, np.float32)
    value = _zinb(*(jnp.asarray(a) for a in (x, mu, th, g)))
    ref = _zinb_ref(*(a.astype(np.float64) for a in (x, mu, th, g)))
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=2e-5)


def test_zinb_extreme_gates_are_finite():
    x = jnp.array([0.0, 0.0, 2.0, 2.0])
    args = (x, jnp.array([0.0, 1e3, 5.0, 0.0]), jnp.full(4, 1e8), jnp.array([-80.0, 80, 80, -80]))
    f = lambda *a: N.zinb_log_prob(*a).sum()
    value = N.zinb_log_prob(*args)
    grads = jax.grad(f, argnums=(1, 2, 3))(*args)
    assert jnp.isfinite(value).all() and all(jnp.isfinite(gr).all() for gr in grads)
    np.testing.assert_allclose(value[2], -80 + _nb_ref(2.0, 5.0, 1e8), rtol=1e-5)


def _kl_ref(mu, lv):
    return 0.5 * np.sum(mu**2 + np.exp(lv) - 1 - lv, axis=-1)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-10, 10, width=32, allow_subnormal=False), min_size=8, max_size=8),
    st.lists(st.floats(-10, 10, width=32, allow_subnormal=False), min_size=8, max_size=8),
)
def test_gaussian_kl_matches_float64(mus, lvs):
    mu, lv = np.array(mus, np.float32).reshape(2, 4), np.array(lvs, np.float32).reshape(2, 4)
    value = N.gaussian_kl(mu, lv)
    g_mu, g_lv = jax.grad(lambda a, b: N.gaussian_kl(a, b).sum(), argnums=(0, 1))(mu, lv)
    mu64, lv64 = mu.astype(np.float64), lv.astype(np.float64)
    np.testing.assert_allclose(value, _kl_ref(mu64, lv64), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_mu, mu64, rtol=1e-6)
    np.testing.assert_allclose(g_lv, 0.5 * np.expm1(lv64), rtol=1e-5, atol=1e-7)


def test_gaussian_kl_near_zero_logvar_keeps_relative_accuracy():
    lv = np.array([1e-4, -1e-3, 0.05, -0.09, 0.2], np.float32)
    value = N.gaussian_kl(np.zeros((5, 1), np.float32), lv[:, None])
    lv64 = lv.astype(np.float64)
    np.testing.assert_allclose(value, 0.5 * (np.expm1(lv64) - lv64), rtol=1e-5)


def test_gaussian_kl_axis_and_saturation():
    mu = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    lv = np.zeros((3, 4), np.float32)
    np.testing.assert_allclose(N.gaussian_kl(mu, lv, axis=0), 0.5 * (mu**2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(N.gaussian_kl(mu, lv, axis=(0, 1)), 0.5 * (mu**2).sum(), rtol=1e-6)
    huge = N.gaussian_kl(jnp.full((1, 64), 1e30), jnp.full((1, 64), 1e3))
    assert jnp.isfinite(huge).all() and float(huge[0]) > 1e37


def test_gaussian_nll_matches_scipy_logpdf():
    rng = np.random.default_rng(3)
    for _ in range(5):
        rot = special_ortho_group.rvs(3, random_state=rng)
        s = rng.uniform(-2, 2, size=3)
        mean, x = rng.normal(size=3), rng.normal(size=3) * np.exp(s).max()
        cov = rot @ np.diag(np.exp(2 * s)) @ rot.T
        ref = -multivariate_normal.logpdf(x, mean, cov)
        got = N.gaussian_nll_3d(*(np.asarray(a, np.float32) for a in (x, mean, s, rot)))
        np.testing.assert_allclose(got, ref, rtol=1e-5)
        with jax.enable_x64(True):
            np.testing.assert_allclose(N.gaussian_nll_3d(x, mean, s, rot), ref, rtol=1e-10)


@pytest.mark.parametrize("s", [-9.0, 0.0, 9.0])
def test_gaussian_nll_extreme_and_equal_scales(s):
    rot = special_ortho_group.rvs(3, random_state=4).astype(np.float32)
    x, mean = np.array([0.3, -0.2, 0.1], np.float32) * np.exp(s), np.zeros(3, np.float32)
    scale_log = np.full(3, s, np.float32)  # equal scales: eigh gradients would be NaN
    f = jax.value_and_grad(N.gaussian_nll_3d, argnums=(0, 1, 2, 3))
    value, grads = f(x, mean, scale_log, rot)
    # Isotropic: NLL = |x − μ|² e^{−2s} / 2 + 3 s + 1.5 log 2π, ∂/∂s_i = 1 − z_i².
    r2 = float(np.sum((x.astype(np.float64) / np.exp(s)) ** 2))
    np.testing.assert_allclose(value, 0.5 * r2 + 3 * s + 1.5 * np.log(2 * np.pi), rtol=1e-5)
    assert all(jnp.isfinite(g).all() for g in grads)
    z = rot.T.astype(np.float64) @ (x.astype(np.float64) / np.exp(s))
    np.testing.assert_allclose(grads[2], 1 - z**2, rtol=1e-4, atol=1e-5)


def test_gaussian_nll_shape_errors():
    with pytest.raises(ValueError, match="rotation"):
        N.gaussian_nll_3d(np.zeros(3), np.zeros(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="scale_log"):
        N.gaussian_nll_3d(np.zeros(3), np.zeros(3), np.zeros(2), np.eye(3))
