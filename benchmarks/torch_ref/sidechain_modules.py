"""Sub-modules of the PyTorch side-chain model, written from the description of
``jaxstab.models.sidechain`` (:mod:`~jaxstab.models.sidechain.features`,
:mod:`~jaxstab.models.sidechain.iga`, :mod:`~jaxstab.models.sidechain.layers`).

Module and attribute names are the Flax port's, so every parameter's state-dict key is its NNX
path with ``nn.Sequential`` indices in place of NNX's ``layers.<i>``
(:func:`benchmarks.specs.sidechain_names.name_map`). The sequence transformer is PyTorch's own
``nn.TransformerEncoder`` (post-norm, ReLU, feed-forward width ``c_s``, no dropout).

Example:
  >>> import torch
  >>> iga = InvariantGaussianAttention(8, 4, 4, 2, 2, 3)
  >>> from benchmarks.torch_ref.sidechain_geometry import OffsetGaussian, Rigid
  >>> g = OffsetGaussian(Rigid.identity((1, 5)), torch.zeros(1, 5, 3), torch.zeros(1, 5, 3))
  >>> iga(torch.ones(1, 5, 8), torch.ones(1, 5, 5, 4), g, torch.ones(1, 5)).shape
  torch.Size([1, 5, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_ref.sidechain_geometry import (
    OffsetGaussian,
    Rigid,
    mahalanobis_logdet,
    safe_norm,
)
from jaxstab.models.sidechain.config import SideChainConfig

__all__ = [
    "INF",
    "BackboneFeatures",
    "EdgeFeatureNet",
    "EdgeTransition",
    "GaussianUpdateBlock",
    "InvariantGaussianAttention",
    "MLPResBlock",
    "NodeFeatureNet",
    "SequenceHead",
    "SidechainAtomHead",
    "SidechainFeatures",
    "StructureModuleTransition",
    "fusion_mlp",
    "index_embedding",
    "sequence_transformer",
    "time_embedding",
    "zeros_linear",
]

INF = 1e5  # the attention's mask logit


def zeros_linear(n_in: int, n_out: int) -> nn.Linear:
    """A ``Linear`` with zero weights and bias (the "final" initialisation).

    >>> float(zeros_linear(3, 2).weight.detach().abs().sum())
    0.0
    """
    layer = nn.Linear(n_in, n_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def fusion_mlp(n_in: int, c: int) -> nn.Sequential:
    """Linear → LayerNorm → SiLU → Linear, ``n_in → c``."""
    return nn.Sequential(nn.Linear(n_in, c), nn.LayerNorm(c), nn.SiLU(), nn.Linear(c, c))


def index_embedding(
    indices: torch.Tensor, size: int, max_len: int = 2056, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sinusoidal embedding of integer offsets: sin, cos of ``i π / max_len^(2k/size)``
    (computed in ``dtype``, default float32).

    >>> import torch
    >>> index_embedding(torch.tensor([0]), 4).tolist()
    [[0.0, 0.0, 1.0, 1.0]]
    """
    dtype = dtype or torch.get_default_dtype()
    k = torch.arange(size // 2, device=indices.device).to(dtype)
    angle = indices[..., None].to(dtype) * math.pi / (max_len ** (2 * k / size))
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def time_embedding(t: torch.Tensor, size: int, max_positions: int = 2056) -> torch.Tensor:
    """Sinusoidal time embedding of ``t`` in [0, 1].

    >>> import torch
    >>> time_embedding(torch.zeros(1), 4).tolist()
    [[0.0, 0.0, 1.0, 1.0]]
    """
    t = t * max_positions
    half = size // 2
    k = torch.arange(half, device=t.device).to(t.dtype)
    freq = torch.exp(k * -(math.log(max_positions) / max(half - 1, 1)))
    angle = t[..., None] * freq
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def _cross(x: torch.Tensor, n: int) -> torch.Tensor:
    # [b, L, c] → [b, L, L, 2c]: (x_i, x_j) for every pair.
    b, c = x.shape[0], x.shape[-1]
    return torch.cat([x[:, :, None].expand(b, n, n, c), x[:, None].expand(b, n, n, c)], dim=-1)


# --------------------------------------------------------------------------- features
class NodeFeatureNet(nn.Module):
    """``linear`` of [index embedding, design flag, time embedding at t = 1] → ``c_s``."""

    def __init__(self, config: SideChainConfig) -> None:
        super().__init__()
        self.c_pos, self.c_t = config.c_pos_emb, config.c_timestep_emb
        self.linear = nn.Linear(self.c_pos + self.c_t + 1, config.c_s)

    def forward(
        self, index: torch.Tensor, mask: torch.Tensor, designed: torch.Tensor
    ) -> torch.Tensor:
        """Node features ``[b, L, c_s]``."""
        m = mask[..., None]
        pos = index_embedding(index, self.c_pos, dtype=mask.dtype) * m
        one = torch.ones((), dtype=mask.dtype, device=mask.device)
        t = time_embedding(one, self.c_t).expand(*mask.shape, self.c_t)
        return self.linear(torch.cat([pos, designed[..., None], t * m], dim=-1))


class EdgeFeatureNet(nn.Module):
    """Node pair (``linear_s_p``), relative position (``linear_relpos``), CA distogram,
    design-flag pair → ``edge_embedder``, times the pair mask."""

    def __init__(self, config: SideChainConfig) -> None:
        super().__init__()
        f = config.edge_feat_dim
        self.feat_dim, self.num_bins = f, config.num_bins
        self.linear_s_p = nn.Linear(config.c_s, f)
        self.linear_relpos = nn.Linear(f, f)
        n_in, c = 3 * f + config.num_bins + 2, config.c_z
        self.edge_embedder = nn.Sequential(
            nn.Linear(n_in, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c),
            nn.LayerNorm(c),
        )  # fmt: skip

    def forward(
        self,
        s: torch.Tensor,
        ca: torch.Tensor,
        index: torch.Tensor,
        mask: torch.Tensor,
        designed: torch.Tensor,
    ) -> torch.Tensor:
        """Edge features ``[b, L, L, c_z]`` (``ca`` in Å)."""
        n = s.shape[1]
        rel = index[:, :, None] - index[:, None, :]
        relpos = self.linear_relpos(index_embedding(rel, self.feat_dim, dtype=s.dtype))
        dist = safe_norm(ca[:, :, None] - ca[:, None, :])[..., None]
        lower = torch.linspace(1e-3, 20.0, self.num_bins, dtype=s.dtype, device=s.device)
        upper = torch.cat([lower[1:], lower.new_tensor([1e8])])
        dgram = ((dist > lower) & (dist < upper)).to(s.dtype)
        feats = [_cross(self.linear_s_p(s), n), relpos, dgram, _cross(designed[..., None], n)]
        edge = self.edge_embedder(torch.cat(feats, dim=-1))
        return edge * (mask[:, :, None] * mask[:, None, :])[..., None]


class SidechainFeatures(nn.Module):
    """``mlp`` of the context side chains (atoms 4–13 in their frame, with presence flags)."""

    def __init__(self, config: SideChainConfig) -> None:
        super().__init__()
        h = config.sidechain_hidden
        self.mlp = nn.Sequential(nn.Linear(40, h), nn.SiLU(), nn.Linear(h, h))

    def forward(self, local: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Features ``[b, L, sidechain_hidden]``."""
        flat = (local * mask[..., None]).reshape(*mask.shape[:2], 30)
        return self.mlp(torch.cat([flat, mask], dim=-1))


class BackboneFeatures(nn.Module):
    """``node`` of N, C, O in the residue frame; ``edge`` of radial features of the 16
    backbone-atom distances of each residue pair."""

    def __init__(self, config: SideChainConfig) -> None:
        super().__init__()
        self.n_rbf = config.backbone_rbf
        self.node = nn.Linear(9, config.c_s)
        self.edge = nn.Linear(16 * self.n_rbf, config.c_z)

    def forward(self, bb: torch.Tensor, rigid: Rigid) -> tuple[torch.Tensor, torch.Tensor]:
        """``bb [b, L, 4, 3]`` (N, CA, C, O, Å) → node and edge features."""
        local = rigid.expand().invert_apply(bb[..., [0, 2, 3], :])
        b, n = bb.shape[:2]
        d = safe_norm(bb[:, :, None, :, None] - bb[:, None, :, None, :])  # [b, L, L, 4, 4]
        centers = torch.linspace(0.0, 20.0, self.n_rbf, dtype=bb.dtype, device=bb.device)
        width = 20.0 / self.n_rbf
        rbf = torch.exp(-(((d[..., None] - centers) / width) ** 2)).reshape(b, n, n, -1)
        return self.node(local.reshape(b, n, 9)), self.edge(rbf)


# --------------------------------------------------------------------------- attention
class InvariantGaussianAttention(nn.Module):
    """Invariant Gaussian attention: scalar ``q·k/√c`` + pair bias + ``softplus(geo_scale)``
    × the query/key Gaussians' overlap + ``geo_bias``; output of scalar values, value points
    in the query's frame with their norms, and attended ``down_z(z)``."""

    def __init__(
        self,
        c_s: int,
        c_z: int,
        c_hidden: int,
        n_heads: int,
        n_qk_gaussians: int,
        n_v_points: int,
        *,
        u_max: float = 3.0,
        log_scale_max: float = 2.0,
        sigma_min_nm: float = 0.03,
        logdet_min: float = -20.0,
    ) -> None:
        super().__init__()
        self.c_hidden, self.n_heads = c_hidden, n_heads
        self.n_qk, self.n_v = n_qk_gaussians, n_v_points
        self.u_max, self.log_scale_max = u_max, log_scale_max
        self.sigma_min, self.logdet_min = sigma_min_nm, logdet_min
        hc = c_hidden * n_heads
        self.linear_q = nn.Linear(c_s, hc, bias=False)
        self.linear_k = nn.Linear(c_s, hc, bias=False)
        self.linear_v = nn.Linear(c_s, hc, bias=False)
        self.linear_b = nn.Linear(c_z, n_heads)
        self.down_z = nn.Linear(c_z, c_z // 4)
        self.linear_q_gaussian = nn.Linear(c_s, n_heads * n_qk_gaussians * 6)
        self.linear_k_gaussian = nn.Linear(c_s, n_heads * n_qk_gaussians * 6)
        self.linear_v_points = nn.Linear(c_s, n_heads * n_v_points * 3)
        self.geo_scale = nn.Parameter(torch.full((n_heads,), -4.0))
        self.geo_bias = nn.Parameter(torch.zeros(n_heads))
        self.linear_out = zeros_linear(n_heads * (c_hidden + n_v_points * 4 + c_z // 4), c_s)

    def _gaussians(self, raw: torch.Tensor, g: OffsetGaussian) -> tuple[torch.Tensor, torch.Tensor]:
        # raw [b, L, H*P*6] → global means [b, L, H, P, 3] and covariances [..., 3, 3].
        b, n = raw.shape[:2]
        raw = raw.reshape(b, n, self.n_heads, self.n_qk, 6)
        u = torch.tanh(raw[..., :3]) * self.u_max
        log_delta = torch.tanh(raw[..., 3:]) * self.log_scale_max
        sigma = torch.exp(g.scaling_log[:, :, None, None] + log_delta)
        sigma = torch.clamp(sigma, min=self.sigma_min)
        local = g.local_mean[:, :, None, None] + u * sigma
        rot = g.rigid.rotation[:, :, None, None]
        mu = torch.einsum("...ij,...j->...i", rot, local) + g.rigid.translation[:, :, None, None]
        cov = (rot * (sigma * sigma)[..., None, :]) @ rot.transpose(-1, -2)
        eye = torch.eye(3, dtype=cov.dtype, device=cov.device)
        cov = 0.5 * (cov + cov.transpose(-1, -2)) + 1e-6 * eye
        return mu, cov

    def forward(
        self, s: torch.Tensor, z: torch.Tensor, g: OffsetGaussian, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention update ``[b, L, c_s]`` (Gaussians in nm)."""
        b, n, _ = s.shape
        h, c = self.n_heads, self.c_hidden
        q = self.linear_q(s).reshape(b, n, h, c)
        k = self.linear_k(s).reshape(b, n, h, c)
        v = self.linear_v(s).reshape(b, n, h, c)
        logits = torch.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(c)
        logits = logits + self.linear_b(z).permute(0, 3, 1, 2)

        q_mu, q_cov = self._gaussians(self.linear_q_gaussian(s), g)
        k_mu, k_cov = self._gaussians(self.linear_k_gaussian(s), g)
        q_mu, k_mu = q_mu.transpose(1, 2), k_mu.transpose(1, 2)  # [b, H, L, P, 3]
        q_cov, k_cov = q_cov.transpose(1, 2), k_cov.transpose(1, 2)
        delta = q_mu[:, :, :, None] - k_mu[:, :, None, :]
        cov = q_cov[:, :, :, None] + k_cov[:, :, None, :]
        dist_sq, log_det = mahalanobis_logdet(delta, cov)
        overlap = -0.5 * dist_sq - 0.5 * torch.clamp(log_det, min=self.logdet_min)
        geo = torch.sum(overlap, dim=-1) / math.sqrt(max(self.n_qk, 1))
        mask2d = (mask[:, :, None] * mask[:, None, :])[:, None].to(s.dtype)
        scale = F.softplus(self.geo_scale)[None, :, None, None]
        logits = logits + scale * (geo * mask2d) + self.geo_bias[None, :, None, None]
        logits = logits - (1.0 - mask2d) * INF
        weights = torch.softmax(logits, dim=-1)

        o_scalar = torch.einsum("bhij,bjhc->bihc", weights, v).reshape(b, n, h * c)
        rot, trans = g.rigid.rotation, g.rigid.translation
        v_local = self.linear_v_points(s).reshape(b, n, h, self.n_v, 3)
        v_global = torch.einsum("bjxy,bjhpy->bjhpx", rot, v_local) + trans[:, :, None, None]
        o_global = torch.einsum("bhij,bjhpx->bihpx", weights, v_global)
        o_local = torch.einsum("biyx,bihpy->bihpx", rot, o_global - trans[:, :, None, None])
        o_norm = torch.sqrt(torch.sum(o_local * o_local, dim=-1) + 1e-8)
        o_pair = torch.einsum("bhij,bijc->bihc", weights, self.down_z(z)).reshape(b, n, -1)
        feats = [o_scalar, o_local.reshape(b, n, -1), o_norm.reshape(b, n, -1), o_pair]
        return self.linear_out(torch.cat(feats, dim=-1))


class GaussianUpdateBlock(nn.Module):
    """``linear``: node features → 12-D Gaussian update (zero-initialised), applied where
    ``mask`` is 1."""

    def __init__(self, c_s: int, clip: str = "hard") -> None:
        super().__init__()
        self.clip = clip
        self.linear = zeros_linear(c_s, 12)

    def forward(self, s: torch.Tensor, g: OffsetGaussian, mask: torch.Tensor) -> OffsetGaussian:
        """The updated Gaussians."""
        return g.update(self.linear(s), mask=mask, clip=self.clip)


# --------------------------------------------------------------------------- trunk layers
def sequence_transformer(d: int, n_heads: int, n_layers: int) -> nn.TransformerEncoder:
    """PyTorch's post-norm transformer encoder (ReLU, feed-forward ``d``, no dropout,
    batch first); call it with ``src_key_padding_mask`` True on padded residues."""
    layer = nn.TransformerEncoderLayer(
        d, n_heads, dim_feedforward=d, dropout=0.0, batch_first=True, norm_first=False
    )
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class StructureModuleTransition(nn.Module):
    """``ln(s + linear_3(relu(linear_2(relu(linear_1(s))))))``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.linear_1, self.linear_2, self.linear_3 = (nn.Linear(c, c) for _ in range(3))
        self.ln = nn.LayerNorm(c)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """Transitioned ``s``."""
        return self.ln(s + self.linear_3(F.relu(self.linear_2(F.relu(self.linear_1(s))))))


class EdgeTransition(nn.Module):
    """``initial_embed`` of both nodes with the edge, ReLU ``trunk`` with a residual,
    ``final_layer`` (zero-init), ``layer_norm``."""

    def __init__(self, c_s: int, c_z: int) -> None:
        super().__init__()
        bias = c_s // 2
        hidden = 2 * bias + c_z
        self.initial_embed = nn.Linear(c_s, bias)
        self.trunk = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.final_layer = zeros_linear(hidden, c_z)
        self.layer_norm = nn.LayerNorm(c_z)

    def forward(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Updated ``z [b, L, L, c_z]``."""
        e = self.initial_embed(s)
        x = torch.cat([z, _cross(e, s.shape[1])], dim=-1)
        return self.layer_norm(self.final_layer(self.trunk(x) + x))


class MLPResBlock(nn.Module):
    """``norm(x + net(x))``, ``net`` = Linear(c, 4c), SiLU, Linear(4c, c)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, c))
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``norm(x + net(x))``."""
        return self.norm(x + self.net(x))


class SequenceHead(nn.Module):
    """``mlp`` (Linear, LayerNorm, SiLU, residual blocks, LayerNorm) → ``projection`` to 21
    logits (zero-initialised)."""

    def __init__(self, c: int, n_layers: int, n_classes: int = 21) -> None:
        super().__init__()
        blocks = [MLPResBlock(c) for _ in range(n_layers)]
        self.mlp = nn.Sequential(
            nn.Linear(c, c), nn.LayerNorm(c), nn.SiLU(), *blocks, nn.LayerNorm(c)
        )
        self.projection = zeros_linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., 21]``."""
        return self.projection(self.mlp(x))


class SidechainAtomHead(nn.Module):
    """``projection`` (Linear, LayerNorm, SiLU, Linear; last weights N(0, 1e-4²), bias 0) →
    ``[b, L, n_atoms, n_params]``."""

    def __init__(self, c: int, n_params: int, n_atoms: int = 10) -> None:
        super().__init__()
        self.n_atoms, self.n_params = n_atoms, n_params
        last = nn.Linear(c, n_atoms * n_params)
        nn.init.normal_(last.weight, std=1e-4)
        nn.init.zeros_(last.bias)
        self.projection = nn.Sequential(nn.Linear(c, c), nn.LayerNorm(c), nn.SiLU(), last)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """Raw per-atom parameters."""
        return self.projection(s).reshape(*s.shape[:-1], self.n_atoms, self.n_params)
