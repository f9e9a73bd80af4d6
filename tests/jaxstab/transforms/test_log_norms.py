"""log_norms: recorded statistics against float64 NumPy, ring buffer, pass-through."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxstab
from jaxstab.transforms.log_norms import ordered_history


def _np_norm(*arrays):
    return np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays))


def test_statistics_match_numpy(params, make_grads):
    grads = make_grads()
    grads["head"]["kernel"] = grads["head"]["kernel"].at[0, 0].set(jnp.nan).at[1, 1].set(-jnp.inf)
    grads["encoder"]["bias"] = jnp.zeros_like(grads["encoder"]["bias"])
    tx = jaxstab.log_norms()
    out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    chex_equal = jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out, grads)
    del chex_equal
    s = jaxstab.read_stats(state)
    enc = [grads["encoder"]["kernel"], grads["encoder"]["bias"]]
    head = np.asarray(grads["head"]["kernel"], np.float64)
    head_fin = np.where(np.isfinite(head), head, 0.0)
    np.testing.assert_allclose(s["grad/norm/encoder"], _np_norm(*enc), rtol=1e-6)
    np.testing.assert_allclose(s["grad/norm/head"], _np_norm(head_fin), rtol=1e-6)
    np.testing.assert_allclose(s["grad/global_norm"], _np_norm(*enc, head_fin), rtol=1e-6)
    np.testing.assert_allclose(s["grad/max_abs/head"], np.max(np.abs(head_fin)), rtol=1e-7)
    assert int(s["grad/nan/head"]) == 1 and int(s["grad/inf/head"]) == 1
    assert int(s["grad/nan/encoder"]) == 0
    np.testing.assert_allclose(s["grad/zero_frac/encoder"], 3 / 15, rtol=1e-6)
    ratio = _np_norm(*enc, head_fin) / _np_norm(*jax.tree.leaves(params))
    np.testing.assert_allclose(s["grad/update_ratio"], ratio, rtol=1e-5)


def test_broken_path_has_zero_frac_one(params, make_grads):
    grads = make_grads()
    grads["head"] = jax.tree.map(jnp.zeros_like, grads["head"])
    tx = jaxstab.log_norms()
    _, state = tx.update(grads, tx.init(params), params)
    assert float(jaxstab.read_stats(state)["grad/zero_frac/head"]) == 1.0


def test_update_ratio_zero_without_params(params, make_grads):
    tx = jaxstab.log_norms()
    _, state = tx.update(make_grads(), tx.init(params))
    assert float(jaxstab.read_stats(state)["grad/update_ratio"]) == 0.0


def test_group_depth_none_one_group_per_leaf(params, make_grads):
    tx = jaxstab.log_norms(group_depth=None)
    grads = make_grads()
    _, state = tx.update(grads, tx.init(params))
    s = jaxstab.read_stats(state)
    np.testing.assert_allclose(
        s["grad/norm/encoder/bias"], _np_norm(grads["encoder"]["bias"]), rtol=1e-6
    )
    assert "grad/norm/head/kernel" in s


def test_nnx_group_names(nnx_model):
    state = nnx.state(nnx_model, nnx.Param)
    tx = optax.chain(jaxstab.log_norms(group_depth=2), optax.adam(1e-3))
    grads = jax.tree.map(jnp.ones_like, state)
    _, opt_state = tx.update(grads, tx.init(state), state)
    s = jaxstab.read_stats(opt_state)
    n_enc = 3 * 4 + 4 + 4 * 4 + 4
    np.testing.assert_allclose(s["grad/norm/encoder/layers"], np.sqrt(n_enc), rtol=1e-6)
    assert {"grad/norm/head/kernel", "grad/norm/head/bias"} <= set(s)


def test_history_ring_buffer(params, make_grads):
    k = 3
    tx = jaxstab.log_norms(history=k)
    state = tx.init(params)
    step = jax.jit(tx.update)
    norms = []
    for i in range(5):
        g = make_grads(seed=i)
        norms.append(_np_norm(*jax.tree.leaves(g)))
        _, state = step(g, state)
    assert state.history["grad/global_norm"].shape == (k,)
    hist = ordered_history(state)
    np.testing.assert_allclose(hist["grad/global_norm"], norms[-k:], rtol=1e-6)
    assert hist["step"].tolist() == [2, 3, 4]


def test_history_validation():
    with pytest.raises(ValueError, match="history"):
        jaxstab.log_norms(history=-1)
