"""On-device batching: one random permutation per epoch, fixed-shape batches that wrap around.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxstab.train.batching import epoch_permutation, batch_indices
  >>> perm = epoch_permutation(jax.random.key(0), 0, 5)
  >>> sorted(perm.tolist())
  [0, 1, 2, 3, 4]
  >>> batch_indices(jnp.arange(5), 1, 3).tolist()  # the last batch wraps to the start
  [3, 4, 0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp


def steps_per_epoch(n: int, batch_size: int) -> int:
    """``ceil(n / batch_size)``: every example is seen at least once per epoch.

    >>> steps_per_epoch(10, 4)
    3
    """
    return math.ceil(n / batch_size)


def epoch_permutation(key: jax.Array, epoch: int | jax.Array, n: int) -> jax.Array:
    """The shuffled order of the ``n`` examples for ``epoch`` (a pure function of key, epoch).

    >>> import jax
    >>> a = epoch_permutation(jax.random.key(1), 3, 8)
    >>> bool((a == epoch_permutation(jax.random.key(1), 3, 8)).all())
    True
    """
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def batch_indices(perm: jax.Array, step_in_epoch: int | jax.Array, batch_size: int) -> jax.Array:
    """Indices of batch ``step_in_epoch``: ``perm[i·B : (i+1)·B]`` taken modulo ``len(perm)``.

    >>> import jax.numpy as jnp
    >>> batch_indices(jnp.arange(4), 0, 3).tolist()
    [0, 1, 2]
    """
    n = perm.shape[0]
    positions = (step_in_epoch * batch_size + jnp.arange(batch_size)) % n
    return perm[positions]


def take(data: Mapping[str, jax.Array], idx: jax.Array) -> dict[str, jax.Array]:
    """Gathers rows ``idx`` of every array in ``data``.

    >>> import jax.numpy as jnp
    >>> take({"x": jnp.arange(4) * 10}, jnp.array([3, 0]))["x"].tolist()
    [30, 0]
    """
    return {k: v[idx] for k, v in data.items()}


def check_data(data: Mapping[str, object], name: str = "data") -> int:
    """Validates that ``data`` is a non-empty mapping of arrays sharing a leading size.

    Returns that size; raises ``TypeError``/``ValueError`` naming the offending field.

    >>> import numpy as np
    >>> check_data({"x": np.zeros((3, 2)), "y": np.zeros(3)})
    3
    """
    if not isinstance(data, Mapping) or not data:
        raise TypeError(f"{name} must be a non-empty mapping of arrays, got {type(data).__name__}")
    sizes: dict[str, int] = {}
    for k, v in data.items():
        shape = getattr(v, "shape", None)
        if shape is None or len(shape) == 0:
            raise TypeError(f"{name}[{k!r}] must be an array with a leading example axis")
        sizes[k] = int(shape[0])
    first = next(iter(sizes))
    for k, size in sizes.items():
        if size != sizes[first]:
            raise ValueError(
                f"{name}[{k!r}] has {size} rows but {name}[{first!r}] has {sizes[first]}"
            )
    if sizes[first] == 0:
        raise ValueError(f"{name}[{first!r}] has no rows")
    return sizes[first]
