"""Geometry of the PyTorch side-chain model: safe elementary functions, rigid frames and the
residues' offset Gaussians, written from the description of ``jaxstab.models.sidechain``
(:mod:`~jaxstab.models.sidechain.rigid`, :mod:`~jaxstab.models.sidechain.geometry`).

Every function takes and returns ``torch`` tensors and is differentiable by autograd with the
same derivatives as the Flax port's (the zero vector's norm has gradient 0, ``safe_exp`` keeps
its slope above the overflow cap, the soft clip's slope is its analytic one).

Example:
  >>> import torch
  >>> n, ca, c = torch.tensor([1.46, 0, 0]), torch.zeros(3), torch.tensor([-0.55, 1.42, 0])
  >>> f = Rigid.from_three_points(n, ca, c)
  >>> [round(float(v), 2) for v in f.invert_apply(c)]
  [-0.55, 0.0, -1.42]
  >>> g = OffsetGaussian(Rigid.identity(()), torch.ones(3), torch.zeros(3))
  >>> g.update(torch.zeros(12)).local_mean.tolist()
  [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

__all__ = [
    "ANG_TO_NM",
    "ATOM_SETS",
    "LOG_SCALE_BOUNDS",
    "NM_TO_ANG",
    "OffsetGaussian",
    "Rigid",
    "gaussian_nll_3d",
    "mahalanobis_logdet",
    "quaternion_to_rotation",
    "safe_exp",
    "safe_norm",
    "sidechain_local",
    "soft_clip",
]

ANG_TO_NM = 0.1
NM_TO_ANG = 10.0
ATOM_SETS: dict[str, tuple[int, int]] = {"sidechain": (4, 14), "sidechain_o": (3, 14),
                                          "all": (0, 14)}  # fmt: skip
LOG_SCALE_BOUNDS = (-6.0, 3.0)
_CHOL_EPS = 1e-8
_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------- elementary
def safe_norm(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm whose gradient is 0 at the zero vector (double ``where``).

    >>> import torch
    >>> x = torch.zeros(3, requires_grad=True)
    >>> safe_norm(x).backward(); x.grad.tolist()
    [0.0, 0.0, 0.0]
    """
    sq = torch.sum(x * x, dim=dim, keepdim=keepdim)
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), 0.0 * sq)


