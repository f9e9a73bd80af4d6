"""read_stats through every optax nesting; name collisions; inside jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxstab


def _update(tx, params, grads):
    return tx.update(grads, tx.init(params), params)[1]


DETAIL_NAMES = {"grad/update_ratio", "grad/max_abs/head", "grad/zero_frac/encoder"}


def test_chain_names(params, make_grads):
    tx = jaxstab.stability_guard(optax.adam(1e-3), adaptive="zclip")
    s = jaxstab.read_stats(_update(tx, params, make_grads()))
    expected = {
        "grad/global_norm",
        "grad/norm/encoder",
        "grad/nan/encoder",
        "grad/inf/head",
        "clip/pre_norm",
        "clip/scale",
        "clip/clipped",
        "zclip/mean",
        "skip/skipped",
        "skip/total",
        "skip/consecutive",
        "skip/halt",
    }
    assert expected <= set(s)
    # The extra passes are a detail= choice: off by default, all there with "full".
    assert not DETAIL_NAMES & set(s)
    full = jaxstab.stability_guard(optax.adam(1e-3), adaptive="zclip", detail="full")
    assert expected | DETAIL_NAMES <= set(jaxstab.read_stats(_update(full, params, make_grads())))
    assert all(isinstance(v, jax.Array) for v in s.values())


def test_inject_hyperparams(params, make_grads):
    tx = optax.inject_hyperparams(
        lambda learning_rate: jaxstab.stability_guard(optax.sgd(learning_rate))
    )(learning_rate=0.1)
    g = make_grads(scale=10.0)
    s = jaxstab.read_stats(_update(tx, params, g))
    norm = float(optax.tree.norm(g))
    np.testing.assert_allclose(s["grad/global_norm"], norm, rtol=1e-6)
    assert bool(s["clip/clipped"])


def test_apply_if_finite(params, make_grads):
    tx = optax.apply_if_finite(optax.chain(jaxstab.log_norms(), optax.adam(1e-3)), 3)
    s = jaxstab.read_stats(_update(tx, params, make_grads()))
    assert "grad/norm/head" in s


def test_multi_transform_with_collisions(params, make_grads):
    labels = {"encoder": "enc", "head": "head"}
    labels = jax.tree.map(lambda _: None, params) | {
        k: jax.tree.map(lambda _, v=v: v, params[k]) for k, v in labels.items()
    }
    tx = optax.multi_transform(
        {
            "enc": optax.chain(jaxstab.clip_by_global_norm(1.0), optax.adam(1e-3)),
            "head": optax.chain(jaxstab.clip_by_global_norm(1.0), optax.sgd(1e-3)),
        },
        labels,
    )
    g = make_grads(scale=5.0)
    s = jaxstab.read_stats(_update(tx, params, g))
    assert "clip/pre_norm" not in s
    enc = float(optax.tree.norm(g["encoder"]))
    head = float(optax.tree.norm(g["head"]))
    np.testing.assert_allclose(s["enc/clip/pre_norm"], enc, rtol=1e-6)
    np.testing.assert_allclose(s["head/clip/pre_norm"], head, rtol=1e-6)


def test_collision_without_dict_labels_uses_path(params, make_grads):
    tx = optax.chain(jaxstab.log_norms(), jaxstab.log_norms())
    s = jaxstab.read_stats(_update(tx, params, make_grads()))
    assert "0/grad/global_norm" in s and "1/grad/global_norm" in s


def test_inside_jit_and_eval_shape(params, make_grads):
    tx = jaxstab.stability_guard(optax.adam(1e-3))

    @jax.jit
    def step(state, g):
        _, state = tx.update(g, state, params)
        return jaxstab.read_stats(state)["grad/global_norm"]

    g = make_grads()
    np.testing.assert_allclose(step(tx.init(params), g), float(optax.tree.norm(g)), rtol=1e-6)
    abstract = jax.eval_shape(tx.init, params)
    s = jaxstab.read_stats(abstract)
    assert s["skip/halt"].dtype == jnp.bool_ and s["grad/global_norm"].shape == ()


def test_no_jaxstab_state_gives_empty_dict(params):
    assert jaxstab.read_stats(optax.adam(1e-3).init(params)) == {}
