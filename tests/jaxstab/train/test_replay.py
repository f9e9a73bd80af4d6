"""Replaying the step that stopped a ``fit`` run: same batch and key, and the NaN's origin."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxstab.train import fit
from jaxstab.train.replay import replay_step, step_inputs

DATA = {"x": np.linspace(-1, 1, 32, dtype=np.float32)[:, None], "i": np.arange(32)}
BAD = 13


def loss_fn(model, batch, key):
    sign = jnp.where(batch["i"] == BAD, -1.0, 1.0)
    noise = jax.random.normal(key, (len(batch["i"]), 1)) * 0.0
    return jnp.mean((model(batch["x"]) + noise) ** 2) + jnp.mean(jnp.sqrt(sign)), {}


def test_replay_finds_the_origin_in_the_step_that_stopped_the_run():
    key = jax.random.key(3)
    result = fit(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), optax.sgd(0.01), loss_fn, DATA,
                 batch_size=4, epochs=3, key=key)  # fmt: skip
    assert result.status == "nonfinite"
    stop = len(result.history["loss"]) - 1
    # The replayed batch is the one fit used: the bad example is in the stopping step only.
    seen = [
        BAD in step_inputs(DATA, key=key, step=t, batch_size=4)[0]["i"] for t in range(stop + 1)
    ]
    assert stop > 0 and seen == [False] * stop + [True]
    origin = replay_step(result.model, loss_fn, DATA, key=key, step=stop, batch_size=4)
    assert origin.primitive == "sqrt"
    lines, start = inspect.getsourcelines(loss_fn)
    assert origin.file == __file__
    assert origin.line == start + next(i for i, ln in enumerate(lines) if "jnp.sqrt" in ln)


def test_replay_of_a_finite_step_finds_nothing():
    key = jax.random.key(3)
    model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    clean = {k: v[DATA["i"] != BAD] for k, v in DATA.items()}
    assert replay_step(model, loss_fn, clean, key=key, step=2, batch_size=4) is None
