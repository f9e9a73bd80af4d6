"""bounded_positive(+inverse), soft_clip and straight_through_clip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

import jaxstab.numerics as N

_bp = jax.jit(jax.vmap(jax.value_and_grad(N.bounded_positive, argnums=(0, 1, 2))))


def _seed_exp_clamp(raw):
    return jnp.exp(jnp.clip(raw, -5.0, 5.0))


def test_bounded_positive_gradient_never_zero():
    raw = jnp.linspace(-50.0, 50.0, 2001, dtype=jnp.float32)
    low, high = jnp.full_like(raw, 0.1), jnp.full_like(raw, 10.0)
    value, (g_raw, g_low, g_high) = _bp(raw, low, high)
    assert (g_raw > 0).all() and jnp.isfinite(g_raw).all()
    assert (g_low > 0).all() and (g_high > 0).all()
    assert ((value >= 0.1) & (value <= 10.0)).all()
    # The seed's exp(clamp(raw, -5, 5)) is flat outside ±5: that is the bug being replaced.
    seed_grad = jax.vmap(jax.grad(_seed_exp_clamp))(raw)
    assert (seed_grad[jnp.abs(raw) > 5] == 0).all()
    # Forward mode agrees.
    fwd = jax.jvp(lambda r: N.bounded_positive(r, 0.1, 10.0), (raw,), (jnp.ones_like(raw),))[1]
    np.testing.assert_allclose(fwd, g_raw, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-50, 50), min_size=8, max_size=8),
    st.floats(0.0, 5.0),
    st.floats(0.01, 100.0),
)
def test_bounded_positive_matches_float64_reference(raws, low, width):
    raw = np.array(raws, np.float32).astype(np.float64)
    lo, hi = np.float32(low), np.float32(low + width)
    n = len(raws)
    value, (g_raw, g_low, g_high) = _bp(
        jnp.asarray(raw, jnp.float32), jnp.full(n, lo), jnp.full(n, hi)
    )
    lo64, hi64 = float(lo), float(hi)
    s, s_neg = expit(raw), expit(-raw)
    np.testing.assert_allclose(value, lo64 + (hi64 - lo64) * s, rtol=1e-5)
    np.testing.assert_allclose(g_raw, (hi64 - lo64) * s * s_neg, rtol=1e-5)
    np.testing.assert_allclose(g_low, s_neg, rtol=1e-5)
    np.testing.assert_allclose(g_high, s, rtol=1e-5)


def test_bounded_positive_inverse_round_trip_float64():
    with jax.enable_x64(True):
        raw = jnp.linspace(-20.0, 20.0, 81, dtype=jnp.float64)
        value = N.bounded_positive(raw, 0.5, 3.0)
        back = N.bounded_positive_inverse(value, 0.5, 3.0)
        np.testing.assert_allclose(back, raw, rtol=1e-8, atol=1e-8)
    # Values on or past a bound give a finite raw.
    edge = N.bounded_positive_inverse(jnp.array([0.5, 3.0, 0.0, 9.0]), 0.5, 3.0)
    assert jnp.isfinite(edge).all() and edge[0] < -80 and edge[1] > 80


def test_bounds_must_be_ordered():
    with pytest.raises(ValueError, match=r"low/high.*index \(1,\)"):
        N.bounded_positive(0.0, jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="low < high"):
        N.soft_clip(0.0, 1.0, 1.0)


def _soft_clip_reference(x, low, high, knee=0.5):
    """float64 reference of the knee soft clip: identity inside, algebraic sigmoid outside."""
    c, h = 0.5 * (low + high), 0.5 * (high - low)
    z = (np.asarray(x, np.float64) - c) / h
    a = np.abs(z)
    u = (a - knee) / (1 - knee)
    outer = c + h * np.sign(z) * (knee + (1 - knee) * u / np.sqrt(1 + u * u))
    slope = np.where(a <= knee, 1.0, (1 + u * u) ** -1.5)
    return np.where(a <= knee, x, outer), slope


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=8, max_size=8))
def test_soft_clip_matches_float64_reference(xs):
    x = np.array(xs, np.float32)
    low, high = -1.0, 3.0
    value, grad = jax.jit(jax.vmap(jax.value_and_grad(N.soft_clip), (0, None, None)))(
        jnp.asarray(x), low, high
    )
    ref, slope = _soft_clip_reference(x.astype(np.float64), low, high)
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, slope, rtol=1e-5, atol=1e-38)
    assert ((value >= low) & (value <= high)).all()


def test_soft_clip_is_the_identity_well_inside():
    # Every float32 in [-0.5, 0.5] x bound comes back bit for bit, with slope exactly 1.
    for limit in (10.0, 20.0):
        x = jnp.linspace(-0.5 * limit, 0.5 * limit, 20001, dtype=jnp.float32)
        value, grad = jax.vmap(jax.value_and_grad(N.soft_clip), (0, None, None))(x, -limit, limit)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(grad), np.ones(x.shape, np.float32))
    # The decoder's log-mean 3 (bound 20) and the logvar -3 (bound 10) are left alone.
    assert float(N.soft_clip(3.0, -20.0, 20.0)) == 3.0
    assert float(N.soft_clip(-3.0, -10.0, 10.0)) == -3.0


def test_soft_clip_monotone_bounded_smooth_with_finite_gradient():
    x = jnp.concatenate(
        [-jnp.logspace(8, -3, 3000), jnp.linspace(-30, 30, 6001), jnp.logspace(-3, 8, 3000)]
    ).astype(jnp.float32)
    x = jnp.sort(x)
    value, grad = jax.vmap(jax.value_and_grad(N.soft_clip), (0, None, None))(x, -10.0, 10.0)
    value, grad = np.asarray(value), np.asarray(grad)
    # Monotone: strictly where the values differ in float32, within one ulp of the bound where
    # rsqrt rounds near saturation.
    assert np.all(np.diff(value) >= -np.spacing(np.float32(10.0)))
    mid = np.abs(np.asarray(x)) < 30
    assert np.all(np.diff(value[mid]) > 0)
    assert np.all((value >= -10.0) & (value <= 10.0))
    assert np.all(np.isfinite(grad)) and np.all(grad > 0) and np.all(grad <= 1.0)
    # Saturates only near the bound: within 2 % of it once x is twice the bound.
    assert float(N.soft_clip(20.0, -10.0, 10.0)) > 9.5
    # The slope is continuous at the knee (|x| = 5 for bound 10).
    eps = 1e-3
    below = float(jax.grad(N.soft_clip)(5.0 - eps, -10.0, 10.0))
    above = float(jax.grad(N.soft_clip)(5.0 + eps, -10.0, 10.0))
    assert below == 1.0 and abs(above - 1.0) < 1e-4


def test_soft_clip_knee_must_be_a_fraction():
    with pytest.raises(ValueError, match="knee"):
        N.soft_clip(0.0, -1.0, 1.0, knee=1.0)


def test_soft_clip_gradient_nonzero_far_outside():
    x = jnp.array([-1e4, -100.0, 100.0, 1e4, 1e5])
    grad = jax.vmap(jax.grad(N.soft_clip), (0, None, None))(x, 0.0, 1.0)
    assert (grad > 0).all()
    # tanh-style clipping with autodiff is exactly flat there in float32.
    tanh_grad = jax.vmap(jax.grad(lambda v: 0.5 + 0.5 * jnp.tanh((v - 0.5) / 0.5)))(x)
    assert (tanh_grad == 0).all()


def test_straight_through_clip_value_and_identity_gradient():
    x = jnp.array([-1e10, -2.0, 0.3, 2.0, 1e10], jnp.float32)
    value = N.straight_through_clip(x, -1.0, 1.0)
    np.testing.assert_array_equal(value, np.clip(np.asarray(x), -1.0, 1.0))
    grad = jax.vmap(jax.grad(N.straight_through_clip), (0, None, None))(x, -1.0, 1.0)
    np.testing.assert_array_equal(grad, np.ones(5, np.float32))
    tangent = jax.jvp(lambda v: N.straight_through_clip(v, -1.0, 1.0), (x,), (2 * x,))[1]
    np.testing.assert_array_equal(tangent, 2 * x)
    # The stop-gradient trick gets the value wrong at 1e10 in float32.
    trick = x + jax.lax.stop_gradient(jnp.clip(x, -1.0, 1.0) - x)
    assert float(trick[-1]) != 1.0
