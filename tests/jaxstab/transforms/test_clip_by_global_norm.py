"""clip_by_global_norm: equal to optax's on finite input; overflow-safe in float16/bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxstab


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e4]),
    max_norm=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_identical_to_optax_on_finite_input(params, seed, scale, max_norm):
    rng = np.random.default_rng(seed)
    grads = jax.tree.map(
        lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), params
    )
    ours = jaxstab.clip_by_global_norm(max_norm)
    ref = optax.clip_by_global_norm(max_norm)
    out, _ = ours.update(grads, ours.init(params))
    expected, _ = ref.update(grads, ref.init(params))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=1)


def test_records_pre_norm_scale_clipped(params, make_grads):
    grads = make_grads(scale=10.0)
    tx = jaxstab.clip_by_global_norm(1.0)
    out, state = tx.update(grads, tx.init(params))
    s = jaxstab.read_stats(state)
    pre = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(s["clip/pre_norm"], pre, rtol=1e-6)
    np.testing.assert_allclose(s["clip/scale"], 1.0 / pre, rtol=1e-6)
    assert bool(s["clip/clipped"])
    np.testing.assert_allclose(float(optax.tree.norm(out)), 1.0, rtol=1e-5)
    _, state = tx.update(make_grads(scale=1e-3), state)
    s = jaxstab.read_stats(state)
    assert not bool(s["clip/clipped"]) and float(s["clip/scale"]) == 1.0


def test_float16_gradients_of_300_are_clipped_not_zeroed():
    grads = {"w": jnp.full((16,), 300.0, jnp.float16), "b": jnp.full((4,), -300.0, jnp.float16)}
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert np.all(np.asarray(ref["w"]) == 0)  # optax: fp16 squared norm overflows -> zeroed
    tx = jaxstab.clip_by_global_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    expected = 300.0 / np.sqrt(20 * 300.0**2)
    assert out["w"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), expected, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(out["b"], np.float64), -expected, rtol=1e-3)
    np.testing.assert_allclose(float(state.pre_norm), np.sqrt(20 * 300.0**2), rtol=1e-6)


def test_bfloat16():
    g = {"w": jnp.full((8,), 300.0, jnp.bfloat16)}
    out, _ = jaxstab.clip_by_global_norm(2.0).update(g, optax.EmptyState())
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), 2.0 / np.sqrt(8), rtol=1e-2)
    np.testing.assert_allclose(float(optax.tree.norm(out)), 2.0, rtol=1e-2)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "x"])
def test_max_norm_validation(bad):
    with pytest.raises(ValueError, match="max_norm"):
        jaxstab.clip_by_global_norm(bad)
