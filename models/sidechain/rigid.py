"""Rigid residue frames for the side-chain Gaussian port: rotation + translation as a pytree.

A :class:`Rigid` maps local coordinates to global ones, ``x_global = R x_local + t``; the
columns of ``R`` are the local axes written in global coordinates. Shapes are ``[..., 3, 3]``
and ``[..., 3]``; every function is jittable, vmappable and differentiable.

Frame conventions (both built by Gram–Schmidt through :func:`jaxstab.numerics.safe_normalize`):

* :meth:`Rigid.from_three_points` is the frame the original trains with (its dataset builds
  ``rotmats_1`` with Chroma's ``frames_from_backbone``): origin CA, x along CA→N, y along
  ``x × (C − CA)`` (normal to the N–CA–C plane), z = x × y. In this frame N lies on the +x
  axis and C in the xz-plane with z < 0.
* :meth:`Rigid.from_gram_schmidt` is the AlphaFold / OpenFold ``from_3_points`` form: x from
  the point on the negative x axis to the origin, y the in-plane remainder, z = x × y. The
  original's ``OffsetGaussianRigid.from_atoms`` helper calls it as
  ``(p_neg_x_axis=N, origin=CA, p_xy_plane=C)``; AlphaFold's backbone group uses
  ``(C, CA, N)``.

Degenerate points (coincident N/CA/C, collinear atoms) give a proper rotation (a fixed
fallback axis replaces the undefined one) with finite gradients, never NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxstab.numerics import safe_norm, safe_normalize

__all__ = ["ANG_TO_NM", "NM_TO_ANG", "Rigid", "quaternion_to_rotation"]

# Å ↔ nm factors of the original's trunk (its ``data/utils.py``: ANG_TO_NM_SCALE = 1 / 10).
ANG_TO_NM = 0.1
NM_TO_ANG = 10.0


def _unit_or(v: jax.Array, fallback: jax.Array) -> jax.Array:
    # v / |v|, or ``fallback`` (a unit vector) where v is exactly the zero vector.
    zero = safe_norm(v, keepdims=True) == 0
    return jnp.where(zero, jnp.broadcast_to(fallback, v.shape), safe_normalize(v))


def _orthonormal_axes(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # e0 = a / |a|; e1 = the part of b orthogonal to e0, normalised; e2 = e0 × e1.
    # Fallbacks: e0 = +x for a = 0; e1 = unit(e0 × axis) when b is parallel to e0 (or 0),
    # with an axis that cannot be parallel to e0.
    dtype = a.dtype
    e0 = _unit_or(a, jnp.array([1.0, 0.0, 0.0], dtype))
    b_perp = b - jnp.sum(e0 * b, axis=-1, keepdims=True) * e0
    z_axis, x_axis = jnp.array([0.0, 0.0, 1.0], dtype), jnp.array([1.0, 0.0, 0.0], dtype)
    axis = jnp.where(jnp.abs(e0[..., 2:3]) < 0.9, z_axis, x_axis)
    e1 = _unit_or(b_perp, safe_normalize(jnp.cross(e0, axis)))
    e2 = jnp.cross(e0, e1)
    return e0, e1, e2


def quaternion_to_rotation(q: jax.typing.ArrayLike) -> jax.Array:
    """Rotation matrix ``[..., 3, 3]`` of a quaternion ``(w, x, y, z)`` (scalar first).

    The quaternion is normalised first; the zero quaternion maps to the identity.

    >>> import jax.numpy as jnp
    >>> quaternion_to_rotation(jnp.array([0.0, 0.0, 0.0, 1.0])).round(3).tolist()
    [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    q = jnp.asarray(q)
    q = _unit_or(q, jnp.array([1.0, 0.0, 0.0, 0.0], q.dtype))
    w, x, y, z = (q[..., i] for i in range(4))
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


class Rigid(NamedTuple):
    """Rigid transform ``x ↦ R x + t`` (``rotation [..., 3, 3]``, ``translation [..., 3]``).

    An immutable pytree: ``jax.tree.map`` slices or stacks frames, and it passes through
    ``jit``/``vmap``/``grad`` unchanged.

    >>> import jax.numpy as jnp
    >>> r = Rigid(jnp.eye(3), jnp.array([1.0, 2.0, 3.0]))
    >>> r.apply(jnp.zeros(3)).tolist()
    [1.0, 2.0, 3.0]
    """

    rotation: jax.Array
    translation: jax.Array

    @classmethod
    def identity(
        cls, shape: tuple[int, ...] = (), dtype: jax.typing.DTypeLike | None = None
    ) -> Rigid:
        """Identity frames of batch shape ``shape``.

        >>> Rigid.identity((2,)).rotation.shape
        (2, 3, 3)
        """
        dtype = dtype or jnp.zeros(()).dtype
        rot = jnp.broadcast_to(jnp.eye(3, dtype=dtype), (*shape, 3, 3))
        return cls(rot, jnp.zeros((*shape, 3), dtype))

    @classmethod
    def from_three_points(
        cls, n: jax.typing.ArrayLike, ca: jax.typing.ArrayLike, c: jax.typing.ArrayLike
    ) -> Rigid:
        """Backbone frame of the original: origin CA, x toward N, C in the xz-plane (z < 0).

        Axes ``x = unit(N − CA)``, ``y = unit(x × (C − CA))``, ``z = x × y``, i.e. with the
        Gram–Schmidt pair ``e0 = unit(N − CA)``, ``e1 = unit((C − CA) ⊥ e0)``:
        ``R = [e0, e0 × e1, −e1]``. Coincident or collinear atoms give a proper rotation with
        finite gradients (see the module docstring).

        >>> import jax.numpy as jnp
        >>> n, ca, c = jnp.array([1.46, 0, 0]), jnp.zeros(3), jnp.array([-0.55, 1.42, 0])
        >>> f = Rigid.from_three_points(n, ca, c)
        >>> [round(float(v), 2) for v in f.invert_apply(c)]
        [-0.55, 0.0, -1.42]
        """
        n, ca, c = jnp.broadcast_arrays(*(jnp.asarray(p) for p in (n, ca, c)))
        e0, e1, e2 = _orthonormal_axes(n - ca, c - ca)
        return cls(jnp.stack([e0, e2, -e1], axis=-1), ca)

    @classmethod
    def from_gram_schmidt(
        cls,
        point_on_neg_x_axis: jax.typing.ArrayLike,
        origin: jax.typing.ArrayLike,
        point_on_xy_plane: jax.typing.ArrayLike,
    ) -> Rigid:
        """AlphaFold/OpenFold ``from_3_points``: ``e0 = unit(origin − p_neg_x)``, ``e1`` the
        normalised part of ``p_xy − origin`` orthogonal to ``e0``, ``e2 = e0 × e1``.

        >>> import jax.numpy as jnp
        >>> f = Rigid.from_gram_schmidt(jnp.array([-1.0, 0, 0]), jnp.zeros(3), jnp.ones(3))
        >>> [[round(float(v), 3) for v in row] for row in f.rotation]
        [[1.0, 0.0, 0.0], [0.0, 0.707, -0.707], [0.0, 0.707, 0.707]]
        """
        p, o, q = jnp.broadcast_arrays(
            *(jnp.asarray(x) for x in (point_on_neg_x_axis, origin, point_on_xy_plane))
        )
        e0, e1, e2 = _orthonormal_axes(o - p, q - o)
        return cls(jnp.stack([e0, e1, e2], axis=-1), o)

    @classmethod
    def from_quaternion_update(cls, update: jax.typing.ArrayLike) -> Rigid:
        """AlphaFold backbone update ``[..., 6] = (b, c, d, t_x, t_y, t_z)``.

        The rotation is that of the quaternion ``(1, b, c, d)`` normalised, the translation
        is ``update[..., 3:]``; an all-zero update is the identity.

        >>> import jax.numpy as jnp
        >>> Rigid.from_quaternion_update(jnp.zeros(6)).rotation.tolist()[0]
        [1.0, 0.0, 0.0]
        """
        update = jnp.asarray(update)
        if update.shape[-1] != 6:
            raise ValueError(f"update: expected last axis 6, got {update.shape}")
        q = jnp.concatenate([jnp.ones_like(update[..., :1]), update[..., :3]], axis=-1)
        return cls(quaternion_to_rotation(q), update[..., 3:])

    def compose(self, other: Rigid) -> Rigid:
        """``self ∘ other``: apply ``other`` first, then ``self``.

        >>> import jax.numpy as jnp
        >>> a = Rigid(jnp.eye(3), jnp.ones(3))
        >>> Rigid.compose(a, a).translation.tolist()
        [2.0, 2.0, 2.0]
        """
        rot = self.rotation @ other.rotation
        return Rigid(rot, self.apply(other.translation))

    def invert(self) -> Rigid:
        """Inverse transform ``x ↦ Rᵀ (x − t)``.

        >>> import jax.numpy as jnp
        >>> Rigid(jnp.eye(3), jnp.ones(3)).invert().translation.tolist()
        [-1.0, -1.0, -1.0]
        """
        rot_t = jnp.swapaxes(self.rotation, -1, -2)
        return Rigid(rot_t, -jnp.einsum("...ij,...j->...i", rot_t, self.translation))

    def apply(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Local → global: ``R x + t`` (batch shapes broadcast; see :meth:`expand`).

        >>> import jax.numpy as jnp
        >>> Rigid(jnp.eye(3), jnp.ones(3)).apply(jnp.ones(3)).tolist()
        [2.0, 2.0, 2.0]
        """
        return jnp.einsum("...ij,...j->...i", self.rotation, x) + self.translation

    def invert_apply(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Global → local: ``Rᵀ (x − t)``.

        >>> import jax.numpy as jnp
        >>> Rigid(jnp.eye(3), jnp.ones(3)).invert_apply(jnp.ones(3)).tolist()
        [0.0, 0.0, 0.0]
        """
        return jnp.einsum("...ji,...j->...i", self.rotation, x - self.translation)

    def expand(self, axis: int = -1) -> Rigid:
        """Insert a batch axis (default: last), e.g. to apply ``[N]`` frames to ``[N, A, 3]``.

        >>> import jax.numpy as jnp
        >>> Rigid.identity((5,)).expand().apply(jnp.ones((5, 14, 3))).shape
        (5, 14, 3)
        """
        # Negative axes count from the end of the batch axes, before the coordinate axes.
        t_axis, r_axis = (axis - 1, axis - 2) if axis < 0 else (axis, axis)
        return Rigid(
            jnp.expand_dims(self.rotation, r_axis), jnp.expand_dims(self.translation, t_axis)
        )

    def compose_update(self, update: jax.typing.ArrayLike) -> Rigid:
        """``self ∘ from_quaternion_update(update)``: ``R ← R R_u``, ``t ← t + R t_u``.

        The update is expressed in the current local frame (AlphaFold's structure module,
        OpenFold's ``compose_q_update_vec``).

        >>> import jax.numpy as jnp
        >>> r = Rigid.identity().compose_update(jnp.array([0, 0, 0, 1.0, 0, 0]))
        >>> r.translation.tolist()
        [1.0, 0.0, 0.0]
        """
        return self.compose(Rigid.from_quaternion_update(update))

    def scale_translation(self, factor: float) -> Rigid:
        """Multiply the translation by ``factor`` (0.1 for Å → nm, 10 for nm → Å).

        >>> import jax.numpy as jnp
        >>> Rigid(jnp.eye(3), jnp.full(3, 10.0)).scale_translation(0.1).translation.tolist()
        [1.0, 1.0, 1.0]
        """
        return Rigid(self.rotation, self.translation * factor)
