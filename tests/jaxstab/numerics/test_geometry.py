"""Norms, cosine, angles, dihedrals and distances against float64 numpy formulas."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import jaxstab.numerics as N

coords = arrays(np.float32, (4, 3), elements=st.floats(-10, 10, width=32, allow_subnormal=False))


def _fd_grad(f, x, h=1e-6, period=None):
    """Central finite differences of a float64 numpy function.

    With ``period`` the difference is taken modulo it (an angle near ±π must not jump by 2π).
    """
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        d = f(x + e) - f(x - e)
        if period is not None:
            d = (d + period / 2) % period - period / 2
        g[i] = d / (2 * h)
    return g


def _ref_angle(u, v):
    cos = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    return np.arccos(np.clip(cos, -1, 1))


def _ref_dihedral(p0, p1, p2, p3):
    # The projection form: an independent formula from the one in the library.
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1) * b1
    w = b2 - np.dot(b2, b1) * b1
    return np.arctan2(np.dot(np.cross(b1, v), w), np.dot(v, w))


def _well_conditioned(p, min_sin=0.05):
    b = np.diff(p.astype(np.float64), axis=0)
    if np.linalg.norm(b, axis=1).min() < 0.1:
        return False
    for u, v in itertools.pairwise(b):
        sin = np.linalg.norm(np.cross(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v))
        if sin < min_sin:
            return False
    return True


_angle_vg = jax.jit(jax.value_and_grad(N.vector_angle, argnums=(0, 1)))
_dihedral_vg = jax.jit(jax.value_and_grad(N.dihedral, argnums=(0, 1, 2, 3)))
_norm_vg = jax.jit(jax.vmap(jax.value_and_grad(N.safe_norm)))
_cos_vg = jax.jit(jax.value_and_grad(lambda a, b: N.cosine_similarity(a, b).sum(), argnums=(0, 1)))


@settings(max_examples=25, deadline=None)
@given(coords)
def test_safe_norm_matches_linalg_norm(p):
    value, grad = _norm_vg(jnp.asarray(p))
    p64 = p.astype(np.float64)
    ref = np.linalg.norm(p64, axis=-1)
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-30)
    safe = np.where(ref[:, None] > 0, p64 / np.where(ref > 0, ref, 1)[:, None], 0)
    np.testing.assert_allclose(grad, safe, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        N.safe_norm(p, axis=0, keepdims=True), np.linalg.norm(p64, axis=0, keepdims=True), rtol=1e-5
    )


def test_safe_norm_zero_vector_and_extreme_scales():
    assert float(N.safe_norm(jnp.zeros(3))) == 0.0
    np.testing.assert_array_equal(jax.grad(N.safe_norm)(jnp.zeros(3)), np.zeros(3))
    np.testing.assert_array_equal(jax.jacfwd(N.safe_norm)(jnp.zeros(3)), np.zeros(3))
    for scale in (1e-30, 1e20):
        x = jnp.array([3.0, 4.0, 0.0]) * scale
        np.testing.assert_allclose(N.safe_norm(x), 5.0 * scale, rtol=1e-6)
        np.testing.assert_allclose(jax.grad(N.safe_norm)(x), [0.6, 0.8, 0.0], rtol=1e-6)
    # The naive norm overflows/underflows there and is NaN-gradient at zero.
    assert not np.isfinite(jnp.sqrt(jnp.sum(jnp.full(3, 1e20) ** 2)))
    assert np.isnan(jax.grad(lambda v: jnp.sqrt(jnp.sum(v**2)))(jnp.zeros(3))).all()


def test_safe_normalize_unit_and_zero():
    x = jnp.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(N.safe_normalize(x), [[0.6, 0.8, 0.0], [0, 0, 0]], rtol=1e-6)
    jac = jax.jacrev(N.safe_normalize)(x)
    assert jnp.isfinite(jac).all() and (jac[1] == 0).all()
    u = np.array([3.0, 4.0, 0.0])
    ref = np.eye(3) / 5 - np.outer(u, u) / 125
    np.testing.assert_allclose(jax.jacfwd(N.safe_normalize)(jnp.asarray(u)), ref, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(coords)
def test_cosine_similarity_and_loss_match_float64(p):
    a, b = p[:2].astype(np.float64), p[2:].astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    assume(norms.min() >= 1e-2)
    ref = np.sum(a * b, axis=-1) / norms
    _, (ga, _) = _cos_vg(jnp.asarray(p[:2]), jnp.asarray(p[2:]))
    value = N.cosine_similarity(p[:2], p[2:])
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6)
    for row in range(2):
        f = lambda x, row=row: np.dot(x, b[row]) / (np.linalg.norm(x) * np.linalg.norm(b[row]))
        np.testing.assert_allclose(ga[row], _fd_grad(f, a[row]), rtol=1e-4, atol=1e-5)
    loss = N.cosine_loss(p[:2], p[2:])
    np.testing.assert_allclose(loss, np.mean(1 - ref), rtol=1e-5, atol=1e-6)


def test_cosine_with_zero_vector_is_zero_with_zero_gradient():
    a, b = jnp.zeros(3), jnp.array([1.0, 2.0, 3.0])
    value, (ga, gb) = _cos_vg(a, b)
    assert float(value) == 0.0 and (ga == 0).all() and (gb == 0).all()
    assert float(N.cosine_loss(a[None], b[None])) == 1.0


@settings(max_examples=25, deadline=None)
@given(coords)
def test_vector_and_bond_angle_match_arccos_when_well_conditioned(p):
    p64 = p.astype(np.float64)
    assume(_well_conditioned(p64[:3], min_sin=0.05))
    u, v = p64[0] - p64[1], p64[2] - p64[1]
    value, (gu, gv) = _angle_vg(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(value, _ref_angle(u, v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gu, _fd_grad(lambda x: _ref_angle(x, v), u), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gv, _fd_grad(lambda x: _ref_angle(u, x), v), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(N.bond_angle(p[0], p[1], p[2]), _ref_angle(u, v), rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(coords)
def test_dihedral_matches_projection_formula(p):
    p64 = p.astype(np.float64)
    assume(_well_conditioned(p64, min_sin=0.1))
    value, grads = _dihedral_vg(*(jnp.asarray(q) for q in p))
    ref = _ref_dihedral(*p64)
    diff = (float(value) - ref + np.pi) % (2 * np.pi) - np.pi  # ±π are the same angle
    assert abs(diff) < 1e-5 * max(1.0, abs(ref))
    for i in range(4):

        def f(x, i=i):
            q = p64.copy()
            q[i] = x
            return _ref_dihedral(*q)

        fd = _fd_grad(f, p64[i], period=2 * np.pi)
        np.testing.assert_allclose(grads[i], fd, rtol=1e-3, atol=1e-4)


def test_pairwise_distances_match_float64_and_diagonal_is_safe():
    x = np.random.default_rng(1).normal(size=(2, 5, 3)).astype(np.float32)
    d = N.pairwise_distances(x)
    x64 = x.astype(np.float64)
    ref = np.linalg.norm(x64[:, :, None] - x64[:, None], axis=-1)
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-6)
    assert (jnp.diagonal(d, axis1=-2, axis2=-1) == 0).all()
    grad = jax.grad(lambda y: N.pairwise_distances(y).sum())(jnp.asarray(x))
    # d/dx_k Σ_ij |x_i − x_j| = 2 Σ_j (x_k − x_j)/|x_k − x_j| over j ≠ k.
    diff = x64[:, :, None] - x64[:, None]
    unit = diff / np.where(ref > 0, ref, 1)[..., None]
    np.testing.assert_allclose(grad, 2 * unit.sum(axis=2), rtol=1e-5, atol=1e-5)


ZERO_LENGTH_CASES = [((0,), -1), ((3, 0), -1), ((0, 3), 0), ((2, 0, 4), (0, 1)), ((2, 0, 4), 1)]


@pytest.mark.parametrize(("shape", "axis"), ZERO_LENGTH_CASES)
def test_zero_length_axis_behaves_like_linalg_norm(shape, axis):
    x = jnp.ones(shape, jnp.float32)
    ref = jnp.linalg.norm(x, axis=axis)
    np.testing.assert_array_equal(N.safe_norm(x, axis=axis), ref)
    kept = N.safe_norm(x, axis=axis, keepdims=True)
    assert kept.shape == jnp.linalg.norm(x, axis=axis, keepdims=True).shape
    assert not np.any(kept)
    unit = N.safe_normalize(x, axis=axis)
    assert unit.shape == x.shape and unit.dtype == x.dtype
    cos = N.cosine_similarity(x, x, axis=axis)
    np.testing.assert_array_equal(cos, np.zeros(ref.shape, np.float32))
    grad = jax.grad(lambda v: jnp.sum(N.safe_norm(v, axis=axis)))(x)
    assert grad.shape == x.shape


def test_zero_points_pairwise_distances():
    assert N.pairwise_distances(jnp.zeros((0, 3))).shape == (0, 0)
