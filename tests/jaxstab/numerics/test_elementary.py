"""safe_log, safe_exp, safe_div, safe_sqrt against float64 numpy at interior points."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxstab.numerics as N

f32 = np.float32
_grad_log = jax.jit(jax.vmap(jax.value_and_grad(N.safe_log)))
_grad_exp = jax.jit(jax.vmap(jax.value_and_grad(N.safe_exp)))
_grad_sqrt = jax.jit(jax.vmap(jax.value_and_grad(N.safe_sqrt)))
_grad_div = jax.jit(jax.vmap(jax.value_and_grad(N.safe_div, argnums=(0, 1))))

positive = st.floats(1e-30, 1e30).map(f32)
moderate = st.floats(-80.0, 80.0).map(f32)


@settings(max_examples=25, deadline=None)
@given(st.lists(positive, min_size=8, max_size=8))
def test_safe_log_matches_float64_log(xs):
    x = np.array(xs, f32)
    value, grad = _grad_log(jnp.asarray(x))
    ref = np.log(x.astype(np.float64))
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, 1 / x.astype(np.float64), rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.lists(moderate, min_size=8, max_size=8))
def test_safe_exp_matches_float64_exp(xs):
    x = np.array(xs, f32)
    value, grad = _grad_exp(jnp.asarray(x))
    ref = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    np.testing.assert_allclose(grad, ref, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-30, 1e30)).map(f32), min_size=8, max_size=8))
def test_safe_sqrt_matches_float64_sqrt(xs):
    x = np.array(xs, f32)
    value, grad = _grad_sqrt(jnp.asarray(x))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(value, np.sqrt(x64), rtol=1e-5)
    ref_grad = np.where(x64 > 0, 0.5 / np.sqrt(np.where(x64 > 0, x64, 1)), 0.0)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.floats(-1e3, 1e3, width=32, allow_subnormal=False).map(f32), min_size=8, max_size=8
    ),
    st.lists(st.floats(1e-3, 1e3).map(f32), min_size=8, max_size=8),
    st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_safe_div_matches_float64_division(ns, ds, flips):
    n = np.array(ns, f32)
    d = np.where(flips, -1, 1).astype(f32) * np.array(ds, f32)
    value, (gn, gd) = _grad_div(jnp.asarray(n), jnp.asarray(d))
    n64, d64 = n.astype(np.float64), d.astype(np.float64)
    np.testing.assert_allclose(value, n64 / d64, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(gn, 1 / d64, rtol=1e-5)
    np.testing.assert_allclose(gd, -n64 / d64**2, rtol=1e-5, atol=1e-30)


def test_boundaries_log0_exp1000_div0_sqrt0():
    x = jnp.zeros(3)
    assert float(N.safe_log(0.0)) == np.log(np.finfo(np.float32).tiny).astype(f32)
    assert float(jax.grad(N.safe_log)(0.0)) == 0.0
    assert np.isfinite(N.safe_exp(1000.0)) and float(N.safe_exp(1000.0)) > 1e37
    assert 0 < float(jax.grad(N.safe_exp)(1000.0)) < np.inf
    assert float(jax.jvp(N.safe_exp, (1000.0,), (1.0,))[1]) > 0
    assert N.safe_div(x + 1, x).tolist() == [0.0, 0.0, 0.0]
    assert float(jax.jvp(N.safe_div, (1.0, 0.0), (1.0, 1.0))[1]) == 0.0
    assert float(jax.grad(N.safe_sqrt)(0.0)) == 0.0
    assert float(jax.jvp(N.safe_sqrt, (0.0,), (1.0,))[1]) == 0.0
    # The naive versions this replaces are not finite at the same points.
    assert not np.isfinite(jax.grad(jnp.log)(0.0))
    assert not np.isfinite(jax.grad(jnp.sqrt)(0.0))
    assert not np.isfinite(jnp.exp(f32(1000.0)))


def test_nan_numerator_with_zero_denominator_stays_nan():
    assert np.isnan(N.safe_div(jnp.nan, 0.0))
    assert np.isnan(N.safe_log(jnp.nan)) and np.isnan(N.safe_sqrt(jnp.nan))
    assert np.isnan(N.safe_exp(jnp.nan))


def test_exp_saturation_is_finite_in_every_dtype():
    for dtype in (jnp.float32, jnp.bfloat16):
        value = N.safe_exp(jnp.asarray(1e4, dtype))
        assert value.dtype == dtype and jnp.isfinite(value)
    with jax.enable_x64(True):
        assert jnp.isfinite(N.safe_exp(jnp.asarray(1e4, jnp.float64)))
        assert float(N.safe_exp(jnp.asarray(700.0, jnp.float64))) == np.exp(700.0)
