"""Side-chain Gaussian model configuration: sizes, masking, Gaussians, loss weights, training.

One frozen :class:`SideChainConfig` is read by :mod:`~jaxstab.models.sidechain.model` and
:mod:`~jaxstab.models.sidechain.losses`. Presets:

- :meth:`SideChainConfig.default` — the original's sizes (``configs/SH.yaml``: c_s 384, c_z 128,
  6 blocks, 8 heads, c_hidden 16, 8 query/key Gaussians, 12 value points, a 4-head 2-layer
  sequence transformer) and loss weights (``configs/Train_esmsd.yaml``), with the port's
  named deviations (see :data:`DEVIATIONS`);
- :meth:`SideChainConfig.original` — every deviation switched back to the original's function;
- :meth:`SideChainConfig.small` — tiny widths for tests and CPU demos.

Example:
  >>> cfg = SideChainConfig.small()
  >>> cfg.c_s, cfg.replace(n_blocks=1).n_blocks
  (32, 1)
  >>> SideChainConfig.from_dict(cfg.to_dict()) == cfg
  True
  >>> sorted(SideChainConfig.original().differences(SideChainConfig.default()))[:4]
  ['backbone_graph', 'embed_aatype', 'gaussian_atoms', 'mask_min']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from jaxstab.models.config import PortConfig

__all__ = [
    "ATOM_WEIGHTS",
    "BACKBONE_GRAPHS",
    "DEVIATIONS",
    "GAUSSIAN_ATOMS",
    "RELPOS",
    "SIDECHAIN_ATOMS",
    "SIDECHAIN_ENCODERS",
    "TYPICAL_CA_DISTANCE",
    "SideChainConfig",
    "atom_weight_table",
]

# atom14 slots the model predicts: CB … (the side chain, indices 4–13).
SIDECHAIN_ATOMS: tuple[int, int] = (4, 14)
# Per-atom loss weights (seed 003's remedies):
#   "none"   every side-chain atom weighs 1 (the original);
#   "linear" atom14 slot k weighs k − 2 (CB 2 … slot 13 11, the seed's table);
#   "exp"    exp(d_k / 3) with d_k = TYPICAL_CA_DISTANCE[k] (the seed's formula).
ATOM_WEIGHTS: tuple[str, ...] = ("none", "linear", "exp")
# Mean distance (Å) from CA of each atom14 side-chain slot 4–13, over every present atom of
# the bundled training chains (``default_data("train")``, 40 chains); computed once and
# written here so the weights do not depend on the data at hand.
TYPICAL_CA_DISTANCE: tuple[float, ...] = (
    1.53,
    2.54,
    3.21,
    3.86,
    4.86,
    5.01,
    5.47,
    6.26,
    5.33,
    6.09,
)
# Atoms the residue Gaussians are built from (geometry.ATOM_SETS): "sidechain" CB … (SPEC);
# "all" all 14 atoms, of which a designed residue keeps N, CA, C (the original's forward,
# ``from_rigid_and_all_atoms``).
GAUSSIAN_ATOMS: tuple[str, ...] = ("sidechain", "all")
# Residue positions: "residue_index" (node index embedding and edge relative positions from
# ``batch["residue_index"]``, so a crop or a chain break is seen) or "arange" (the original:
# edges from slot differences, ``EdgeFeatureNet.embed_relpos(torch.arange(num_res))``; nodes
# from the residue numbers renumbered from 1, its ``res_idx``).
RELPOS: tuple[str, ...] = ("residue_index", "arange")
LOG_SCALE_CLIPS: tuple[str, ...] = ("hard", "soft")
# Backbone features (``feature_graph``): "frame" the N, C, O atoms in the residue's frame and
# radial features of the backbone atom-pair distances (features.BackboneFeatures); "chroma"
# the original's Chroma feature graph (backbone_graph.BackboneGraph) on what the original
# feeds it: each residue's N, CA, C, O in that residue's own frame.
BACKBONE_GRAPHS: tuple[str, ...] = ("frame", "chroma")
# Context side-chain features (``sidechain_head``): "mlp" a 2-layer MLP of the context side
# chains with presence flags (features.SidechainFeatures); "conv" the original's CNN + MLP
# (sidechain_encoder.SideAtomsFeatureHead) with the original's pooling mask, the designed
# residues' (zeroed) atoms.
SIDECHAIN_ENCODERS: tuple[str, ...] = ("mlp", "conv")

# Field → (default's value, original's value) for every function choice where they differ.
DEVIATIONS: Mapping[str, tuple[Any, Any]] = {
    "gaussian_atoms": ("sidechain", "all"),
    "target_thickness": (0.5, 0.0),
    "relpos": ("residue_index", "arange"),
    "embed_aatype": (True, False),
    "mask_min": (0.5, 0.15),
    "backbone_graph": ("frame", "chroma"),
    "sidechain_encoder": ("mlp", "conv"),
}


def atom_weight_table(kind: str) -> np.ndarray:
    """Loss weight of each side-chain slot 4–13 (``[10]`` float32) for ``atom_weights``.

    >>> atom_weight_table("linear").tolist()[:3]
    [2.0, 3.0, 4.0]
    >>> round(float(atom_weight_table("exp")[0]), 3)
    1.665
    """
    if kind == "none":
        return np.ones(10, np.float32)
    if kind == "linear":
        return np.arange(2.0, 12.0, dtype=np.float32)
    if kind == "exp":
        return np.exp(np.asarray(TYPICAL_CA_DISTANCE, np.float32) / 3.0)
    raise ValueError(f"atom_weights = {kind!r}; expected one of {ATOM_WEIGHTS}")


_POSITIVE_INTS = (
    "c_s", "c_z", "n_blocks", "n_heads", "c_hidden", "n_qk_gaussians", "n_v_points",
    "seq_heads", "seq_layers", "c_pos_emb", "c_timestep_emb", "edge_feat_dim", "num_bins",
    "sidechain_hidden", "sidechain_blocks", "backbone_rbf", "esm_single_dim", "esm_pair_dim",
    "batch_size", "epochs", "max_len",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SideChainConfig(PortConfig):
    """Every side-chain model setting. Build one with a preset, then :meth:`replace` fields.

    Sizes: ``c_s`` node and ``c_z`` edge channels; ``n_blocks`` trunk blocks; IGA ``n_heads``,
    ``c_hidden`` per head, ``n_qk_gaussians`` query/key Gaussians and ``n_v_points`` value
    points per head; ``seq_heads``/``seq_layers`` of the post-norm sequence transformer (its
    feed-forward width is ``c_s``, as the original's); ``c_pos_emb``/``c_timestep_emb`` sizes
    of the node embedder's sinusoidal index and (constant t = 1) time embeddings;
    ``edge_feat_dim`` and ``num_bins`` (CA distogram, 1e-3–20 Å) of the edge embedder;
    ``sidechain_hidden`` width of the context side-chain features and ``sidechain_blocks``
    residual blocks per stack of the ``"conv"`` encoder (the original's 4); ``seq_head_layers``
    residual MLP blocks of the sequence head; ``backbone_rbf`` radial bins per backbone atom
    pair of the backbone edge features.

    ESM: ``use_esm`` reads precomputed ``batch["esm_single"] [b, L, esm_single_dim]`` and
    ``batch["esm_pair"] [b, L, L, esm_pair_dim]`` (1280 and 660: ESM2-650M's single size and
    33 layers × 20 heads of attention maps), fused through LayerNorm + MLP.

    Masking: each example designs a share ``p ~ U(mask_min, mask_max)`` of its residues (each
    residue independently with probability ``p``, the original's ``bert15_simple_mask``).

    Gaussians: ``base_thickness`` (designed, context) Å, multiplied by ``thickness_scale``;
    ``gaussian_atoms`` (:data:`GAUSSIAN_ATOMS`); ``target_thickness`` Å of the true Gaussians
    the parameter loss compares with (the original's dataset builds them from all atoms with
    thickness 0; with only side-chain atoms a glycine or alanine would have standard deviation
    0 and log-scale log 1e-6, hence 0.5 Å, the context thickness); ``log_scale_clip`` of the
    updated log-scale, ``"hard"`` (the original's clamp) or ``"soft"``.

    Function choices: ``relpos`` (:data:`RELPOS`); ``embed_aatype`` embeds the input sequence
    (designed residues as the mask token 20) into the node features (the original sees the
    sequence only through ESM); ``backbone_graph`` (:data:`BACKBONE_GRAPHS`) and
    ``sidechain_encoder`` (:data:`SIDECHAIN_ENCODERS`) choose the backbone and context
    side-chain feature networks; ``per_atom_gaussians``: the side-chain head predicts a Gaussian
    per atom (9 numbers: normalised offset 3, log-scale change 3, rotation 3; seed 003's
    remedy) and the NLL scores each atom under its own Gaussian.

    Loss weights: ``w_mse``, ``w_pair``, ``w_huber`` (coordinates, Å), ``w_offset``,
    ``w_logscale`` (Gaussian parameters), ``w_nll``, ``w_ce``; ``huber_delta`` (Å);
    ``atom_weights`` (:data:`ATOM_WEIGHTS`) weights the MSE and Huber terms per atom.

    Training: ``lr``, ``weight_decay`` (AdamW; the original's ``torch.optim.AdamW`` default
    0.01), ``grad_clip``, ``batch_size``, ``epochs``, ``max_len`` (crop length),
    ``explosion_norm`` and gradient-report ``thresholds``. The explosion level is 1e5: the
    global gradient norm at initialisation is ~3e3 at ``default()`` widths and ~5e2 at
    ``small()`` (the coordinate losses are in Å²), so a level of 1e3 stopped ``default()`` at
    its first step.
    """

    LABEL: ClassVar[str] = "side-chain"
    CHOICES: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "atom_weights": ATOM_WEIGHTS,
        "gaussian_atoms": GAUSSIAN_ATOMS,
        "relpos": RELPOS,
        "log_scale_clip": LOG_SCALE_CLIPS,
        "backbone_graph": BACKBONE_GRAPHS,
        "sidechain_encoder": SIDECHAIN_ENCODERS,
    }

    # sizes
    c_s: int = 384
    c_z: int = 128
    n_blocks: int = 6
    n_heads: int = 8
    c_hidden: int = 16
    n_qk_gaussians: int = 8
    n_v_points: int = 12
    seq_heads: int = 4
    seq_layers: int = 2
    c_pos_emb: int = 128
    c_timestep_emb: int = 128
    edge_feat_dim: int = 64
    num_bins: int = 22
    sidechain_hidden: int = 384
    sidechain_blocks: int = 4
    seq_head_layers: int = 3
    backbone_rbf: int = 8
    # ESM inputs
    use_esm: bool = False
    esm_single_dim: int = 1280
    esm_pair_dim: int = 660
    # masking
    mask_min: float = 0.5
    mask_max: float = 1.0
    # Gaussians
    base_thickness: tuple[float, float] = (2.5, 0.5)
    thickness_scale: float = 1.0
    gaussian_atoms: str = "sidechain"
    target_thickness: float = 0.5
    log_scale_clip: str = "hard"
    # function choices
    relpos: str = "residue_index"
    embed_aatype: bool = True
    backbone_graph: str = "frame"
    sidechain_encoder: str = "mlp"
    per_atom_gaussians: bool = False
    # loss
    w_mse: float = 1.0
    w_pair: float = 1.0
    w_huber: float = 1.0
    w_offset: float = 5.0
    w_logscale: float = 5.0
    w_nll: float = 3e-4
    w_ce: float = 0.01
    huber_delta: float = 1.0
    atom_weights: str = "none"
    # training
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 4
    epochs: int = 100
    max_len: int = 256
    explosion_norm: float = 1e5
    thresholds: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "base_thickness", tuple(float(t) for t in self.base_thickness))
        for name in _POSITIVE_INTS:
            if int(getattr(self, name)) < 1:
                raise ValueError(
                    f"side-chain config {name} must be >= 1, got {getattr(self, name)}"
                )
        if self.seq_head_layers < 0:
            raise ValueError(
                f"side-chain config seq_head_layers must be >= 0, got {self.seq_head_layers}"
            )
        if self.c_s % self.seq_heads:
            raise ValueError(
                f"side-chain config c_s {self.c_s} not divisible by seq_heads {self.seq_heads}"
            )
        if self.c_z < 4:
            raise ValueError(f"side-chain config c_z must be >= 4 (IGA's c_z // 4), got {self.c_z}")
        if not 0.0 <= self.mask_min <= self.mask_max <= 1.0:
            raise ValueError(
                f"side-chain config needs 0 <= mask_min <= mask_max <= 1, got "
                f"{self.mask_min}, {self.mask_max}"
            )
        if len(self.base_thickness) != 2 or min(self.base_thickness) < 0:
            raise ValueError(
                f"side-chain config base_thickness must be 2 values >= 0, got {self.base_thickness}"
            )
        self.check_positive("thickness_scale", "lr", "huber_delta", "grad_clip", "explosion_norm")
        self.check_positive("target_thickness", "weight_decay", strict=False)
        self.check_positive("w_mse", "w_pair", "w_huber", "w_offset", "w_logscale", "w_nll", "w_ce",
                            strict=False)  # fmt: skip

    # ------------------------------------------------------------------ helpers
    @property
    def thickness(self) -> tuple[float, float]:
        """``base_thickness × thickness_scale`` (designed, context) in Å.

        >>> SideChainConfig(thickness_scale=2.0).thickness
        (5.0, 1.0)
        """
        return tuple(t * self.thickness_scale for t in self.base_thickness)

    def differences(self, other: SideChainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: ``{name: (self's, other's)}``.

        >>> SideChainConfig().differences(SideChainConfig(w_nll=3e-3))
        {'w_nll': (0.0003, 0.003)}
        """
        out = {}
        for name in self.field_names():
            a, b = getattr(self, name), getattr(other, name)
            if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b):
                continue
            if a != b:
                out[name] = (a, b)
        return out

    # ------------------------------------------------------------------ presets
    @classmethod
    def default(cls) -> SideChainConfig:
        """The original's sizes and weights with the port's deviations (:data:`DEVIATIONS`).

        >>> SideChainConfig.default().gaussian_atoms
        'sidechain'
        """
        return cls()

    @classmethod
    def original(cls) -> SideChainConfig:
        """The original's function: every entry of :data:`DEVIATIONS` switched back.

        >>> cfg = SideChainConfig.original()
        >>> cfg.gaussian_atoms, cfg.relpos, cfg.embed_aatype, cfg.mask_min
        ('all', 'arange', False, 0.15)
        """
        return cls(**{name: pair[1] for name, pair in DEVIATIONS.items()})

    @classmethod
    def small(cls, base: SideChainConfig | None = None) -> SideChainConfig:
        """Tiny widths for tests and CPU demos, on ``base`` (default: :meth:`default`).

        >>> SideChainConfig.small(SideChainConfig.original()).relpos
        'arange'
        """
        base = cls.default() if base is None else base
        return base.replace(
            c_s=32,
            c_z=16,
            n_blocks=2,
            n_heads=4,
            c_hidden=8,
            n_qk_gaussians=2,
            n_v_points=4,
            seq_heads=2,
            seq_layers=1,
            c_pos_emb=16,
            c_timestep_emb=8,
            edge_feat_dim=8,
            sidechain_hidden=32,
            sidechain_blocks=1,
            seq_head_layers=1,
            backbone_rbf=4,
            esm_single_dim=16,
            esm_pair_dim=8,
            batch_size=2,
            max_len=24,
        )
