"""Input features of the side-chain model: designed-residue masks, the geometry read from
``atom14_pos`` (frames and residue Gaussians), and the node and edge feature networks.

Sub-module names follow the original (``node_feature_net``, ``edge_feature_net``,
``sidechain_head``, ``feature_graph``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstab.models.sidechain.config import SideChainConfig
from jaxstab.models.sidechain.geometry import OffsetGaussianRigid
from jaxstab.models.sidechain.rigid import Rigid
from jaxstab.numerics import safe_norm

MASK_TOKEN = 20  # the unknown / masked amino-acid type
TORCH_LN_EPS = 1e-5  # nn.LayerNorm's default eps

__all__ = [
    "MASK_TOKEN",
    "BackboneFeatures",
    "EdgeFeatureNet",
    "NodeFeatureNet",
    "SidechainFeatures",
    "design_mask",
    "fusion_mlp",
    "index_embedding",
    "input_geometry",
    "layer_norm",
    "time_embedding",
    "zeros_linear",
]


def design_mask(
    key: jax.Array, residue_mask: jax.typing.ArrayLike, mask_min: float, mask_max: float
) -> jax.Array:
    """BERT-style designed residues ``[b, L]`` bool: each example draws ``p ~ U(mask_min,
    mask_max)`` and designs each real residue independently with probability ``p`` (the
    original's ``bert15_simple_mask``). Pure; jittable.

    >>> import jax, jax.numpy as jnp
    >>> m = design_mask(jax.random.key(0), jnp.ones((2, 8)).at[1, 4:].set(0), 1.0, 1.0)
    >>> m.sum(axis=1).tolist()
    [8, 4]
    """
    residue_mask = jnp.asarray(residue_mask) > 0
    k_p, k_u = jax.random.split(key)
    p = jax.random.uniform(k_p, (*residue_mask.shape[:1], 1), minval=mask_min, maxval=mask_max)
    return (jax.random.uniform(k_u, residue_mask.shape) < p) & residue_mask


def index_embedding(indices: jax.Array, size: int, max_len: int = 2056) -> jax.Array:
    """Sinusoidal embedding ``[..., size]`` of integer offsets (FrameFlow's
    ``get_index_embedding``: sin then cos of ``i π / max_len^(2k/size)``).

    >>> import jax.numpy as jnp
    >>> index_embedding(jnp.array([0]), 4).tolist()
    [[0.0, 0.0, 1.0, 1.0]]
    """
    k = jnp.arange(size // 2)
    angle = indices[..., None] * math.pi / (max_len ** (2 * k / size))
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def time_embedding(t: jax.Array, size: int, max_positions: int = 2056) -> jax.Array:
    """Sinusoidal time embedding ``[..., size]`` of ``t`` in [0, 1] (FrameFlow's
    ``get_time_embedding``).

    >>> import jax.numpy as jnp
    >>> time_embedding(jnp.zeros(1), 4).tolist()
    [[0.0, 0.0, 1.0, 1.0]]
    """
    t = t * max_positions
    half = size // 2
    freq = jnp.exp(jnp.arange(half) * -(math.log(max_positions) / max(half - 1, 1)))
    angle = t[..., None] * freq
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def layer_norm(c: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """``nnx.LayerNorm`` over ``c`` features with PyTorch's eps (1e-5).

    >>> layer_norm(4, nnx.Rngs(0)).epsilon
    1e-05
    """
    return nnx.LayerNorm(c, epsilon=TORCH_LN_EPS, rngs=rngs)


def zeros_linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """A ``Linear`` whose kernel starts at zero (the original's "final" initialisation).

    >>> float(abs(zeros_linear(3, 2, nnx.Rngs(0)).kernel[...]).sum())
    0.0
    """
    return nnx.Linear(n_in, n_out, kernel_init=nnx.initializers.zeros, rngs=rngs)


def fusion_mlp(n_in: int, c: int, rngs: nnx.Rngs) -> nnx.Sequential:
    """Linear → LayerNorm → SiLU → Linear, ``n_in → c`` (the original's feature fusions).

    >>> import jax.numpy as jnp
    >>> fusion_mlp(6, 4, nnx.Rngs(0))(jnp.ones((2, 6))).shape
    (2, 4)
    """
    return nnx.Sequential(
        nnx.Linear(n_in, c, rngs=rngs), layer_norm(c, rngs), nnx.silu, nnx.Linear(c, c, rngs=rngs)
    )


def input_geometry(
    batch: Mapping[str, Any], config: SideChainConfig
) -> tuple[Rigid, OffsetGaussianRigid, jax.Array, jax.Array, jax.Array]:
    """Backbone frames, input Gaussians (Å), cleaned positions, residue and design masks.

    Padded residues' positions are replaced by zeros, the design mask is restricted to real
    residues. Used by the model and by the losses (for the true side chains' frames).

    >>> from jaxstab.models.sidechain.data import default_data
    >>> from jaxstab.models.sidechain.crop import center_crop
    >>> import jax.numpy as jnp
    >>> b = center_crop({k: v[:1] for k, v in default_data("val").arrays.items()}, 5)
    >>> b["design_mask"] = jnp.zeros((1, 5), bool)
    >>> rigid, g, pos, res, des = input_geometry(b, SideChainConfig.small())
    >>> g.local_mean.shape, pos.shape
    ((1, 5, 3), (1, 5, 14, 3))
    """
    res = jnp.asarray(batch["residue_mask"]) > 0
    designed = (jnp.asarray(batch["design_mask"]) > 0) & res
    atom_mask = (jnp.asarray(batch["atom14_mask"]) > 0) & res[..., None]
    pos = jnp.where(atom_mask[..., None], jnp.asarray(batch["atom14_pos"]), 0.0)
    rigid = Rigid.from_three_points(pos[..., 0, :], pos[..., 1, :], pos[..., 2, :])
    g = OffsetGaussianRigid.from_rigid_and_sidechain(
        rigid, pos, atom_mask, designed, config.thickness, atoms=config.gaussian_atoms
    )
    return rigid, g, pos, res, designed


class NodeFeatureNet(nnx.Module):
    """``linear`` of [index embedding, design flag, time embedding at t = 1] → ``c_s``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = NodeFeatureNet(SideChainConfig.small(), rngs=nnx.Rngs(0))
    >>> net(jnp.arange(4)[None], jnp.ones((1, 4)), jnp.zeros((1, 4))).shape
    (1, 4, 32)
    """

    def __init__(self, config: SideChainConfig, *, rngs: nnx.Rngs) -> None:
        self.c_pos, self.c_t = config.c_pos_emb, config.c_timestep_emb
        self.linear = nnx.Linear(self.c_pos + self.c_t + 1, config.c_s, rngs=rngs)

    def __call__(self, index: jax.Array, mask: jax.Array, designed: jax.Array) -> jax.Array:
        """Node features ``[b, L, c_s]``."""
        m = mask[..., None]
        pos = index_embedding(index, self.c_pos) * m
        t = jnp.broadcast_to(time_embedding(jnp.ones(()), self.c_t), (*mask.shape, self.c_t))
        return self.linear(jnp.concatenate([pos, designed[..., None], t * m], axis=-1))


class EdgeFeatureNet(nnx.Module):
    """FrameFlow's edge embedder: node pair (``linear_s_p``), relative position
    (``linear_relpos``), CA distogram (Å, 1e-3–20, ``num_bins``), design-flag pair →
    ``edge_embedder`` (Linear, ReLU, Linear, ReLU, Linear, LayerNorm), times the pair mask.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> cfg = SideChainConfig.small()
    >>> net = EdgeFeatureNet(cfg, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((1, 3, 32)), jnp.zeros((1, 3, 3)), jnp.arange(3)[None], jnp.ones((1, 3)),
    ...     jnp.zeros((1, 3))).shape
    (1, 3, 3, 16)
    """

    def __init__(self, config: SideChainConfig, *, rngs: nnx.Rngs) -> None:
        f = config.edge_feat_dim
        self.feat_dim, self.num_bins = f, config.num_bins
        self.linear_s_p = nnx.Linear(config.c_s, f, rngs=rngs)
        self.linear_relpos = nnx.Linear(f, f, rngs=rngs)
        n_in, c = 3 * f + config.num_bins + 2, config.c_z
        self.edge_embedder = nnx.Sequential(
            nnx.Linear(n_in, c, rngs=rngs),
            nnx.relu,
            nnx.Linear(c, c, rngs=rngs),
            nnx.relu,
            nnx.Linear(c, c, rngs=rngs),
            layer_norm(c, rngs),
        )

    def __call__(
        self, s: jax.Array, ca: jax.Array, index: jax.Array, mask: jax.Array, designed: jax.Array
    ) -> jax.Array:
        """Edge features ``[b, L, L, c_z]`` (``ca`` in Å)."""
        n = s.shape[1]

        def cross(x: jax.Array) -> jax.Array:
            shape = (x.shape[0], n, n, x.shape[-1])
            return jnp.concatenate(
                [jnp.broadcast_to(x[:, :, None], shape), jnp.broadcast_to(x[:, None], shape)], -1
            )

        relpos = self.linear_relpos(
            index_embedding(index[:, :, None] - index[:, None, :], self.feat_dim)
        )
        dist = safe_norm(ca[:, :, None] - ca[:, None, :], axis=-1)[..., None]
        lower = jnp.linspace(1e-3, 20.0, self.num_bins)
        upper = jnp.concatenate([lower[1:], jnp.array([1e8])])
        dgram = ((dist > lower) & (dist < upper)).astype(s.dtype)
        feats = [cross(self.linear_s_p(s)), relpos, dgram, cross(designed[..., None])]
        edge = self.edge_embedder(jnp.concatenate(feats, axis=-1))
        return edge * (mask[:, :, None] * mask[:, None, :])[..., None]


class SidechainFeatures(nnx.Module):
    """``mlp`` of the context side chains in their own frame (atoms 4–13, Å, with presence
    flags; designed residues' atoms are zeros) → ``sidechain_hidden``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = SidechainFeatures(SideChainConfig.small(), rngs=nnx.Rngs(0))
    >>> net(jnp.zeros((1, 3, 10, 3)), jnp.zeros((1, 3, 10))).shape
    (1, 3, 32)
    """

    def __init__(self, config: SideChainConfig, *, rngs: nnx.Rngs) -> None:
        h = config.sidechain_hidden
        self.mlp = nnx.Sequential(
            nnx.Linear(40, h, rngs=rngs), nnx.silu, nnx.Linear(h, h, rngs=rngs)
        )

    def __call__(self, local: jax.Array, mask: jax.Array) -> jax.Array:
        """Features ``[b, L, sidechain_hidden]``."""
        x = jnp.concatenate([(local * mask[..., None]).reshape(*mask.shape[:2], 30), mask], -1)
        return self.mlp(x)


class BackboneFeatures(nnx.Module):
    """Backbone geometry: ``node`` of N, C, O in the residue's frame (Å) → ``c_s``; ``edge``
    of radial features of the 16 backbone-atom distances of each residue pair → ``c_z``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxstab.models.sidechain.rigid import Rigid
    >>> net = BackboneFeatures(SideChainConfig.small(), rngs=nnx.Rngs(0))
    >>> node, edge = net(jnp.ones((1, 3, 4, 3)), Rigid.identity((1, 3)))
    >>> node.shape, edge.shape
    ((1, 3, 32), (1, 3, 3, 16))
    """

    def __init__(self, config: SideChainConfig, *, rngs: nnx.Rngs) -> None:
        self.n_rbf = config.backbone_rbf
        self.node = nnx.Linear(9, config.c_s, rngs=rngs)
        self.edge = nnx.Linear(16 * self.n_rbf, config.c_z, rngs=rngs)

    def __call__(self, bb: jax.Array, rigid: Rigid) -> tuple[jax.Array, jax.Array]:
        """``bb [b, L, 4, 3]`` (N, CA, C, O, Å) → node and edge features."""
        local = rigid.expand().invert_apply(bb[..., jnp.array([0, 2, 3]), :])
        b, n = bb.shape[:2]
        d = safe_norm(bb[:, :, None, :, None] - bb[:, None, :, None, :], axis=-1)  # [b,L,L,4,4]
        centers = jnp.linspace(0.0, 20.0, self.n_rbf)
        width = 20.0 / self.n_rbf
        rbf = jnp.exp(-(((d[..., None] - centers) / width) ** 2)).reshape(b, n, n, -1)
        return self.node(local.reshape(b, n, 9)), self.edge(rbf)
