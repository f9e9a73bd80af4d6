"""The side-chain Gaussian model in PyTorch, written from the same description as
``jaxstab.models.sidechain``, with its losses and a training loop with the seed's guards.

:class:`SideChainTorch` reads the same :class:`~jaxstab.models.sidechain.config.SideChainConfig`
as the Flax :class:`~jaxstab.models.sidechain.model.SideChainModel` and computes the same
function for every option in it (sizes, ``gaussian_atoms``, ``relpos``, ``embed_aatype``,
``use_esm``, ``per_atom_gaussians``, ``log_scale_clip``, thickness, loss weights and
``atom_weights``). Its modules carry the port's names, so a state dict maps onto the NNX
model by :func:`benchmarks.specs.sidechain_names.name_map`. Geometry lives in
:mod:`benchmarks.torch_ref.sidechain_geometry`, sub-modules in
:mod:`benchmarks.torch_ref.sidechain_modules`, data helpers in
:mod:`benchmarks.torch_ref.sidechain_data`.

The forward is deterministic given ``batch["design_mask"]``; :func:`design_mask` draws one
with a ``torch.Generator`` (the port's rule, not its random numbers).

Example:
  >>> import torch
  >>> arrays = toy_arrays(2, 8, seed=0)
  >>> batch = batch_to_tensors(arrays)
  >>> gen = torch.Generator().manual_seed(0)
  >>> batch["design_mask"] = design_mask(batch["residue_mask"], 0.5, 1.0, gen)
  >>> model = SideChainTorch(SideChainConfig.small())
  >>> out = model(batch)
  >>> tuple(out["atom14_pos"].shape), tuple(out["aatype_logits"].shape)
  ((2, 8, 14, 3), (2, 8, 21))
  >>> loss, metrics = loss_terms(out, batch, model.config)
  >>> bool(loss > 0), sorted(metrics)[:3]
  (True, ['atom04_mse', 'atom05_mse', 'atom06_mse'])
  >>> hist = train(model, arrays, epochs=1, batch_size=1, seed=0)
  >>> len(hist["loss"]), hist["first_nonfinite_step"]
  (2, None)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_ref.guards import scan_gradients
from benchmarks.torch_ref.sidechain_conv import SideAtomsFeatureHead
from benchmarks.torch_ref.sidechain_data import (
    batch_to_tensors,
    crop_arrays,
    design_mask,
    random_crop,
    toy_arrays,
)
from benchmarks.torch_ref.sidechain_geometry import (
    ANG_TO_NM,
    NM_TO_ANG,
    OffsetGaussian,
    Rigid,
    gaussian_nll_3d,
    quaternion_to_rotation,
    safe_norm,
    sidechain_local,
)
from benchmarks.torch_ref.sidechain_graph import BackboneGraph
from benchmarks.torch_ref.sidechain_modules import (
    BackboneFeatures,
    EdgeFeatureNet,
    EdgeTransition,
    GaussianUpdateBlock,
    InvariantGaussianAttention,
    NodeFeatureNet,
    SequenceHead,
    SidechainAtomHead,
    SidechainFeatures,
    StructureModuleTransition,
    fusion_mlp,
    sequence_transformer,
    zeros_linear,
)
from jaxstab.models.sidechain.config import SIDECHAIN_ATOMS, SideChainConfig, atom_weight_table

__all__ = [
    "MASK_TOKEN",
    "TERMS",
    "SideChainConfig",
    "SideChainTorch",
    "batch_to_tensors",
    "crop_arrays",
    "design_mask",
    "input_geometry",
    "loss_terms",
    "sidechain_loss",
    "toy_arrays",
    "train",
]

MASK_TOKEN = 20
TERMS: tuple[str, ...] = ("mse", "pair", "huber", "offset", "logscale", "nll", "ce")
_HALF_LOG_2PI_3 = 1.5 * math.log(2 * math.pi)


def input_geometry(
    batch: Mapping[str, torch.Tensor], config: SideChainConfig
) -> tuple[Rigid, OffsetGaussian, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames, input Gaussians (Å), cleaned positions, residue and design masks."""
    res = batch["residue_mask"] > 0
    designed = (batch["design_mask"] > 0) & res
    atom_mask = (batch["atom14_mask"] > 0) & res[..., None]
    pos = torch.where(atom_mask[..., None], batch["atom14_pos"], 0.0)
    rigid = Rigid.from_three_points(pos[..., 0, :], pos[..., 1, :], pos[..., 2, :])
    g = OffsetGaussian.from_rigid_and_sidechain(
        rigid, pos, atom_mask, designed, config.thickness, atoms=config.gaussian_atoms
    )
    return rigid, g, pos, res, designed


