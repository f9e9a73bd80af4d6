"""``jaxstab.report``: the files ``jaxstab diagnose`` writes and ``jaxstab compare`` reads.

Example:
  >>> from jaxstab.report import Thresholds
  >>> Thresholds().total_danger
  10.0
"""

from jaxstab.report.thresholds import Thresholds

__all__ = ["Thresholds"]
