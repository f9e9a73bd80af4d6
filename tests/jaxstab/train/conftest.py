"""Toy NNX models and data for the training-loop tests."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


class Regressor(nnx.Module):
    """A tiny MLP; with ``stateful`` it carries BatchNorm statistics and Dropout RNG state."""

    def __init__(self, rngs: nnx.Rngs, *, stateful: bool = False, din: int = 3) -> None:
        self.stateful = stateful
        self.l1 = nnx.Linear(din, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.l1(x)
        if self.stateful:
            h = self.drop(self.bn(h))
        return self.l2(jnp.tanh(h))


def mse_loss(model, batch, key):
    """Regression loss with an aux term and a small key-dependent term (checks the key schedule)."""
    pred = model(batch["x"])
    err = pred - batch["y"]
    noise = 1e-3 * jax.random.normal(key, ())
    return jnp.mean(err**2) + noise, {"mae": jnp.mean(jnp.abs(err)), "noise": noise}


def make_data(n: int = 37, din: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, din)).astype(np.float32)
    w = rng.normal(size=(din, 1)).astype(np.float32)
    return {"x": x, "y": np.sin(x @ w).astype(np.float32)}


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return make_data()


@pytest.fixture
def toy() -> SimpleNamespace:
    """The toy model, loss and data maker (test modules cannot import conftest directly)."""
    return SimpleNamespace(Regressor=Regressor, mse_loss=mse_loss, make_data=make_data)
