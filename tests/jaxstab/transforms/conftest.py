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
