"""Invariant Gaussian attention (IGA) and the 12-D Gaussian update of the side-chain trunk.

:class:`InvariantGaussianAttention` is invariant point attention whose point term scores the
overlap of Gaussians: every residue emits ``n_qk_gaussians`` query and key Gaussians per head,
each its residue Gaussian moved by a bounded offset (``3 tanh``, in units of the scale) and
rescaled by a bounded log-scale change (``2 tanh``), σ floored at 0.03 nm. The score of a
query/key pair is ``−½ (Δμᵀ (Σ_q + Σ_k)⁻¹ Δμ + log det(Σ_q + Σ_k))`` (log det floored at −20),
summed over the Gaussians / √n, scaled per head by ``softplus(geo_scale)`` (initial
``softplus(−4)``) plus ``geo_bias``. Logits = scalar ``q·k/√c`` + pair bias ``linear_b(z)`` +
that geometric term; the output concatenates the scalar values, the value points (expressed
in the query's frame) with their norms and the attended ``down_z(z)``. Everything the
attention sees is a distance or a local coordinate, so it is invariant under a global
rotation and translation. Sub-module names are the original's (``models/IGA.py``).

:class:`GaussianUpdateBlock` maps the node features to the 12-D update
(:meth:`~jaxstab.models.sidechain.geometry.OffsetGaussianRigid.update`), zero for context
residues.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxstab.models.sidechain.geometry import OffsetGaussianRigid, Rigid
  >>> iga = InvariantGaussianAttention(8, 4, 4, 2, 2, 3, rngs=nnx.Rngs(0))
  >>> g = OffsetGaussianRigid(Rigid.identity((1, 5)), jnp.zeros((1, 5, 3)), jnp.zeros((1, 5, 3)))
  >>> iga(jnp.ones((1, 5, 8)), jnp.ones((1, 5, 5, 4)), g, jnp.ones((1, 5))).shape
  (1, 5, 8)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstab.models.sidechain.geometry import OffsetGaussianRigid

__all__ = ["GaussianUpdateBlock", "InvariantGaussianAttention", "mahalanobis_logdet"]

_CHOL_EPS = 1e-8  # the original's floor on each squared Cholesky pivot
INF = 1e5  # the original's mask logit


def mahalanobis_logdet(delta: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(Δᵀ Σ⁻¹ Δ, log det Σ)`` of symmetric ``sigma [..., 3, 3]`` by an unrolled Cholesky.

    Each squared pivot is floored at 1e-8 (as the original's ``compute_robust_nll_components``),
    so a singular matrix gives large but finite values and gradients.

    >>> import jax.numpy as jnp
    >>> d, ld = mahalanobis_logdet(jnp.array([2.0, 0, 0]), 4.0 * jnp.eye(3))
    >>> round(float(d), 4), round(float(ld), 4)
    (1.0, 4.1589)
    """
    s00, s01, s02 = sigma[..., 0, 0], sigma[..., 0, 1], sigma[..., 0, 2]
    s11, s12, s22 = sigma[..., 1, 1], sigma[..., 1, 2], sigma[..., 2, 2]
    d0, d1, d2 = delta[..., 0], delta[..., 1], delta[..., 2]
    l00_sq = jnp.maximum(s00, _CHOL_EPS)
    inv00 = jax.lax.rsqrt(l00_sq)
    l10, l20 = s01 * inv00, s02 * inv00
    l11_sq = jnp.maximum(s11 - l10 * l10, _CHOL_EPS)
    inv11 = jax.lax.rsqrt(l11_sq)
    l21 = (s12 - l20 * l10) * inv11
    l22_sq = jnp.maximum(s22 - l20 * l20 - l21 * l21, _CHOL_EPS)
    inv22 = jax.lax.rsqrt(l22_sq)
    y0 = d0 * inv00
    y1 = (d1 - l10 * y0) * inv11
    y2 = (d2 - l20 * y0 - l21 * y1) * inv22
    log_det = jnp.log(l00_sq) + jnp.log(l11_sq) + jnp.log(l22_sq)
    return y0 * y0 + y1 * y1 + y2 * y2, log_det


