"""jaxstab: training-stability tools for JAX and Flax.

Submodules:
  jaxstab.numerics  safe-math primitives with finite values and gradients at the boundaries.
  jaxstab.transforms  optax stability transforms (logging, clipping, skipping, loss scaling);
    their public names are also exported at the top level (``jaxstab.stability_guard``).
"""

__version__ = "0.1.0"

from jaxstab.transforms import (
    AutoClipState,
    ClipByGlobalNormState,
    ClipByGroupNormState,
    DynamicLossScaleState,
    GradientFlowReport,
    LogNormsState,
    SkipBadStepsState,
    ZClipState,
    ZeroNonfiniteState,
    autoclip,
    clip_by_global_norm,
    clip_by_group_norm,
    dynamic_loss_scale,
    gradient_flow_report,
    log_norms,
    loss_scale,
    read_stats,
    skip_bad_steps,
    stability_guard,
    zclip,
    zero_nonfinite,
)

__all__ = [
    "AutoClipState",
    "ClipByGlobalNormState",
    "ClipByGroupNormState",
    "DynamicLossScaleState",
    "GradientFlowReport",
    "LogNormsState",
    "SkipBadStepsState",
    "ZClipState",
    "ZeroNonfiniteState",
    "__version__",
    "autoclip",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "dynamic_loss_scale",
    "gradient_flow_report",
    "log_norms",
    "loss_scale",
    "read_stats",
    "skip_bad_steps",
    "stability_guard",
    "zclip",
    "zero_nonfinite",
]
