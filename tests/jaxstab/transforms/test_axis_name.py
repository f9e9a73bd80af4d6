"""axis_name: a gradient sharded over a mapped axis gives the unsharded statistics and
the same decision on every replica (simulated on one device with ``jax.vmap``, whose
named axis supports the same ``psum``/``pmax`` collectives as ``shard_map``/``pmap``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab

N = 4  # replicas


def _grads(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "enc": jnp.asarray(scale * rng.normal(size=(8, 3)), jnp.float32),
        "head": jnp.asarray(scale * rng.normal(size=(4,)), jnp.float32),
    }


def _shard(tree):
    return jax.tree.map(lambda x: x.reshape(N, x.shape[0] // N, *x.shape[1:]), tree)


def _unshard(tree):
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def _run(make_tx, grads_seq):
    """Runs the sharded (vmapped) and the unsharded transform side by side."""
    sharded_tx, plain_tx = make_tx("i"), make_tx(None)
    shard0 = jax.tree.map(lambda x: x[0], _shard(grads_seq[0]))
    s_state = jax.tree.map(lambda x: jnp.stack([x] * N), sharded_tx.init(shard0))
    p_state = plain_tx.init(grads_seq[0])
    step = jax.jit(jax.vmap(sharded_tx.update, axis_name="i"))
    for g in grads_seq:
        s_out, s_state = step(_shard(g), s_state)
        p_out, p_state = plain_tx.update(g, p_state)
    return _unshard(s_out), s_state, p_out, p_state


def _assert_replicas_equal_plain(s_stats, p_stats):
    assert set(s_stats) == set(p_stats)
    for name, value in s_stats.items():
        value = np.asarray(value)
        for r in range(N):  # every replica holds the same value
            np.testing.assert_array_equal(value[r], value[0], err_msg=name)
        np.testing.assert_allclose(value[0], np.asarray(p_stats[name]), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda ax: jaxstab.log_norms(axis_name=ax),
        lambda ax: jaxstab.clip_by_global_norm(1.0, axis_name=ax),
        lambda ax: jaxstab.clip_by_group_norm(1.0, axis_name=ax),
        lambda ax: jaxstab.zclip(warmup_steps=2, axis_name=ax),
        lambda ax: jaxstab.autoclip(history=4, axis_name=ax),
        lambda ax: jaxstab.zero_nonfinite(axis_name=ax),
    ],
    ids=["log_norms", "clip_global", "clip_group", "zclip", "autoclip", "zero_nonfinite"],
)
def test_sharded_statistics_and_updates_match_unsharded(make_tx):
    seq = [_grads(0), _grads(1, 3.0), _grads(2), _grads(3, 10.0)]
    seq[2]["enc"] = seq[2]["enc"].at[0, 0].set(jnp.nan)  # lives on replica 0 only
    s_out, s_state, p_out, p_state = _run(make_tx, seq)
    _assert_replicas_equal_plain(jaxstab.read_stats(s_state), jaxstab.read_stats(p_state))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), s_out, p_out)


def test_nan_on_one_replica_skips_on_all():
    seq = [_grads(0), _grads(1)]
    seq[1]["head"] = seq[1]["head"].at[3].set(jnp.inf)  # replica 3 only
    s_out, s_state, _, _ = _run(
        lambda ax: jaxstab.stability_guard(optax.sgd(0.1), axis_name=ax), seq
    )
    skipped = np.asarray(jaxstab.read_stats(s_state)["skip/skipped"])
    assert skipped.tolist() == [True] * N
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(s_out))


def test_loss_scale_overflow_on_one_replica_halves_everywhere():
    seq = [_grads(0)]
    seq[0]["enc"] = seq[0]["enc"].at[7, 2].set(jnp.inf)  # replica 3 only
    _, s_state, _, p_state = _run(
        lambda ax: jaxstab.dynamic_loss_scale(initial=8.0, axis_name=ax), seq
    )
    assert np.asarray(s_state.scale).tolist() == [4.0] * N
    assert float(p_state.scale) == 4.0
