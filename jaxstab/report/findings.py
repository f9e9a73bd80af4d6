"""Findings: what a recorded run's statistics say, in plain sentences with stable codes.

Each finding is ``{"code", "severity", "message", "evidence"}``. Codes are stable (a test or a
dashboard may key on them); ``severity`` is ``"info"``, ``"warning"`` or ``"critical"``; the
``message`` is one or two sentences for a person; ``evidence`` holds the numbers behind it.
Findings never change a report's ``status``: they explain it.

The rules read the per-step gradient table (``gradient_stats.csv``'s columns, see
:func:`jaxstab.report.tables.gradient_table`) and, where given, the recorded statistics, the
per-step suspicious input features and the weight changes of groups that should not move.

Example:
  >>> import numpy as np
  >>> n = 50
  >>> table = {"loss": np.linspace(2, 1, n), "total_grad_norm": np.full(n, 40.0),
  ...          "clipped": np.ones(n, int), "grad_norm:enc": np.full(n, 40.0),
  ...          "grad_norm:dec": np.zeros(n)}
  >>> [f["code"] for f in find_findings(table, clip=1.0)]
  ['always_clipped', 'dead_group', 'group_dominates']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxstab import stat_names as S

CODES = (
    "always_clipped",
    "dead_group",
    "frozen_group_moves",
    "group_dominates",
    "norm_growth",
    "input_jump",
    "lr_too_high",
    "nonfinite_origin",
)
SEVERITIES = ("info", "warning", "critical")

# Rule levels. A share of clipped steps at or above CLIPPED_SHARE is "always" clipped; a
# trainable group with an exactly zero gradient on DEAD_SHARE of its steps is dead; one group
# "dominates" at DOMINANT_SHARE of the squared norm; a norm that rises GROWTH_FACTOR-fold from
# the run's start to its end has grown by orders of magnitude; an update/parameter ratio above
# LR_RATIO (100x the usual 1e-3) means too large a learning rate. Rules on trends need
# MIN_STEPS steps.
CLIPPED_SHARE = 0.9
DEAD_SHARE = 0.9
DOMINANT_SHARE = 0.9
GROWTH_FACTOR = 100.0
LR_RATIO = 0.1
MIN_STEPS = 10
# The recorded update/parameter norm ratio (the optimizer's update over the parameters it
# moves), read by ``lr_too_high``.
UPDATE_PARAM_RATIO = S.UPDATE_PARAM_RATIO


def finding_line(finding: Mapping[str, Any]) -> str:
    """One finding as the sentence the console and ``jaxstab compare`` print.

    >>> finding_line({"code": "dead_group", "severity": "warning", "message": "It is dead."})
    '[warning] dead_group: It is dead.'
    """
    return f"[{finding['severity']}] {finding['code']}: {finding['message']}"


def _finding(code: str, severity: str, message: str, **evidence: Any) -> dict[str, Any]:
    assert code in CODES and severity in SEVERITIES
    return {"code": code, "severity": severity, "message": message, "evidence": evidence}


def _groups(table: Mapping[str, Any]) -> list[str]:
    return [k[len("grad_norm:") :] for k in table if k.startswith("grad_norm:")]


def _under(group: str, names: Sequence[str]) -> bool:
    return any(group == n or group.startswith(n + "/") for n in names)


def infer_clip(history: Mapping[str, Any] | None) -> float | None:
    """The fixed clip level of a run, from :func:`jaxstab.clip_by_global_norm`'s statistics
    (``clip/pre_norm`` × ``clip/scale`` on its clipped steps), or ``None``.

    >>> import numpy as np
    >>> infer_clip({"clip/pre_norm": np.array([4.0, 0.5]), "clip/scale": np.array([0.25, 1.0]),
    ...             "clip/clipped": np.array([True, False])})
    1.0
    """
    if history is None or not {S.CLIP_PRE_NORM, S.CLIP_SCALE, S.CLIP_CLIPPED} <= set(history):
        return None
    clipped = np.asarray(history[S.CLIP_CLIPPED], bool)
    level = np.asarray(history[S.CLIP_PRE_NORM], np.float64) * np.asarray(
        history[S.CLIP_SCALE], np.float64
    )
    level = level[clipped & np.isfinite(level)]
    return float(np.median(level)) if level.size else None


def always_clipped(table: Mapping[str, Any], clip: float | None) -> list[dict[str, Any]]:
    """``always_clipped``: the fixed clip acts on (almost) every step.

    >>> import numpy as np
    >>> t = {"total_grad_norm": np.full(20, 40.0), "clipped": np.ones(20, int)}
    >>> print(always_clipped(t, 1.0)[0]["message"])  # doctest: +ELLIPSIS
    The clip at 1 acted on 20 of 20 steps (100 %); the median gradient norm is 40, 40× ...
    """
    clipped = np.asarray(table.get("clipped", ()), dtype=bool)
    n = clipped.size
    if clip is None or n < MIN_STEPS or clipped.mean() < CLIPPED_SHARE:
        return []
    norms = np.asarray(table["total_grad_norm"], np.float64)
    norms = norms[np.isfinite(norms)]
    median = float(np.median(norms)) if norms.size else float("nan")
    suggested = float(np.percentile(norms, 90)) if norms.size else float("nan")
    message = (
        f"The clip at {clip:g} acted on {int(clipped.sum())} of {n} steps "
        f"({100 * clipped.mean():.0f} %); the median gradient norm is {median:.3g}, "
        f"{median / clip:.0f}× the clip, so every update has the clip's length and only its "
        f"direction follows the gradient. Clip at about {suggested:.3g} (the 90th percentile of "
        'the norms) or use the adaptive clip (stability_guard(..., clip=None, adaptive="zclip")).'
    )
    return [
        _finding(
            "always_clipped",
            "warning",
            message,
            clipped_steps=int(clipped.sum()),
            steps=n,
            share=float(clipped.mean()),
            median_norm=median,
            clip=float(clip),
            suggested_clip=suggested,
        )
    ]


def dead_groups(
    table: Mapping[str, Any], trainable: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """``dead_group``: a trainable group whose gradient is exactly zero on most steps.

    >>> import numpy as np
    >>> t = {"grad_norm:a": np.ones(20), "grad_norm:b": np.r_[np.zeros(19), 1.0]}
    >>> [f["evidence"]["group"] for f in dead_groups(t)], dead_groups(t, trainable=["a"])
    (['b'], [])
    """
    out = []
    for g in _groups(table):
        if trainable is not None and not _under(g, trainable):
            continue
        v = np.asarray(table[f"grad_norm:{g}"], np.float64)
        v = v[np.isfinite(v)]
        if v.size < MIN_STEPS:
            continue
        share = float((v == 0).mean())
        if share >= DEAD_SHARE:
            message = (
                f"Group '{g}' gets an exactly zero gradient on {int((v == 0).sum())} of "
                f"{v.size} steps: it does not train. Its output may not reach the loss, its "
                "activations may be dead, or a stop_gradient may cut it off."
            )
            out.append(_finding("dead_group", "warning", message, group=g, zero_share=share))
    return out


def frozen_group_moves(moves: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """``frozen_group_moves``: a group that should be frozen changed (``moves``: group ->
    largest relative weight change of its parameters over the run).

    >>> [f["evidence"]["group"] for f in frozen_group_moves({"enc": 0.02, "dec": 0.0})]
    ['enc']
    """
    out = []
    for g, change in (moves or {}).items():
        if change > 0 or not np.isfinite(change):
            message = (
                f"Group '{g}' should be frozen in this stage, but its parameters changed by "
                f"{change:.3g} (relative): the freezing does not hold. Check that the stage's "
                "optimizer masks it (jaxstab.train_only) and that no weight decay or other "
                "transform outside the mask updates it."
            )
            out.append(_finding("frozen_group_moves", "critical", message, group=g,
                                relative_change=float(change)))  # fmt: skip
    return out


def group_dominates(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``group_dominates``: one group holds most of the squared gradient norm.

    >>> import numpy as np
    >>> t = {"grad_norm:a": np.full(20, 10.0), "grad_norm:b": np.ones(20)}
    >>> group_dominates(t)[0]["evidence"]["group"]
    'a'
    """
    names = _groups(table)
    if len(names) < 2:
        return []
    sq = np.stack([np.asarray(table[f"grad_norm:{g}"], np.float64) ** 2 for g in names])
    total = sq.sum(axis=0)
    ok = np.isfinite(total) & (total > 0)
    if ok.sum() < MIN_STEPS:
        return []
    shares = np.median(sq[:, ok] / total[ok], axis=1)
    top = int(np.argmax(shares))
    if shares[top] < DOMINANT_SHARE:
        return []
    g = names[top]
    message = (
        f"Group '{g}' carries {100 * shares[top]:.0f} % of the squared gradient norm (median "
        "over steps): the global norm, its clip and its spike test mostly see this group. "
        "Per-group clipping (jaxstab.clip_by_group_norm) keeps it from setting the others' step."
    )
    return [_finding("group_dominates", "info", message, group=g, share=float(shares[top]))]


