"""GenoFlow configuration: sizes, the choices that differ from the original, training.

One frozen :class:`GenoFlowConfig` is read by the model, the losses, the OT pairing, the
registry entry, the PyTorch version in ``benchmarks/torch_ref`` and the benchmarks. Presets:

- :meth:`GenoFlowConfig.default` — the original's sizes and training with the project's
  deviations (each a field below, listed in :data:`DEVIATIONS`);
- :meth:`GenoFlowConfig.original` — the function of the original code
  (``causal_genoflow.CausalGenoFlow`` and its ``TwoStageTrainer``);
- :meth:`GenoFlowConfig.small` — tiny widths for tests and CPU demos.

Example:
  >>> cfg = GenoFlowConfig.small()
  >>> cfg.latent_dim, cfg.replace(latent_dim=3).latent_dim
  (4, 3)
  >>> GenoFlowConfig.original().kl, GenoFlowConfig.default().kl
  ('clamp', 'safe')
  >>> sorted(DEVIATIONS) == sorted(GenoFlowConfig.original().differences())
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from jaxstab.models.config import PortConfig

__all__ = ["DEVIATIONS", "GenoFlowConfig"]

# Each field where default() differs from original(), and why (the README lists each one with
# its measured effect, benchmarks/deviations_genoflow.py).
DEVIATIONS: Mapping[str, str] = MappingProxyType(
    {
        "kl": "the Gaussian KL from jaxstab.numerics.gaussian_kl (finite value and gradient for "
        "any mean and log-variance) instead of clamping log-variance at 20 and the mean at "
        "±100 (zero gradient beyond them) and replacing a non-finite KL by 0",
        "nb": "the NB log-likelihood from jaxstab.numerics.nb_log_prob (exact at mean 0 and "
        "for large dispersion) instead of the original's formula with 1e-8 added inside every "
        "log and log-gamma and non-finite terms replaced by 0",
        "recon": "the NB reconstruction summed over genes (the evidence lower bound, which "
        "weighs the KL against every gene) instead of averaged over genes, which weighs the "
        "KL of 16 dimensions against one gene's likelihood and collapses the latent",
        "flow_time": "one time axis over the whole experiment (each time point at its real, "
        "normalised time; the flow is integrated across all of them) instead of every pair of "
        "adjacent time points mapped onto [0, 1], which leaves the vector field to guess from "
        "z alone which interval it is in",
    }
)


@dataclasses.dataclass(frozen=True)
class GenoFlowConfig(PortConfig):
    """Every GenoFlow setting. Build one with a preset, then :meth:`replace` fields.

    Sizes (the original's): ``latent_dim`` 16; encoder ``hidden_encoder`` 512 → 256 (half),
    BatchNorm and LeakyReLU(0.2); decoder ``hidden_decoder`` 512 → 512, LeakyReLU(0.2);
    discriminator ``hidden_disc`` 128 → 128, LeakyReLU(0.2), dropout ``disc_dropout`` 0.2;
    vector field: gene embeddings ``gene_dim`` 64, GATv2 with ``gat_heads`` 2 (concatenated:
    128 features per gene; attention dropout ``gat_dropout`` 0.1), cross-attention from z
    onto the genes, time MLP 1 → ``time_dim`` 16 → 16, condition embedding ``cond_dim`` 16,
    MLP → ``hidden_flow`` 128 → latent (dropout ``flow_dropout`` 0.1).

    Function choices (``default()`` → ``original()``, see :data:`DEVIATIONS`):
      kl: ``"safe"`` → ``"clamp"``.
      nb: ``"safe"`` → ``"original"``.
      recon: ``"gene_sum"`` → ``"gene_mean"`` (the reconstruction's reduction over genes).
      flow_time: ``"global"`` → ``"interval"``.

    Losses: stage ``vae`` = NB reconstruction (summed over genes, or averaged as the original) +
    ``beta`` · KL (summed over latent dimensions, mean over cells) − ``lambda_adv`` · entropy
    of the discriminator's prediction (the encoder maximises it) + the discriminator's
    cross-entropy on the stopped latent (trained at ``disc_lr_scale`` × ``lr``).
    ``lambda_adv = 0`` is the original's ``use_adversarial=False``: the VAE's loss is then the
    same, and the discriminator still trains, as a probe of how much of the condition the
    latent holds (``disc_ce``). Stage
    ``flow``: mean squared error of the velocity on OT-paired cells. ``theta_bounds``: the
    dispersion ``exp(px_r)`` is clipped to this range (the original's).

    OT pairing (:mod:`jaxstab.models.genoflow.pairing`): ``ot_epsilon`` (absolute, as POT's
    ``reg``), ``ot_cost`` (``"euclidean"``, the original's ``ot.dist(..., 'euclidean')``, or
    ``"sqeuclidean"``), z-scores with ``ot_ddof`` (1: torch's ``std``).

    Trajectories: ``library_size`` of the decoded expression (the original's 1e4), ``rtol`` and
    ``atol`` of the adaptive Dopri5 steps (the original's 1e-5, 1e-6).

    Training: ``epochs``, ``batch_size``, ``lr`` (Adam, ``weight_decay`` 0 as the original),
    ``grad_clip``, ``explosion_norm`` and the report ``thresholds``.
    """

    LABEL: ClassVar[str] = "GenoFlow"
    CHOICES: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "kl": ("safe", "clamp"),
        "nb": ("safe", "original"),
        "flow_time": ("global", "interval"),
        "recon": ("gene_sum", "gene_mean"),
        "ot_cost": ("euclidean", "sqeuclidean"),
    }

    latent_dim: int = 16
    hidden_encoder: int = 512
    hidden_decoder: int = 512
    hidden_disc: int = 128
    disc_dropout: float = 0.2
    gene_dim: int = 64
    gat_heads: int = 2
    gat_dropout: float = 0.1
    time_dim: int = 16
    cond_dim: int = 16
    hidden_flow: int = 128
    flow_dropout: float = 0.1
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    leaky_slope: float = 0.2

    kl: str = "safe"
    nb: str = "safe"
    flow_time: str = "global"
    recon: str = "gene_sum"
    beta: float = 1.0
    lambda_adv: float = 0.1
    disc_lr_scale: float = 0.5
    theta_bounds: tuple[float, float] = (1e-4, 1e4)

    ot_epsilon: float = 0.01
    ot_cost: str = "euclidean"
    ot_ddof: int = 1

    library_size: float = 1e4
    rtol: float = 1e-5
    atol: float = 1e-6

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    # The stage-1 gradient norm starts near 260 at default() on the bundled data (9 with the
    # original's gene-averaged reconstruction): the clip catches spikes, not every step.
    grad_clip: float = 1e3
    explosion_norm: float = 1e6
    thresholds: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {
            "total_warning": 1e3,
            "total_danger": 1e4,
            "group_warning": 1e3,
            "group_danger": 1e4,
        },
        hash=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive(
            "latent_dim", "hidden_encoder", "hidden_decoder", "hidden_disc", "gene_dim",
            "gat_heads", "time_dim", "cond_dim", "hidden_flow", "ot_epsilon", "library_size",
            "rtol", "atol", "lr", "epochs", "batch_size", "disc_lr_scale",
        )  # fmt: skip
        self.check_positive("beta", "lambda_adv", "weight_decay", "grad_clip", strict=False)
        for name in ("disc_dropout", "gat_dropout", "flow_dropout", "bn_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GenoFlow config {name} must be in [0, 1)")
        if self.hidden_encoder < 2:
            raise ValueError(
                "GenoFlow config hidden_encoder must be >= 2 (its second layer is half)"
            )
        lo, hi = self.theta_bounds
        if not 0 < lo < hi:
            raise ValueError(f"GenoFlow config theta_bounds must be 0 < low < high, got {lo}, {hi}")
        if self.ot_ddof not in (0, 1):
            raise ValueError(f"GenoFlow config ot_ddof must be 0 or 1, got {self.ot_ddof}")
        object.__setattr__(self, "theta_bounds", tuple(float(b) for b in self.theta_bounds))

    @classmethod
    def default(cls) -> GenoFlowConfig:
        """The original's sizes and training with the deviations of :data:`DEVIATIONS`."""
        return cls()

    @classmethod
    def original(cls) -> GenoFlowConfig:
        """The original code's function: every field of :data:`DEVIATIONS` set its way."""
        return cls(kl="clamp", nb="original", flow_time="interval", recon="gene_mean")

    @classmethod
    def small(cls) -> GenoFlowConfig:
        """Tiny widths (latent 4, hidden 32/16) for tests and CPU demos."""
        return cls(
            latent_dim=4, hidden_encoder=32, hidden_decoder=32, hidden_disc=16, gene_dim=8,
            time_dim=8, cond_dim=8, hidden_flow=32, epochs=5,
        )  # fmt: skip

    def differences(self, other: GenoFlowConfig | None = None) -> dict[str, tuple[Any, Any]]:
        """Fields that differ from ``other`` (default: :meth:`default`), as ``(self, other)``.

        >>> GenoFlowConfig.small().differences()["latent_dim"]
        (4, 16)
        """
        other = GenoFlowConfig.default() if other is None else other
        return {
            f: (getattr(self, f), getattr(other, f))
            for f in self.field_names()
            if getattr(self, f) != getattr(other, f)
        }
