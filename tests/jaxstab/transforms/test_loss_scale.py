"""dynamic_loss_scale: unscaling, halving on overflow, growth after period."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab


def test_halves_on_overflow_and_grows_after_period():
    tx = jaxstab.dynamic_loss_scale(initial=64.0, period=3, factor=2.0)
    state = tx.init({"w": jnp.zeros(2)})
    step = jax.jit(tx.update)
    scales = []
    seq = [1.0, jnp.inf, 1.0, 1.0, 1.0, 1.0, jnp.nan, 1.0]
    for g in seq:
        out, state = step({"w": jnp.array([g, 2.0], jnp.float16)}, state)
        scales.append(float(jaxstab.loss_scale(state)))
        if np.isfinite(float(g)):
            assert out["w"].dtype == jnp.float16
        else:
            np.testing.assert_array_equal(out["w"], [0.0, 0.0])
    assert scales == [64.0, 32.0, 32.0, 32.0, 64.0, 64.0, 32.0, 32.0]


def test_unscales_gradient():
    tx = jaxstab.dynamic_loss_scale(initial=1024.0)
    g = {"w": jnp.array([1024.0, -2048.0], jnp.float16)}
    out, state = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [1.0, -2.0])
    assert not bool(jaxstab.read_stats(state)["loss_scale/overflow"])


def test_min_scale_floor():
    tx = jaxstab.dynamic_loss_scale(initial=2.0, min_scale=1.0)
    state = tx.init({"w": jnp.zeros(1)})
    for _ in range(3):
        _, state = tx.update({"w": jnp.array([jnp.inf])}, state)
    assert float(state.scale) == 1.0


def test_inner_state_kept_on_overflow(params, make_grads):
    tx = jaxstab.dynamic_loss_scale(initial=8.0, inner=optax.adam(1e-3))
    state = tx.init(params)
    _, state = tx.update(make_grads(), state, params)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.inf), make_grads(2))
    out, new = tx.update(bad, state, params)
    jax.tree.map(np.testing.assert_array_equal, new.inner_state, state.inner_state)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))


def test_end_to_end_float16_loss_scaling():
    # float32 master weights, float16 compute: the float16 backward pass underflows
    # without the scale; with it, the unscaled float32 gradient is accurate.
    w = {"w": jnp.asarray([1e-3, 2e-3], jnp.float32)}
    tx = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(
            jaxstab.dynamic_loss_scale(initial=2.0**14), optax.sgd(learning_rate)
        )
    )(learning_rate=1.0)
    state = tx.init(w)

    def loss(p, scale):
        w16 = p["w"].astype(jnp.float16)
        small = jnp.sum(w16 * w16) * jnp.asarray(1e-4, jnp.float16)
        return small * scale.astype(jnp.float16)

    grads = jax.jit(jax.grad(loss))(w, jaxstab.loss_scale(state))
    out, state = tx.update(grads, state, w)
    ref = 2e-4 * np.asarray(w["w"], np.float64)
    np.testing.assert_allclose(-np.asarray(out["w"], np.float64), ref, rtol=1e-2)
    raw = np.asarray(jax.jit(jax.grad(loss))(w, jnp.asarray(1.0))["w"], np.float64)
    assert np.max(np.abs(raw - ref) / ref) > 0.05  # lost in float16 without scaling


def test_loss_scale_errors():
    with pytest.raises(ValueError, match="dynamic_loss_scale"):
        jaxstab.loss_scale(optax.adam(1e-3).init({"w": jnp.zeros(1)}))
    with pytest.raises(ValueError, match="period"):
        jaxstab.dynamic_loss_scale(period=0)
    with pytest.raises(ValueError, match="factor"):
        jaxstab.dynamic_loss_scale(factor=1.0)
