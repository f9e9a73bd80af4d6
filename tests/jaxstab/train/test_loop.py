"""``jaxstab.train.fit`` against a plain per-step reference loop written from the contract."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxstab.train import fit


def reference_fit(model, tx, loss_fn, data, *, batch_size, epochs, key, max_steps=None):
    """The documented schedule, one eager-dispatched jitted step at a time, no lax.scan."""
    model = nnx.clone(model)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    perm_key, step_key, _ = jax.random.split(key, 3)

    @jax.jit
    def step(params, opt_state, rest, batch, k):
        def f(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            loss, _ = loss_fn(m, batch, k)
            return loss, nnx.split(m, nnx.Param, ...)[2]

        (loss, new_rest), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_rest, loss

    n = len(next(iter(data.values())))
    t, losses = 0, []
    for e in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(perm_key, e), n))
        for i in range(math.ceil(n / batch_size)):
            if max_steps is not None and t == max_steps:
                return params, rest, np.array(losses)
            idx = perm[np.arange(i * batch_size, (i + 1) * batch_size) % n]
            batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
            params, opt_state, rest, loss = step(
                params, opt_state, rest, batch, jax.random.fold_in(step_key, t)
            )
            losses.append(float(loss))
            t += 1
    return params, rest, np.array(losses)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("steps_per_call", [None, 1, 3])
def test_matches_reference_loop(toy, data, steps_per_call):
    model = toy.Regressor(nnx.Rngs(0, dropout=1), stateful=True)
    tx = optax.adamw(1e-2, weight_decay=1e-3)
    key = jax.random.key(7)
    res = fit(
        model,
        tx,
        toy.mse_loss,
        data,
        batch_size=8,
        epochs=3,
        key=key,
        steps_per_call=steps_per_call,
    )
    ref_params, ref_rest, ref_losses = reference_fit(
        model, tx, toy.mse_loss, data, batch_size=8, epochs=3, key=key
    )
    assert res.status == "ok"
    assert res.steps == 3 * math.ceil(37 / 8) == len(res.history["loss"])
    np.testing.assert_allclose(res.history["loss"], ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(_params(res.model), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # BatchNorm statistics are carried forward from the model call.
    ref_bn = jax.tree.leaves(ref_rest["bn"])
    for a, b in zip(jax.tree.leaves(nnx.state(res.model.bn, nnx.BatchStat)), ref_bn, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(res.history) >= {"loss", "mae", "noise", "grad/global_norm"}


def test_input_model_untouched_and_mode_kept(toy, data):
    model = toy.Regressor(nnx.Rngs(0, dropout=1), stateful=True)
    model.eval()
    before = [np.array(x) for x in _params(model)]
    res = fit(
        model, optax.sgd(0.1), toy.mse_loss, data, batch_size=8, epochs=1, key=jax.random.key(0)
    )
    after = [np.array(x) for x in _params(model)]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(
        np.array_equal(a, np.asarray(b)) for a, b in zip(before, _params(res.model), strict=True)
    )
    assert res.model.drop.deterministic and res.model.bn.use_running_average


def test_eval_uses_eval_mode(toy, data):
    model = toy.Regressor(nnx.Rngs(0, dropout=1), stateful=True)
    eval_data = toy.make_data(n=16, seed=1)
    res = fit(
        model,
        optax.adam(1e-2),
        toy.mse_loss,
        data,
        batch_size=8,
        epochs=2,
        key=jax.random.key(0),
        eval_data=eval_data,
    )
    trained = nnx.clone(res.model)
    trained.eval()
    pred = trained(jnp.asarray(eval_data["x"]))
    mse = float(jnp.mean((pred - eval_data["y"]) ** 2))
    # eval_loss = mean over the 2 eval batches of (mse + 1e-3·noise); compare up to the noise.
    assert len(res.epoch_history["eval_loss"]) == 2
    assert abs(res.epoch_history["eval_loss"][-1] - mse) < 5e-3


def _diverging():
    model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 1)).astype(np.float32) + 2.0
    return model, {"x": x, "y": 3.0 * x}


def _quadratic(model, batch, key):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


@pytest.mark.parametrize("steps_per_call", [None, 1, 5])
def test_explosion_stops_exactly(toy, steps_per_call):
    model, data = _diverging()
    tx = optax.sgd(0.5)  # lr far above 2/L: the norm grows geometrically
    key = jax.random.key(3)
    res = fit(
        model,
        tx,
        _quadratic,
        data,
        batch_size=4,
        epochs=20,
        key=key,
        steps_per_call=steps_per_call,
        explosion_norm=100.0,
    )
    norms = res.history["grad/global_norm"]
    assert res.status == "explosion"
    assert norms[-1] > 100.0 and np.all(norms[:-1] <= 100.0)
    assert res.steps == len(norms) - 1 < 20 * 8
    # The offending update is not applied: the model is the one after `steps` good steps.
    ref_params, _, _ = reference_fit(
        model, tx, _quadratic, data, batch_size=4, epochs=20, key=key, max_steps=res.steps
    )
    for a, b in zip(_params(res.model), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_nonfinite_loss_stops_at_first_bad_batch(toy, data):
    data = {k: v.copy() for k, v in data.items()}
    bad_row = 11
    data["x"][bad_row, 1] = np.nan
    key = jax.random.key(5)
    res = fit(
        toy.Regressor(nnx.Rngs(0)),
        optax.adam(1e-2),
        toy.mse_loss,
        data,
        batch_size=8,
        epochs=3,
        key=key,
        steps_per_call=2,
        explosion_norm=None,
    )
    perm = np.asarray(
        jax.random.permutation(jax.random.fold_in(jax.random.split(key, 3)[0], 0), 37)
    )
    first_bad = int(np.nonzero(perm == bad_row)[0][0]) // 8
    assert res.status == "nonfinite"
    assert res.steps == first_bad == len(res.history["loss"]) - 1
    assert not np.isfinite(res.history["loss"][-1])
    assert all(np.isfinite(np.asarray(p)).all() for p in _params(res.model))


def test_no_halt_runs_to_the_end(toy, data):
    data = {k: v.copy() for k, v in data.items()}
    data["x"][0] = np.inf
    res = fit(
        toy.Regressor(nnx.Rngs(0)),
        optax.sgd(1e-2),
        toy.mse_loss,
        data,
        batch_size=8,
        epochs=1,
        key=jax.random.key(0),
        explosion_norm=None,
        halt_on_nonfinite=False,
    )
    assert res.status == "ok" and res.steps == 5


def test_raw_uint32_key_is_the_same_run(toy, data):
    a = fit(
        toy.Regressor(nnx.Rngs(0)),
        optax.sgd(0.1),
        toy.mse_loss,
        data,
        batch_size=8,
        epochs=1,
        key=jax.random.PRNGKey(4),
    )
    b = fit(
        toy.Regressor(nnx.Rngs(0)),
        optax.sgd(0.1),
        toy.mse_loss,
        data,
        batch_size=8,
        epochs=1,
        key=jax.random.key(4),
    )
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])


def test_batch_larger_than_data_wraps(toy, data):
    small = {k: v[:5] for k, v in data.items()}
    res = fit(
        toy.Regressor(nnx.Rngs(0)),
        optax.sgd(0.1),
        toy.mse_loss,
        small,
        batch_size=8,
        epochs=2,
        key=jax.random.key(0),
    )
    assert res.steps == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": -1}, "epochs"),
        ({"steps_per_call": 0}, "steps_per_call"),
        ({"resume": True}, "checkpoint_dir"),
        ({"data": {"x": np.zeros((4, 3)), "y": np.zeros((5, 1))}}, "'y'"),
        ({"data": {}}, "non-empty"),
    ],
)
def test_bad_arguments(toy, data, kwargs, match):
    args = {"batch_size": 4, "epochs": 1, "data": data, **kwargs}
    d = args.pop("data")
    with pytest.raises((ValueError, TypeError), match=match):
        fit(
            toy.Regressor(nnx.Rngs(0)),
            optax.sgd(0.1),
            toy.mse_loss,
            d,
            key=jax.random.key(0),
            **args,
        )


class _NormedRegressor(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.bn(self.lin(x)))


def test_a_step_the_guard_skips_keeps_the_batch_statistics(data):
    import jaxstab

    data = {k: v.copy() for k, v in data.items()}
    data["x"][3, 0] = np.nan

    def loss_fn(m, batch, key):
        return jnp.mean((m(batch["x"]) - batch["y"]) ** 2), {}

    def run(tx):
        res = fit(_NormedRegressor(nnx.Rngs(0)), tx, loss_fn, data, batch_size=8, epochs=2,
                  key=jax.random.key(0), explosion_norm=None, halt_on_nonfinite=False)  # fmt: skip
        stats = jax.tree.leaves(nnx.state(res.model, nnx.BatchStat))
        return res, all(np.isfinite(np.asarray(s)).all() for s in stats)

    guarded, finite = run(jaxstab.stability_guard(optax.adam(1e-2)))
    assert guarded.status == "ok" and finite
    assert all(np.isfinite(np.asarray(p)).all() for p in _params(guarded.model))
    _, plain_finite = run(optax.adam(1e-2))  # no guard: the NaN batch reaches the statistics
    assert not plain_finite
