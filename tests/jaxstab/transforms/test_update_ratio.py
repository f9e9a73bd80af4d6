"""``log_update_ratio``: ‖update‖ / ‖params‖ of the final update, against a float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab


def test_ratio_of_the_final_update_matches_numpy_and_leaves_updates_alone():
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=5), jnp.float32)}  # fmt: skip
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    ref_tx = optax.adam(0.1)
    tx = optax.chain(optax.adam(0.1), jaxstab.log_update_ratio())
    ref_updates, _ = jax.jit(ref_tx.update)(grads, ref_tx.init(params), params)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    for k in params:
        np.testing.assert_array_equal(updates[k], ref_updates[k])
    flat = lambda t: np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in t.values()])
    expected = np.linalg.norm(flat(ref_updates)) / np.linalg.norm(flat(params))
    ratio = jaxstab.read_stats(state)["update/param_ratio"]
    np.testing.assert_allclose(float(ratio), expected, rtol=1e-6)


def test_zero_params_give_zero_and_missing_params_are_an_error():
    tx = jaxstab.log_update_ratio()
    zeros = {"w": jnp.zeros(3)}
    _, state = tx.update({"w": jnp.ones(3)}, tx.init(zeros), zeros)
    assert float(state.ratio) == 0.0
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"w": jnp.ones(3)}, tx.init(zeros))
