"""Every transform inside lax.scan, lax.cond and optax.apply_if_finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

CASE_IDS = [
    "log_norms",
    "zero_nonfinite",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "zclip",
    "autoclip",
    "skip_bad_steps",
    "dynamic_loss_scale",
    "stability_guard",
    "guard_autoclip_noskip",
]


@pytest.mark.parametrize("name", CASE_IDS)
def test_inside_scan_cond_and_apply_if_finite(
    name, params, nan_grads, make_grads, transform_cases, same_layout
):
    tx = transform_cases[name]()
    grads = jax.tree.map(lambda *x: jnp.stack(x), make_grads(1), nan_grads)

    def body(state, g):
        def do(s):
            return tx.update(g, s, params)

        def skip(s):
            return jax.tree.map(jnp.zeros_like, g), s

        updates, state = jax.lax.cond(jnp.all(jnp.isfinite(g["encoder"]["bias"])), do, skip, state)
        return state, optax.tree.norm(updates)

    state, _ = jax.jit(lambda s, gs: jax.lax.scan(body, s, gs))(tx.init(params), grads)
    same_layout(state, tx.init(params))
    wrapped = optax.apply_if_finite(tx, max_consecutive_errors=2)
    ws = wrapped.init(params)
    for i in range(2):
        _, ws = jax.jit(wrapped.update)(jax.tree.map(lambda x, i=i: x[i], grads), ws, params)
    assert int(ws.notfinite_count) == 1