def _final_linear(n_in: int, n_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    # OpenFold's init="final": weights and bias 0.
    zeros = nnx.initializers.zeros
    return nnx.Linear(n_in, n_out, use_bias=use_bias, kernel_init=zeros, rngs=rngs)


class InvariantGaussianAttention(nnx.Module):
    """IGA block (see the module docstring): ``(s, z, gaussians, mask) -> Δs [b, L, c_s]``.

    Args: ``c_s``, ``c_z`` (pair channels), ``c_hidden`` per head, ``n_heads``,
    ``n_qk_gaussians``, ``n_v_points``; ``rngs``. The Gaussians are in nm (the trunk's unit).

    >>> from flax import nnx
    >>> iga = InvariantGaussianAttention(8, 4, 4, 2, 2, 3, rngs=nnx.Rngs(0))
    >>> iga.geo_scale.value.tolist()
    [-4.0, -4.0]
    """

    def __init__(
        self,
        c_s: int,
        c_z: int,
        c_hidden: int,
        n_heads: int,
        n_qk_gaussians: int,
        n_v_points: int,
        *,
        rngs: nnx.Rngs,
        u_max: float = 3.0,
        log_scale_max: float = 2.0,
        sigma_min_nm: float = 0.03,
        logdet_min: float = -20.0,
    ) -> None:
        self.c_hidden, self.n_heads = c_hidden, n_heads
        self.n_qk, self.n_v = n_qk_gaussians, n_v_points
        self.u_max, self.log_scale_max = u_max, log_scale_max
        self.sigma_min, self.logdet_min = sigma_min_nm, logdet_min
        hc = c_hidden * n_heads
        self.linear_q = nnx.Linear(c_s, hc, use_bias=False, rngs=rngs)
        self.linear_k = nnx.Linear(c_s, hc, use_bias=False, rngs=rngs)
        self.linear_v = nnx.Linear(c_s, hc, use_bias=False, rngs=rngs)
        self.linear_b = nnx.Linear(c_z, n_heads, rngs=rngs)
        self.down_z = nnx.Linear(c_z, c_z // 4, rngs=rngs)
        self.linear_q_gaussian = nnx.Linear(c_s, n_heads * n_qk_gaussians * 6, rngs=rngs)
        self.linear_k_gaussian = nnx.Linear(c_s, n_heads * n_qk_gaussians * 6, rngs=rngs)
        self.linear_v_points = nnx.Linear(c_s, n_heads * n_v_points * 3, rngs=rngs)
        self.geo_scale = nnx.Param(jnp.full((n_heads,), -4.0))
        self.geo_bias = nnx.Param(jnp.zeros((n_heads,)))
        out_dim = n_heads * (c_hidden + n_v_points * 4 + c_z // 4)
        self.linear_out = _final_linear(out_dim, c_s, rngs)

    def _gaussians(self, raw: jax.Array, g: OffsetGaussianRigid) -> tuple[jax.Array, jax.Array]:
        # raw [b, L, H*P*6] → global means [b, L, H, P, 3] and covariances [..., 3, 3].
        b, n = raw.shape[:2]
        raw = raw.reshape(b, n, self.n_heads, self.n_qk, 6)
        u = jnp.tanh(raw[..., :3]) * self.u_max
        log_delta = jnp.tanh(raw[..., 3:]) * self.log_scale_max
        sigma = jnp.maximum(jnp.exp(g.scaling_log[:, :, None, None] + log_delta), self.sigma_min)
        local = g.local_mean[:, :, None, None] + u * sigma
        rot = g.rigid.rotation[:, :, None, None]  # [b, L, 1, 1, 3, 3]
        mu = jnp.einsum("...ij,...j->...i", rot, local) + g.rigid.translation[:, :, None, None]
        cov = (rot * (sigma * sigma)[..., None, :]) @ jnp.swapaxes(rot, -1, -2)
        cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2)) + 1e-6 * jnp.eye(3, dtype=cov.dtype)
        return mu, cov

    def __call__(
        self, s: jax.Array, z: jax.Array, g: OffsetGaussianRigid, mask: jax.Array
    ) -> jax.Array:
        """Attention update of ``s [b, L, c_s]`` given ``z [b, L, L, c_z]``, Gaussians (nm,
        batch shape ``[b, L]``) and ``mask [b, L]``."""
        b, n, _ = s.shape
        h, c = self.n_heads, self.c_hidden
        q = self.linear_q(s).reshape(b, n, h, c)
        k = self.linear_k(s).reshape(b, n, h, c)
        v = self.linear_v(s).reshape(b, n, h, c)
        logits = jnp.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(c)
        logits = logits + jnp.moveaxis(self.linear_b(z), -1, 1)

        q_mu, q_cov = self._gaussians(self.linear_q_gaussian(s), g)
        k_mu, k_cov = self._gaussians(self.linear_k_gaussian(s), g)
        q_mu, k_mu = jnp.moveaxis(q_mu, 2, 1), jnp.moveaxis(k_mu, 2, 1)  # [b, H, L, P, 3]
        q_cov, k_cov = jnp.moveaxis(q_cov, 2, 1), jnp.moveaxis(k_cov, 2, 1)
        delta = q_mu[:, :, :, None] - k_mu[:, :, None, :]  # [b, H, L, L, P, 3]
        cov = q_cov[:, :, :, None] + k_cov[:, :, None, :]
        dist_sq, log_det = mahalanobis_logdet(delta, cov)
        overlap = -0.5 * dist_sq - 0.5 * jnp.maximum(log_det, self.logdet_min)
        geo = jnp.sum(overlap, axis=-1) / math.sqrt(max(self.n_qk, 1))  # [b, H, L, L]
        mask2d = (mask[:, :, None] * mask[:, None, :])[:, None].astype(s.dtype)
        scale = jax.nn.softplus(self.geo_scale.value)[None, :, None, None]
        logits = logits + scale * (geo * mask2d) + self.geo_bias.value[None, :, None, None]
        logits = logits - (1.0 - mask2d) * INF
        weights = jax.nn.softmax(logits, axis=-1)

        o_scalar = jnp.einsum("bhij,bjhc->bihc", weights, v).reshape(b, n, h * c)
        rot, trans = g.rigid.rotation, g.rigid.translation
        v_local = self.linear_v_points(s).reshape(b, n, h, self.n_v, 3)
        v_global = jnp.einsum("bjxy,bjhpy->bjhpx", rot, v_local) + trans[:, :, None, None]
        o_global = jnp.einsum("bhij,bjhpx->bihpx", weights, v_global)
        o_local = jnp.einsum("biyx,bihpy->bihpx", rot, o_global - trans[:, :, None, None])
        o_norm = jnp.sqrt(jnp.sum(o_local * o_local, axis=-1) + 1e-8)
        o_pair = jnp.einsum("bhij,bijc->bihc", weights, self.down_z(z)).reshape(b, n, -1)
        feats = [o_scalar, o_local.reshape(b, n, -1), o_norm.reshape(b, n, -1), o_pair]
        return self.linear_out(jnp.concatenate(feats, axis=-1))


class GaussianUpdateBlock(nnx.Module):
    """``linear``: node features → 12-D Gaussian update (zero-initialised), applied where
    ``mask`` is 1 (:meth:`OffsetGaussianRigid.update`).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxstab.models.sidechain.geometry import OffsetGaussianRigid, Rigid
    >>> block = GaussianUpdateBlock(4, rngs=nnx.Rngs(0))
    >>> g = OffsetGaussianRigid(Rigid.identity((3,)), jnp.ones((3, 3)), jnp.zeros((3, 3)))
    >>> block(jnp.ones((3, 4)), g, jnp.ones(3)).local_mean.tolist()[0]
    [1.0, 1.0, 1.0]
    """

    def __init__(self, c_s: int, *, rngs: nnx.Rngs, clip: str = "hard") -> None:
        self.clip = clip
        self.linear = _final_linear(c_s, 12, rngs)

    def __call__(
        self, s: jax.Array, g: OffsetGaussianRigid, mask: jax.Array
    ) -> OffsetGaussianRigid:
        """The updated Gaussians (context residues, ``mask`` 0, unchanged)."""
        return g.update(self.linear(s), mask=mask, clip=self.clip)
