"""autoclip against a step-by-step NumPy implementation of AutoClip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxstab


def _reference(norms, percentile, history):
    """AutoClip (Seetharaman et al. 2020) with the history bounded to the last ``history``."""
    seen: list[float] = []
    out = []
    for g in norms:
        if not np.isfinite(g):
            out.append(g)
            continue
        seen.append(g)
        tau = np.percentile(seen[-history:], percentile)
        out.append(min(g, tau))
    return out


@pytest.mark.parametrize("percentile,history", [(10.0, 1024), (50.0, 7), (90.0, 4)])
def test_matches_numpy_reference(percentile, history):
    rng = np.random.default_rng(3)
    norms = np.abs(1.0 + 0.3 * rng.normal(size=30)).astype(np.float32).astype(np.float64)
    norms[[5, 17]] *= 10
    norms[11] = np.inf
    direction = np.array([0.6, 0.8], np.float32)  # unit norm
    tx = jaxstab.autoclip(percentile=percentile, history=history)
    state = tx.init({"w": jnp.zeros(2)})
    step = jax.jit(tx.update)
    expected = _reference(norms, percentile, history)
    for g, e in zip(norms, expected, strict=True):
        out, state = step({"w": jnp.asarray(g * direction)}, state)
        if np.isfinite(g):
            np.testing.assert_allclose(
                np.linalg.norm(np.asarray(out["w"], np.float64)), e, rtol=1e-5
            )
    assert state.norms.shape == (history,)


def test_nan_step_not_in_history():
    tx = jaxstab.autoclip(history=8)
    state = tx.init({"w": jnp.zeros(1)})
    for g in (1.0, 2.0):
        _, state = tx.update({"w": jnp.array([g])}, state)
    out, after = tx.update({"w": jnp.array([jnp.nan])}, state)
    assert np.isnan(float(out["w"][0]))  # passed through, left to skip_bad_steps
    np.testing.assert_array_equal(after.norms, state.norms)
    assert int(after.count) == int(state.count) == 2
    assert not bool(after.clipped)


def test_validation():
    with pytest.raises(ValueError, match="percentile"):
        jaxstab.autoclip(percentile=0.0)
    with pytest.raises(ValueError, match="history"):
        jaxstab.autoclip(history=0)