# --------------------------------------------------------------------------- model
class SideChainTorch(nn.Module):
    """The side-chain Gaussian model (``jaxstab.models.sidechain.model.SideChainModel``'s
    function, the same sub-module names). ``forward(batch)`` takes tensors
    (:func:`batch_to_tensors`) with ``design_mask`` and returns the same dict as the port
    (``gaussian`` an :class:`OffsetGaussian` in Å)."""

    def __init__(self, config: SideChainConfig | None = None, **changes: Any) -> None:
        super().__init__()
        config = SideChainConfig.default() if config is None else config
        self.config = c = config.replace(**changes) if changes else config
        self.node_feature_net = NodeFeatureNet(c)
        self.edge_feature_net = EdgeFeatureNet(c)
        if c.backbone_graph == "chroma":
            self.feature_graph = BackboneGraph(c.c_s, c.c_z)
        else:
            self.feature_graph = BackboneFeatures(c)
        if c.sidechain_encoder == "conv":
            n = c.sidechain_blocks
            self.sidechain_head = SideAtomsFeatureHead(
                c.sidechain_hidden, conv_blocks=n, mlp_blocks=n, fuse_blocks=n
            )
        else:
            self.sidechain_head = SidechainFeatures(c)
        if c.embed_aatype:
            self.aatype_embedding = nn.Embedding(21, c.c_s)
        n_node = 2 * c.c_s + c.sidechain_hidden + (c.c_s if c.use_esm else 0)
        n_edge = 2 * c.c_z + (c.c_z if c.use_esm else 0)
        if c.use_esm:
            self.sequence_to_trunk = nn.ModuleDict(
                {"single": nn.Linear(c.esm_single_dim, c.c_s),
                 "pair": nn.Linear(c.esm_pair_dim, c.c_z)}
            )  # fmt: skip
            self.esm_feature_ln = nn.LayerNorm(c.c_s)
            self.edge_esm_ln = nn.LayerNorm(c.c_z)
        self.feature_fusion = fusion_mlp(n_node, c.c_s)
        self.edge_feature_fusion = fusion_mlp(n_edge, c.c_z)
        self.node_feature_ln = nn.LayerNorm(c.c_s)
        self.sidechain_feature_ln = nn.LayerNorm(c.sidechain_hidden)
        self.graph_feature_ln = nn.LayerNorm(c.c_s)
        self.edge_init_ln = nn.LayerNorm(c.c_z)
        self.edge_graph_ln = nn.LayerNorm(c.c_z)
        trunk: dict[str, nn.Module] = {}
        for b in range(c.n_blocks):
            trunk[f"iga_{b}"] = InvariantGaussianAttention(
                c.c_s, c.c_z, c.c_hidden, c.n_heads, c.n_qk_gaussians, c.n_v_points
            )
            trunk[f"iga_ln_{b}"] = nn.LayerNorm(c.c_s)
            trunk[f"seq_tfmr_{b}"] = sequence_transformer(c.c_s, c.seq_heads, c.seq_layers)
            trunk[f"post_tfmr_{b}"] = zeros_linear(c.c_s, c.c_s)
            trunk[f"node_transition_{b}"] = StructureModuleTransition(c.c_s)
            if b < c.n_blocks - 1:
                trunk[f"edge_transition_{b}"] = EdgeTransition(c.c_s, c.c_z)
            trunk[f"Gau_update_{b}"] = GaussianUpdateBlock(c.c_s, clip=c.log_scale_clip)
        self.trunk = nn.ModuleDict(trunk)
        self.atom_head = SidechainAtomHead(c.c_s, 9 if c.per_atom_gaussians else 3)
        self.logits_head = SequenceHead(c.c_s, c.seq_head_layers)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The outputs for ``batch`` (see the class docstring)."""
        c = self.config
        rigid, g, pos, res, designed = input_geometry(batch, c)
        dtype = pos.dtype
        mask = res.to(dtype)
        des = designed.to(dtype)
        edge_mask = mask[:, :, None] * mask[:, None, :]
        start, stop = SIDECHAIN_ATOMS
        index = node_index = batch["residue_index"].long()
        if c.relpos == "arange":
            index = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
            big = torch.full_like(node_index, torch.iinfo(node_index.dtype).max)
            first = torch.where(res, node_index, big).min(dim=1).values
            node_index = node_index - first[:, None] + 1

        node = self.node_feature_net(node_index, mask, des)
        sc_mask = (batch["atom14_mask"] > 0) & (res & ~designed)[..., None]
        sc_mask = sc_mask[..., start:stop].to(dtype)
        bb_frames = rigid.expand()
        sc_local = bb_frames.invert_apply(pos[..., start:stop, :])
        if c.sidechain_encoder == "conv":
            pool = des[..., None].expand(sc_mask.shape)
            sc_feat = self.sidechain_head(sc_local * sc_mask[..., None], pool)
        else:
            sc_feat = self.sidechain_head(sc_local, sc_mask)
        if c.backbone_graph == "chroma":
            bb_mask = (batch["atom14_mask"][..., :4] > 0) & res[..., None]
            bb_local = bb_frames.invert_apply(pos[..., :4, :]) * bb_mask[..., None].to(dtype)
            graph_node, graph_edge = self.feature_graph(bb_local, res.long())
        else:
            graph_node, graph_edge = self.feature_graph(pos[..., :4, :], rigid)
        parts = [self.node_feature_ln(node), self.sidechain_feature_ln(sc_feat),
                 self.graph_feature_ln(graph_node)]  # fmt: skip
        if c.use_esm:
            esm_s = self.sequence_to_trunk["single"](batch["esm_single"].to(dtype))
            parts.append(self.esm_feature_ln(esm_s))
        node = self.feature_fusion(torch.cat(parts, dim=-1))
        if c.embed_aatype:
            aatype = torch.where(designed | ~res, MASK_TOKEN, batch["aatype"].long())
            node = node + self.aatype_embedding(aatype)
        node = node * mask[..., None]

        edge = self.edge_feature_net(node, pos[..., 1, :], index, mask, des)
        edge_parts = [self.edge_init_ln(edge), self.edge_graph_ln(graph_edge)]
        if c.use_esm:
            esm_z = self.sequence_to_trunk["pair"](batch["esm_pair"].to(dtype))
            edge_parts.append(self.edge_esm_ln(esm_z))
        edge = self.edge_feature_fusion(torch.cat(edge_parts, dim=-1)) * edge_mask[..., None]

        g = g.scale_translation(ANG_TO_NM)
        t = self.trunk
        pad = ~res
        for b in range(c.n_blocks):
            iga_out = t[f"iga_{b}"](node, edge, g, mask) * mask[..., None]
            node = t[f"iga_ln_{b}"](node + iga_out)
            seq = t[f"seq_tfmr_{b}"](node, src_key_padding_mask=pad)
            node = node + t[f"post_tfmr_{b}"](seq)
            node = t[f"node_transition_{b}"](node) * mask[..., None]
            if b < c.n_blocks - 1:
                edge = t[f"edge_transition_{b}"](node, edge) * edge_mask[..., None]
            g = t[f"Gau_update_{b}"](node, g, des)

        logits = self.logits_head(node)
        raw = self.atom_head(node)
        g_ang = g.scale_translation(NM_TO_ANG)
        atom_mask = mask[..., None].expand(raw.shape[:-1])
        local = sidechain_local(
            g_ang.local_mean[..., None, :], g_ang.scaling[..., None, :], raw[..., :3], atom_mask
        )
        frames = g_ang.rigid.expand()
        side = frames.apply(local) * mask[..., None, None]
        out = {
            "atom14_pos": torch.cat([pos[..., :start, :], side], dim=-2),
            "aatype_logits": logits,
            "sidechain_local": local,
            "gaussian": g_ang,
            "design_mask": designed,
        }
        if c.per_atom_gaussians:
            out["atom_gaussian_scaling_log"] = (
                g_ang.scaling_log[..., None, :] + torch.tanh(raw[..., 3:6]) * 2.0
            )
            q = torch.cat([torch.ones_like(raw[..., 6:7]), raw[..., 6:9]], dim=-1)
            out["atom_gaussian_rotation"] = frames.rotation @ quaternion_to_rotation(q)
        return out


# --------------------------------------------------------------------------- losses
def _mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Σ w x / Σ w, 0 when Σ w = 0.
    total = torch.sum(w)
    return torch.sum(x * w) / torch.clamp(total, min=1e-10) * (total > 0)


def _huber(diff: torch.Tensor, delta: float) -> torch.Tensor:
    a = torch.abs(diff)
    return torch.where(a <= delta, 0.5 * diff * diff, 0.5 * delta * delta + delta * (a - delta))


def loss_terms(
    outputs: Mapping[str, Any], batch: Mapping[str, torch.Tensor], config: SideChainConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted loss and metrics (``jaxstab.models.sidechain.losses.loss_terms``)."""
    c = config
    start, stop = SIDECHAIN_ATOMS
    batch = {**batch, "design_mask": outputs["design_mask"]}
    rigid, _, pos, res, designed = input_geometry(batch, c)
    dtype = pos.dtype
    des = designed.to(dtype)
    present = (batch["atom14_mask"] > 0) & res[..., None]
    m = present[..., start:stop].to(dtype) * des[..., None]
    true_global = pos[..., start:stop, :]
    true_local = rigid.expand().invert_apply(true_global)
    pred_local = outputs["sidechain_local"]
    w_atom = torch.as_tensor(atom_weight_table(c.atom_weights), dtype=dtype, device=pos.device)

    diff = pred_local - true_local
    sq = torch.sum(diff * diff, dim=-1)
    terms = {"mse": _mean(sq, m * w_atom)}
    d_pred = safe_norm(pred_local[..., :, None, :] - pred_local[..., None, :, :])
    d_true = safe_norm(true_local[..., :, None, :] - true_local[..., None, :, :])
    terms["pair"] = _mean(torch.square(d_pred - d_true), m[..., :, None] * m[..., None, :])
    hub = torch.sum(_huber(diff, c.huber_delta), dim=-1)
    terms["huber"] = _mean(hub, m * w_atom)

    g: OffsetGaussian = outputs["gaussian"]
    target = OffsetGaussian.from_rigid_and_sidechain(
        rigid, pos, present, torch.zeros_like(designed), (c.target_thickness,) * 2,
        atoms=c.gaussian_atoms,
    )  # fmt: skip
    terms["offset"] = _mean(torch.sum(torch.square(g.local_mean - target.local_mean), -1), des)
    terms["logscale"] = _mean(torch.sum(torch.square(g.scaling_log - target.scaling_log), -1), des)
    if c.per_atom_gaussians:
        nll = gaussian_nll_3d(
            true_global, outputs["atom14_pos"][..., start:stop, :],
            outputs["atom_gaussian_scaling_log"], outputs["atom_gaussian_rotation"],
        )  # fmt: skip
    else:
        nll = g.nll(true_global)
    terms["nll"] = _mean(nll - _HALF_LOG_2PI_3, m)

    aatype = batch["aatype"].long()
    logits = outputs["aatype_logits"]
    known = des * (aatype < 20)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                         torch.clamp(aatype, 0, 20).reshape(-1), reduction="none")  # fmt: skip
    terms["ce"] = _mean(ce.reshape(aatype.shape), known)

    weights = {"mse": c.w_mse, "pair": c.w_pair, "huber": c.w_huber, "offset": c.w_offset,
               "logscale": c.w_logscale, "nll": c.w_nll, "ce": c.w_ce}  # fmt: skip
    metrics: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), dtype=dtype, device=pos.device)
    for name in TERMS:
        weighted = weights[name] * terms[name]
        metrics[name], metrics[f"{name}_weighted"] = terms[name], weighted
        loss = loss + weighted
    count = torch.sum(m, dim=(0, 1))
    per_atom = torch.sum(sq * m, dim=(0, 1)) / torch.clamp(count, min=1.0)
    for i in range(stop - start):
        metrics[f"atom{start + i:02d}_mse"] = per_atom[i]
    hit = (torch.argmax(logits, -1) == aatype).to(dtype)
    metrics["seq_recovery"] = _mean(hit, known)
    metrics["n_designed"] = torch.sum(des)
    return loss, metrics


