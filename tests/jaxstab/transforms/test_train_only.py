"""``jaxstab.train_only``: ``inner`` on the selected leaves, exact zero updates elsewhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxstab


def _params():
    return {
        "encoder": {"layers": [{"kernel": jnp.ones((2, 3))}], "bias": jnp.ones(3)},
        "encoder_extra": {"w": jnp.ones(2)},
        "head": {"w": jnp.full(4, 2.0)},
    }


def test_matches_optax_on_the_trained_leaves_and_freezes_the_rest():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    inner = optax.adamw(0.1, weight_decay=0.5)
    tx = jaxstab.train_only(inner, ["encoder"])
    state = tx.init(params)
    ref_state = inner.init(params["encoder"])
    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads, state, params)
        ref, ref_state = inner.update(grads["encoder"], ref_state, params["encoder"])
        for a, b in zip(jax.tree.leaves(updates["encoder"]), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
        # "encoder" selects the group, not every name that starts with the same letters
        for frozen in ("encoder_extra", "head"):
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates[frozen]))
        params = optax.apply_updates(params, updates)
    assert float(params["head"]["w"][0]) == 2.0  # weight decay did not move it


def test_a_guard_inside_sees_only_the_trained_groups():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1.0), params)
    grads["head"]["w"] = jnp.full(4, jnp.nan)  # a NaN in a frozen group: not this stage's concern
    tx = jaxstab.train_only(jaxstab.stability_guard(optax.sgd(1.0), clip=None), ["encoder"])
    updates, state = tx.update(grads, tx.init(params), params)
    stats = jaxstab.read_stats(state)
    assert {k for k in stats if k.startswith("grad/norm/")} == {"grad/norm/encoder"}
    assert float(stats["grad/global_norm"]) == pytest.approx(3.0)  # sqrt(6 + 3) ones
    assert not bool(stats["skip/skipped"])
    assert float(updates["encoder"]["bias"][0]) == -1.0
    assert not bool(jnp.any(jnp.isnan(updates["head"]["w"])))


def test_a_predicate_on_leaf_names():
    tx = jaxstab.train_only(optax.sgd(1.0), lambda name: name.endswith("bias"))
    params = _params()
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    assert float(updates["encoder"]["bias"][0]) == -1.0
    assert float(jnp.abs(updates["encoder"]["layers"][0]["kernel"]).max()) == 0.0


def test_nnx_state_by_group_name():
    class M(nnx.Module):
        def __init__(self):
            self.body = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(2, 1, rngs=nnx.Rngs(1))

    params = nnx.state(M(), nnx.Param)
    tx = jaxstab.train_only(optax.sgd(1.0), ("head",))
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params))
    assert float(jnp.abs(updates["body"]["kernel"][...]).max()) == 0.0
    assert float(updates["head"]["bias"][...][0]) == -1.0


def test_a_name_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"no parameter under 'encodr'; top-level groups: enc"):
        jaxstab.train_only(optax.sgd(1.0), ["encodr"]).init(_params())
    with pytest.raises(ValueError, match="no trainable group"):
        jaxstab.train_only(optax.sgd(1.0), [])
