"""skip_bad_steps: selection (not multiplication), inner state kept, spikes, halt."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab


def _bits_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_nonfinite_step_keeps_adam_state_bit_identical(params, make_grads):
    tx = jaxstab.skip_bad_steps(optax.adam(1e-3))
    step = jax.jit(tx.update)
    state = tx.init(params)
    _, state = step(make_grads(1), state, params)
    bad = make_grads(2)
    bad["head"]["kernel"] = bad["head"]["kernel"].at[0, 0].set(jnp.nan)
    out, new_state = step(bad, state, params)
    _bits_equal(new_state.inner_state, state.inner_state)
    for leaf in jax.tree.leaves(out):
        assert np.all(np.asarray(leaf) == 0) and np.all(np.isfinite(leaf))
    s = jaxstab.read_stats(new_state)
    assert bool(s["skip/skipped"]) and int(s["skip/total"]) == 1
    assert int(s["skip/consecutive"]) == 1
    # The next good step equals adam's update from the pre-NaN state.
    good = make_grads(3)
    out2, after = step(good, new_state, params)
    ref = optax.adam(1e-3)
    _, ref_state = ref.update(make_grads(1), ref.init(params), params)
    expected, _ = ref.update(good, ref_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out2, expected)
    assert int(jaxstab.read_stats(after)["skip/consecutive"]) == 0


def _noisy_sgd() -> optax.GradientTransformation:
    """SGD plus noise drawn from a typed PRNG key kept in the state (split every step)."""

    def init(params):
        return {"key": jax.random.key(0), "count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        key, sub = jax.random.split(state["key"])
        leaves, treedef = jax.tree.flatten(updates)
        noise = [
            jax.random.normal(k, x.shape)
            for k, x in zip(jax.random.split(sub, len(leaves)), leaves, strict=True)
        ]
        out = jax.tree.unflatten(
            treedef, [-0.1 * (g + 1e-3 * n) for g, n in zip(leaves, noise, strict=True)]
        )
        return out, {"key": key, "count": state["count"] + 1}

    return optax.GradientTransformation(init, update)


def test_typed_prng_key_in_the_inner_state_is_kept_or_advanced(params, make_grads):
    tx = jaxstab.skip_bad_steps(_noisy_sgd())
    step = jax.jit(tx.update)
    state = tx.init(params)
    _, good = step(make_grads(1), state, params)
    assert not np.array_equal(
        jax.random.key_data(good.inner_state["key"]), jax.random.key_data(state.inner_state["key"])
    )
    bad = make_grads(2)
    bad["head"]["kernel"] = bad["head"]["kernel"].at[0, 0].set(jnp.inf)
    _, skipped = step(bad, good, params)
    assert jax.dtypes.issubdtype(skipped.inner_state["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(skipped.inner_state["key"]),
        jax.random.key_data(good.inner_state["key"]),
    )
    assert int(skipped.inner_state["count"]) == 1 and bool(skipped.skipped)


def test_inf_in_inner_output_never_escapes(params, make_grads):
    # An Inf gradient makes adam's output NaN (inf/inf); the emitted update is still zero.
    tx = jaxstab.skip_bad_steps(optax.adam(1e-3))
    g = make_grads()
    g["encoder"]["bias"] = g["encoder"]["bias"].at[0].set(jnp.inf)
    out, _ = tx.update(g, tx.init(params), params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


def test_halt_after_max_consecutive_vs_apply_if_finite(params, make_grads):
    nan_grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), make_grads())
    ours = jaxstab.skip_bad_steps(optax.sgd(0.1), max_consecutive=3)
    theirs = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    halts = []
    for _ in range(5):
        u_ours, s_ours = ours.update(nan_grads, s_ours, params)
        u_theirs, s_theirs = theirs.update(nan_grads, s_theirs, params)
        halts.append(bool(jaxstab.read_stats(s_ours)["skip/halt"]))
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u_ours))
    assert halts == [False, False, True, True, True]
    # optax applies the poisoned update once its error budget is spent.
    assert any(np.any(np.isnan(x)) for x in jax.tree.leaves(u_theirs))
    # Halt is sticky: a good gradient is skipped too.
    u, s_ours = ours.update(make_grads(), s_ours, params)
    assert bool(s_ours.skipped) and all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_spike_z_against_numpy_window():
    window, spike_z = 8, 3.0
    tx = jaxstab.skip_bad_steps(optax.sgd(1.0), spike_z=spike_z, window=window, min_window=4)
    state = tx.init({"w": jnp.zeros(1)})
    step = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    norms = list(np.abs(1.0 + 0.1 * rng.normal(size=14)).astype(np.float32))
    norms[9] = np.float32(5.0)
    norms[12] = np.float32(np.nan)
    good: list[float] = []
    n_skips = 0
    for g in norms:
        out, state = step({"w": jnp.array([g])}, state)
        hist = np.asarray(good[-window:], np.float64)
        expect_skip = not np.isfinite(g)
        if len(hist) >= 4 and np.isfinite(g):
            z = (g - hist.mean()) / hist.std()
            np.testing.assert_allclose(float(state.z), z, rtol=1e-4)
            expect_skip = z > spike_z
        assert bool(state.skipped) == expect_skip
        n_skips += bool(expect_skip)
        if not expect_skip:
            good.append(float(g))
            np.testing.assert_allclose(float(out["w"][0]), -g, rtol=1e-6)
    assert int(state.total) == n_skips >= 2


def test_extra_args_reach_inner(params, make_grads):
    inner = optax.contrib.reduce_on_plateau() if hasattr(optax, "contrib") else None
    tx = jaxstab.skip_bad_steps(optax.chain(optax.sgd(0.1), inner))
    state = tx.init(params)
    out, state = tx.update(make_grads(), state, params, value=jnp.asarray(1.0))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"window": 1}, "window"),
        ({"max_consecutive": 0}, "max_consecutive"),
        ({"spike_z": -1.0}, "spike_z"),
        ({"min_window": 1}, "min_window"),
    ],
)
def test_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        jaxstab.skip_bad_steps(optax.sgd(0.1), **kwargs)
