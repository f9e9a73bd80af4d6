"""Per-step tables of a recorded run: ``gradient_stats.csv`` and ``input_features.csv``.

``history`` is :func:`jaxstab.train.fit`'s ``history`` with ``record=True``: arrays of one
entry per step named ``loss``, ``grad/global_norm``, ``grad/norm/<group>``,
``grad/nan/<group>``, ``grad/inf/<group>``, ``clip/clipped``, ``skip/skipped`` and
``input/<feature>``.

Example:
  >>> import numpy as np
  >>> h = {"loss": np.array([1.0, 0.5]), "grad/global_norm": np.array([2.0, 1.0]),
  ...      "grad/norm/enc": np.array([1.5, 0.5]), "grad/norm/dec": np.array([1.0, 0.8])}
  >>> t = gradient_table(h, steps_per_epoch=1, lr=np.array([0.1, 0.1]))
  >>> list(t)[:4], t["max_grad_norm"].tolist(), list(t)[-2:]
  (['step', 'epoch', 'loss', 'lr'], [1.5, 0.8], ['grad_norm:dec', 'grad_norm:enc'])
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence

import numpy as np

from jaxstab import stat_names as S

NORM, NAN, INF, INPUT = S.GROUP_NORM, S.GROUP_NAN, S.GROUP_INF, S.INPUT


def groups(history: Mapping[str, np.ndarray]) -> list[str]:
    """Parameter groups with a recorded norm, sorted.

    >>> groups({"grad/norm/b": [], "grad/norm/a": [], "loss": []})
    ['a', 'b']
    """
    return sorted(k[len(NORM) :] for k in history if k.startswith(NORM))


def n_steps(history: Mapping[str, np.ndarray]) -> int:
    """Number of recorded steps."""
    return len(history["loss"])


def _sum(history: Mapping[str, np.ndarray], prefix: str, n: int) -> np.ndarray:
    cols = [np.asarray(v, dtype=np.int64) for k, v in history.items() if k.startswith(prefix)]
    return np.sum(cols, axis=0) if cols else np.zeros(n, dtype=np.int64)


def gradient_table(
    history: Mapping[str, np.ndarray], *, steps_per_epoch: int, lr: np.ndarray
) -> dict[str, np.ndarray]:
    """The ``gradient_stats.csv`` columns, in order (see the module example)."""
    n = n_steps(history)
    names = groups(history)
    group_norms = np.zeros((0, n))  # a loop that records only the global norm has no groups
    if names:
        group_norms = np.stack([np.asarray(history[NORM + g], np.float64) for g in names])
    zeros = np.zeros(n, dtype=np.int64)
    table: dict[str, np.ndarray] = {
        "step": np.arange(n),
        "epoch": np.arange(n) // steps_per_epoch,
        "loss": np.asarray(history[S.LOSS], np.float64),
        "lr": np.asarray(lr, np.float64),
        "total_grad_norm": np.asarray(history[S.GLOBAL_NORM], np.float64),
        # fmax: a NaN group norm must not hide the finite ones; all-NaN stays NaN.
        "max_grad_norm": (np.fmax.reduce(group_norms, axis=0) if names else np.full(n, np.nan)),
        "num_nan_grads": _sum(history, NAN, n),
        "num_inf_grads": _sum(history, INF, n),
        "clipped": np.asarray(history.get(S.CLIP_CLIPPED, zeros), dtype=np.int64),
        "skipped": np.asarray(history.get(S.SKIP_SKIPPED, zeros), dtype=np.int64),
    }
    for g, row in zip(names, group_norms, strict=True):
        table[f"grad_norm:{g}"] = row
    return table


def suspicious_features(values: Mapping[str, np.ndarray], *, z_limit: float = 6.0) -> list[str]:
    """Per step, the ``;``-joined names of features that are non-finite or outliers.

    With the feature's quantiles over the run, an outlier lies outside
    ``[q25 − z·w, q75 + z·w]`` where ``w = max(q75 − q25, (q95 − q5) / 2, 1e-6 + 1e-3·|median|)``
    and ``z = z_limit``: a rare spike or a jump far beyond the run's usual spread is flagged,
    the ordinary batch-to-batch variation (even of a feature that takes few values) is not.

    >>> import numpy as np
    >>> v = np.r_[np.linspace(0.9, 1.1, 20), 50.0]
    >>> b = np.r_[np.zeros(10), np.inf, np.zeros(10)]
    >>> [i for i, s in enumerate(suspicious_features({"a": v, "b": b}, z_limit=6)) if s]
    [10, 20]
    """
    n = len(next(iter(values.values()))) if values else 0
    flags: list[list[str]] = [[] for _ in range(n)]
    for name, raw in values.items():
        v = np.asarray(raw, dtype=np.float64)
        finite = np.isfinite(v)
        bad = ~finite
        if finite.any():
            q5, q25, q50, q75, q95 = np.percentile(v[finite], [5, 25, 50, 75, 95])
            w = max(q75 - q25, (q95 - q5) / 2, 1e-6 + 1e-3 * abs(q50))
            with np.errstate(invalid="ignore"):
                bad |= (v < q25 - z_limit * w) | (v > q75 + z_limit * w)
        for i in np.nonzero(bad)[0]:
            flags[i].append(name)
    return [";".join(f) for f in flags]


def feature_table(
    history: Mapping[str, np.ndarray], *, steps_per_epoch: int, z_limit: float = 6.0
) -> dict[str, np.ndarray | list[str]]:
    """The ``input_features.csv`` columns: step, epoch, every feature, suspicious_features.

    >>> import numpy as np
    >>> t = feature_table({"loss": np.zeros(2), "input/x_col0_min": np.array([0.0, 0.1])},
    ...                   steps_per_epoch=2)
    >>> list(t), t["suspicious_features"]
    (['step', 'epoch', 'x_col0_min', 'suspicious_features'], ['', ''])
    >>> feature_table({"loss": np.zeros(2)}, steps_per_epoch=2)["suspicious_features"]
    ['', '']
    """
    n = n_steps(history)
    feats = {k[len(INPUT) :]: np.asarray(v) for k, v in history.items() if k.startswith(INPUT)}
    table: dict[str, np.ndarray | list[str]] = {
        "step": np.arange(n),
        "epoch": np.arange(n) // steps_per_epoch,
    }
    table.update(feats)
    # No input statistics (a model without feature_stats): an empty flag per step.
    table["suspicious_features"] = (
        suspicious_features(feats, z_limit=z_limit) if feats else [""] * n
    )
    return table


def write_csv(path: str | os.PathLike, table: Mapping[str, Sequence]) -> None:
    """Writes ``table`` (column name -> values of equal length) as CSV with a header row.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.csv")
    >>> write_csv(p, {"a": [1, 2], "b": ["x", ""]})
    >>> open(p).read().splitlines()
    ['a,b', '1,x', '2,']
    """
    names = list(table)
    columns = [np.asarray(table[k]).tolist() for k in names]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows(zip(*columns, strict=True))
