"""CFM-VC configuration: model sizes, the choices that differ from the original, training defaults.

One frozen :class:`CFMVCConfig` is read by the model, the losses, the training stages, the
registry entry, the PyTorch version in ``benchmarks/torch_ref`` and the benchmarks. Presets:

- :meth:`CFMVCConfig.default` — the project's model (the documented deviations switched on);
- :meth:`CFMVCConfig.original` — the function of the original code (``cfm_vc`` 2.0.1): raw
  counts in, hard clamps in the forward pass, ``log_theta`` clamped, the control as its own
  one-hot column, the flow target a posterior sample;
- :meth:`CFMVCConfig.small` — tiny widths for tests and CPU demos.

Example:
  >>> cfg = CFMVCConfig.small()
  >>> cfg.hidden_vae, cfg.replace(hidden_vae=8).hidden_vae
  (32, 8)
  >>> CFMVCConfig.from_dict(cfg.to_dict()) == cfg
  True
  >>> CFMVCConfig.original().input_transform
  'none'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["BOUND_MODES", "CFMVCConfig"]

# How a bounded quantity is bounded:
#   "soft"             jaxstab.numerics.soft_clip: the identity well inside, a smooth saturation
#                      near the limit, a non-zero slope everywhere;
#   "straight_through" the hard clamp's value, slope 1 everywhere (gradients survive);
#   "clip"             the hard clamp, value and slope (slope 0 outside, as torch.clamp);
#   "none"             unbounded.
BOUND_MODES: tuple[str, ...] = ("soft", "straight_through", "clip", "none")
_CHOICES: dict[str, tuple[Any, ...]] = {
    "input_transform": ("log1p", "none"),
    "logvar_bound": BOUND_MODES,
    "mean_bound": BOUND_MODES,
    "theta_bound": BOUND_MODES,
    "flow_target": ("mean", "sample"),
    "control_encoding": ("zero", "column"),
    "nb_likelihood": ("exact", "eps"),
}

_THRESHOLDS = MappingProxyType(
    {
        # The NB log-likelihood is summed over genes, so healthy raw gradient norms are in the
        # tens to hundreds (about 500 at initialisation with 500 genes); the seed's levels
        # (warning 5, danger 10) were set for a per-example loss of order 1. Same ratios,
        # scaled to this loss: warning and danger a decade apart, explosion a decade above.
        "total_low": 1.0,
        "total_warning": 1e3,
        "total_danger": 1e4,
        "group_warning": 1e3,
        "group_danger": 1e4,
    }
)


@dataclasses.dataclass(frozen=True)
class CFMVCConfig:
    """Every CFM-VC setting. Build one with a preset, then :meth:`replace` fields.

    Sizes (the original's): ``dim_int`` 32, ``dim_tech`` 8, ``hidden_vae`` 256, ``hidden_ctx``
    64, ``hidden_flow`` 128, ``n_basis`` 16, ``dropout`` 0.1.

    Function choices (``default()`` → ``original()``):
      input_transform: encoder input, ``"log1p"`` of the counts → ``"none"`` (raw counts).
      logvar_bound, logvar_limit: encoder logvar bound (see :data:`BOUND_MODES`), ``"soft"`` →
        ``"clip"``, both to ±10.
      mean_bound, log_mean_limit: decoder log-mean bound, ``"soft"`` → ``"clip"``, ±20.
      theta_bound, log_theta_limit: bound of the per-gene ``log_theta``, ``"none"`` →
        ``"clip"``, ±10. (``original(straight_through=True)``: ``"straight_through"`` for all
        three.)
      flow_target: flow-matching endpoint, ``"mean"`` (stop-gradient encoder mean, encoder
        without dropout) → ``"sample"`` (a posterior sample from the encoder in the model's
        mode, dropout included, as the original's stage-2 loop encodes in train mode).
      control_encoding, control_column: ``"zero"`` (the control is the all-zero perturbation
        row) → ``"column"`` (the control gets its own one-hot column at index
        ``control_column``, built in the model from the data's ``p``; the original's dataset
        sorts labels, so ``control_column`` is the control label's rank among all labels).
      nb_likelihood: NB log-likelihood, ``"exact"`` (``jaxstab.numerics.nb_log_prob``) →
        ``"eps"`` (the original's: mean and theta clamped below at 1e-8, ``+ 1e-8`` inside
        every log, non-finite terms replaced by -1e6; biased once the mean falls to ~1e-6,
        which raw-count input reaches).
      alpha_gating: gate the cell-type embedding in the perturbation MLP by ``max|p|`` so that
        the control gives ``alpha = 0`` exactly, ``True`` → ``False``.
      use_library_size: decoder mean = softmax × library size (off in both).
      lambda_dist: weight of the flow loss's MMD term (0 in both; the original's term had no
        gradient).

    Training defaults: ``epochs`` (per stage), ``batch_size``, ``lr``, ``weight_decay``,
    ``grad_clip``, ``beta`` (KL weight), ``explosion_norm`` (the loop stops above it) and the
    gradient-report ``thresholds``.
    """

    # sizes
    dim_int: int = 32
    dim_tech: int = 8
    hidden_vae: int = 256
    hidden_ctx: int = 64
    hidden_flow: int = 128
    n_basis: int = 16
    dropout: float = 0.1
    # function choices
    input_transform: str = "log1p"
    logvar_bound: str = "soft"
    logvar_limit: float = 10.0
    mean_bound: str = "soft"
    log_mean_limit: float = 20.0
    theta_bound: str = "none"
    log_theta_limit: float = 10.0
    flow_target: str = "mean"
    control_encoding: str = "zero"
    control_column: int = 0
    nb_likelihood: str = "exact"
    alpha_gating: bool = True
    use_library_size: bool = False
    lambda_dist: float = 0.0
    # training
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    beta: float = 1.0
    # The NB likelihood is summed over genes, so healthy raw gradient norms are in the hundreds
    # to thousands (the guard clips them to ``grad_clip``); ``fit``'s default explosion bound
    # of 100 would stop a normal run at its first step.
    explosion_norm: float = 1e5
    thresholds: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: _THRESHOLDS, hash=False
    )

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"CFMVCConfig.{name} = {getattr(self, name)!r}; expected one of {choices}"
                )
        for name in ("dim_int", "dim_tech", "hidden_vae", "hidden_ctx", "hidden_flow", "n_basis",
                     "epochs", "batch_size"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CFMVCConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("logvar_limit", "log_mean_limit", "log_theta_limit", "lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"CFMVCConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"CFMVCConfig.dropout must be in [0, 1), got {self.dropout}")
        if int(self.control_column) < 0:
            raise ValueError(f"CFMVCConfig.control_column must be >= 0, got {self.control_column}")
        object.__setattr__(self, "thresholds", MappingProxyType(dict(self.thresholds)))

    # A frozen config is immutable (``thresholds`` is a read-only mapping), so a copy is the
    # config itself and pickling rebuilds it from its fields.
    def __copy__(self) -> CFMVCConfig:
        return self

    def __deepcopy__(self, memo: dict) -> CFMVCConfig:
        return self

    def __reduce__(self) -> tuple:
        return (_from_fields, (self.to_dict(),))

    # ------------------------------------------------------------------ presets
    @classmethod
    def default(cls) -> CFMVCConfig:
        """The project's CFM-VC: the original's sizes with the documented deviations.

        >>> CFMVCConfig.default().flow_target
        'mean'
        """
        return cls()

    @classmethod
    def original(cls, *, straight_through: bool = False) -> CFMVCConfig:
        """The original code's function (``cfm_vc`` 2.0.1): values and gradients.

        Its bounds are the original's ``torch.clamp``: where a clamp is active the gradient is
        0, as there. ``straight_through=True`` keeps the clamps' forward values but passes the
        gradient through them (``jaxstab.numerics.straight_through_clip``), so a clamped
        log-mean still learns; the function is the same, its gradients differ where a clamp is
        active.

        >>> cfg = CFMVCConfig.original()
        >>> cfg.control_encoding, cfg.theta_bound, cfg.alpha_gating, cfg.epochs
        ('column', 'clip', False, 50)
        >>> CFMVCConfig.original(straight_through=True).mean_bound
        'straight_through'
        """
        mode = "straight_through" if straight_through else "clip"
        return cls(
            input_transform="none",
            logvar_bound=mode,
            mean_bound=mode,
            theta_bound=mode,
            flow_target="sample",
            control_encoding="column",
            nb_likelihood="eps",
            alpha_gating=False,
            epochs=50,
        )

    @classmethod
    def small(cls, base: CFMVCConfig | None = None) -> CFMVCConfig:
        """Tiny widths for tests and CPU demos, on ``base`` (default: :meth:`default`).

        >>> CFMVCConfig.small(CFMVCConfig.original()).input_transform
        'none'
        """
        base = cls.default() if base is None else base
        return base.replace(
            dim_int=8, dim_tech=4, hidden_vae=32, hidden_ctx=16, hidden_flow=32, n_basis=4
        )

    # ------------------------------------------------------------------ conversion
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of every field, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: CFMVCConfig | None = None) -> CFMVCConfig:
        """``base`` (default: :meth:`default`) with the fields in ``values`` replaced.

        An unknown key is a ``KeyError`` naming it and listing the valid ones.

        >>> CFMVCConfig.from_dict({"hidden_vae": 64}).hidden_vae
        64
        >>> CFMVCConfig.from_dict({"hiden_vae": 64})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        KeyError: "unknown CFM-VC config key 'hiden_vae'; valid keys: dim_int, ..."
        """
        base = cls.default() if base is None else base
        return base.replace(**values)

    def replace(self, **changes: Any) -> CFMVCConfig:
        """A copy with ``changes`` applied (validated like a new config).

        >>> CFMVCConfig().replace(dropout=0.0).dropout
        0.0
        """
        names = self.field_names()
        for key in changes:
            if key not in names:
                valid = ", ".join(names)
                raise KeyError(f"unknown CFM-VC config key {key!r}; valid keys: {valid}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain ``dict`` (``thresholds`` as a plain ``dict`` too).

        >>> CFMVCConfig().to_dict()["thresholds"]["total_low"]
        1.0
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["thresholds"] = dict(self.thresholds)
        return out


def _from_fields(fields: Mapping[str, Any]) -> CFMVCConfig:
    return CFMVCConfig(**fields)
