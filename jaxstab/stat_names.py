"""The flat statistic names that jaxstab records, in one place.

The transforms write these names (:func:`jaxstab.read_stats`), the training loop records
them per step, and the progress bar, the tables and the report read them back. Per-group
names are a prefix followed by the group name (:func:`group_stat`).

>>> from jaxstab import stat_names as S
>>> S.GLOBAL_NORM, S.group_stat(S.GROUP_NORM, "encoder")
('grad/global_norm', 'grad/norm/encoder')
>>> S.group_of(S.GROUP_NORM, "grad/norm/encoder/layers")
'encoder/layers'
"""

from __future__ import annotations

# log_norms: statistics of the raw gradient.
GLOBAL_NORM = "grad/global_norm"
UPDATE_RATIO = "grad/update_ratio"
GROUP_NORM = "grad/norm/"
GROUP_MAX_ABS = "grad/max_abs/"
GROUP_NAN = "grad/nan/"
GROUP_INF = "grad/inf/"
GROUP_ZERO_FRAC = "grad/zero_frac/"

# log_update_ratio: the final update over the parameters.
UPDATE_PARAM_RATIO = "update/param_ratio"

# zero_nonfinite.
NONFINITE_COUNT = "nonfinite/count/"
NONFINITE_STEPS = "nonfinite/steps"

# clip_by_global_norm.
CLIP_PRE_NORM = "clip/pre_norm"
CLIP_SCALE = "clip/scale"
CLIP_CLIPPED = "clip/clipped"

# clip_by_group_norm.
CLIP_GROUP_NORM = "clip/group_norm/"
CLIP_GROUP_CLIPPED = "clip/clipped/"
CLIP_GROUPS_CLIPPED = "clip/groups_clipped"

# zclip.
ZCLIP_COUNT = "zclip/count"
ZCLIP_MEAN = "zclip/mean"
ZCLIP_STD = "zclip/std"
ZCLIP_PRE_NORM = "zclip/pre_norm"
ZCLIP_Z = "zclip/z"
ZCLIP_CLIPPED = "zclip/clipped"
ZCLIP_SCALE = "zclip/scale"

# autoclip.
AUTOCLIP_COUNT = "autoclip/count"
AUTOCLIP_THRESHOLD = "autoclip/threshold"
AUTOCLIP_PRE_NORM = "autoclip/pre_norm"
AUTOCLIP_CLIPPED = "autoclip/clipped"

# skip_bad_steps.
SKIP_SKIPPED = "skip/skipped"
SKIP_TOTAL = "skip/total"
SKIP_CONSECUTIVE = "skip/consecutive"
SKIP_HALT = "skip/halt"
SKIP_Z = "skip/z"

# dynamic_loss_scale.
LOSS_SCALE = "loss_scale/scale"
LOSS_SCALE_GOOD_STEPS = "loss_scale/good_steps"
LOSS_SCALE_OVERFLOW = "loss_scale/overflow"

# Recorded by the training loop next to the transforms' statistics.
LOSS = "loss"
INPUT = "input/"


def group_stat(prefix: str, group: str) -> str:
    """The name of a per-group statistic: ``prefix`` (ending in ``/``) then the group.

    >>> group_stat(GROUP_NAN, "head")
    'grad/nan/head'
    """
    return prefix + group


def group_of(prefix: str, name: str) -> str | None:
    """The group of a per-group statistic ``name`` with ``prefix``, else ``None``.

    >>> group_of(GROUP_NORM, "grad/norm/head"), group_of(GROUP_NORM, "grad/global_norm")
    ('head', None)
    """
    return name[len(prefix) :] if name.startswith(prefix) else None
