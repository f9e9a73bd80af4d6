"""clip_by_group_norm: each group clipped to its own bound, against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxstab


def test_groups_clipped_independently(params, make_grads):
    grads = make_grads()
    grads["head"] = jax.tree.map(lambda g: 100.0 * g, grads["head"])
    grads["encoder"] = jax.tree.map(lambda g: 1e-3 * g, grads["encoder"])
    tx = jaxstab.clip_by_group_norm(1.0)
    out, state = jax.jit(tx.update)(grads, tx.init(params))
    head = np.asarray(grads["head"]["kernel"], np.float64)
    np.testing.assert_allclose(out["head"]["kernel"], head / np.sqrt(np.sum(head**2)), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, out["encoder"], grads["encoder"])
    s = jaxstab.read_stats(state)
    assert bool(s["clip/clipped/head"]) and not bool(s["clip/clipped/encoder"])
    assert int(s["clip/groups_clipped"]) == 1
    np.testing.assert_allclose(s["clip/group_norm/head"], np.sqrt(np.sum(head**2)), rtol=1e-6)


def test_group_depth_none_clips_each_leaf():
    grads = {"a": {"x": jnp.array([3.0, 4.0]), "y": jnp.array([0.3, 0.4])}}
    tx = jaxstab.clip_by_group_norm(1.0, group_depth=None)
    out, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(out["a"]["x"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out["a"]["y"], grads["a"]["y"])
    assert set(jaxstab.read_stats(state)) >= {"clip/clipped/a/x", "clip/clipped/a/y"}


def test_float16_group():
    grads = {"a": jnp.full((10,), 300.0, jnp.float16)}
    out, _ = jaxstab.clip_by_group_norm(1.0).update(grads, None)
    np.testing.assert_allclose(np.asarray(out["a"], np.float64), 1 / np.sqrt(10), rtol=1e-3)


def test_validation():
    with pytest.raises(ValueError, match="max_norm"):
        jaxstab.clip_by_group_norm(-1.0)
    with pytest.raises(ValueError, match="group_depth"):
        jaxstab.clip_by_group_norm(1.0, group_depth=0)
