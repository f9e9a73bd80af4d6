"""gradient_flow_report: seed 002's gradient-flow checklist, automated."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxstab


def test_stage2_freeze_with_multi_transform(nnx_model):
    # Stage 2: encoder frozen with optax.set_to_zero, head trained. The gradient of a loss
    # through a stop_gradient'ed encoder reaches only the head.
    params = nnx.state(nnx_model, nnx.Param)
    x = jnp.ones((5, 3))

    def loss(p, detach):
        model = nnx.merge(nnx.graphdef(nnx_model), p)
        h = x
        for layer in model.encoder.layers:
            h = jnp.tanh(layer(h))
        if detach:
            h = jax.lax.stop_gradient(h)
        return jnp.sum(model.head(h) ** 2)

    trainable = lambda g: g == "head"
    good = jaxstab.gradient_flow_report(jax.grad(loss)(params, True), trainable)
    assert good.ok and good.frozen_with_grad == [] and good.trainable_without_grad == []
    leak = jaxstab.gradient_flow_report(jax.grad(loss)(params, False), trainable)
    assert leak.frozen_with_grad == ["encoder"] and not leak.ok
    assert "encoder" in str(leak) and "frozen but receives a gradient" in str(leak)


def test_mask_pytree_and_norms():
    grads = {"vae": {"enc": jnp.array([3.0, 4.0]), "dec": jnp.zeros(2)}, "flow": jnp.zeros(3)}
    mask = {"vae": {"enc": False, "dec": True}, "flow": True}
    r = jaxstab.gradient_flow_report(grads, mask, group_depth=2)
    assert r.frozen_with_grad == ["vae/enc"]
    assert r.trainable_without_grad == ["flow", "vae/dec"]  # pytree (sorted-key) order
    assert r.norms == {"vae/enc": 5.0, "vae/dec": 0.0, "flow": 0.0}
    assert dataclasses.is_dataclass(r)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.norms = {}  # type: ignore[misc]


def test_mask_prefix_and_optax_style():
    grads = {"a": {"x": jnp.ones(2), "y": jnp.ones(1)}, "b": jnp.ones(1)}
    r = jaxstab.gradient_flow_report(grads, {"a": True, "b": False})
    assert r.frozen_with_grad == ["b"] and r.trainable_without_grad == []
    mask = jax.tree.map(lambda _: True, grads)
    assert jaxstab.gradient_flow_report(grads, mask).ok


def test_nan_counts_as_gradient():
    r = jaxstab.gradient_flow_report({"a": jnp.array([jnp.nan])}, lambda g: False)
    assert r.frozen_with_grad == ["a"] and np.isnan(r.norms["a"])


def test_bad_inputs():
    grads = {"a": jnp.ones(2), "b": jnp.ones(1)}
    with pytest.raises(TypeError, match="leaf 1"):
        jaxstab.gradient_flow_report(grads, {"a": True, "b": "yes"})
    with pytest.raises(ValueError, match="expected_trainable"):
        jaxstab.gradient_flow_report(grads, {"a": True, "c": True})
    with pytest.raises(TypeError, match="'a'"):
        jaxstab.gradient_flow_report(grads, lambda g: 1)


def test_str_lists_every_group():
    r = jaxstab.gradient_flow_report({"enc": jnp.ones(2), "flow": jnp.zeros(2)}, lambda g: True)
    text = str(r)
    assert text.splitlines()[0] == "Gradient flow: PROBLEMS FOUND"
    assert "enc" in text and "flow" in text and "exactly zero" in text
    _ = optax  # the report pairs with optax.multi_transform / set_to_zero freezing
