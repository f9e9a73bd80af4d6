"""Shared fixtures of the stability-transform tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])


class TinyNet(nnx.Module):
    """encoder/layers/{0,1}/{kernel,bias}, head/{kernel,bias}."""

    def __init__(self, rngs: nnx.Rngs):
        self.encoder = Block(rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.encoder.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)


@pytest.fixture
def nnx_model() -> TinyNet:
    return TinyNet(nnx.Rngs(0))


@pytest.fixture(scope="session")
def params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "encoder": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    }


@pytest.fixture(scope="session")
def make_grads(params):
    """Random gradients shaped like ``params``; ``scale`` multiplies them."""

    def make(seed: int = 1, scale: float = 1.0) -> dict:
        rng = np.random.default_rng(seed)
        return jax.tree.map(
            lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), params
        )

    return make


@pytest.fixture(scope="session")
def transform_cases() -> dict:
    """One configured instance factory per transform (names used as test ids)."""
    import optax

    import jaxstab

    return {
        "log_norms": lambda: jaxstab.log_norms(group_depth=None, history=4),
        "zero_nonfinite": lambda: jaxstab.zero_nonfinite(),
        "clip_by_global_norm": lambda: jaxstab.clip_by_global_norm(1.0),
        "clip_by_group_norm": lambda: jaxstab.clip_by_group_norm(1.0),
        "zclip": lambda: jaxstab.zclip(warmup_steps=2),
        "autoclip": lambda: jaxstab.autoclip(history=16),
        "skip_bad_steps": lambda: jaxstab.skip_bad_steps(
            optax.adam(1e-3), spike_z=3.0, max_consecutive=5, window=8, min_window=2
        ),
        "dynamic_loss_scale": lambda: jaxstab.dynamic_loss_scale(inner=optax.adam(1e-3)),
        "stability_guard": lambda: jaxstab.stability_guard(optax.adam(1e-3), history=4),
        "guard_autoclip_noskip": lambda: jaxstab.stability_guard(
            optax.sgd(0.1), adaptive="autoclip", skip=False, group_depth=None
        ),
    }


@pytest.fixture(scope="session")
def nan_grads(make_grads) -> dict:
    g = make_grads(7)
    g["head"]["kernel"] = g["head"]["kernel"].at[0, 0].set(jnp.nan)
    return g


def assert_same_layout_impl(a, b) -> None:
    import chex

    assert jax.tree.structure(a) == jax.tree.structure(b)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


@pytest.fixture(scope="session")
def same_layout():
    """Asserts identical tree structure, shapes and dtypes."""
    return assert_same_layout_impl
