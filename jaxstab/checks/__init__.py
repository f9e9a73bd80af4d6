"""Finiteness checks and a NaN/Inf locator that work under ``jit``.

* `assert_finite`, `guard_step`, `wait_checks` — device-side assertions through
  ``chex.chexify`` (asynchronous by default).
* `locate_nonfinite` — names the first primitive that produced a NaN or ±Inf, with its
  source line, Flax NNX module path and input ranges (`NonFiniteReport`).
"""

from jaxstab.checks.finite import GuardedStep, assert_finite, guard_step, wait_checks
from jaxstab.checks.locate import NonFiniteReport, locate_nonfinite

__all__ = [
    "GuardedStep",
    "NonFiniteReport",
    "assert_finite",
    "guard_step",
    "locate_nonfinite",
    "wait_checks",
]
