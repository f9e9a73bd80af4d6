"""Standardisation that survives constant features."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxstab.numerics._common import promote
from jaxstab.numerics.elementary import safe_sqrt

__all__ = ["safe_zscore"]

Axis = int | tuple[int, ...]


def safe_zscore(x: jax.typing.ArrayLike, axis: Axis = 0, min_std: float = 1e-8) -> jax.Array:
    """Z-score ``(x − mean) / max(std, min_std)`` over ``axis``; a constant column gives 0.

    ``std`` is the population standard deviation (``ddof = 0``). The mean is computed in two
    passes (``m = mean(x)``, then ``m + mean(x − m)``), which recovers a constant column's
    value exactly, so its centred values are exactly 0 and the result is 0 rather than a
    rounding residual divided by ``min_std``. ``std`` uses :func:`safe_sqrt` (zero gradient at
    variance 0), and the gradient at a constant column is that of ``(x − mean) / min_std``:
    finite, of size ``1 / min_std``.

    Naive ``(x − x.mean()) / x.std()`` is ``0/0 = NaN`` for a constant feature (seed 004's
    OT step), and ``clamp(std, 1e-8)`` alone turns the ~1e-9 residual of a one-pass mean into
    values of order 1.

    >>> import jax.numpy as jnp
    >>> safe_zscore(jnp.array([[0.1, 1.0], [0.1, 3.0]])).tolist()
    [[0.0, -1.0], [0.0, 1.0]]
    """
    dtype, (x,) = promote(x)
    first = jnp.mean(x, axis=axis, keepdims=True)
    mean = first + jnp.mean(x - first, axis=axis, keepdims=True)
    centred = x - mean
    std = safe_sqrt(jnp.mean(centred * centred, axis=axis, keepdims=True))
    return (centred / jnp.maximum(std, jnp.asarray(min_std, x.dtype))).astype(dtype)
