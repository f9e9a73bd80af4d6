"""Orbax checkpoints of ``fit``: resume equals the uninterrupted run bit for bit; best/latest."""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxstab
from jaxstab.train import fit
from jaxstab.train.checkpoint import (
    KEEP_LATEST,
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    CheckpointWarning,
)

# One optimizer object for the module: fit reuses its compiled step across calls.
TX = jaxstab.stability_guard(optax.adamw(1e-2, weight_decay=1e-3), clip=0.5)


def _features(batch):
    return {"x_col0_max": batch["x"][:, 0].max()}


def _run(toy, data, directory, *, epochs, resume=False, eval_data=None, batch_size=8):
    model = toy.Regressor(nnx.Rngs(0, dropout=1), stateful=True)
    tx = TX
    return fit(
        model,
        tx,
        toy.mse_loss,
        data,
        batch_size=batch_size,
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


def test_resume_without_checkpoint_is_an_error(toy, data, tmp_path):
    with pytest.raises(CheckpointError, match="no 'latest' checkpoint under"):
        _run(toy, data, str(tmp_path / "a"), epochs=1, resume=True)


def test_fresh_run_into_existing_checkpoints_is_refused_before_any_step(toy, data, tmp_path):
    _run(toy, data, str(tmp_path), epochs=1)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _run(toy, data, str(tmp_path), epochs=1)
    assert _tree(tmp_path) == before


def _tree(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _largest_file(step_dir):
    """The largest array-data file of the checkpoint's state."""
    data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    files = [os.path.join(data, n) for n in os.listdir(data)]
    return max(files, key=os.path.getsize)


def _corrupt(path):
    """Flips a few bytes in the middle of ``path``; the size stays the same."""
    size = os.path.getsize(path)
    n = min(16, size // 4)
    with open(path, "r+b") as f:
        f.seek((size - n) // 2)
        chunk = f.read(n)
        f.seek((size - n) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert os.path.getsize(path) == size


def _assert_same_run(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for k in a.history:
        np.testing.assert_array_equal(a.history[k], b.history[k], err_msg=k)


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "no_manifest"])
def test_damaged_latest_falls_back_to_the_previous_good_one(toy, data, tmp_path, damage):
    _run(toy, data, str(tmp_path), epochs=2)
    store = CheckpointStore(str(tmp_path))
    assert store.steps("latest") == [5, 10]
    victim = store.step_dir("latest", 10)
    store.close()
    if damage == "flip_bytes":
        _corrupt(_largest_file(victim))
    elif damage == "truncate":
        path = _largest_file(victim)
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # killed between orbax's commit and the manifest
        os.remove(os.path.join(victim, MANIFEST))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _run(toy, data, str(tmp_path), epochs=3, resume=True)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(msgs) == 1 and "latest/10" in msgs[0] and "latest/5" in msgs[0], msgs
    full = _run(toy, data, str(tmp_path / "full"), epochs=3)
    assert resumed.steps == full.steps == 15
    _assert_same_run(resumed, full)


def test_every_checkpoint_corrupt_is_an_error_naming_the_folder(toy, data, tmp_path):
    _run(toy, data, str(tmp_path), epochs=2)
    store = CheckpointStore(str(tmp_path))
    for step in store.steps("latest"):
        _corrupt(_largest_file(store.step_dir("latest", step)))
    store.close()
    with pytest.raises(CheckpointError, match=r"no verified 'latest' checkpoint under .*latest"):
        _run(toy, data, str(tmp_path), epochs=3, resume=True)


def test_resume_with_another_batch_size_is_an_error_naming_it(toy, data, tmp_path):
    _run(toy, data, str(tmp_path), epochs=1)
    with pytest.raises(CheckpointError, match="batch_size=8, this run has batch_size=4"):
        _run(toy, data, str(tmp_path), epochs=2, resume=True, batch_size=4)
    other = toy.make_data(n=40)
    with pytest.raises(CheckpointError, match="n_examples=37, this run has n_examples=40"):
        _run(toy, other, str(tmp_path), epochs=2, resume=True)


def test_best_checkpoint_is_the_lowest_eval_loss(toy, data, tmp_path):
    eval_data = toy.make_data(n=16, seed=3)
    res = _run(toy, data, str(tmp_path), epochs=4, eval_data=eval_data)
    losses = res.epoch_history["eval_loss"]
    store = CheckpointStore(str(tmp_path))
    best_epoch = int(np.argmin(losses))
    assert store.latest_step("best") == (best_epoch + 1) * res.steps_per_epoch
    assert store.latest_step("latest") == res.steps
    assert res.best_metric == losses.min()
    # The last KEEP_LATEST latest steps are kept, one best.
    kept = sorted(int(d) for d in os.listdir(tmp_path / "latest") if d.isdigit())
    assert kept == [res.steps_per_epoch * e for e in range(5 - KEEP_LATEST, 5)]
    assert [d for d in os.listdir(tmp_path / "best") if d.isdigit()] == [
        str((best_epoch + 1) * res.steps_per_epoch)
    ]
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
