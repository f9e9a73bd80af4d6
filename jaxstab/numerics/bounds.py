"""Smooth and straight-through bounds that keep a gradient everywhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxstab.numerics._common import check_less, promote
from jaxstab.numerics.elementary import safe_log

__all__ = [
    "bounded_positive",
    "bounded_positive_inverse",
    "soft_clip",
    "straight_through_clip",
]


def _sigmoid_parts(raw: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # sigmoid(raw), sigmoid(-raw) and the slope sigmoid(raw) sigmoid(-raw) from one
    # logistic: with m = sigmoid(-|raw|) <= 1/2, the other one is 1 - m (in [1/2, 1]: no
    # digits lost) and the slope m (1 - m) has no cancellation, so at raw = ±50 it is about
    # 2e-22 instead of the 0 that ``s * (1 - s)`` rounds to. One logistic for value and
    # slope is as fast as autodiff of a plain sigmoid (benchmarks/bench_numerics.py).
    m = jax.nn.sigmoid(-jnp.abs(raw))
    positive = raw >= 0
    return jnp.where(positive, 1.0 - m, m), jnp.where(positive, m, 1.0 - m), m * (1.0 - m)


@jax.custom_jvp
def _bounded(raw: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    return low + (high - low) * _sigmoid_parts(raw)[0]


def _bounded_jvp(primals, tangents):
    raw, low, high = primals
    raw_dot, low_dot, high_dot = tangents
    s, s_neg, slope = _sigmoid_parts(raw)
    out = low + (high - low) * s
    out_dot = (high - low) * slope * _instantiate(raw_dot, raw)
    # Bound tangents are usually symbolic zeros (constant bounds); skip their work then.
    if not isinstance(low_dot, SymbolicZero):
        out_dot = out_dot + s_neg * low_dot
    if not isinstance(high_dot, SymbolicZero):
        out_dot = out_dot + s * high_dot
    return out, jnp.broadcast_to(out_dot, out.shape).astype(out.dtype)


def _instantiate(tangent, like: jax.Array) -> jax.Array:
    if isinstance(tangent, SymbolicZero):
        return jnp.zeros_like(like)
    return tangent


_bounded.defjvp(_bounded_jvp, symbolic_zeros=True)


def bounded_positive(
    raw: jax.typing.ArrayLike, low: jax.typing.ArrayLike, high: jax.typing.ArrayLike
) -> jax.Array:
    """Smooth map of the real line onto ``(low, high)`` whose gradient never vanishes.

    ``bounded_positive(raw, low, high) = low + (high - low) * sigmoid(raw)``, derivative
    ``(high - low) * sigmoid(raw) * sigmoid(-raw)`` (``custom_jvp``), strictly positive for
    ``raw`` in [-50, 50] in float32 (about 2e-22 at the ends). With ``0 <= low`` the result is
    positive. Near the ends the value rounds to the bound itself once ``sigmoid`` rounds to 1.

    The seed's ``exp(clip(raw, -5, 5))`` has gradient exactly 0 outside ±5, so a weight that
    wanders there never comes back; and autodiff of ``sigmoid`` alone gives 0 at ``raw = 50``
    because ``s * (1 - s)`` rounds to 0. Concrete bounds must satisfy ``low < high``
    (``ValueError`` otherwise).

    >>> import jax
    >>> round(float(bounded_positive(0.0, 0.1, 10.0)), 4)
    5.05
    >>> bool(jax.grad(bounded_positive)(50.0, 0.1, 10.0) > 0)
    True
    """
    check_less(low, high)
    dtype, (raw, low, high) = promote(raw, low, high)
    return _bounded(raw, low, high).astype(dtype)


def bounded_positive_inverse(
    value: jax.typing.ArrayLike, low: jax.typing.ArrayLike, high: jax.typing.ArrayLike
) -> jax.Array:
    """Inverse of :func:`bounded_positive`: the ``raw`` that maps to ``value``.

    ``raw = log(value - low) - log(high - value)`` (the logit of
    ``(value - low) / (high - low)``, written as a difference of logs so that values close to
    either bound keep their precision). Values on or beyond a bound are floored through
    :func:`safe_log`, giving a large finite ``raw`` (about ±87 plus the log-width in float32)
    instead of ``±inf``. Naive ``log(p / (1 - p))`` loses all digits near ``p = 1``.

    >>> round(float(bounded_positive_inverse(bounded_positive(1.5, 0.1, 10.0), 0.1, 10.0)), 4)
    1.5
    """
    check_less(low, high)
    dtype, (value, low, high) = promote(value, low, high)
    return (safe_log(value - low) - safe_log(high - value)).astype(dtype)


@jax.custom_jvp
def _st_clip(x: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    return jnp.clip(x, low, high)


@_st_clip.defjvp
def _st_clip_jvp(primals, tangents):
    x, low, high = primals
    out = _st_clip(x, low, high)
    return out, jnp.broadcast_to(tangents[0], out.shape).astype(out.dtype)


@jax.custom_jvp
def _algebraic_sigmoid(z: jax.Array) -> jax.Array:
    # z / sqrt(1 + z^2); beyond |z| = cap the value is ±1 to working precision and the true
    # derivative (< cap^-3) underflows, so capping keeps z^2 from overflowing. rsqrt may round
    # the magnitude past 1, hence the final clip (its slope is supplied by the jvp below).
    cap = jnp.sqrt(jnp.finfo(z.dtype).max) / 4
    zc = jnp.clip(z, -cap, cap)
    return jnp.clip(zc * jax.lax.rsqrt(1 + zc * zc), -1, 1)


@_algebraic_sigmoid.defjvp
def _algebraic_sigmoid_jvp(primals, tangents):
    (z,), (z_dot,) = primals, tangents
    cap = jnp.sqrt(jnp.finfo(z.dtype).max) / 4
    zc = jnp.clip(z, -cap, cap)
    r = jax.lax.rsqrt(1 + zc * zc)
    # (1 + z^2)^(-3/2) directly; autodiff of z * rsqrt(1 + z^2) cancels to 0 for large z.
    return _algebraic_sigmoid(z), r * r * r * z_dot


def soft_clip(
    x: jax.typing.ArrayLike,
    low: jax.typing.ArrayLike,
    high: jax.typing.ArrayLike,
    *,
    knee: float = 0.5,
) -> jax.Array:
    """Clip into ``(low, high)`` that is the identity inside and saturates smoothly near the ends.

    With ``c = (low + high) / 2``, ``h = (high - low) / 2`` and ``z = (x - c) / h``: for
    ``|z| <= knee`` the value is ``x`` itself (bit for bit); beyond, it is
    ``c ± h (knee + (1 - knee) s(u))`` with ``u = (|z| - knee) / (1 - knee)`` and the algebraic
    sigmoid ``s(u) = u / sqrt(1 + u^2)``. Value, slope and curvature are continuous at the knee
    (``s(0) = 0``, ``s'(0) = 1``, ``s''(0) = 0``), the value stays strictly inside the bounds
    (up to rounding at the very ends), the function is strictly increasing, and the slope
    ``(1 + u^2)^(-3/2)`` is non-zero far outside the bounds (about 1e-12 at ``z = 1e4`` in
    float32; ``custom_jvp``). A ``tanh`` clip has slope exactly 0 once ``|z| > 9`` in float32
    and bends values everywhere (``20 tanh(3 / 20) = 2.97``); a hard ``clip`` has slope 0
    outside. ``knee`` in ``[0, 1)`` is the identity band as a fraction of ``h``. Concrete
    bounds must satisfy ``low < high``.

    >>> import jax
    >>> float(soft_clip(3.0, -20.0, 20.0)), round(float(soft_clip(50.0, -20.0, 20.0)), 3)
    (3.0, 19.701)
    >>> float(jax.grad(soft_clip)(3.0, -20.0, 20.0))
    1.0
    >>> bool(jax.grad(soft_clip)(1e3, 0.0, 1.0) > 0)
    True
    """
    if not 0.0 <= knee < 1.0:
        raise ValueError(f"knee must be in [0, 1), got {knee}")
    check_less(low, high)
    dtype, (x, low, high) = promote(x, low, high)
    centre = 0.5 * (low + high)
    half = 0.5 * (high - low)
    z = (x - centre) / half
    a = jnp.abs(z)
    outer = knee + (1.0 - knee) * _algebraic_sigmoid((a - knee) / (1.0 - knee))
    out = jnp.where(a <= knee, x, centre + half * jnp.sign(z) * outer)
    # Rounding of centre ± half can land an ulp outside; clip the value, keep the slope.
    return _st_clip(out, low, high).astype(dtype)


def straight_through_clip(
    x: jax.typing.ArrayLike, low: jax.typing.ArrayLike, high: jax.typing.ArrayLike
) -> jax.Array:
    """Hard clip in the forward pass, identity in the backward pass.

    Value ``clip(x, low, high)`` exactly; derivative 1 with respect to ``x`` and 0 with
    respect to the bounds (``custom_jvp``). The familiar ``x + stop_gradient(clip(x) - x)``
    gives the wrong value for large ``|x|`` in float32 (``1e10 + (1 - 1e10)`` is 0, not 1) and
    NaN for infinite ``x``; plain ``clip`` has gradient 0 outside the bounds.

    >>> import jax
    >>> float(straight_through_clip(5.0, 0.0, 1.0))
    1.0
    >>> float(jax.grad(straight_through_clip)(5.0, 0.0, 1.0))
    1.0
    """
    check_less(low, high)
    dtype, (x, low, high) = promote(x, low, high)
    return _st_clip(x, low, high).astype(dtype)
