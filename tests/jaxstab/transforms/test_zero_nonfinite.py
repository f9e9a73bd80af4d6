"""zero_nonfinite: NaN and ±Inf become 0 (optax.zero_nans leaves Inf), counts per group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxstab


def test_replaces_nan_and_both_infs(params, make_grads):
    grads = make_grads()
    grads["encoder"]["kernel"] = (
        grads["encoder"]["kernel"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    )
    grads["head"]["kernel"] = grads["head"]["kernel"].at[2, 1].set(-jnp.inf)
    tx = jaxstab.zero_nonfinite()
    out, state = jax.jit(tx.update)(grads, tx.init(params))
    for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(out), strict=True):
        g = np.asarray(g)
        np.testing.assert_array_equal(np.asarray(o), np.where(np.isfinite(g), g, 0.0))
    s = jaxstab.read_stats(state)
    assert int(s["nonfinite/count/encoder"]) == 2
    assert int(s["nonfinite/count/head"]) == 1
    assert int(s["nonfinite/steps"]) == 1
    # optax's zero_nans keeps the Infs.
    ref, _ = optax.zero_nans().update(grads, optax.zero_nans().init(params))
    assert not np.all(np.isfinite(np.asarray(ref["head"]["kernel"])))


def test_finite_step_counts_zero_and_keeps_values(params, make_grads):
    grads = make_grads()
    tx = jaxstab.zero_nonfinite()
    out, state = tx.update(grads, tx.init(params))
    jax.tree.map(np.testing.assert_array_equal, out, grads)
    assert int(jaxstab.read_stats(state)["nonfinite/steps"]) == 0
