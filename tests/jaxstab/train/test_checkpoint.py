"""Orbax checkpoints of ``fit``: resume equals the uninterrupted run bit for bit; best/latest."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
from flax import nnx

import jaxstab
from jaxstab.train import fit
from jaxstab.train.checkpoint import CheckpointStore

# One optimizer object for the module: fit reuses its compiled step across calls.
TX = jaxstab.stability_guard(optax.adamw(1e-2, weight_decay=1e-3), clip=0.5)


def _features(batch):
    return {"x_col0_max": batch["x"][:, 0].max()}


def _run(toy, data, directory, *, epochs, resume=False, eval_data=None):
    model = toy.Regressor(nnx.Rngs(0, dropout=1), stateful=True)
    tx = TX
    return fit(
        model,
        tx,
        toy.mse_loss,
        data,
        batch_size=8,
        epochs=epochs,
        key=jax.random.key(11),
        steps_per_call=None,  # one compiled chunk; chunking is covered in test_loop
        checkpoint_dir=directory,
        resume=resume,
        record=True,
        eval_data=eval_data,
        batch_stats_fn=_features,
    )


def _leaves(result):
    return jax.tree.leaves((nnx.state(result.model), result.opt_state))


def test_resume_reproduces_uninterrupted_run_bit_for_bit(toy, data, tmp_path):
    full = _run(toy, data, str(tmp_path / "full"), epochs=4)
    first = _run(toy, data, str(tmp_path / "split"), epochs=2)
    resumed = _run(toy, data, str(tmp_path / "split"), epochs=4, resume=True)
    assert first.steps == 10 and resumed.steps == full.steps == 20
    full_leaves, resumed_leaves = _leaves(full), _leaves(resumed)
    assert len(full_leaves) == len(resumed_leaves)
    for a, b in zip(full_leaves, resumed_leaves, strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert full.history.keys() == resumed.history.keys()
    for k in full.history:
        np.testing.assert_array_equal(full.history[k], resumed.history[k], err_msg=k)
    np.testing.assert_array_equal(
        full.epoch_history["train_loss"], resumed.epoch_history["train_loss"]
    )
    # The state differs from a run that did not resume (sanity: the comparison has teeth).
    fresh = _run(toy, data, str(tmp_path / "fresh"), epochs=2)
    assert not np.array_equal(np.asarray(_leaves(fresh)[0]), np.asarray(full_leaves[0]))


def test_resume_of_finished_run_trains_no_more(toy, data, tmp_path):
    done = _run(toy, data, str(tmp_path), epochs=2)
    again = _run(toy, data, str(tmp_path), epochs=2, resume=True)
    assert again.steps == done.steps
    for a, b in zip(_leaves(done)[:4], _leaves(again)[:4], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_without_checkpoint_starts_fresh(toy, data, tmp_path):
    a = _run(toy, data, str(tmp_path / "a"), epochs=1, resume=True)
    b = _run(toy, data, None, epochs=1)
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])


def test_best_checkpoint_is_the_lowest_eval_loss(toy, data, tmp_path):
    eval_data = toy.make_data(n=16, seed=3)
    res = _run(toy, data, str(tmp_path), epochs=4, eval_data=eval_data)
    losses = res.epoch_history["eval_loss"]
    store = CheckpointStore(str(tmp_path))
    best_epoch = int(np.argmin(losses))
    assert store.latest_step("best") == (best_epoch + 1) * res.steps_per_epoch
    assert store.latest_step("latest") == res.steps
    assert res.best_metric == losses.min()
    # Only one step directory per kind is kept.
    assert [d for d in os.listdir(tmp_path / "latest") if d.isdigit()] == [str(res.steps)]
    store.close()


def test_half_written_checkpoint_does_not_hide_the_last_good_one(toy, data, tmp_path):
    first = _run(toy, data, str(tmp_path), epochs=1)
    # A save that died before orbax's final rename leaves only a temporary directory.
    tmp = tmp_path / "latest" / "99.orbax-checkpoint-tmp-1234567"
    tmp.mkdir()
    (tmp / "junk").write_bytes(b"\0" * 10)
    store = CheckpointStore(str(tmp_path))
    assert store.latest_step("latest") == first.steps
    store.close()
    resumed = _run(toy, data, str(tmp_path), epochs=2, resume=True)
    full = _run(toy, data, str(tmp_path / "full"), epochs=2)
    np.testing.assert_array_equal(resumed.history["loss"], full.history["loss"])


def test_record_keeps_read_stats_every_step(toy, data):
    res = _run(toy, data, None, epochs=2)
    expected = {
        "grad/global_norm",
        "grad/norm/l1",
        "grad/nan/l2",
        "grad/norm/bn",
        "skip/skipped",
        "clip/clipped",
        "input/x_col0_max",
        "loss",
        "mae",
    }
    assert expected <= set(res.history)
    assert all(len(v) == res.steps == 10 for v in res.history.values())
    # The recorded norm is the norm of the raw gradient at each step, checked on step 0.
    model = toy.Regressor(nnx.Rngs(0, dropout=1), stateful=True)
    model.train()
    g = nnx.grad(lambda m: toy.mse_loss(m, _first_batch(data), _first_key())[0])(model)
    np.testing.assert_allclose(res.history["grad/global_norm"][0], optax.tree.norm(g), rtol=1e-5)


def _first_key():
    return jax.random.fold_in(jax.random.split(jax.random.key(11), 3)[1], 0)


def _first_batch(data):
    perm_key = jax.random.split(jax.random.key(11), 3)[0]
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(perm_key, 0), 37))
    return {k: v[perm[:8]] for k, v in data.items()}
