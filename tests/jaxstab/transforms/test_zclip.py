"""zclip against a step-by-step NumPy implementation of the published algorithm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxstab


class NumpyZClip:
    """ZClip (Kumar et al. 2025), float64, one global norm per step."""

    def __init__(self, alpha, z_threshold, warmup_steps):
        self.alpha, self.zt, self.warmup = alpha, z_threshold, warmup_steps
        self.warm_norms: list[float] = []
        self.mean = self.var = None

    def step(self, g: float) -> float:
        """Returns the norm after clipping."""
        if not np.isfinite(g):
            return g
        if self.mean is None:
            self.warm_norms.append(g)
            if len(self.warm_norms) == self.warmup:
                self.mean = float(np.mean(self.warm_norms))
                self.var = float(np.var(self.warm_norms))
            return g
        std = np.sqrt(self.var)
        z = (g - self.mean) / max(std, 1e-12)
        g_star = self.mean + self.zt * std if z > self.zt else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * g_star
        self.var = self.alpha * self.var + (1 - self.alpha) * (g_star - self.mean) ** 2
        return g_star


def _norms(seed, n):
    rng = np.random.default_rng(seed)
    norms = np.abs(1.0 + 0.1 * rng.normal(size=n))
    norms[[12, 20, 21, 30]] *= [8.0, 5.0, 20.0, 3.0]  # spikes
    norms[25] = np.nan
    return norms


@pytest.mark.parametrize("alpha,zt,warmup", [(0.97, 2.5, 10), (0.8, 1.5, 5)])
def test_matches_numpy_reference(alpha, zt, warmup):
    direction = np.array([0.6, 0.0, -0.8], np.float32)  # unit norm
    tx = jaxstab.zclip(alpha=alpha, z_threshold=zt, warmup_steps=warmup)
    state = tx.init({"w": jnp.zeros(3)})
    step = jax.jit(tx.update)
    ref = NumpyZClip(alpha, zt, warmup)
    n_clipped = 0
    for g in _norms(0, 40):
        out, state = step({"w": jnp.asarray(g * direction)}, state)
        expected = ref.step(float(np.float32(g)))
        got = float(np.linalg.norm(np.asarray(out["w"], np.float64)))
        if np.isfinite(g):
            np.testing.assert_allclose(got, expected, rtol=2e-5)
            n_clipped += bool(state.clipped)
        if ref.mean is not None:
            np.testing.assert_allclose(float(state.mean), ref.mean, rtol=2e-5)
            np.testing.assert_allclose(float(state.var), ref.var, rtol=1e-3, atol=1e-8)
    assert n_clipped >= 2


def test_nan_step_leaves_statistics_unchanged():
    tx = jaxstab.zclip(warmup_steps=3)
    state = tx.init({"w": jnp.zeros(2)})
    for g in (1.0, 1.2, 0.8, 1.1):
        _, state = tx.update({"w": jnp.array([g, 0.0])}, state)
    before = state
    _, after = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state)
    for field in ("count", "mean", "var"):
        np.testing.assert_array_equal(getattr(after, field), getattr(before, field))
    assert not bool(after.clipped)


def test_stats_names():
    tx = jaxstab.zclip()
    state = tx.init({"w": jnp.zeros(2)})
    assert {"zclip/mean", "zclip/std", "zclip/z", "zclip/clipped", "zclip/scale"} <= set(
        jaxstab.read_stats(state)
    )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"alpha": 1.0}, "alpha"),
        ({"z_threshold": 0}, "z_threshold"),
        ({"warmup_steps": 0}, "warmup_steps"),
    ],
)
def test_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        jaxstab.zclip(**kwargs)
