"""Replaying one step of a :func:`jaxstab.train.fit` run: where its NaN or Inf was born.

``fit`` draws step ``t``'s batch and key from the run key alone (its docstring gives the
schedule), so the step that stopped a run can be computed again from the model the run
returned (a stopping step's update is never applied) with the same parameters, batch and key,
once, under :func:`jaxstab.checks.locate_nonfinite`.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from flax import nnx
  >>> data = {"x": np.linspace(-1.0, 1.0, 8, dtype=np.float32)[:, None]}
  >>> def loss_fn(model, batch, key):
  ...     return jnp.sum(jnp.sqrt(model(batch["x"]))), {}
  >>> model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
  >>> origin = replay_step(model, loss_fn, data, key=jax.random.key(0), step=0, batch_size=4)
  >>> origin.primitive, origin.transforms
  ('sqrt', ('jvp',))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstab.train import batching


def step_inputs(
    data: Mapping[str, Any], *, key: jax.Array, step: int, batch_size: int
) -> tuple[dict[str, jax.Array], jax.Array]:
    """The batch and the key that step ``step`` of ``fit(..., data, batch_size=batch_size,
    key=key)`` used.

    >>> import numpy as np
    >>> batch, _ = step_inputs({"x": np.arange(6)}, key=jax.random.key(0), step=1, batch_size=4)
    >>> batch["x"].shape
    (4,)
    """
    n = batching.check_data(data)
    spe = batching.steps_per_epoch(n, batch_size)
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    perm_key, step_key, _ = jax.random.split(key, 3)
    perm = batching.epoch_permutation(perm_key, step // spe, n)
    idx = batching.batch_indices(perm, step % spe, batch_size)
    batch = batching.take({k: jnp.asarray(v) for k, v in data.items()}, idx)
    return batch, jax.random.fold_in(step_key, step)


def replay_step(
    model: nnx.Module,
    loss_fn: Callable,
    data: Mapping[str, Any],
    *,
    key: jax.Array,
    step: int,
    batch_size: int,
) -> Any:
    """Runs step ``step`` of a ``fit`` run again, in train mode, under
    :func:`jaxstab.checks.locate_nonfinite`: the loss and its gradient with respect to the
    model's ``nnx.Param`` state, on that step's batch and key. Returns the
    :class:`jaxstab.checks.NonFiniteReport` of the first non-finite value, or ``None``.

    ``model``: the parameters the step started from (``FitResult.model`` of a run that
    stopped at ``step``); it is not modified.
    """
    from jaxstab.checks import locate_nonfinite

    batch, step_key = step_inputs(data, key=key, step=step, batch_size=batch_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    work = nnx.merge(graphdef, params, rest, copy=True)
    work.train()
    graphdef, params, rest = nnx.split(work, nnx.Param, ...)

    def loss(p: Any) -> jax.Array:
        return loss_fn(nnx.merge(graphdef, p, rest, copy=True), batch, step_key)[0]

    return locate_nonfinite(jax.value_and_grad(loss), params)
