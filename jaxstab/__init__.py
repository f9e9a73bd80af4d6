"""jaxstab: training-stability tools for JAX and Flax.

Submodules:
  jaxstab.numerics  safe-math primitives with finite values and gradients at the boundaries.
  jaxstab.transforms  optax stability transforms (logging, clipping, skipping, loss scaling);
    their public names are also exported at the top level (``jaxstab.stability_guard``).
  jaxstab.plugin  the plugin API (``jaxstab.Dataset``, ``jaxstab.ModelEntry``,
    ``jaxstab.Stage``) through which a model plugs into ``jaxstab diagnose`` and ``train``.
  jaxstab.record  ``jaxstab.Recorder``: the diagnosis report from any training loop.
"""

__version__ = "0.1.0"

from jaxstab.plugin import Dataset, ModelEntry, Stage
from jaxstab.transforms import (
    AutoClipState,
    ClipByGlobalNormState,
    ClipByGroupNormState,
    DynamicLossScaleState,
    GradientFlowReport,
    LogNormsState,
    SkipBadStepsState,
    UpdateRatioState,
    ZClipState,
    ZeroNonfiniteState,
    autoclip,
    clip_by_global_norm,
    clip_by_group_norm,
    dynamic_loss_scale,
    gradient_flow_report,
    log_norms,
    log_update_ratio,
    loss_scale,
    read_stats,
    skip_bad_steps,
    stability_guard,
    train_only,
    zclip,
    zero_nonfinite,
)
from jaxstab.transforms.rollback import RollbackState, restore_or_apply, rollback


def __getattr__(name: str):
    # The recorder pulls in the report's plotting; imported on first use only.
    if name == "Recorder":
        from jaxstab.record import Recorder

        return Recorder
    raise AttributeError(f"module 'jaxstab' has no attribute {name!r}")


__all__ = [
    "AutoClipState",
    "ClipByGlobalNormState",
    "ClipByGroupNormState",
    "Dataset",
    "DynamicLossScaleState",
    "GradientFlowReport",
    "LogNormsState",
    "ModelEntry",
    "Recorder",
    "RollbackState",
    "SkipBadStepsState",
    "Stage",
    "UpdateRatioState",
    "ZClipState",
    "ZeroNonfiniteState",
    "__version__",
    "autoclip",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "dynamic_loss_scale",
    "gradient_flow_report",
    "log_norms",
    "log_update_ratio",
    "loss_scale",
    "read_stats",
    "restore_or_apply",
    "rollback",
    "skip_bad_steps",
    "stability_guard",
    "train_only",
    "zclip",
    "zero_nonfinite",
]
