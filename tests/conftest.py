"""Test-wide settings: property tests are derandomized, so every run draws the same examples,
and XLA compiles with its cheap CPU pipeline.

The suite is dominated by compilation (small models, a few steps each), so XLA's backend
optimisation level 0 without the expensive LLVM passes cuts its time by about a third; the
computations are the same (no fast-math), only less optimised machine code. Set before any
test module imports JAX; flags already in ``XLA_FLAGS`` are kept, and a subprocess that sets
its own ``XLA_FLAGS`` is unaffected.
"""

import os

from hypothesis import settings

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.load_profile("deterministic")