def _unit_or(v: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    # v / |v|, or ``fallback`` where v is exactly the zero vector.
    norm = safe_norm(v, keepdim=True)
    zero = norm == 0
    unit = v / torch.where(zero, torch.ones_like(norm), norm)
    return torch.where(zero, fallback.expand_as(v), unit)


def _safe_normalize(v: torch.Tensor) -> torch.Tensor:
    return _unit_or(v, torch.zeros_like(v))


def _exp_limit(dtype: torch.dtype) -> float:
    finfo = torch.finfo(dtype)
    return float(math.log(float(finfo.max)) * (1.0 - 4.0 * float(finfo.eps)))


class _SafeExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.exp(torch.clamp(x, max=_exp_limit(x.dtype)))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * y


def safe_exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(min(x, L))`` (``L`` just below the overflow point) with derivative equal to the
    value everywhere (``jaxstab.numerics.safe_exp``).

    >>> import torch
    >>> bool(torch.isfinite(safe_exp(torch.tensor(1000.0))))
    True
    """
    return _SafeExp.apply(x)


class _AlgebraicSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        cap = math.sqrt(torch.finfo(z.dtype).max) / 4
        zc = torch.clamp(z, -cap, cap)
        r = torch.rsqrt(1 + zc * zc)
        ctx.save_for_backward(r)
        return torch.clamp(zc * r, -1.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return grad * r * r * r


def soft_clip(x: torch.Tensor, low: float, high: float, knee: float = 0.5) -> torch.Tensor:
    """``jaxstab.numerics.soft_clip``: identity for ``|z| <= knee``, an algebraic sigmoid
    beyond, the value clipped into ``[low, high]`` with a straight-through slope.

    >>> import torch
    >>> float(soft_clip(torch.tensor(3.0), -20.0, 20.0))
    3.0
    >>> round(float(soft_clip(torch.tensor(50.0), -20.0, 20.0)), 3)
    19.701
    """
    centre, half = 0.5 * (low + high), 0.5 * (high - low)
    z = (x - centre) / half
    a = torch.abs(z)
    outer = knee + (1.0 - knee) * _AlgebraicSigmoid.apply((a - knee) / (1.0 - knee))
    out = torch.where(a <= knee, x, centre + half * torch.sign(z) * outer)
    return out + (torch.clamp(out, low, high) - out).detach()


def gaussian_nll_3d(
    x: torch.Tensor, mean: torch.Tensor, scale_log: torch.Tensor, rotation: torch.Tensor
) -> torch.Tensor:
    """``½ |diag(e^{−s}) Rᵀ (x − μ)|² + Σ s + 1.5 log 2π`` (``jaxstab.numerics``'s form).

    >>> import torch
    >>> round(float(gaussian_nll_3d(torch.zeros(3), torch.zeros(3), torch.zeros(3),
    ...                             torch.eye(3))), 4)
    2.7568
    """
    local = torch.einsum("...ji,...j->...i", rotation, x - mean)
    z = local * torch.exp(-scale_log)
    return 0.5 * torch.sum(z * z, dim=-1) + torch.sum(scale_log, dim=-1) + 1.5 * _LOG_2PI


def mahalanobis_logdet(
    delta: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Δᵀ Σ⁻¹ Δ, log det Σ)`` by an unrolled Cholesky, squared pivots floored at 1e-8.

    >>> import torch
    >>> d, ld = mahalanobis_logdet(torch.tensor([2.0, 0, 0]), 4.0 * torch.eye(3))
    >>> round(float(d), 4), round(float(ld), 4)
    (1.0, 4.1589)
    """
    s00, s01, s02 = sigma[..., 0, 0], sigma[..., 0, 1], sigma[..., 0, 2]
    s11, s12, s22 = sigma[..., 1, 1], sigma[..., 1, 2], sigma[..., 2, 2]
    d0, d1, d2 = delta[..., 0], delta[..., 1], delta[..., 2]
    l00_sq = torch.clamp(s00, min=_CHOL_EPS)
    inv00 = torch.rsqrt(l00_sq)
    l10, l20 = s01 * inv00, s02 * inv00
    l11_sq = torch.clamp(s11 - l10 * l10, min=_CHOL_EPS)
    inv11 = torch.rsqrt(l11_sq)
    l21 = (s12 - l20 * l10) * inv11
    l22_sq = torch.clamp(s22 - l20 * l20 - l21 * l21, min=_CHOL_EPS)
    inv22 = torch.rsqrt(l22_sq)
    y0 = d0 * inv00
    y1 = (d1 - l10 * y0) * inv11
    y2 = (d2 - l20 * y0 - l21 * y1) * inv22
    log_det = torch.log(l00_sq) + torch.log(l11_sq) + torch.log(l22_sq)
    return y0 * y0 + y1 * y1 + y2 * y2, log_det


# --------------------------------------------------------------------------- frames
def quaternion_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """Rotation ``[..., 3, 3]`` of a quaternion ``(w, x, y, z)``, normalised first (zero:
    identity).

    >>> import torch
    >>> quaternion_to_rotation(torch.tensor([0.0, 0, 0, 1])).diagonal().tolist()
    [-1.0, -1.0, 1.0]
    """
    q = _unit_or(q, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=q.dtype, device=q.device))
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


class Rigid(NamedTuple):
    """``x ↦ R x + t`` with ``rotation [..., 3, 3]`` and ``translation [..., 3]``."""

    rotation: torch.Tensor
    translation: torch.Tensor

    @classmethod
    def identity(cls, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Rigid:
        """Identity frames of batch shape ``shape``."""
        rot = torch.eye(3, dtype=dtype).expand(*shape, 3, 3)
        return cls(rot, torch.zeros(*shape, 3, dtype=dtype))

    @classmethod
    def from_three_points(cls, n: torch.Tensor, ca: torch.Tensor, c: torch.Tensor) -> Rigid:
        """Origin CA, x along CA→N, y along ``x × (C − CA)``, z = x × y (Gram–Schmidt with
        the port's fallback axes for coincident or collinear atoms)."""
        a, b = n - ca, c - ca
        kw = {"dtype": a.dtype, "device": a.device}
        x_axis, z_axis = torch.tensor([1.0, 0, 0], **kw), torch.tensor([0, 0, 1.0], **kw)
        e0 = _unit_or(a, x_axis)
        b_perp = b - torch.sum(e0 * b, dim=-1, keepdim=True) * e0
        axis = torch.where(torch.abs(e0[..., 2:3]) < 0.9, z_axis, x_axis)
        e1 = _unit_or(b_perp, _safe_normalize(torch.linalg.cross(e0, axis.expand_as(e0))))
        e2 = torch.linalg.cross(e0, e1)
        return cls(torch.stack([e0, e2, -e1], dim=-1), ca)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Local → global ``R x + t``."""
        return torch.einsum("...ij,...j->...i", self.rotation, x) + self.translation

    def invert_apply(self, x: torch.Tensor) -> torch.Tensor:
        """Global → local ``Rᵀ (x − t)``."""
        return torch.einsum("...ji,...j->...i", self.rotation, x - self.translation)

    def expand(self) -> Rigid:
        """One more batch axis at the end (``[N]`` frames applied to ``[N, A, 3]``)."""
        return Rigid(self.rotation.unsqueeze(-3), self.translation.unsqueeze(-2))

    def compose_update(self, update: torch.Tensor) -> Rigid:
        """``R ← R R_u``, ``t ← t + R u[3:6]`` with ``R_u`` of the quaternion
        ``(1, u0, u1, u2)``."""
        q = torch.cat([torch.ones_like(update[..., :1]), update[..., :3]], dim=-1)
        rot_u = quaternion_to_rotation(q)
        return Rigid(self.rotation @ rot_u, self.apply(update[..., 3:6]))

    def scale_translation(self, factor: float) -> Rigid:
        """Translation × ``factor``."""
        return Rigid(self.rotation, self.translation * factor)


class OffsetGaussian(NamedTuple):
    """Backbone frame + Gaussian ``local_mean`` and per-axis ``scaling_log`` in that frame."""

    rigid: Rigid
    local_mean: torch.Tensor
    scaling_log: torch.Tensor

    @classmethod
    def from_rigid_and_sidechain(
        cls,
        rigid: Rigid,
        atom14_pos: torch.Tensor,
        atom14_mask: torch.Tensor,
        designed: torch.Tensor,
        base_thickness: tuple[float, float],
        atoms: str = "sidechain",
    ) -> OffsetGaussian:
        """Centroid and per-axis spread of the kept atoms of ``ATOM_SETS[atoms]`` (present,
        not designed; a designed residue keeps N, CA, C with ``"all"``), ``log(std +
        thickness + 1e-6)`` with the designed / context thickness."""
        start, stop = ATOM_SETS[atoms]
        pos = atom14_pos[..., start:stop, :]
        present = atom14_mask[..., start:stop] > 0
        designed = designed.bool()
        keep = present & ~designed[..., None]
        if atoms == "all":
            keep = torch.cat([present[..., :3], keep[..., 3:]], dim=-1)
        pos = torch.where(keep[..., None], pos, torch.zeros_like(pos))
        weight = keep.to(pos.dtype)[..., None]
        count = torch.sum(weight, dim=-2)
        denom = torch.clamp(count, min=1)
        centroid = torch.where(count > 0, torch.sum(pos, dim=-2) / denom, rigid.translation)
        local_mean = rigid.invert_apply(centroid)
        centred = Rigid(rigid.rotation, centroid).expand().invert_apply(pos)
        centred = torch.where(keep[..., None], centred, torch.zeros_like(centred))
        var = torch.sum(centred * centred, dim=-2) / denom
        std = torch.sqrt(var + 1e-8) if atoms == "all" else torch.sqrt(torch.clamp(var, min=0))
        thick_designed, thick_context = base_thickness
        thickness = torch.where(designed, thick_designed, thick_context)[..., None]
        return cls(rigid, local_mean, torch.log(std + thickness + 1e-6))

    @property
    def scaling(self) -> torch.Tensor:
        """``safe_exp(scaling_log)``."""
        return safe_exp(self.scaling_log)

    def mean(self) -> torch.Tensor:
        """Global mean ``R μ + t``."""
        return self.rigid.apply(self.local_mean)

    def update(
        self, u: torch.Tensor, mask: torch.Tensor | None = None, clip: str = "hard"
    ) -> OffsetGaussian:
        """The 12-D update: frame by ``u[0:6]``, offset ``(μ / max(s, 1e-6) + u[6:9]) s'``,
        ``log s' = clip(log s + u[9:12], -6, 3)`` (``"hard"`` or ``"soft"``)."""
        if mask is not None:
            u = u * mask.to(u.dtype)[..., None]
        rigid = self.rigid.compose_update(u[..., :6])
        if u.shape[-1] == 6:
            return OffsetGaussian(rigid, self.local_mean, self.scaling_log)
        alpha = self.local_mean / torch.clamp(self.scaling, min=1e-6)
        low, high = LOG_SCALE_BOUNDS
        raw = self.scaling_log + u[..., 9:12]
        log_new = torch.clamp(raw, low, high) if clip == "hard" else soft_clip(raw, low, high)
        return OffsetGaussian(rigid, (alpha + u[..., 6:9]) * safe_exp(log_new), log_new)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-density of ``x [..., A, 3]`` (or ``[..., 3]``), ``1.5 log 2π``
        included."""
        mean, logs, rot = self.mean(), self.scaling_log, self.rigid.rotation
        if x.dim() == mean.dim() + 1:
            mean, logs, rot = mean.unsqueeze(-2), logs.unsqueeze(-2), rot.unsqueeze(-3)
        return gaussian_nll_3d(x, mean, logs, rot)

    def scale_translation(self, factor: float) -> OffsetGaussian:
        """Translation and offset × ``factor``, log-scales + ``log factor``."""
        return OffsetGaussian(
            self.rigid.scale_translation(factor),
            self.local_mean * factor,
            self.scaling_log + math.log(factor),
        )


def sidechain_local(
    mu: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``μ + tanh(u) (1 + 0.2 |u|) σ``, zero where ``mask [..., A]`` is 0.

    >>> import torch
    >>> x = sidechain_local(torch.zeros(3), torch.full((3,), 2.0), torch.tensor([0.0, 1, -1]))
    >>> [round(float(v), 4) for v in x]
    [0.0, 1.8278, -1.8278]
    """
    x = mu + torch.tanh(u) * (1 + 0.2 * torch.abs(u)) * sigma
    if mask is not None:
        x = x * mask.to(x.dtype)[..., None]
    return x
