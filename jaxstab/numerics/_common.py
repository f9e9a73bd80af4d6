"""Dtype handling and argument checks shared by the safe-math modules."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_last_axis", "check_less", "compute_dtype", "promote", "result_dtype"]


def result_dtype(*args: jax.typing.ArrayLike) -> jnp.dtype:
    """Floating dtype of the result: the promoted input dtype, integers → default float."""
    dtype = jnp.result_type(*args)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return jnp.dtype(dtype)


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Dtype used inside a primitive: 16-bit floats are computed in float32."""
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def promote(*args: jax.typing.ArrayLike) -> tuple[jnp.dtype, list[jax.Array]]:
    """Returns the output dtype and the arguments cast to the compute dtype."""
    out = result_dtype(*args)
    comp = compute_dtype(out)
    return out, [jnp.asarray(a).astype(comp) for a in args]


def _concrete(x: jax.typing.ArrayLike) -> np.ndarray | None:
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_less(low: jax.typing.ArrayLike, high: jax.typing.ArrayLike) -> None:
    """Raises ValueError when concrete bounds violate ``low < high`` (traced bounds pass)."""
    lo, hi = _concrete(low), _concrete(high)
    if lo is None or hi is None:
        return
    lo, hi = np.broadcast_arrays(lo, hi)
    bad = ~(lo < hi)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"low/high: need low < high everywhere; first bad index {idx}: "
            f"low={lo[idx]!r}, high={hi[idx]!r}"
        )


def check_last_axis(name: str, x: jax.typing.ArrayLike, size: int) -> None:
    """Raises ValueError unless the last axis of ``x`` has ``size`` entries."""
    shape: Sequence[int] = jnp.shape(x)
    if len(shape) == 0 or shape[-1] != size:
        raise ValueError(f"{name}: last axis must have size {size}, got shape {tuple(shape)}")
