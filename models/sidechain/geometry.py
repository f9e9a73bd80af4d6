"""Residue Gaussians of the side-chain model: a backbone frame carrying an offset 3-D Gaussian.

An :class:`OffsetGaussianRigid` is a :class:`~jaxstab.models.sidechain.rigid.Rigid` (the
backbone frame at CA) plus, in that frame's local coordinates, the Gaussian's mean offset
``local_mean [..., 3]`` and per-axis log standard deviation ``scaling_log [..., 3]``. The
Gaussian's axes are the frame's axes, so in global coordinates it has mean ``R μ + t`` and
covariance ``R diag(s²) Rᵀ`` with ``s = exp(scaling_log)`` and ``R`` the frame's rotation
(there is no separate side-chain rotation; the original's ``local_quat`` is commented out).

Construction (:meth:`OffsetGaussianRigid.from_rigid_and_sidechain`): the centroid of the
present side-chain atoms (the frame origin, CA, when there are none: glycine, or a residue
being designed, whose atoms are hidden), expressed in the frame; the per-axis standard
deviation of the atoms about the centroid along the frame's axes; and
``scaling_log = log(std + base_thickness + 1e-6)`` with base thickness 2.5 Å for designed
residues and 0.5 Å for context. The inputs are in Å; the trunk works in nm, reached with
:meth:`OffsetGaussianRigid.scale_translation` (0.1), which scales the translation and the
offset and adds ``log 0.1`` to the log-scales.

The trunk's 12-D update (:meth:`OffsetGaussianRigid.update`) composes the frame with an
AlphaFold-style quaternion update (``u[0:6]``), moves the offset in units of the current
scale (``u[6:9]``) and adds to the log-scale (``u[9:12]``, clipped to [-6, 3]).

>>> import jax.numpy as jnp
>>> g = OffsetGaussianRigid(Rigid.identity(), jnp.array([1.0, 0, 0]), jnp.zeros(3))
>>> g.mean().tolist(), g.covariance().diagonal().round(4).tolist()
([1.0, 0.0, 0.0], [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxstab.models.sidechain.rigid import ANG_TO_NM, NM_TO_ANG, Rigid
from jaxstab.numerics import gaussian_nll_3d, safe_exp, safe_sqrt, soft_clip

__all__ = [
    "ANG_TO_NM",
    "ATOM_SETS",
    "NM_TO_ANG",
    "OffsetGaussianRigid",
    "Rigid",
    "sidechain_local",
]

# atom14 index ranges ``[start, stop)`` of the atoms a Gaussian is built from.
# "sidechain": CB … (indices 4–13; SPEC §6 C). "sidechain_o": O + side chain (3–13), the
# original's ``sideonly=True`` path. "all": all 14 atoms, of which a designed residue keeps
# N, CA, C (0–2), the original's default ``from_rigid_and_all_atoms`` path.
ATOM_SETS: dict[str, tuple[int, int]] = {
    "sidechain": (4, 14),
    "sidechain_o": (3, 14),
    "all": (0, 14),
}

LOG_SCALE_BOUNDS = (-6.0, 3.0)  # the original's clamp of the updated log-scale (nm)


class OffsetGaussianRigid(NamedTuple):
    """Backbone frame ``rigid`` + Gaussian offset ``local_mean`` and ``scaling_log`` (local).

    A pytree; all methods return new objects.

    >>> import jax.numpy as jnp
    >>> g = OffsetGaussianRigid(Rigid.identity((4,)), jnp.zeros((4, 3)), jnp.zeros((4, 3)))
    >>> g.covariance().shape
    (4, 3, 3)
    """

    rigid: Rigid
    local_mean: jax.Array
    scaling_log: jax.Array

    @classmethod
    def from_rigid_and_sidechain(
        cls,
        rigid: Rigid,
        atom14_pos: jax.typing.ArrayLike,
        atom14_mask: jax.typing.ArrayLike,
        designed_mask: jax.typing.ArrayLike,
        base_thickness: tuple[float, float] = (2.5, 0.5),
        atoms: Literal["sidechain", "sidechain_o", "all"] = "sidechain",
    ) -> OffsetGaussianRigid:
        """Gaussian of each residue's side chain in its frame (global Å inputs).

        ``atom14_pos [..., 14, 3]`` (global), ``atom14_mask [..., 14]`` (atom present),
        ``designed_mask [...]`` (True: residue being designed, its side chain is hidden and
        it gets ``base_thickness[0]``; False: context, ``base_thickness[1]``). With ``m`` the
        kept atoms of ``ATOM_SETS[atoms]`` (present and not designed): centroid
        ``c = Σ m x / Σ m`` (CA, i.e. ``rigid.translation``, when ``Σ m = 0``);
        ``local_mean = Rᵀ (c − t)``; ``std_k = sqrt(Σ m ((Rᵀ (x − c))_k)² / Σ m)`` per local
        axis ``k`` (0 when nothing is kept; ``+ 1e-8`` under the root for ``atoms="all"``, as
        the original's all-atom Gaussian); ``scaling_log = log(std + thickness + 1e-6)``.
        The original divides by ``Σ m + 1e-6``; here the division is exact, so the centroid
        of a translated side chain is exactly translated. Masked positions may hold any
        value (NaN included); gradients are finite for one atom or none (``safe_sqrt``).

        >>> import jax.numpy as jnp
        >>> pos = jnp.zeros((14, 3)).at[4].set(jnp.array([0.0, 1.5, 0.0]))
        >>> mask = jnp.zeros(14).at[:5].set(1.0)  # N, CA, C, O, CB
        >>> g = OffsetGaussianRigid.from_rigid_and_sidechain(Rigid.identity(), pos, mask, False)
        >>> g.local_mean.tolist(), jnp.exp(g.scaling_log).round(4).tolist()
        ([0.0, 1.5, 0.0], [0.5, 0.5, 0.5])
        """
        start, stop = ATOM_SETS[atoms]
        pos = jnp.asarray(atom14_pos)[..., start:stop, :]
        present = jnp.asarray(atom14_mask)[..., start:stop] > 0
        designed = jnp.asarray(designed_mask).astype(bool)
        keep = present & ~designed[..., None]
        if atoms == "all":  # a designed residue keeps its N, CA, C
            keep = keep.at[..., :3].set(present[..., :3])
        dtype = jnp.result_type(pos.dtype, rigid.translation.dtype)
        pos = jnp.where(keep[..., None], pos, 0).astype(dtype)
        weight = keep.astype(dtype)[..., None]  # [..., A, 1]
        count = jnp.sum(weight, axis=-2)  # [..., 1]
        denom = jnp.maximum(count, 1)
        centroid = jnp.where(count > 0, jnp.sum(pos, axis=-2) / denom, rigid.translation)
        local_mean = rigid.invert_apply(centroid)
        centred = Rigid(rigid.rotation, centroid).expand().invert_apply(pos)
        centred = jnp.where(keep[..., None], centred, 0)
        var = jnp.sum(centred * centred, axis=-2) / denom
        # The original's all-atom Gaussian takes sqrt(var + 1e-8); its side-chain one sqrt(var).
        std = jnp.sqrt(var + 1e-8) if atoms == "all" else safe_sqrt(var)
        thick_designed, thick_context = base_thickness
        thickness = jnp.where(designed, thick_designed, thick_context)[..., None]
        return cls(rigid, local_mean, jnp.log(std + thickness + 1e-6))

    @property
    def scaling(self) -> jax.Array:
        """Per-axis standard deviations ``exp(scaling_log)``.

        >>> import jax.numpy as jnp
        >>> OffsetGaussianRigid(Rigid.identity(), jnp.zeros(3), jnp.zeros(3)).scaling.tolist()
        [1.0, 1.0, 1.0]
        """
        return safe_exp(self.scaling_log)

    def mean(self) -> jax.Array:
        """Global mean ``R μ_local + t``.

        >>> import jax.numpy as jnp
        >>> r = Rigid(jnp.eye(3), jnp.ones(3))
        >>> OffsetGaussianRigid(r, jnp.ones(3), jnp.zeros(3)).mean().tolist()
        [2.0, 2.0, 2.0]
        """
        return self.rigid.apply(self.local_mean)

    def covariance(self) -> jax.Array:
        """Global covariance ``R diag(s²) Rᵀ + 1e-6 I`` with ``R`` the frame's rotation.

        As the original: ``s`` floored at 1e-6, the product symmetrised, then the jitter.

        >>> import jax.numpy as jnp
        >>> g = OffsetGaussianRigid(Rigid.identity(), jnp.zeros(3), jnp.log(jnp.arange(1.0, 4)))
        >>> g.covariance().diagonal().round(4).tolist()
        [1.0, 4.0, 9.0]
        """
        s = jnp.maximum(self.scaling, 1e-6)
        rot = self.rigid.rotation
        cov = (rot * (s * s)[..., None, :]) @ jnp.swapaxes(rot, -1, -2)
        cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
        return cov + 1e-6 * jnp.eye(3, dtype=cov.dtype)

    def update(
        self,
        u: jax.typing.ArrayLike,
        mask: jax.typing.ArrayLike | None = None,
        clip: Literal["hard", "soft"] = "hard",
    ) -> OffsetGaussianRigid:
        """Apply the trunk's update ``u [..., 12]`` (or ``[..., 6]``: frame only).

        ``u[0:6]``: :meth:`Rigid.compose_update` (quaternion ``(1, u0, u1, u2)``, translation
        ``R u[3:6]``); ``u[6:9]``: the offset moves in units of the scale,
        ``μ' = (μ / max(s, 1e-6) + u[6:9]) · s'``; ``u[9:12]``: ``log s' = clip(log s +
        u[9:12], -6, 3)``. ``mask [...]`` multiplies ``u`` (0 freezes a context residue).
        ``clip="soft"`` replaces the hard clip (zero gradient outside) by
        :func:`jaxstab.numerics.soft_clip`.

        >>> import jax.numpy as jnp
        >>> g = OffsetGaussianRigid(Rigid.identity(), jnp.ones(3), jnp.zeros(3))
        >>> g2 = g.update(jnp.zeros(12).at[9:].set(jnp.log(2.0)))
        >>> g2.local_mean.round(4).tolist()
        [2.0, 2.0, 2.0]
        """
        u = jnp.asarray(u)
        if u.shape[-1] not in (6, 12):
            raise ValueError(f"u: expected last axis 6 or 12, got {u.shape}")
        if mask is not None:
            u = u * jnp.asarray(mask, u.dtype)[..., None]
        rigid = self.rigid.compose_update(u[..., :6])
        if u.shape[-1] == 6:
            return OffsetGaussianRigid(rigid, self.local_mean, self.scaling_log)
        alpha = self.local_mean / jnp.maximum(self.scaling, 1e-6)
        low, high = LOG_SCALE_BOUNDS
        raw = self.scaling_log + u[..., 9:12]
        log_new = jnp.clip(raw, low, high) if clip == "hard" else soft_clip(raw, low, high)
        return OffsetGaussianRigid(rigid, (alpha + u[..., 6:9]) * safe_exp(log_new), log_new)

    def nll(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Negative log-density of points ``x`` under the Gaussian (:func:`gaussian_nll_3d`).

        ``x [..., 3]`` (one point per Gaussian) or ``[..., A, 3]`` (``A`` points each, one
        more axis than ``local_mean``). Uses the exact factored covariance (no jitter) and
        includes ``1.5 log 2π``: the original's ``½ (mahal² + log det)`` is this minus
        ``1.5 log 2π``. Masking atoms is the caller's job.

        >>> import jax.numpy as jnp
        >>> g = OffsetGaussianRigid(Rigid.identity(), jnp.zeros(3), jnp.zeros(3))
        >>> round(float(g.nll(jnp.zeros(3))), 4)
        2.7568
        """
        x = jnp.asarray(x)
        mean, logs, rot = self.mean(), self.scaling_log, self.rigid.rotation
        if x.ndim == mean.ndim + 1:
            mean, logs, rot = mean[..., None, :], logs[..., None, :], rot[..., None, :, :]
        return gaussian_nll_3d(x, mean, logs, rot)

    def scale_translation(self, factor: float) -> OffsetGaussianRigid:
        """Change length units: translation and offset × ``factor``, log-scales + log factor.

        >>> import jax.numpy as jnp
        >>> g = OffsetGaussianRigid(Rigid.identity(), jnp.full(3, 10.0), jnp.log(jnp.full(3, 5.0)))
        >>> g = g.scale_translation(ANG_TO_NM)
        >>> g.local_mean.round(4).tolist(), g.scaling.round(4).tolist()
        ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
        """
        return OffsetGaussianRigid(
            self.rigid.scale_translation(factor),
            self.local_mean * factor,
            self.scaling_log + math.log(factor),
        )


def sidechain_local(
    mu: jax.typing.ArrayLike,
    sigma: jax.typing.ArrayLike,
    u: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """The side-chain head's decoder ``x_local = μ + tanh(u) · (1 + 0.2 |u|) · σ``.

    ``mu`` and ``sigma`` broadcast against ``u`` (pass ``mu[..., None, :]`` for ``u
    [..., A, 3]``); ``mask [..., A]`` zeroes absent atoms as the original does. Near 0 the
    factor is ``u``; it grows linearly (slope 0.2) instead of saturating, so atoms can leave
    the 1-σ box. Global coordinates: ``g.rigid.expand().apply(x_local)``.

    >>> import jax.numpy as jnp
    >>> x = sidechain_local(jnp.zeros(3), jnp.full(3, 2.0), jnp.array([0.0, 1.0, -1.0]))
    >>> [round(float(v), 4) for v in x]
    [0.0, 1.8278, -1.8278]
    """
    u = jnp.asarray(u)
    x = jnp.asarray(mu) + jnp.tanh(u) * (1 + 0.2 * jnp.abs(u)) * jnp.asarray(sigma)
    if mask is not None:
        x = x * jnp.asarray(mask, x.dtype)[..., None]
    return x
