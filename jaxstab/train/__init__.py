"""``jaxstab.train``: the training loop shared by every model.

Example:
  >>> from jaxstab.train import fit, FitResult
  >>> callable(fit)
  True
"""

from jaxstab.train.loop import FitResult, fit

__all__ = ["FitResult", "fit"]
