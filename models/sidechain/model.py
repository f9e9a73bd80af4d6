"""The side-chain Gaussian model (SPEC §6 C; the original's ``SideAtomsIGAModel``) in Flax NNX.

Data flow of one call on a padded batch (the arrays of :func:`~jaxstab.models.sidechain.data.
load_pdb`, cropped, plus ``design_mask``):

1. frames from N, CA, C (:meth:`Rigid.from_three_points`); residue Gaussians from the context
   residues' side chains (:meth:`OffsetGaussianRigid.from_rigid_and_sidechain`; designed
   residues' atoms hidden, thickness 2.5 Å designed / 0.5 Å context);
2. node features: ``node_feature_net`` (sinusoidal residue-index embedding, design flag,
   constant t = 1 time embedding), ``sidechain_head`` (the context side chains in their
   frame), ``feature_graph`` (backbone geometry), optionally the input sequence with designed
   residues as the mask token 20 and ESM single features — each LayerNormed, then
   ``feature_fusion`` (Linear, LayerNorm, SiLU, Linear); edge features: ``edge_feature_net``
   (node-pair, relative position, CA distogram, design flags), backbone atom-pair distances,
   optional ESM pair features, fused by ``edge_feature_fusion``;
3. the trunk in nm, ``n_blocks`` × [IGA → ``iga_ln`` → sequence transformer → ``post_tfmr`` →
   ``node_transition`` → ``edge_transition`` (not after the last block) → ``Gau_update``
   (12-D update of the designed residues' Gaussians)];
4. heads: ``atom_head`` decodes atoms 4–13 as ``x_local = μ + tanh(u)(1 + 0.2|u|)σ`` in the
   final Gaussian's frame, then to global Å; ``logits_head`` gives 21-class logits.

Every geometric input is computed here from ``atom14_pos``, so a global rotation and
translation of ``atom14_pos`` moves the predicted atoms with it and leaves the logits
unchanged. The forward is deterministic (no dropout; the masking is the input
``design_mask``, drawn by :func:`design_mask`). Sub-module names follow the original.

Example:
  >>> import jax
  >>> from flax import nnx
  >>> from jaxstab.models.sidechain.config import SideChainConfig
  >>> from jaxstab.models.sidechain.data import default_data
  >>> from jaxstab.models.sidechain.crop import center_crop
  >>> batch = center_crop({k: v[:1] for k, v in default_data("val").arrays.items()}, 12)
  >>> batch["design_mask"] = design_mask(jax.random.key(0), batch["residue_mask"], 0.5, 1.0)
  >>> model = SideChainModel(SideChainConfig.small(), rngs=nnx.Rngs(0))
  >>> out = model(batch)
  >>> out["atom14_pos"].shape, out["aatype_logits"].shape
  ((1, 12, 14, 3), (1, 12, 21))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxstab.models.sidechain.backbone_graph import BackboneGraph
from jaxstab.models.sidechain.config import SIDECHAIN_ATOMS, SideChainConfig
from jaxstab.models.sidechain.features import (
    MASK_TOKEN,
    BackboneFeatures,
    EdgeFeatureNet,
    NodeFeatureNet,
    SidechainFeatures,
    design_mask,
    fusion_mlp,
    input_geometry,
    layer_norm,
    zeros_linear,
)
from jaxstab.models.sidechain.geometry import sidechain_local
from jaxstab.models.sidechain.iga import GaussianUpdateBlock, InvariantGaussianAttention
from jaxstab.models.sidechain.layers import (
    EdgeTransition,
    SequenceHead,
    SidechainAtomHead,
    StructureModuleTransition,
    TransformerEncoderLayer,
)
from jaxstab.models.sidechain.rigid import ANG_TO_NM, NM_TO_ANG, quaternion_to_rotation
from jaxstab.models.sidechain.sidechain_encoder import SideAtomsFeatureHead

__all__ = ["MASK_TOKEN", "SideChainModel", "design_mask", "input_geometry"]


class SideChainModel(nnx.Module):
    """The side-chain Gaussian model (see the module docstring).

    ``SideChainModel(config=None, *, rngs, **changes)``: ``config`` defaults to
    :meth:`SideChainConfig.default`, ``changes`` replace its fields.

    Call with a batch holding ``aatype [b, L]``, ``atom14_pos [b, L, 14, 3]`` (Å),
    ``atom14_mask [b, L, 14]``, ``residue_mask [b, L]``, ``residue_index [b, L]``,
    ``design_mask [b, L]`` (see :func:`design_mask`) and, with ``use_esm``, ``esm_single``
    and ``esm_pair``. Returns a dict:

    - ``atom14_pos [b, L, 14, 3]`` global Å: atoms 0–3 copied from the input, 4–13 predicted
      (zeros on padded residues);
    - ``aatype_logits [b, L, 21]``;
    - ``sidechain_local [b, L, 10, 3]``: atoms 4–13 in the final Gaussian's frame (Å);
    - ``gaussian``: the final :class:`OffsetGaussianRigid` (Å), batch shape ``[b, L]``;
    - ``design_mask [b, L]`` (restricted to real residues);
    - with ``per_atom_gaussians``: ``atom_gaussian_scaling_log [b, L, 10, 3]`` (Å) and
      ``atom_gaussian_rotation [b, L, 10, 3, 3]`` (global), centred on the predicted atoms.
    """

    def __init__(
        self, config: SideChainConfig | None = None, *, rngs: nnx.Rngs, **changes: Any
    ) -> None:
        config = SideChainConfig.default() if config is None else config
        config = config.replace(**changes) if changes else config
        self.config = config
        c = config
        self.node_feature_net = NodeFeatureNet(c, rngs=rngs)
        self.edge_feature_net = EdgeFeatureNet(c, rngs=rngs)
        if c.backbone_graph == "chroma":
            self.feature_graph = BackboneGraph(c.c_s, c.c_z, rngs=rngs)
        else:
            self.feature_graph = BackboneFeatures(c, rngs=rngs)
        if c.sidechain_encoder == "conv":
            n = c.sidechain_blocks
            self.sidechain_head = SideAtomsFeatureHead(
                c.sidechain_hidden, conv_blocks=n, mlp_blocks=n, fuse_blocks=n, rngs=rngs
            )
        else:
            self.sidechain_head = SidechainFeatures(c, rngs=rngs)
        if c.embed_aatype:
            self.aatype_embedding = nnx.Embed(21, c.c_s, rngs=rngs)
        n_node = 2 * c.c_s + c.sidechain_hidden + (c.c_s if c.use_esm else 0)
        n_edge = 2 * c.c_z + (c.c_z if c.use_esm else 0)
        if c.use_esm:
            self.sequence_to_trunk = nnx.Dict(
                single=nnx.Linear(c.esm_single_dim, c.c_s, rngs=rngs),
                pair=nnx.Linear(c.esm_pair_dim, c.c_z, rngs=rngs),
            )
            self.esm_feature_ln = layer_norm(c.c_s, rngs)
            self.edge_esm_ln = layer_norm(c.c_z, rngs)
        self.feature_fusion = fusion_mlp(n_node, c.c_s, rngs)
        self.edge_feature_fusion = fusion_mlp(n_edge, c.c_z, rngs)
        self.node_feature_ln = layer_norm(c.c_s, rngs)
        self.sidechain_feature_ln = layer_norm(c.sidechain_hidden, rngs)
        self.graph_feature_ln = layer_norm(c.c_s, rngs)
        self.edge_init_ln = layer_norm(c.c_z, rngs)
        self.edge_graph_ln = layer_norm(c.c_z, rngs)

        trunk = {}
        for b in range(c.n_blocks):
            trunk[f"iga_{b}"] = InvariantGaussianAttention(
                c.c_s, c.c_z, c.c_hidden, c.n_heads, c.n_qk_gaussians, c.n_v_points, rngs=rngs
            )
            trunk[f"iga_ln_{b}"] = layer_norm(c.c_s, rngs)
            trunk[f"seq_tfmr_{b}"] = nnx.List(
                [
                    TransformerEncoderLayer(c.c_s, c.seq_heads, rngs=rngs)
                    for _ in range(c.seq_layers)
                ]
            )
            trunk[f"post_tfmr_{b}"] = zeros_linear(c.c_s, c.c_s, rngs)
            trunk[f"node_transition_{b}"] = StructureModuleTransition(c.c_s, rngs=rngs)
            if b < c.n_blocks - 1:
                trunk[f"edge_transition_{b}"] = EdgeTransition(c.c_s, c.c_z, rngs=rngs)
            trunk[f"Gau_update_{b}"] = GaussianUpdateBlock(c.c_s, rngs=rngs, clip=c.log_scale_clip)
        self.trunk = nnx.Dict(trunk)
        self.atom_head = SidechainAtomHead(c.c_s, 9 if c.per_atom_gaussians else 3, rngs=rngs)
        self.logits_head = SequenceHead(c.c_s, c.seq_head_layers, rngs=rngs)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The outputs for ``batch`` (see the class docstring)."""
        c = self.config
        rigid, g, pos, res, designed = input_geometry(batch, c)
        dtype = pos.dtype
        mask = res.astype(dtype)
        des = designed.astype(dtype)
        edge_mask = mask[:, :, None] * mask[:, None, :]
        start, stop = SIDECHAIN_ATOMS
        index = node_index = jnp.asarray(batch["residue_index"])
        if c.relpos == "arange":
            # The original: slot offsets for the edges, residue numbers from 1 for the nodes.
            index = jnp.broadcast_to(jnp.arange(mask.shape[1]), mask.shape)
            first = jnp.min(jnp.where(res, node_index, jnp.iinfo(node_index.dtype).max), axis=1)
            node_index = node_index - first[:, None] + 1

        # ---------------------------------------------------------------- features
        node = self.node_feature_net(node_index, mask, des)
        sc_mask = (jnp.asarray(batch["atom14_mask"]) > 0) & (res & ~designed)[..., None]
        sc_mask = sc_mask[..., start:stop].astype(dtype)
        bb_frames = rigid.expand()
        sc_local = bb_frames.invert_apply(pos[..., start:stop, :])
        if c.sidechain_encoder == "conv":
            # The original's input: context side chains in their frame, zeros elsewhere; its
            # pooling mask: the designed residues' slots (``sidechain_atom_mask``).
            pool = jnp.broadcast_to(des[..., None], sc_mask.shape)
            sc_feat = self.sidechain_head(sc_local * sc_mask[..., None], pool)
        else:
            sc_feat = self.sidechain_head(sc_local, sc_mask)
        if c.backbone_graph == "chroma":
            # The original's input: each residue's N, CA, C, O in its own frame.
            bb_mask = (jnp.asarray(batch["atom14_mask"])[..., :4] > 0) & res[..., None]
            bb_local = bb_frames.invert_apply(pos[..., :4, :]) * bb_mask[..., None]
            graph_node, graph_edge = self.feature_graph(bb_local, res.astype(jnp.int32))
        else:
            graph_node, graph_edge = self.feature_graph(pos[..., :4, :], rigid)
        parts = [self.node_feature_ln(node), self.sidechain_feature_ln(sc_feat)]
        parts.append(self.graph_feature_ln(graph_node))
        if c.use_esm:
            esm_s = self.sequence_to_trunk["single"](jnp.asarray(batch["esm_single"], dtype))
            parts.append(self.esm_feature_ln(esm_s))
        node = self.feature_fusion(jnp.concatenate(parts, axis=-1))
        if c.embed_aatype:
            aatype = jnp.where(designed | ~res, MASK_TOKEN, jnp.asarray(batch["aatype"]))
            node = node + self.aatype_embedding(aatype)
        node = node * mask[..., None]

        edge = self.edge_feature_net(node, pos[..., 1, :], index, mask, des)
        edge_parts = [self.edge_init_ln(edge), self.edge_graph_ln(graph_edge)]
        if c.use_esm:
            esm_z = self.sequence_to_trunk["pair"](jnp.asarray(batch["esm_pair"], dtype))
            edge_parts.append(self.edge_esm_ln(esm_z))
        edge = self.edge_feature_fusion(jnp.concatenate(edge_parts, axis=-1))
        edge = edge * edge_mask[..., None]

        # ---------------------------------------------------------------- trunk (nm)
        g = g.scale_translation(ANG_TO_NM)
        t = self.trunk
        for b in range(c.n_blocks):
            iga_out = t[f"iga_{b}"](node, edge, g, mask) * mask[..., None]
            node = t[f"iga_ln_{b}"](node + iga_out)
            seq = node
            for layer in t[f"seq_tfmr_{b}"]:
                seq = layer(seq, res)
            node = node + t[f"post_tfmr_{b}"](seq)
            node = t[f"node_transition_{b}"](node) * mask[..., None]
            if b < c.n_blocks - 1:
                edge = t[f"edge_transition_{b}"](node, edge) * edge_mask[..., None]
            g = t[f"Gau_update_{b}"](node, g, des)

        # ---------------------------------------------------------------- heads
        logits = self.logits_head(node)
        raw = self.atom_head(node)
        g_ang = g.scale_translation(NM_TO_ANG)
        atom_mask = jnp.broadcast_to(mask[..., None], raw.shape[:-1])
        local = sidechain_local(
            g_ang.local_mean[..., None, :], g_ang.scaling[..., None, :], raw[..., :3], atom_mask
        )
        frames = g_ang.rigid.expand()
        side = frames.apply(local) * mask[..., None, None]
        out = {
            "atom14_pos": jnp.concatenate([pos[..., :start, :], side], axis=-2),
            "aatype_logits": logits,
            "sidechain_local": local,
            "gaussian": g_ang,
            "design_mask": designed,
        }
        if c.per_atom_gaussians:
            log_delta = jnp.tanh(raw[..., 3:6]) * 2.0
            out["atom_gaussian_scaling_log"] = g_ang.scaling_log[..., None, :] + log_delta
            rot_local = quaternion_to_rotation(
                jnp.concatenate([jnp.ones_like(raw[..., 6:7]), raw[..., 6:9]], axis=-1)
            )
            out["atom_gaussian_rotation"] = frames.rotation @ rot_local
        return out
