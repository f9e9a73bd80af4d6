"""Elementary safe functions: log, exp, division and square root.

Each is written so that finite inputs give a finite value *and* a finite gradient, and a NaN
input still gives NaN. Conditions in the ``where`` calls are phrased so that NaN takes the
ordinary branch; that is what keeps NaN visible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxstab.numerics._common import promote

__all__ = ["exp_limit", "safe_div", "safe_exp", "safe_log", "safe_sqrt"]


def safe_log(x: jax.typing.ArrayLike) -> jax.Array:
    """Natural log with the argument floored at the smallest normal number.

    ``safe_log(x) = log(max(x, tiny))`` with ``tiny = finfo(dtype).tiny``. The gradient is
    ``1/x`` for ``x > tiny`` and 0 below, where the function is constant (double-where trick).

    Naive ``jnp.log(0)`` is ``-inf`` with an infinite gradient, and ``log(x + eps)`` biases
    every value. Here log 0 is ``log(tiny)`` (about -87.3 in float32, -708.4 in float64) and
    every ``x >= tiny`` gives exactly ``jnp.log(x)``.

    >>> import jax
    >>> round(float(safe_log(0.0)), 2), float(jax.grad(safe_log)(0.0))
    (-87.34, 0.0)
    """
    dtype, (x,) = promote(x)
    tiny = jnp.finfo(x.dtype).tiny
    clamped = x < tiny  # False for NaN, so NaN flows through log.
    out = jnp.log(jnp.where(clamped, tiny, x))
    return out.astype(dtype)


def exp_limit(dtype: jax.typing.DTypeLike) -> float:
    """Largest argument whose exponential is finite in ``dtype`` (with a small margin)."""
    finfo = jnp.finfo(dtype)
    return float(np.log(float(finfo.max)) * (1.0 - 4.0 * float(finfo.eps)))


@jax.custom_jvp
def _clipped_exp(x: jax.Array, limit: jax.Array) -> jax.Array:
    return jnp.exp(jnp.minimum(x, limit))


@_clipped_exp.defjvp
def _clipped_exp_jvp(primals, tangents):
    x, limit = primals
    x_dot, _ = tangents
    y = _clipped_exp(x, limit)
    # The derivative is the (clipped) function itself: positive everywhere, never zeroed.
    return y, y * x_dot


def safe_exp(x: jax.typing.ArrayLike) -> jax.Array:
    """Exponential with the argument capped below the overflow point of the dtype.

    ``safe_exp(x) = exp(min(x, L))`` with ``L = log(finfo(dtype).max)`` less a few ulps, and
    derivative ``safe_exp(x)`` everywhere (``custom_jvp``): above ``L`` the value saturates at
    about ``finfo.max`` and the gradient stays positive, so an optimiser is still pushed back.

    Naive ``jnp.exp(1000.)`` is ``inf`` (gradient ``inf``, then NaN downstream); the clamp
    ``exp(clip(x, -5, 5))`` has gradient exactly 0 outside the clamp.

    >>> import jax
    >>> bool(jax.numpy.isfinite(safe_exp(1000.0))), bool(jax.grad(safe_exp)(1000.0) > 0)
    (True, True)
    """
    dtype, (x,) = promote(x)
    limit = jnp.asarray(exp_limit(dtype), x.dtype)
    return _clipped_exp(x, limit).astype(dtype)


def safe_div(n: jax.typing.ArrayLike, d: jax.typing.ArrayLike) -> jax.Array:
    """Division that returns 0 where the denominator is exactly 0.

    ``safe_div(n, d) = n / d`` for ``d != 0`` and ``0`` for ``d == 0`` (the
    ``divide_no_nan`` convention), with zero gradient there. The double-where trick keeps
    ``1/0`` out of the backward pass: naive ``n / d`` gives ``inf``/NaN at ``d = 0`` and a
    ``where`` around it alone still leaks NaN gradients. A NaN numerator stays NaN even where
    ``d == 0``. Quotients beyond the float range overflow as in any division.

    >>> import jax
    >>> float(safe_div(1.0, 0.0)), float(jax.grad(safe_div, argnums=1)(1.0, 0.0))
    (0.0, 0.0)
    """
    dtype, (n, d) = promote(n, d)
    zero = d == 0
    quotient = n / jnp.where(zero, jnp.ones_like(d), d)
    at_zero = jnp.where(jnp.isnan(n), n, jnp.zeros_like(n))
    return jnp.where(zero, at_zero, quotient).astype(dtype)


@jax.custom_jvp
def _sqrt_floor0(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(x, 0))  # jnp.maximum keeps NaN


@_sqrt_floor0.defjvp
def _sqrt_floor0_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    root = _sqrt_floor0(x)
    positive = root > 0
    slope = jnp.where(positive, 0.5 / jnp.where(positive, root, 1), 0)
    return root, slope * x_dot


def safe_sqrt(x: jax.typing.ArrayLike) -> jax.Array:
    """Square root with a finite (zero) gradient at 0 and below.

    ``safe_sqrt(x) = sqrt(max(x, 0))``; the derivative is ``1/(2 sqrt(x))`` for ``x > 0`` and
    0 otherwise (the minimum-norm subgradient of the non-negative root; ``custom_jvp`` with the
    slope itself computed through a double-where, so no ``0 * inf`` appears in either mode).
    Naive ``jnp.sqrt`` has gradient ``inf`` at 0, which turns into NaN as soon as it is
    multiplied by a zero cotangent.

    >>> import jax
    >>> float(safe_sqrt(0.0)), float(jax.grad(safe_sqrt)(0.0)), float(safe_sqrt(4.0))
    (0.0, 0.0, 2.0)
    """
    dtype, (x,) = promote(x)
    return _sqrt_floor0(x).astype(dtype)
