"""Norms, directions, angles and distances with finite gradients at degenerate points."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxstab.numerics._common import check_last_axis, promote

__all__ = [
    "bond_angle",
    "cosine_loss",
    "cosine_similarity",
    "dihedral",
    "pairwise_distances",
    "safe_norm",
    "safe_normalize",
    "vector_angle",
]

Axis = int | tuple[int, ...]


def _nonzero_or_one(x: jax.Array) -> jax.Array:
    return jnp.where(x == 0, jnp.ones_like(x), x)


_UNROLL_UP_TO = 8


def _axis_reduce(op, v: jax.Array, axis: Axis, full) -> jax.Array:
    # ``op``/``full`` reduce non-negative values (|x|, x²), so 0 is their identity: a
    # zero-length axis reduces to 0, as in ``jnp.linalg.norm``.
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if any(v.shape[a] == 0 for a in axes):
        shape = list(v.shape)
        for a in axes:
            shape[a] = 1
        return jnp.zeros(shape, v.dtype)
    # XLA on CPU reduces a short minor axis (xyz coordinates) several times slower than it
    # combines slices elementwise, so short single axes are unrolled by hand.
    if isinstance(axis, int) and v.shape[axis] <= _UNROLL_UP_TO:
        parts = [jax.lax.index_in_dim(v, i, axis, keepdims=True) for i in range(v.shape[axis])]
        out = parts[0]
        for part in parts[1:]:
            out = op(out, part)
        return out
    return full(v, axis=axis, keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _norm_keepdims(x: jax.Array, axis: Axis) -> jax.Array:
    # Scale by the largest |x_i| so that neither x_i^2 overflows (|x| ~ 1e20 in float32) nor
    # underflows (|x| ~ 1e-25): the result is finite whenever the true norm is representable.
    big = _axis_reduce(jnp.maximum, jnp.abs(x), axis, jnp.max)
    scale = jnp.where(jnp.isinf(big), jnp.ones_like(big), _nonzero_or_one(big))
    scaled = x * (1 / scale)
    norm = big * jnp.sqrt(_axis_reduce(jnp.add, scaled * scaled, axis, jnp.sum))
    return jnp.where(jnp.isinf(big), big, norm)


@_norm_keepdims.defjvp
def _norm_keepdims_jvp(axis, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    norm = _norm_keepdims(x, axis)
    # d|x| = <x / |x|, dx>, and 0 at the zero vector (the minimum-norm subgradient).
    unit = jnp.where(norm == 0, jnp.zeros_like(x), x / _nonzero_or_one(norm))
    return norm, jnp.sum(unit * x_dot, axis=axis, keepdims=True)


def safe_norm(x: jax.typing.ArrayLike, axis: Axis = -1, keepdims: bool = False) -> jax.Array:
    """Euclidean norm with gradient 0 at the zero vector and no overflow or underflow.

    ``|x| = m * sqrt(sum((x / m)^2))`` with ``m = max |x_i|`` (0 for the zero vector), and
    derivative ``<x / |x|, dx>``, set to 0 at the zero vector (``custom_jvp``). Naive
    ``sqrt(sum(x^2))`` has gradient ``0/0 = NaN`` at the zero vector, overflows to ``inf``
    for components above ~1e19 and underflows to 0 below ~1e-19 in float32.

    >>> import jax, jax.numpy as jnp
    >>> float(safe_norm(jnp.array([3.0, 4.0])))
    5.0
    >>> jax.grad(safe_norm)(jnp.zeros(3)).tolist()
    [0.0, 0.0, 0.0]
    """
    dtype, (x,) = promote(x)
    norm = _norm_keepdims(x, axis)
    if not keepdims:
        norm = jnp.squeeze(norm, axis=axis)
    return norm.astype(dtype)


def safe_normalize(x: jax.typing.ArrayLike, axis: Axis = -1) -> jax.Array:
    """Unit vector ``x / |x|``; the zero vector maps to the zero vector with zero gradient.

    Uses :func:`safe_norm` and a double-where, so there is no ``0/0`` in the value or the
    gradient. Naive ``x / jnp.linalg.norm(x)`` is NaN at 0 (value and gradient), and
    ``x / (|x| + eps)`` is biased and has gradient ``1/eps`` at 0.

    >>> import jax.numpy as jnp
    >>> safe_normalize(jnp.array([3.0, 4.0])).tolist()
    [0.6000000238418579, 0.800000011920929]
    >>> safe_normalize(jnp.zeros(2)).tolist()
    [0.0, 0.0]
    """
    dtype, (x,) = promote(x)
    norm = _norm_keepdims(x, axis)
    unit = x / _nonzero_or_one(norm)
    return jnp.where(norm == 0, jnp.zeros_like(x), unit).astype(dtype)


def cosine_similarity(
    a: jax.typing.ArrayLike, b: jax.typing.ArrayLike, axis: Axis = -1
) -> jax.Array:
    """Cosine of the angle between ``a`` and ``b``; 0 (with zero gradient) for a zero vector.

    ``cos = <a / |a|, b / |b|>`` with :func:`safe_normalize`. Naive ``<a, b> / (|a| |b|)`` is
    NaN when either vector is zero and overflows for large entries;
    ``<a, b> / max(|a| |b|, eps)`` has gradient ``~1/eps`` near 0.

    >>> import jax.numpy as jnp
    >>> float(cosine_similarity(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])))
    0.7071067690849304
    >>> float(cosine_similarity(jnp.zeros(2), jnp.array([1.0, 1.0])))
    0.0
    """
    dtype, (a, b) = promote(a, b)
    return jnp.sum(safe_normalize(a, axis) * safe_normalize(b, axis), axis=axis).astype(dtype)


def cosine_loss(pred: jax.typing.ArrayLike, target: jax.typing.ArrayLike) -> jax.Array:
    """Mean over all leading axes of ``1 - cosine_similarity(pred, target, axis=-1)``.

    Finite with finite gradients when a prediction or a target is the zero vector (that pair
    contributes 1 and no gradient), where the naive loss is NaN.

    >>> import jax.numpy as jnp
    >>> round(float(cosine_loss(jnp.array([[1.0, 0.0], [0.0, 0.0]]), jnp.ones((2, 2)))), 4)
    0.6464
    """
    return jnp.mean(1 - cosine_similarity(pred, target, axis=-1))


def _atan2(y: jax.Array, x: jax.Array) -> jax.Array:
    # atan2 whose derivative -y/(x^2+y^2), x/(x^2+y^2) is 0 (not 0/0) at the origin.
    origin = (x == 0) & (y == 0)
    angle = jnp.arctan2(y, jnp.where(origin, jnp.ones_like(x), x))
    return jnp.where(origin, jnp.zeros_like(angle), angle)


def _cross(u: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.cross(u, v, axis=-1)


def vector_angle(u: jax.typing.ArrayLike, v: jax.typing.ArrayLike) -> jax.Array:
    """Angle in [0, π] between 3-vectors, finite with finite gradients when (anti)parallel.

    ``θ = atan2(|û × v̂|, û · v̂)`` on the unit vectors ``û, v̂`` (:func:`safe_normalize`).
    Naive ``arccos(<u, v> / (|u| |v|))`` has an infinite derivative at ±1 and NaN values once
    rounding pushes the cosine past 1 — exactly the collinear-atom case. At exactly parallel or
    antiparallel vectors the gradient is 0 (the angle has a kink there), and a zero vector gives
    angle 0 with zero gradient.

    >>> import jax, jax.numpy as jnp
    >>> round(float(vector_angle(jnp.array([1.0, 0, 0]), jnp.array([0.0, 1, 0]))), 4)
    1.5708
    >>> jax.grad(vector_angle)(jnp.array([1.0, 0, 0]), jnp.array([2.0, 0, 0])).tolist()
    [0.0, 0.0, 0.0]
    """
    check_last_axis("u", u, 3)
    check_last_axis("v", v, 3)
    dtype, (u, v) = promote(u, v)
    u_hat, v_hat = safe_normalize(u), safe_normalize(v)
    sin = safe_norm(_cross(u_hat, v_hat))
    cos = jnp.sum(u_hat * v_hat, axis=-1)
    return _atan2(sin, cos).astype(dtype)


def bond_angle(
    a: jax.typing.ArrayLike, b: jax.typing.ArrayLike, c: jax.typing.ArrayLike
) -> jax.Array:
    """Angle a-b-c at the middle point ``b`` in [0, π]: ``vector_angle(a - b, c - b)``.

    Finite with finite gradients for collinear points (angle 0 or π), where
    ``arccos`` of the normalised dot product gives NaN gradients.

    >>> import jax.numpy as jnp
    >>> a, b, c = jnp.array([1.0, 0, 0]), jnp.zeros(3), jnp.array([-1.0, 0, 0])
    >>> round(float(bond_angle(a, b, c)), 4)
    3.1416
    """
    check_last_axis("a", a, 3)
    check_last_axis("b", b, 3)
    check_last_axis("c", c, 3)
    dtype, (a, b, c) = promote(a, b, c)
    return vector_angle(a - b, c - b).astype(dtype)


def dihedral(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    c: jax.typing.ArrayLike,
    d: jax.typing.ArrayLike,
) -> jax.Array:
    """Signed torsion angle of a-b-c-d in (-π, π] (IUPAC sign convention).

    With bonds ``b1 = b - a``, ``b2 = c - b``, ``b3 = d - c`` each scaled to unit length
    (which leaves the angle unchanged and avoids overflow):
    ``φ = atan2(b1 · (b2 × b3), (b1 × b2) · (b2 × b3))``. Naive
    ``arccos`` of the normalised plane normals is NaN when three points are collinear (a
    normal is the zero vector) and has infinite gradients at 0 and π. Here collinear points
    give φ = 0 with zero gradient, and cis/trans (0, π) have finite gradients.

    >>> import jax.numpy as jnp
    >>> p = jnp.array([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]])
    >>> round(float(dihedral(p[0], p[1], p[2], p[3])), 4)
    -1.5708
    """
    for name, p in (("a", a), ("b", b), ("c", c), ("d", d)):
        check_last_axis(name, p, 3)
    dtype, (a, b, c, d) = promote(a, b, c, d)
    b1, b2, b3 = safe_normalize(b - a), safe_normalize(c - b), safe_normalize(d - c)
    n2 = _cross(b2, b3)
    y = jnp.sum(b1 * n2, axis=-1)
    x = jnp.sum(_cross(b1, b2) * n2, axis=-1)
    return _atan2(y, x).astype(dtype)


def pairwise_distances(x: jax.typing.ArrayLike) -> jax.Array:
    """All Euclidean distances between points: ``[..., N, 3] -> [..., N, N]``.

    ``D_ij = |x_i - x_j|`` through :func:`safe_norm`, so the diagonal is exactly 0 with zero
    gradient. Naive ``sqrt(sum((x_i - x_j)^2))`` has NaN gradients on the diagonal, and the
    Gram-matrix form ``|x_i|^2 + |x_j|^2 - 2 x_i·x_j`` cancels catastrophically for close points
    (it can go negative, so its square root is NaN).

    >>> import jax.numpy as jnp
    >>> pairwise_distances(jnp.array([[0.0, 0, 0], [3.0, 4, 0]])).tolist()
    [[0.0, 5.0], [5.0, 0.0]]
    """
    check_last_axis("x", x, 3)
    dtype, (x,) = promote(x)
    diff = x[..., :, None, :] - x[..., None, :, :]
    return safe_norm(diff, axis=-1).astype(dtype)
