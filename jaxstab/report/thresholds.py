"""Gradient-norm thresholds of the diagnosis report and the per-step danger level.

Defaults from the diagnosis notes: total gradient norm normal 0.1–5, warning 5–10, danger
above 10; largest group norm warning 3–10, danger above 10; any NaN/Inf gradient is danger;
the run stops when the total norm exceeds ``explosion`` (100).

Example:
  >>> import numpy as np
  >>> levels(Thresholds(), total=np.array([1.0, 7.0, 20.0]), max_group=np.array([1.0, 1.0, 1.0]),
  ...        nonfinite=np.array([0, 0, 0])).tolist()
  [0, 1, 2]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

NORMAL, WARNING, DANGER = 0, 1, 2
LEVEL_NAMES = ("normal", "warning", "danger")


class Thresholds(NamedTuple):
    """Configurable limits (every value a gradient L2 norm)."""

    total_low: float = 0.1  # below: gradients vanishing (reported, not an anomaly)
    total_warning: float = 5.0
    total_danger: float = 10.0
    group_warning: float = 3.0
    group_danger: float = 10.0
    explosion: float = 100.0

    def as_dict(self) -> dict[str, float]:
        """Plain dict for the JSON report.

        >>> Thresholds().as_dict()["total_danger"]
        10.0
        """
        return {k: float(v) for k, v in self._asdict().items()}


def levels(
    th: Thresholds, *, total: np.ndarray, max_group: np.ndarray, nonfinite: np.ndarray
) -> np.ndarray:
    """Per-step level: ``NORMAL`` (0), ``WARNING`` (1) or ``DANGER`` (2).

    A non-finite norm or any NaN/Inf gradient entry is danger.

    >>> import numpy as np
    >>> levels(Thresholds(), total=np.array([np.nan, 1.0]), max_group=np.array([1.0, 4.0]),
    ...        nonfinite=np.array([0, 0])).tolist()
    [2, 1]
    """
    total = np.asarray(total, dtype=np.float64)
    max_group = np.asarray(max_group, dtype=np.float64)
    out = np.full(total.shape, NORMAL, dtype=np.int64)
    out[(total > th.total_warning) | (max_group > th.group_warning)] = WARNING
    bad = (
        (total > th.total_danger)
        | (max_group > th.group_danger)
        | ~np.isfinite(total)
        | ~np.isfinite(max_group)
        | (np.asarray(nonfinite) > 0)
    )
    out[bad] = DANGER
    return out
