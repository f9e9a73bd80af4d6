"""Stability transforms: composable ``optax.GradientTransformation``s.

Gradient-norm logging, NaN/Inf zeroing, fixed/per-group/adaptive clipping, step skipping
and dynamic loss scaling, with fixed-shape on-device state and multi-device reductions.
"""

from jaxstab.transforms.autoclip import AutoClipState, autoclip
from jaxstab.transforms.clip_by_global_norm import ClipByGlobalNormState, clip_by_global_norm
from jaxstab.transforms.clip_by_group_norm import ClipByGroupNormState, clip_by_group_norm
from jaxstab.transforms.gradient_flow import GradientFlowReport, gradient_flow_report
from jaxstab.transforms.guard import stability_guard
from jaxstab.transforms.log_norms import LogNormsState, log_norms, ordered_history
from jaxstab.transforms.loss_scale import DynamicLossScaleState, dynamic_loss_scale, loss_scale
from jaxstab.transforms.skip_bad_steps import SkipBadStepsState, skip_bad_steps
from jaxstab.transforms.stats import find_states, read_stats
from jaxstab.transforms.train_only import train_only
from jaxstab.transforms.update_ratio import UpdateRatioState, log_update_ratio
from jaxstab.transforms.zclip import ZClipState, zclip
from jaxstab.transforms.zero_nonfinite import ZeroNonfiniteState, zero_nonfinite

__all__ = [
    "AutoClipState",
    "ClipByGlobalNormState",
    "ClipByGroupNormState",
    "DynamicLossScaleState",
    "GradientFlowReport",
    "LogNormsState",
    "SkipBadStepsState",
    "UpdateRatioState",
    "ZClipState",
    "ZeroNonfiniteState",
    "autoclip",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "dynamic_loss_scale",
    "find_states",
    "gradient_flow_report",
    "log_norms",
    "log_update_ratio",
    "loss_scale",
    "ordered_history",
    "read_stats",
    "skip_bad_steps",
    "stability_guard",
    "train_only",
    "zclip",
    "zero_nonfinite",
]
