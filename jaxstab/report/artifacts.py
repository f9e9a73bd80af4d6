"""The report files of a recorded run, from its per-step history: one path for every run.

:func:`write_artifacts` writes ``gradient_stats.csv``, ``input_features.csv``,
``diagnosis_report.json`` (with its ``findings``), ``diagnostics.png``,
``gradient_heatmap.png`` and ``feature_changes.png`` into a folder, from the history that
:func:`jaxstab.train.fit` records or that :class:`jaxstab.Recorder` collects in a user's loop.

Example:
  >>> import os, tempfile
  >>> import numpy as np
  >>> h = {"loss": np.linspace(1.0, 0.5, 12), "grad/global_norm": np.full(12, 2.0)}
  >>> d = tempfile.mkdtemp()
  >>> report = write_artifacts(d, h, status="ok", config={})
  >>> report["steps_recorded"], sorted(os.listdir(d))[:3]
  (12, ['diagnosis_report.json', 'diagnostics.png', 'feature_changes.png'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxstab import stat_names as S
from jaxstab.report import findings as findings_lib
from jaxstab.report import plots, report_json, tables
from jaxstab.report.thresholds import Thresholds

FILES = (
    "gradient_stats.csv",
    "input_features.csv",
    "diagnosis_report.json",
    "diagnostics.png",
    "gradient_heatmap.png",
    "feature_changes.png",
)


def frozen_moves(
    changes: Sequence[Mapping[str, Any]], frozen: Sequence[str] | None
) -> dict[str, float]:
    """Per frozen group, the largest relative change of its parameters (``changes``: the
    report's ``weight_changes`` rows, parameter names ``group/...``).

    >>> frozen_moves([{"param": "enc/w", "relative_change": 0.5},
    ...               {"param": "dec/w", "relative_change": 0.1}], ["enc"])
    {'enc': 0.5}
    """
    out: dict[str, float] = {}
    for group in frozen or ():
        rows = [r["relative_change"] for r in changes
                if r["param"] == group or r["param"].startswith(group + "/")]  # fmt: skip
        if rows:
            values = np.asarray(rows, np.float64)
            out[group] = float(np.nan if np.isnan(values).any() else values.max())
    return out


def origin_entry(origin: Any) -> dict[str, Any]:
    """The report's ``nonfinite_origin`` entry for a :class:`jaxstab.checks.NonFiniteReport`.

    >>> from types import SimpleNamespace as NS
    >>> o = NS(message="m", primitive="sqrt", file="f.py", line=3, module_path="body",
    ...        transforms=("jvp",), kind="NaN", input_ranges=None)
    >>> origin_entry(o)["primitive"], origin_entry(o)["line"]
    ('sqrt', 3)
    """
    fields = ("message", "primitive", "file", "line", "module_path", "transforms", "kind",
              "input_ranges")  # fmt: skip
    return {f: getattr(origin, f, None) for f in fields}


def write_artifacts(
    directory: str,
    history: Mapping[str, np.ndarray],
    *,
    status: str,
    config: Mapping[str, Any],
    thresholds: Thresholds | None = None,
    steps_per_epoch: int | None = None,
    lr: np.ndarray | None = None,
    params_before: Mapping[str, np.ndarray] | None = None,
    params_after: Mapping[str, np.ndarray] | None = None,
    clip: float | None = None,
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] | None = None,
    origin: Any = None,
    origin_loss_finite: bool | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the six report files of :data:`FILES` into ``directory``; returns the report.

    Args:
      history: per-step arrays: ``loss``, ``grad/global_norm`` and any other recorded
        statistic (``grad/norm/<group>``, ``clip/clipped``, ``input/<feature>``, ...).
      status: ``"ok"``, ``"explosion"`` or ``"nonfinite"``.
      config: the run's settings, copied into the report.
      thresholds: the report's levels (default :class:`Thresholds`).
      steps_per_epoch: for the tables' ``epoch`` column (default: every step epoch 0).
      lr: the learning rate per step (default NaN).
      params_before, params_after: flat parameters at the start and end (weight changes).
      clip, trainable, frozen, origin, origin_loss_finite: what the findings need (see
        :func:`jaxstab.report.findings.find_findings`; ``frozen``: groups that should not
        move).
      extra: more top-level report entries.
    """
    thresholds = thresholds or Thresholds()
    n = tables.n_steps(history)
    spe = steps_per_epoch or max(n, 1)
    lr = np.full(n, np.nan) if lr is None else np.asarray(lr, np.float64)
    grad = tables.gradient_table(history, steps_per_epoch=spe, lr=lr)
    feats = tables.feature_table(history, steps_per_epoch=spe)
    tables.write_csv(os.path.join(directory, "gradient_stats.csv"), grad)
    tables.write_csv(os.path.join(directory, "input_features.csv"), feats)
    aux = {"loss": history[S.LOSS]}
    aux |= {k: v for k, v in history.items() if "/" not in k and k != S.LOSS}
    changes = []
    if params_before is not None and params_after is not None:
        changes = report_json.weight_changes(params_before, params_after)
    suspicious = [i for i, s in enumerate(feats["suspicious_features"]) if s]
    report = report_json.build_report(
        grad,
        status=status,
        thresholds=thresholds,
        config=config,
        weight_change_rows=changes,
        aux=aux,
        extra={
            "first_suspicious_feature_step": suspicious[0] if suspicious else None,
            **({"nonfinite_origin": origin_entry(origin)} if origin is not None else {}),
            **(extra or {}),
        },
    )
    report["findings"] = report_json.jsonable(
        findings_lib.find_findings(
            grad,
            clip=clip,
            trainable=trainable,
            history=history,
            suspicious=list(feats["suspicious_features"]),
            first_anomaly_step=report["first_anomaly_step"],
            frozen_moves=frozen_moves(changes, frozen),
            origin=origin,
            origin_loss_finite=origin_loss_finite,
        )
    )
    report_json.write_report(os.path.join(directory, "diagnosis_report.json"), report)
    plots.plot_diagnostics(grad, thresholds, os.path.join(directory, "diagnostics.png"),
                           findings=report["findings"])  # fmt: skip
    plots.plot_heatmap(grad, os.path.join(directory, "gradient_heatmap.png"))
    plots.plot_features(feats, os.path.join(directory, "feature_changes.png"))
    return report
