"""``diagnosis_report.json``: status, first anomaly, offending groups, weight changes.

Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` so
the file is strict JSON.

Example:
  >>> import numpy as np
  >>> from jaxstab.report.thresholds import Thresholds
  >>> table = {"step": np.arange(2), "loss": np.array([1.0, np.nan]),
  ...          "total_grad_norm": np.array([1.0, 300.0]), "max_grad_norm": np.array([1, 290.0]),
  ...          "num_nan_grads": np.array([0, 0]), "num_inf_grads": np.array([0, 0]),
  ...          "clipped": np.array([0, 1]), "skipped": np.array([0, 0]),
  ...          "grad_norm:enc": np.array([1.0, 290.0]), "grad_norm:dec": np.array([0.1, 3.0])}
  >>> r = build_report(table, status="explosion", thresholds=Thresholds(), config={})
  >>> r["first_anomaly_step"], [g["group"] for g in r["offending_groups"]]
  (1, ['enc'])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxstab.report import thresholds as th_lib


def _num(x: Any) -> Any:
    x = float(x)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def jsonable(obj: Any) -> Any:
    """Converts numpy/jax scalars and arrays, tuples and non-finite floats for ``json``.

    >>> jsonable({"a": np.float32(np.inf), "b": (1, np.int64(2))})
    {'a': 'Infinity', 'b': [1, 2]}
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _num(obj)
    if isinstance(obj, np.ndarray | jax.Array):
        return jsonable(np.asarray(obj).tolist())
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def weight_changes(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> list:
    """Per parameter, ``‖after − before‖ / max(‖before‖, 1e-3·√size)``, largest first.

    The floor (an RMS of 1e-3) keeps zero-initialised parameters such as biases from
    dividing by zero; NaN changes (a poisoned parameter) rank first.

    >>> w = weight_changes({"a": np.ones(4), "b": np.ones(4)},
    ...                    {"a": np.ones(4) * 2, "b": np.ones(4)})
    >>> [(c["param"], c["relative_change"]) for c in w]
    [('a', 1.0), ('b', 0.0)]
    """
    rows = []
    for name, b in before.items():
        b = np.asarray(b, np.float64)
        a = np.asarray(after[name], np.float64)
        nb, delta = float(np.linalg.norm(b)), float(np.linalg.norm(a - b))
        floor = 1e-3 * math.sqrt(max(b.size, 1))
        rows.append(
            {
                "param": name,
                "norm_before": nb,
                "norm_after": float(np.linalg.norm(a)),
                "abs_change": delta,
                "relative_change": delta / max(nb, floor),
            }
        )
    rows.sort(
        key=lambda r: (
            not math.isnan(r["relative_change"]),
            -np.nan_to_num(r["relative_change"], nan=0.0, posinf=np.finfo(float).max),
        )
    )
    return rows


def offending_groups(
    table: Mapping[str, np.ndarray], thresholds: th_lib.Thresholds
) -> list[dict[str, Any]]:
    """Groups whose norm ever exceeded the group danger limit or was non-finite.

    Ranked by the norm at the last step (the step that stopped an exploding run), then by
    the largest norm; non-finite norms rank first.
    """
    out = []
    for col in (c for c in table if c.startswith("grad_norm:")):
        v = np.asarray(table[col], np.float64)
        bad = ~np.isfinite(v) | (v > thresholds.group_danger)
        if not bad.any():
            continue
        finite = v[np.isfinite(v)]
        out.append(
            {
                "group": col[len("grad_norm:") :],
                "first_danger_step": int(np.nonzero(bad)[0][0]),
                "danger_steps": int(bad.sum()),
                "max_norm": float(finite.max()) if finite.size else math.nan,
                "last_norm": float(v[-1]),
                "nonfinite": bool((~np.isfinite(v)).any()),
            }
        )

    def rank(g: dict[str, Any]) -> tuple:
        last = g["last_norm"]
        return (not g["nonfinite"], -np.nan_to_num(last, nan=np.inf), -g["max_norm"])

    return sorted(out, key=rank)


def loss_terms(aux: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """First, last, mean, min and max (over finite steps) of every loss term."""
    out = {}
    for k, v in aux.items():
        v = np.asarray(v, np.float64)
        fin = v[np.isfinite(v)]
        out[k] = {
            "first": float(v[0]) if v.size else math.nan,
            "last": float(v[-1]) if v.size else math.nan,
            "mean": float(fin.mean()) if fin.size else math.nan,
            "min": float(fin.min()) if fin.size else math.nan,
            "max": float(fin.max()) if fin.size else math.nan,
            "nonfinite_steps": int((~np.isfinite(v)).sum()),
        }
    return out


def build_report(
    table: Mapping[str, np.ndarray],
    *,
    status: str,
    thresholds: th_lib.Thresholds,
    config: Mapping[str, Any],
    weight_change_rows: Sequence[Mapping[str, Any]] = (),
    aux: Mapping[str, np.ndarray] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a dict (see the module example); ``table`` is the gradient table."""
    total = np.asarray(table["total_grad_norm"], np.float64)
    nonfinite = np.asarray(table["num_nan_grads"]) + np.asarray(table["num_inf_grads"])
    lv = th_lib.levels(
        thresholds, total=total, max_group=table["max_grad_norm"], nonfinite=nonfinite
    )
    danger = np.nonzero(lv == th_lib.DANGER)[0]
    warning = np.nonzero(lv >= th_lib.WARNING)[0]
    n = len(total)
    peak = int(np.nanargmax(np.where(np.isfinite(total), total, np.inf))) if n else None
    report = {
        "status": status,
        "stopped_early": status != "ok",
        "steps_recorded": n,
        "first_anomaly_step": int(danger[0]) if danger.size else None,
        "first_warning_step": int(warning[0]) if warning.size else None,
        "offending_groups": offending_groups(table, thresholds),
        "summary": {
            "warning_steps": int((lv == th_lib.WARNING).sum()),
            "danger_steps": int(danger.size),
            "nonfinite_grad_steps": int((nonfinite > 0).sum()),
            "nonfinite_loss_steps": int((~np.isfinite(np.asarray(table["loss"]))).sum()),
            "clipped_steps": int(np.asarray(table["clipped"]).sum()),
            "skipped_steps": int(np.asarray(table["skipped"]).sum()),
            "max_total_grad_norm": float(total[peak]) if n else None,
            "max_total_grad_norm_step": peak,
            "low_norm_steps": int((total < thresholds.total_low).sum()),
            "final_loss": float(table["loss"][-1]) if n else None,
        },
        "weight_changes": list(weight_change_rows),
        "thresholds": thresholds.as_dict(),
        "config": dict(config),
    }
    if aux and len(aux) > 1:
        report["loss_terms"] = loss_terms(aux)
    report.update(extra or {})
    return jsonable(report)


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """Writes ``report`` as indented strict JSON."""
    with open(path, "w") as f:
        json.dump(jsonable(report), f, indent=2, allow_nan=False)
        f.write("\n")
