"""jaxstab: training-stability tools for JAX and Flax.

Submodules:
  jaxstab.numerics  safe-math primitives with finite values and gradients at the boundaries.
"""

__version__ = "0.1.0"