def sidechain_loss(
    model: SideChainTorch,
    batch: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss; draws ``design_mask`` (:func:`design_mask`) when the batch has
    none."""
    if "design_mask" not in batch:
        c = model.config
        gen = torch.Generator().manual_seed(0) if generator is None else generator
        mask = design_mask(batch["residue_mask"].cpu(), c.mask_min, c.mask_max, gen)
        batch = {**batch, "design_mask": mask.to(batch["residue_mask"].device)}
    return loss_terms(model(batch), batch, model.config)


# --------------------------------------------------------------------------- training
def train(
    model: SideChainTorch,
    arrays: Mapping[str, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    lr: float | None = None,
    weight_decay: float | None = None,
    clip: float | None = None,
    compile: bool = False,
    max_len: int | None = None,
    check_every: int = 10,
    on_nonfinite: str = "skip",
    device: str = "cpu",
) -> dict[str, Any]:
    """Trains ``model`` on the padded ``arrays`` (those of ``default_data``).

    AdamW at ``lr`` / ``weight_decay`` (the config's unless given). Each epoch one
    ``torch.randperm`` of the chains from ``torch.Generator().manual_seed(seed)``, cut into
    ``ceil(n / batch_size)`` batches, the last one wrapping around to the start (the rule of
    ``jaxstab.train.fit``). Per batch, drawn from the same generator: when the arrays are wider
    than ``max_len`` residues (default ``config.max_len``) a random window of ``max_len``
    residues of each chain (:func:`crop_arrays`, the rule of the port's ``sidechain_loss``),
    and a design mask (:func:`design_mask`) unless ``arrays`` hold ``design_mask``. Per step:
    loss, ``zero_grad``, ``backward``; every ``check_every`` steps the per-parameter gradient
    norms (the total is recorded, and the names of parameters whose norm is not finite);
    ``clip_grad_norm_(…, clip)`` (``config.grad_clip`` unless given; 0: none); the AdamW step.

    A non-finite loss is recorded (``first_nonfinite_step``, ``nonfinite_steps``);
    ``on_nonfinite="skip"`` (default) skips its backward and step, ``"step"`` steps anyway.
    ``compile=True`` runs forward + loss through ``torch.compile``. ``epoch_seconds`` covers
    forward, backward, the checks, clip and step. Returns ``{"loss": [per step],
    "epoch_seconds", "first_nonfinite_step", "nonfinite_steps", "nonfinite_params":
    ["name@step", ...], "grad_norms": [(step, total norm before clipping), ...]}``.
    """
    if on_nonfinite not in ("skip", "step"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'step', got {on_nonfinite!r}")
    c = model.config
    clip = c.grad_clip if clip is None else clip
    max_len = c.max_len if max_len is None else max_len
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    dtype = next(model.parameters()).dtype
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=c.lr if lr is None else lr,
        weight_decay=c.weight_decay if weight_decay is None else weight_decay,
    )

    def step_loss(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return loss_terms(model(batch), batch, c)[0]

    loss_fn: Callable[..., torch.Tensor] = torch.compile(step_loss) if compile else step_loss
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = len(arrays["aatype"])
    steps = math.ceil(n / batch_size)
    history: dict[str, Any] = {"loss": [], "epoch_seconds": [], "first_nonfinite_step": None,
                               "nonfinite_steps": [], "nonfinite_params": [],
                               "grad_norms": []}  # fmt: skip
    global_step = 0
    for _ in range(epochs):
        seconds = 0.0
        perm = np.resize(torch.randperm(n, generator=gen).numpy(), steps * batch_size)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            part = {k: v[idx] for k, v in arrays.items()}
            if part["aatype"].shape[1] > max_len:
                if "esm_pair" in part:
                    raise ValueError("arrays wider than max_len hold esm_pair: crop them first")
                part = random_crop(part, max_len, gen)
            batch = batch_to_tensors(part, dtype, device)
            if "design_mask" not in batch:
                mask = design_mask(batch["residue_mask"].cpu(), c.mask_min, c.mask_max, gen)
                batch["design_mask"] = mask.to(device)
            start = time.perf_counter()
            value = loss_fn(batch)
            finite = bool(torch.isfinite(value))
            history["loss"].append(float(value.detach()))
            if not finite:
                history["nonfinite_steps"].append(global_step)
                if history["first_nonfinite_step"] is None:
                    history["first_nonfinite_step"] = global_step
            opt.zero_grad(set_to_none=True)
            if finite or on_nonfinite == "step":
                value.backward()
                if check_every and global_step % check_every == 0:
                    scan_gradients(model, global_step, history)
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, max_norm=clip)
                opt.step()
            seconds += time.perf_counter() - start
            global_step += 1
        history["epoch_seconds"].append(seconds)
    return history
