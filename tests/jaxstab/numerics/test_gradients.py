"""Gradients against finite differences (float64, forward and reverse mode) and the
docstring examples of every module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxstab.numerics as N

NAMES = sorted(N.__all__)


def _cast(args, dtype):
    return tuple(jnp.asarray(a, dtype) if isinstance(a, np.ndarray) else a for a in args)


# Second order where it is cheap and meaningful; straight_through_clip's gradient is the
# identity by design, not the derivative of its value, so it is checked in test_bounds.
SECOND_ORDER = {"safe_log", "safe_exp", "safe_div", "safe_sqrt", "safe_norm", "gaussian_kl"}


@pytest.mark.parametrize("name", [n for n in NAMES if n != "straight_through_clip"])
def test_check_grads_interior_float64(name, cases):
    fn, interior, _, argnums = cases[name]
    with jax.enable_x64(True):
        args = _cast(interior, jnp.float64)

        @jax.jit
        def partial(*diff):
            full = list(args)
            for i, d in zip(argnums, diff, strict=True):
                full[i] = d
            return fn(*full)

        order = 2 if name in SECOND_ORDER else 1
        check_grads(
            partial, tuple(args[i] for i in argnums), order=order, modes=("fwd", "rev"), eps=1e-4
        )
