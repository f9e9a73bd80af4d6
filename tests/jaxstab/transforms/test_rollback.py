"""rollback: snapshot, triggers (norm excursion, non-finite parameters, loss), skipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab
from jaxstab.transforms import rollback as R

TARGET = {"a": jnp.arange(4.0, dtype=jnp.float32), "b": jnp.full((2, 3), -1.0, jnp.float32)}
P0 = jax.tree.map(jnp.zeros_like, TARGET)


def loss_fn(params, noise):
    # A quadratic with a noisy target: a healthy run has a noisy, decaying loss.
    d = jax.tree.map(lambda p, t, n: p - t - n, params, TARGET, noise)
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(d))


def noise_at(step, scale=0.05):
    key = jax.random.fold_in(jax.random.key(0), step)
    ka, kb = jax.random.split(key)
    return {
        "a": scale * jax.random.normal(ka, (4,)),
        "b": scale * jax.random.normal(kb, (2, 3)),
    }


value_and_grad = jax.jit(jax.value_and_grad(loss_fn))


def run(tx, steps, damage=None, loss_bump=None, value=False, apply=optax.apply_updates):
    """A loop of jitted steps; ``damage(t, params)`` may change the parameters after step ``t``.

    Every entry of the history is (params, state) before the step, its updates and the
    state after it."""
    params, state = P0, tx.init(P0)
    hist = []
    update = jax.jit(tx.update)
    for t in range(steps):
        loss, g = value_and_grad(params, noise_at(t))
        if loss_bump is not None:
            loss = loss + loss_bump(t)
        hist.append((params, state))
        kw = {"value": loss} if value else {}
        updates, state = update(g, state, params, **kw)
        hist[-1] = (*hist[-1], updates, state)
        params = (
            apply(params, updates)
            if apply is optax.apply_updates
            else apply(params, updates, state)
        )
        if damage is not None:
            params = damage(t, params)
    return params, state, hist


def tree_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def stats_of(state):
    return {k: np.asarray(v).item() for k, v in jaxstab.read_stats(state).items()}


def burst(at, size=30.0, steps=1):
    def damage(t, params):
        if at <= t < at + steps:
            return jax.tree.map(lambda p: p + size, params)
        return params

    return damage


KW = {"every": 4, "warmup": 6, "patience": 3, "z": 4.0}


def test_burst_rolls_back_to_the_snapshot_and_skips():
    tx = jaxstab.rollback(optax.adam(0.05), skip_after=2, **KW)
    _, _, hist = run(tx, 24, damage=burst(12))
    rolled = [t for t, h in enumerate(hist) if bool(h[3].rolled_back)]
    # Damage after step 12: steps 13, 14, 15 are excursion steps; 15 rolls back.
    assert rolled == [15]
    params, state, updates, after = hist[15]
    snap = int(after.snapshot_step)
    assert 0 < snap <= 12 and snap == int(state.snapshot_step)
    snap_params, snap_state = hist[snap][0], hist[snap][1]
    # The update is snapshot - params; inner's state is the snapshot's, bit for bit.
    expect = jax.tree.map(lambda s, p: s - p, snap_params, params)
    assert tree_equal(updates, expect)
    assert tree_equal(after.inner_state, snap_state.inner_state)
    # read_stats sees inner's statistics once (the snapshot's copy is not a state).
    assert not any(k.startswith(("inner", "snapshot")) for k in jaxstab.read_stats(after))
    # Two skipped steps: inner untouched, parameters end exactly at the snapshot.
    for t in (16, 17):
        _, s_t, _, a_t = hist[t]
        assert tree_equal(a_t.inner_state, s_t.inner_state)
        assert not bool(a_t.rolled_back)
    assert tree_equal(hist[18][0], snap_params)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(hist[17][2]))
    s = [stats_of(h[3]) for h in hist]
    assert [x[R.SKIPPING] for x in s[15:19]] == [2, 1, 0, 0]
    assert s[-1][R.COUNT] == 1 and s[-1][R.LAST_STEP] == 15
    assert s[14][R.CONSECUTIVE] == 2 and s[15][R.CONSECUTIVE] == 0
    assert not s[16][R.ARMED] and s[18][R.ARMED]
    # Training goes on from the snapshot and no further rollback fires.
    assert hist[-1][0]["a"].tolist() != snap_params["a"].tolist()


def test_healthy_run_never_rolls_back_and_takes_snapshots():
    tx = jaxstab.rollback(optax.adam(0.05), **KW)
    _, state, hist = run(tx, 48, value=True)
    s = stats_of(state)
    assert s[R.COUNT] == 0 and s[R.LAST_STEP] == -1
    losses = [float(loss_fn(h[0], noise_at(t))) for t, h in enumerate(hist)]
    assert losses[-1] < 0.1 * losses[0]  # the run decays ...
    assert np.any(np.diff(losses[10:]) > 0)  # ... with noise
    snaps = {int(h[3].snapshot_step) for h in hist}
    assert len(snaps) >= 8  # a snapshot every 4 good steps
    assert max(abs(float(h[3].z)) for h in hist) < KW["z"]


def test_nonfinite_params_roll_back_even_in_warmup():
    tx = jaxstab.rollback(optax.sgd(0.1), **KW)

    def damage(t, params):
        return {**params, "a": params["a"].at[0].set(jnp.nan)} if t == 2 else params

    params, state, hist = run(tx, 6, damage=damage, apply=jaxstab.restore_or_apply)
    assert bool(hist[3][3].rolled_back) and stats_of(state)[R.COUNT] == 1
    assert int(hist[3][3].snapshot_step) == 0  # the init snapshot
    assert tree_equal(hist[4][0], P0)  # restored bit for bit, then training goes on
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    # No update brings a NaN back: with optax.apply_updates it stays NaN (and rolls back
    # again every step).
    _, state_plain, _ = run(tx, 6, damage=damage)
    assert stats_of(state_plain)[R.COUNT] == 3
    # nonfinite_params=False leaves it to the excursion triggers (none during warm-up).
    tx_off = jaxstab.rollback(optax.sgd(0.1), nonfinite_params=False, **KW)
    _, state_off, _ = run(tx_off, 6, damage=damage)
    assert stats_of(state_off)[R.COUNT] == 0


def test_loss_excursion_via_value():
    def bump(t):
        return 100.0 if 14 <= t < 20 else 0.0

    tx = jaxstab.rollback(optax.adam(0.05), **KW)
    _, _, hist = run(tx, 22, loss_bump=bump, value=True)
    rolled = [t for t, h in enumerate(hist) if bool(h[3].rolled_back)]
    assert rolled[0] == 16  # 14, 15, 16 in a row
    assert float(hist[14][3].loss_z) > KW["z"]
    # The gradient alone (no value=) does not see the loss excursion.
    _, state_nv, _ = run(tx, 22, loss_bump=bump, value=False)
    assert stats_of(state_nv)[R.COUNT] == 0
    # loss_z=inf ignores the loss.
    tx_inf = jaxstab.rollback(optax.adam(0.05), loss_z=float("inf"), **KW)
    _, state_inf, _ = run(tx_inf, 22, loss_bump=bump, value=True)
    assert stats_of(state_inf)[R.COUNT] == 0


def test_one_step_spike_does_not_roll_back():
    tx = jaxstab.rollback(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05)), **KW)
    params, state = P0, tx.init(P0)
    update = jax.jit(tx.update)
    for t in range(20):
        g = value_and_grad(params, noise_at(t))[1]
        if t == 12:
            g = jax.tree.map(lambda x: x * 1e4, g)
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    assert stats_of(state)[R.COUNT] == 0


def test_scan_matches_the_loop_of_jitted_steps():
    tx = jaxstab.rollback(optax.adam(0.05), skip_after=1, **KW)
    p_loop, s_loop, _ = run(tx, 20, damage=burst(10))

    def body(carry, t):
        params, state = carry
        g = jax.grad(loss_fn)(params, noise_at(t))
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        params = jax.tree.map(lambda p: jnp.where(t == 10, p + 30.0, p), params)
        return (params, state), state.rolled_back

    @jax.jit
    def scanned(params):
        return jax.lax.scan(body, (params, tx.init(params)), jnp.arange(20))

    (p_scan, s_scan), rolled = scanned(P0)
    assert int(jnp.sum(rolled)) == 1 and stats_of(s_scan)[R.COUNT] == 1
    assert stats_of(s_scan)[R.LAST_STEP] == stats_of(s_loop)[R.LAST_STEP] == 13
    for a, b in zip(jax.tree.leaves(p_scan), jax.tree.leaves(p_loop), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_persistent_spike_under_skip_ends_in_a_rollback():
    inner = jaxstab.skip_bad_steps(optax.adam(0.05), spike_z=4.0, min_window=4)
    tx = jaxstab.rollback(inner, **KW)
    _, state, hist = run(tx, 26, damage=burst(12))
    skips = [bool(h[3].inner_state.skipped) for h in hist]
    rolled = [t for t, h in enumerate(hist) if bool(h[3].rolled_back)]
    # The skip drops the damaged steps (the parameters stay damaged), until the rollback.
    assert skips[13] and skips[14] and rolled == [15]
    snap = int(hist[15][3].snapshot_step)
    # The skip's own statistics return with the snapshot.
    restored = hist[15][3].inner_state
    assert tree_equal(restored, hist[snap][1].inner_state)
    assert int(restored.consecutive) == 0 and int(restored.total) == 0
    # Then the run is healthy again: nothing more is skipped or rolled back.
    assert not any(skips[16:]) and stats_of(state)[R.COUNT] == 1
    assert stats_of(state)["skip/total"] == 0


@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_loss_scale_overflow_is_no_excursion(placement):
    patience = KW["patience"]
    if placement == "inside":
        tx = jaxstab.dynamic_loss_scale(
            initial=2.0**12, inner=jaxstab.rollback(optax.adam(0.05), **KW)
        )
    else:
        tx = jaxstab.rollback(
            jaxstab.dynamic_loss_scale(initial=2.0**12, period=3, inner=optax.adam(0.05)), **KW
        )
    params, state = P0, tx.init(P0)
    update = jax.jit(tx.update)
    overflow = range(10, 10 + 2 * patience)
    for t in range(30):
        scale = jaxstab.loss_scale(state)
        g = jax.tree.map(lambda x, s=scale: s * x, value_and_grad(params, noise_at(t))[1])
        if t in overflow:
            g = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), g)
        updates, state = update(g, state, params)
        if t in overflow:
            assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
        params = optax.apply_updates(params, updates)
    s = stats_of(state)
    assert s[R.COUNT] == 0
    # The scale shrank on every overflow (and, outside, grew back every 3 steps).
    assert float(jaxstab.loss_scale(state)) != 2.0**12


def test_one_decision_for_all_replicas():
    # Two replicas (vmap with an axis name): only replica 0's shard turns NaN, both roll back.
    tx = jaxstab.rollback(optax.sgd(0.1), axis_name="i", **KW)
    params = {"w": jnp.ones((2, 3))}
    state = jax.vmap(tx.init)(params)
    step = jax.vmap(tx.update, axis_name="i")
    updates, state = step({"w": jnp.ones((2, 3))}, state, params)
    params = optax.apply_updates(params, updates)
    params = {"w": params["w"].at[0, 0].set(jnp.nan)}
    updates, state = step({"w": jnp.ones((2, 3))}, state, params)
    assert state.rolled_back.tolist() == [True, True]
    new = jax.vmap(jaxstab.restore_or_apply)(params, updates, state)
    assert np.array_equal(np.asarray(new["w"]), np.ones((2, 3)))


def test_needs_params_and_checks_arguments():
    tx = jaxstab.rollback(optax.sgd(0.1))
    state = tx.init(P0)
    with pytest.raises(ValueError, match="parameters"):
        tx.update(P0, state)
    with pytest.raises(ValueError, match="patience"):
        jaxstab.rollback(optax.sgd(0.1), patience=0)
    with pytest.raises(ValueError, match="alpha"):
        jaxstab.rollback(optax.sgd(0.1), alpha=1.0)
