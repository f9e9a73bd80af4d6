"""GenoFlow phase 2's OT pairing: ott-jax's plan against POT's, and seed 004's failures (a
constant latent dimension, NaN plans at small ε) made impossible.

The shapes are few on purpose: each new (shape, dtype, cost) compiles the Sinkhorn loop again,
and ε, ``min_std`` and ``ddof`` are traced, so the tests below share three compilations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from jaxstab.models.genoflow.pairing import Pairing, pair_by_ot, pair_time_points
from jaxstab.numerics import safe_zscore

N, D = 30, 4  # float32 tests: N + N cells, D latent dimensions
CONSTANT = 0.7


def _sets(seed: int = 3, constant: str = "none") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    source = rng.normal(size=(N, D)).astype(np.float32)
    target = (rng.normal(size=(N, D)) * 1.5 + 0.5).astype(np.float32)
    if constant in ("source", "both"):
        source[:, 2] = CONSTANT
    if constant in ("target", "both"):
        target[:, 2] = CONSTANT
    return source, target


def _np_zscore(x: np.ndarray, ddof: int = 0) -> np.ndarray:
    return (x - x.mean(0)) / x.std(0, ddof=ddof)


# Plans are compared relative to their largest entry: entries are at most 1/n, so "within
# 1e-4" in absolute terms would allow a 0.2-0.5 % error of the largest entries here; relative
# to the maximum it is scale-free and stricter (and implies the absolute bound).
PLAN_RTOL = 1e-4


@pytest.mark.parametrize("cost", ["euclidean", "sqeuclidean"])
def test_plan_matches_pot_log_domain_sinkhorn(cost):
    # float64 on both sides, small enough sets that both solvers converge at ε = 0.01 too, so
    # the comparison is of the (unique) entropic optimum and not of two iterates.
    rng = np.random.default_rng(1)
    xs, xt = rng.normal(size=(24, 2)), rng.normal(size=(20, 2)) + 0.5
    with jax.enable_x64(True):
        for ddof in (0, 1):
            zs, zt = _np_zscore(xs, ddof), _np_zscore(xt, ddof)
            m = ot.dist(zs, zt, metric=cost)
            for eps in (0.1, 0.01) if ddof == 0 else (0.1,):
                ref = ot.sinkhorn(
                    ot.unif(24),
                    ot.unif(20),
                    m,
                    eps,
                    method="sinkhorn_log",
                    numItermax=20000,
                    stopThr=1e-11,
                )
                p = pair_by_ot(
                    xs,
                    xt,
                    epsilon=eps,
                    cost=cost,
                    ddof=ddof,
                    max_iterations=20000,
                    threshold=1e-10,
                )
                assert p.plan.dtype == jnp.float64 and bool(p.converged)
                err = np.abs(np.asarray(p.plan) - ref).max() / ref.max()
                assert err < PLAN_RTOL, (cost, eps, ddof, err)
                np.testing.assert_array_equal(p.target, ref.argmax(1))


def _weighted_cost(source: jax.Array, target: jax.Array, epsilon: float) -> jax.Array:
    """Σ plan ⊙ squared distance of the z-scores (no sqrt, so safe at distance 0)."""
    plan = pair_by_ot(source, target, epsilon=epsilon).plan
    zs, zt = safe_zscore(source), safe_zscore(target)
    return jnp.sum(plan * jnp.sum((zs[:, None, :] - zt[None, :, :]) ** 2, axis=-1))


@pytest.mark.parametrize("constant", ["source", "both"])
def test_constant_latent_dimension_is_finite(constant):
    source, target = _sets(constant=constant)
    # The contrast, naive float32 z-scores of a constant column: of 0.5 (its mean is exact) it
    # is 0/0 = NaN, and the NaN reaches the whole cost matrix (every distance involves that
    # column); of 0.7 the one-pass mean leaves a rounding residual r, so the column is
    # r / |r| = ±1 (or NaN), not 0 (a spurious offset between the two sets).
    exact = source.copy()
    exact[:, 2] = 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        naive_exact, naive = _np_zscore(exact), _np_zscore(source)
    assert np.isnan(naive_exact[:, 2]).all()
    assert np.isnan(ot.dist(naive_exact, _np_zscore(target), metric="euclidean")).all()
    assert not (naive[:, 2] == 0).all()
    assert (np.asarray(safe_zscore(source))[:, 2] == 0).all()
    assert (np.asarray(safe_zscore(exact))[:, 2] == 0).all()

    p = pair_by_ot(source, target)
    assert isinstance(p, Pairing) and np.isfinite(p.plan).all()
    np.testing.assert_allclose(float(p.plan.sum()), 1.0, atol=1e-5)
    assert float(p.marginal_error) < 1e-2 / N

    # A finite gradient of the plan-weighted cost, through the z-score and the (unrolled)
    # Sinkhorn iterations, at the default ε and below (ott's implicit differentiation raises
    # "non-finite output" here at ε = 0.01; pair_by_ot unrolls instead).
    for eps in (0.01, 0.001):
        grads = jax.grad(_weighted_cost, argnums=(0, 1))(source, target, eps)
        assert all(np.isfinite(g).all() for g in grads), eps
        assert float(jnp.abs(grads[0]).max()) > 0  # the other columns do get a gradient

    def naive_zscore(x):
        return (x - x.mean(0)) / x.std(0)

    naive_grad = jax.grad(
        lambda s: jnp.sum((naive_zscore(s)[:, None, :] - safe_zscore(target)[None, :, :]) ** 2)
    )(exact)
    assert not np.isfinite(naive_grad).all()


def test_small_epsilon_is_finite_and_argmax_pairs():
    source, target = _sets(constant="both")
    p = pair_by_ot(source, target, epsilon=0.001)
    plan = np.asarray(p.plan)
    assert np.isfinite(plan).all()
    assert float(p.marginal_error) < 1e-2 / N  # under 1 % of one cell's mass
    assert p.target.dtype == jnp.int32
    np.testing.assert_array_equal(p.target, plan.argmax(1))
    assert int(p.n_iterations) > 0

    # Identical sets: each point is paired with itself, the plan nearly diagonal.
    same = pair_by_ot(source, source, epsilon=0.001)
    np.testing.assert_array_equal(same.target, np.arange(N))
    assert float(jnp.trace(same.plan)) > 0.999


def test_pair_by_ot_rejects_bad_inputs():
    source, target = _sets()
    with pytest.raises(ValueError, match="source set is empty"):
        pair_by_ot(source[:0], target)
    with pytest.raises(ValueError, match="target set is empty"):
        pair_by_ot(source, target[:0])
    with pytest.raises(ValueError, match="different latent sizes: 4 and 3"):
        pair_by_ot(source, target[:, :3])
    with pytest.raises(ValueError, match="cost must be one of"):
        pair_by_ot(source, target, cost="cosine")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        pair_by_ot(source, target, epsilon=0.0)
    with pytest.raises(ValueError, match=r"\[n_cells, n_latent\]"):
        pair_by_ot(source[0], target)


def test_pair_time_points():
    # Three time points of N cells each (one compilation shared with the tests above), the
    # rows shuffled so that global indexing matters.
    rng = np.random.default_rng(5)
    latent = np.concatenate([rng.normal(size=(N, D)) + 2.0 * k for k in range(3)])
    latent[:, 1] = CONSTANT
    time = np.repeat(np.arange(3), N)
    order = rng.permutation(len(time))
    latent, time = latent[order].astype(np.float32), time[order]

    src, tgt, interval = pair_time_points(latent, time, 3)
    assert src.dtype == tgt.dtype == interval.dtype == np.int32
    assert len(src) == len(tgt) == len(interval) == 2 * N
    # Every cell of times 0 and 1 is a source exactly once; none of time 2.
    np.testing.assert_array_equal(np.sort(src), np.sort(np.flatnonzero(time < 2)))
    np.testing.assert_array_equal(time[src], interval)
    np.testing.assert_array_equal(time[tgt], interval + 1)
    # The same pairs as pair_by_ot on each interval.
    for k in range(2):
        a, b = np.flatnonzero(time == k), np.flatnonzero(time == k + 1)
        expected = b[np.asarray(pair_by_ot(latent[a], latent[b]).target)]
        np.testing.assert_array_equal(tgt[interval == k], expected)

    with pytest.raises(ValueError, match="time point 1 has no cells"):
        pair_time_points(latent, np.where(time == 1, 2, time), 3)
    with pytest.raises(ValueError, match="time point 3 has no cells"):
        pair_time_points(latent, time, 4)
    with pytest.raises(ValueError, match=r"integers in \[0, 2\)"):
        pair_time_points(latent, time, 2)
