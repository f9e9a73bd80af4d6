"""Scaled dot-product attention that stays finite for fully masked rows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxstab.numerics._common import promote

__all__ = ["dot_product_attention"]


def dot_product_attention(
    q: jax.typing.ArrayLike,
    k: jax.typing.ArrayLike,
    v: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Softmax attention in the layout of :func:`jax.nn.dot_product_attention`.

    Shapes: ``q [..., T, N, H]``, ``k [..., S, N, H]``, ``v [..., S, N, D]``; ``mask`` is
    boolean (``True`` = attend), broadcastable to ``[..., N, T, S]``. Output ``[..., T, N, D]``:
    ``softmax(q kᵀ / √H) v`` with ``H = q.shape[-1]``, the *query* feature size (seed 004's bug
    scaled by the number of keys).

    A row whose keys are all masked returns zeros with finite (zero) gradients: the softmax
    denominator of such a row is replaced by 1 through a double-where. Naive
    ``softmax(where(mask, logits, -inf))`` is ``0/0 = NaN`` there, and
    :func:`jax.nn.dot_product_attention` returns the mean of ``v`` over all (masked) keys.
    Elsewhere the result matches :func:`jax.nn.dot_product_attention`. bfloat16 inputs are
    computed in float32.

    >>> import jax.numpy as jnp
    >>> q = k = v = jnp.ones((2, 1, 4))
    >>> mask = jnp.array([[True, True], [False, False]])
    >>> dot_product_attention(q, k, v, mask)[:, 0, 0].tolist()
    [1.0, 0.0]
    """
    q_shape, k_shape, v_shape = jnp.shape(q), jnp.shape(k), jnp.shape(v)
    if len(q_shape) < 3 or len(k_shape) < 3 or len(v_shape) < 3:
        raise ValueError(
            f"q, k, v: need rank >= 3 ([..., T, N, H]), got {q_shape}, {k_shape}, {v_shape}"
        )
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"k: feature size {k_shape[-1]} differs from q's {q_shape[-1]}")
    if k_shape[-3:-1] != v_shape[-3:-1]:
        raise ValueError(f"v: keys/heads {v_shape[-3:-1]} differ from k's {k_shape[-3:-1]}")
    if mask is not None and jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"mask: expected a boolean array, got dtype {jnp.result_type(mask)}")
    dtype, (q, k, v) = promote(q, k, v)
    scale = 1.0 / math.sqrt(q_shape[-1])
    logits = jnp.einsum("...tnh,...snh->...nts", q * jnp.asarray(scale, q.dtype), k)
    if mask is None:
        weights = jax.nn.softmax(logits, axis=-1)
    else:
        mask = jnp.broadcast_to(mask, logits.shape)
        peak = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
        peak = jax.lax.stop_gradient(jnp.where(jnp.isneginf(peak), 0, peak))
        shifted = jnp.where(mask, logits - peak, 0)  # no exp of -inf/overflow in masked slots
        unnorm = jnp.where(mask, jnp.exp(shifted), 0)
        total = jnp.sum(unnorm, axis=-1, keepdims=True)
        weights = unnorm / jnp.where(total == 0, 1, total)
    out = jnp.einsum("...nts,...snd->...tnd", weights, v)
    return out.astype(dtype)
