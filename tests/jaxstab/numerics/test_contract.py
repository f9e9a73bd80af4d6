"""The shared contract, checked for every public function of jaxstab.numerics.

dtype in = dtype out (float32, bfloat16, float64), jit and vmap agree with eager calls, NaN in →
NaN out, boundary inputs give finite values and finite forward- and reverse-mode derivatives,
and the two modes agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxstab.numerics as N

NAMES = sorted(N.__all__)


def test_every_public_name_is_covered(cases):
    assert set(cases) == set(NAMES)


def _cast(args, dtype):
    return tuple(jnp.asarray(a, dtype) if isinstance(a, np.ndarray) else a for a in args)


def _scalar_loss(fn):
    return lambda *a: jnp.sum(fn(*a).astype(jnp.float32))


@pytest.mark.parametrize("name", NAMES)
def test_dtype_in_is_dtype_out(name, cases):
    # Dtypes are fixed at trace time, so abstract evaluation checks them without compiling.
    fn, interior, _, argnums = cases[name]
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        with jax.enable_x64(dtype == jnp.float64):
            args = _cast(interior, dtype)
            value = jax.eval_shape(fn, *args)
            grads = jax.eval_shape(jax.grad(_scalar_loss(fn), argnums=argnums), *args)
            assert value.dtype == dtype
            assert all(g.dtype == dtype for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_and_nan_propagation(name, cases):
    # One jitted vmap over rows: [interior, interior/2, then one row per argument with a NaN].
    fn, interior, _, argnums = cases[name]
    args = _cast(interior, jnp.float32)
    rows = [args, tuple(a * 0.5 if i in argnums else a for i, a in enumerate(args))]
    for i in argnums:
        row = list(args)
        row[i] = row[i].at[(0,) * row[i].ndim].set(jnp.nan)
        rows.append(tuple(row))
    stacked = tuple(
        jnp.stack([r[i] for r in rows]) if i in argnums else a for i, a in enumerate(args)
    )
    axes = tuple(0 if i in argnums else None for i in range(len(args)))
    out = jax.jit(jax.vmap(fn, in_axes=axes))(*stacked)
    for r in range(2):
        np.testing.assert_allclose(out[r], fn(*rows[r]), rtol=1e-5, atol=1e-6)
        assert jnp.isfinite(out[r]).all()
    for r, i in enumerate(argnums, start=2):
        assert jnp.isnan(out[r]).any(), f"NaN in argument {i} was hidden"


@pytest.mark.parametrize("name", NAMES)
def test_boundary_values_and_gradients_are_finite(name, cases):
    fn, _, boundary, argnums = cases[name]
    args = _cast(boundary, jnp.float32)
    loss = _scalar_loss(fn)

    @jax.jit
    def everything(*a):
        rev = jax.grad(loss, argnums=argnums)(*a)
        fwd = jax.jacfwd(loss, argnums=argnums)(*a)
        return fn(*a), rev, fwd

    value, rev, fwd = everything(*args)
    assert jnp.isfinite(value).all()
    for g in (*rev, *fwd):
        assert jnp.isfinite(g).all()
    if name == "safe_zscore":
        # At a constant column the slope is 1/min_std = 1e8 and the two modes round those
        # large terms differently; test_statistics checks that gradient in float64.
        return
    for g_rev, g_fwd in zip(rev, fwd, strict=True):
        np.testing.assert_allclose(g_rev, g_fwd, rtol=1e-5, atol=1e-6)


def test_x64_does_not_leak():
    assert jnp.asarray(1.0).dtype == jnp.float32