def norm_growth(table: Mapping[str, Any], stop_step: int | None = None) -> list[dict[str, Any]]:
    """``norm_growth``: the gradient norm's trend rises by orders of magnitude before the stop.

    Compares the median norm of the run's first tenth with that of the last twentieth before
    ``stop_step`` (default: the end).

    >>> import numpy as np
    >>> norm_growth({"total_grad_norm": np.logspace(0, 4, 100)})[0]["evidence"]["factor"] > 100
    True
    """
    v = np.asarray(table["total_grad_norm"], np.float64)
    if stop_step is not None:
        v = v[: stop_step + 1]
    v = v[np.isfinite(v)]
    if v.size < 2 * MIN_STEPS:
        return []
    start = float(np.median(v[: max(5, v.size // 10)]))
    end = float(np.median(v[-max(3, v.size // 20) :]))
    if start <= 0 or end / start < GROWTH_FACTOR:
        return []
    message = (
        f"The gradient norm rose {end / start:.3g}× over the run (median {start:.3g} at the start, "
        f"{end:.3g} at the end): a steady climb, not one bad batch. Lower the learning rate or "
        "add warm-up; a clip only hides the trend."
    )
    return [_finding("norm_growth", "warning", message, start_norm=start, end_norm=end,
                     factor=end / start)]  # fmt: skip


def input_jump(
    suspicious: Sequence[str] | None, first_anomaly_step: int | None
) -> list[dict[str, Any]]:
    """``input_jump``: input statistics jump at the first anomaly (that step or the one before).

    ``suspicious``: per step, the ``;``-joined flagged input features
    (:func:`jaxstab.report.tables.suspicious_features`).

    >>> input_jump(["", "", "x_col0_max"], 2)[0]["evidence"]["features"]
    ['x_col0_max']
    """
    if not suspicious or first_anomaly_step is None:
        return []
    lo = max(first_anomaly_step - 1, 0)
    names = sorted({f for s in suspicious[lo : first_anomaly_step + 1] for f in s.split(";") if f})
    if not names:
        return []
    message = (
        f"At the first anomaly (step {first_anomaly_step}) the inputs jumped: "
        f"{', '.join(names[:5])}{' and more' if len(names) > 5 else ''} lie far outside their "
        "range over the run or are not finite. Check that batch's data before the model."
    )
    return [_finding("input_jump", "warning", message, step=first_anomaly_step, features=names)]


def lr_too_high(history: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """``lr_too_high``: the update/parameter norm ratio is far above the usual 1e-3.

    >>> import numpy as np
    >>> lr_too_high({"update/param_ratio": np.full(20, 0.5)})[0]["evidence"]["median_ratio"]
    0.5
    """
    ratio = None if history is None else history.get(UPDATE_PARAM_RATIO)
    if ratio is None:
        return []
    v = np.asarray(ratio, np.float64)
    v = v[np.isfinite(v)]
    if v.size < MIN_STEPS or np.median(v) <= LR_RATIO:
        return []
    med = float(np.median(v))
    message = (
        f"Each update moves the parameters by {med:.3g} of their norm (median), "
        f"{med / 1e-3:.0f}× the usual 1e-3: the learning rate is too high for this model."
    )
    return [_finding("lr_too_high", "warning", message, median_ratio=med)]


def nonfinite_origin(origin: Any, loss_finite: bool | None = None) -> list[dict[str, Any]]:
    """``nonfinite_origin``: where the first NaN/Inf of the stopping step was born (a
    :class:`jaxstab.checks.NonFiniteReport` from the replayed step, or ``None``).

    The pass is ``"backward"`` when the value was born in the transposed (backward) part of
    the gradient, or when the step's loss was finite (``loss_finite``): then the forward
    values were all finite (or masked away) and only the derivative, e.g. that of ``sqrt``
    at 0 inside ``jnp.linalg.norm``, is not; else ``"forward"``.

    >>> nonfinite_origin(None)
    []
    """
    if origin is None:
        return []
    backward = "transpose" in origin.transforms or bool(loss_finite)
    passes = "backward" if backward else "forward"
    where = f"{origin.file}:{origin.line}" if origin.file else "an unknown line"
    module = f" in module '{origin.module_path}'" if origin.module_path else ""
    ranges = [r for r in origin.input_ranges or () if r is not None]
    inputs = ", ".join(f"[{lo:.3g}, {hi:.3g}]" for lo, hi in ranges)
    message = (
        f"The first {origin.kind} came from `{origin.primitive}` at {where}{module}, in the "
        f"{passes} pass{f'; its inputs ranged over {inputs}' if inputs else ''}."
    )
    evidence = {"primitive": origin.primitive, "file": origin.file, "line": origin.line,
                "module_path": origin.module_path, "pass": passes, "kind": origin.kind,
                "input_ranges": origin.input_ranges}  # fmt: skip
    return [_finding("nonfinite_origin", "critical", message, **evidence)]


def find_findings(
    table: Mapping[str, Any],
    *,
    clip: float | None = None,
    trainable: Sequence[str] | None = None,
    history: Mapping[str, Any] | None = None,
    suspicious: Sequence[str] | None = None,
    first_anomaly_step: int | None = None,
    frozen_moves: Mapping[str, float] | None = None,
    origin: Any = None,
    origin_loss_finite: bool | None = None,
) -> list[dict[str, Any]]:
    """Every rule of this module on one run, most severe first (see the module example).

    Args:
      table: the gradient table (``total_grad_norm``, ``clipped``, ``grad_norm:<group>``).
      clip: the fixed global-norm clip of the run (default: :func:`infer_clip` of
        ``history``).
      trainable: the groups that train in this stage (``None``: all).
      history: the recorded statistics (for ``update/param_ratio``).
      suspicious: per step, the flagged input features.
      first_anomaly_step: the report's first danger step.
      frozen_moves: per group that should be frozen, its largest relative weight change.
      origin: the located first non-finite value of the stopping step;
        ``origin_loss_finite``: whether that step's loss was finite.
    """
    found = [
        *nonfinite_origin(origin, origin_loss_finite),
        *frozen_group_moves(frozen_moves),
        *always_clipped(table, infer_clip(history) if clip is None else clip),
        *dead_groups(table, trainable),
        *norm_growth(table),
        *input_jump(suspicious, first_anomaly_step),
        *lr_too_high(history),
        *group_dominates(table),
    ]
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    return sorted(found, key=lambda f: order[f["severity"]])
