"""E3 GNN pocket encoder configuration: sizes, the choices that differ from the original, training.

One frozen :class:`E3GNNConfig` is read by the model, the losses, the registry entry, the
PyTorch version in ``benchmarks/torch_ref`` and the benchmarks. Presets:

- :meth:`E3GNNConfig.default` — the best run of the original (6 layers, LayerNorm, dropout 0.1,
  AdamW 2e-4, clip 1.0, batch 8) with the project's two deviations: a rotation-equivariant
  LayerNorm and branch weights bounded through ``jaxstab.numerics.bounded_positive``;
- :meth:`E3GNNConfig.original` — the function of the original code (``RNAPocketEncoderV2``):
  its per-component LayerNorm and raw (unconstrained) branch weights;
- :meth:`E3GNNConfig.small` — tiny widths for tests and CPU demos.

Example:
  >>> cfg = E3GNNConfig.small()
  >>> cfg.num_layers, cfg.replace(num_layers=1).num_layers
  (2, 1)
  >>> E3GNNConfig.from_dict(cfg.to_dict()) == cfg
  True
  >>> E3GNNConfig.original().weight_param, E3GNNConfig.default().weight_param
  ('raw', 'bounded')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxstab.models.config import PortConfig

__all__ = ["LOSSES", "NORMS", "WEIGHT_PARAMS", "E3GNNConfig"]

# How the angle / dihedral / non-bonded branch weights are parametrised (initial value
# ``weight_init`` in every case):
#   "raw"       w = raw, unconstrained (the original's current code; w may turn negative);
#   "exp_clamp" w = exp(clip(raw, -L, L)), L = weight_log_limit (the seed's fix; its gradient
#               is exactly 0 once raw leaves [-L, L], and the weight stops learning);
#   "bounded"   w = jaxstab.numerics.bounded_positive(raw, exp(-L), exp(L)): the same range,
#               smooth, gradient never 0;
#   "fixed"     w = weight_init, not trained.
WEIGHT_PARAMS: tuple[str, ...] = ("raw", "exp_clamp", "bounded", "fixed")
# LayerNorm after each message-passing layer (when ``use_layer_norm``):
#   "equivariant" scalars layer-normed together (affine); every l > 0 block (mul x (2l + 1))
#                 divided by the root mean square of its components (no centring), which
#                 commutes with rotations;
#   "original"    the original's: scalars as above, then every l > 0 instance centred and
#                 scaled over its own 2l + 1 components; not rotation-equivariant (subtracting
#                 the mean of a vector's x, y, z changes its direction differently in every
#                 frame).
NORMS: tuple[str, ...] = ("equivariant", "original")
LOSSES: tuple[str, ...] = ("cosine", "mse", "cos_mse", "infonce")


@dataclasses.dataclass(frozen=True)
class E3GNNConfig(PortConfig):
    """Every E3 GNN setting. Build one with a preset, then :meth:`replace` fields.

    Sizes (the original's): ``hidden_irreps`` ``"32x0e+16x1o+8x2e"``, ``embed_hidden`` 64
    (the input MLP), ``sh_lmax`` 2, ``num_radial`` 8 Bessel functions with a degree-6 polynomial
    cutoff at ``r_max`` 6 Å, ``radial_hidden`` 64, ``branch_hidden`` 64 (angle and dihedral MLPs),
    ``pooling_hidden`` 128, ``output_dim`` 1536 (the target's size).

    Function choices (``default()`` → ``original()``):
      norm: LayerNorm kind, ``"equivariant"`` → ``"original"`` (see :data:`NORMS`).
      weight_param: branch weights, ``"bounded"`` → ``"raw"`` (see :data:`WEIGHT_PARAMS`).
      use_layer_norm, use_multi_hop, use_nonbonded, use_gate: the original's flags (the best run
        had all four on).
      avg_num_neighbors: messages divided by its square root (``None``: not divided, as the
        original's run).

    Loss (``loss``, see :data:`LOSSES`): ``"cosine"`` 1 − cos, ``"mse"``, ``"cos_mse"`` =
    ``cos_weight`` · cosine + ``mse_weight`` · mse, ``"infonce"`` at ``temperature``.

    Training defaults: ``epochs``, ``batch_size`` (molecules per step), ``lr``,
    ``weight_decay`` (AdamW), ``grad_clip``, ``explosion_norm`` (the loop stops above it) and
    the gradient-report ``thresholds``.
    """

    LABEL: ClassVar[str] = "E3 GNN"
    CHOICES: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "weight_param": WEIGHT_PARAMS,
        "norm": NORMS,
        "loss": LOSSES,
    }

    # sizes
    num_layers: int = 6
    hidden_irreps: str = "32x0e+16x1o+8x2e"
    embed_hidden: int = 64
    sh_lmax: int = 2
    num_radial: int = 8
    r_max: float = 6.0
    cutoff_p: int = 6
    radial_hidden: int = 64
    branch_hidden: int = 64
    pooling_hidden: int = 128
    output_dim: int = 1536
    dropout: float = 0.1
    # function choices
    use_layer_norm: bool = True
    norm: str = "equivariant"
    norm_eps: float = 1e-5
    use_multi_hop: bool = True
    use_nonbonded: bool = True
    use_gate: bool = True
    weight_param: str = "bounded"
    weight_init: float = 0.333
    weight_log_limit: float = 5.0
    avg_num_neighbors: float | None = None
    # loss
    loss: str = "cosine"
    cos_weight: float = 0.7
    mse_weight: float = 0.3
    temperature: float = 0.07
    # training
    epochs: int = 10
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    explosion_norm: float = 1e3
    thresholds: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_layers", "embed_hidden", "num_radial", "radial_hidden",
                     "branch_hidden", "pooling_hidden", "output_dim", "epochs", "batch_size",
                     "cutoff_p"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"E3 GNN config {name} must be >= 1, got {getattr(self, name)}")
        self.check_positive("r_max", "lr", "norm_eps", "weight_log_limit", "temperature")
        self.check_positive("weight_decay", "cos_weight", "mse_weight", strict=False)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"E3 GNN config dropout must be in [0, 1), got {self.dropout}")
        if self.weight_param in ("exp_clamp", "bounded") and not self.weight_init > 0:
            raise ValueError(
                f"E3 GNN config weight_init must be > 0 for weight_param "
                f"{self.weight_param!r}, got {self.weight_init}"
            )
        if self.avg_num_neighbors is not None and not self.avg_num_neighbors > 0:
            raise ValueError(
                f"E3 GNN config avg_num_neighbors must be > 0 or None, got {self.avg_num_neighbors}"
            )
        if self.sh_lmax != 2:
            # The readout takes norms of the l = 1 and l = 2 features (the original's 56
            # invariants); other degrees would change its layout.
            raise ValueError(f"E3 GNN config sh_lmax must be 2, got {self.sh_lmax}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def default(cls) -> E3GNNConfig:
        """The project's encoder: the original's best run with the two documented deviations.

        >>> E3GNNConfig.default().norm
        'equivariant'
        """
        return cls()

    @classmethod
    def original(cls) -> E3GNNConfig:
        """The original code's function (``RNAPocketEncoderV2`` at its best run's settings).

        >>> cfg = E3GNNConfig.original()
        >>> cfg.norm, cfg.weight_param, cfg.num_layers
        ('original', 'raw', 6)
        """
        return cls(norm="original", weight_param="raw")

    @classmethod
    def seed(cls) -> E3GNNConfig:
        """The seed notes' encoder: ``exp(clamp(raw, -5, 5))`` weights, LayerNorm off.

        >>> E3GNNConfig.seed().weight_param, E3GNNConfig.seed().use_layer_norm
        ('exp_clamp', False)
        """
        return cls(norm="original", weight_param="exp_clamp", use_layer_norm=False)

    @classmethod
    def small(cls, base: E3GNNConfig | None = None) -> E3GNNConfig:
        """Tiny widths for tests and CPU demos, on ``base`` (default: :meth:`default`).

        >>> E3GNNConfig.small(E3GNNConfig.original()).norm
        'original'
        """
        base = cls.default() if base is None else base
        return base.replace(
            num_layers=2,
            hidden_irreps="8x0e+4x1o+2x2e",
            embed_hidden=16,
            num_radial=4,
            radial_hidden=16,
            branch_hidden=16,
            pooling_hidden=16,
        )
