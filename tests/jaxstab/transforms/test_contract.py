"""Rules shared by every transform: optax chaining, fixed state, jit/scan/cond safety."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab

PROTECTING = {
    "zero_nonfinite",
    "skip_bad_steps",
    "dynamic_loss_scale",
    "stability_guard",
    "guard_autoclip_noskip",
}
UNPROTECTED = {
    "log_norms",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "zclip",
    "autoclip",
}

IDS = sorted(PROTECTING | UNPROTECTED)


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("opt", [optax.adam(1e-3), optax.sgd(0.1)], ids=["adam", "sgd"])
def test_chains_with_optax_and_keeps_state_layout(
    name, opt, params, make_grads, transform_cases, nan_grads, same_layout
):
    tx = optax.chain(transform_cases[name](), opt)
    step = jax.jit(tx.update)
    state0 = tx.init(params)
    state = state0
    for g in (make_grads(1), nan_grads, make_grads(2, scale=50.0)):
        updates, state = step(g, state, params)
        same_layout(updates, params)
        same_layout(state, state0)
    if name in PROTECTING:
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert step._cache_size() == 1
    new_params = optax.apply_updates(params, updates)
    same_layout(new_params, params)


@pytest.mark.parametrize("name", IDS)
def test_init_on_abstract_inputs(name, params, transform_cases, same_layout):
    tx = transform_cases[name]()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    same_layout(shapes, jax.eval_shape(tx.init, params))
    same_layout(tx.init(params), shapes)


def _primitive_names(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitive_names(inner)
    return names


def _host_primitives(names: set[str]) -> set[str]:
    return {n for n in names if "callback" in n or n == "debug_print"}


def test_jaxpr_walker_finds_callbacks_in_sub_jaxprs():
    def f(x):
        def host(v):
            return jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct((), x.dtype), v)

        y = jax.lax.cond(x > 0, host, lambda v: v, x)
        jax.lax.cond(x > 0, lambda: jax.debug.print("{}", x), lambda: None)
        return y

    names = _primitive_names(jax.make_jaxpr(f)(1.0).jaxpr)
    assert _host_primitives(names) == {"pure_callback", "debug_print"}


@pytest.mark.parametrize("name", IDS)
def test_no_callbacks_in_jitted_step(name, params, make_grads, transform_cases):
    tx = transform_cases[name]()

    def step(state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, jaxstab.read_stats(state)

    names = _primitive_names(jax.make_jaxpr(step)(tx.init(params), make_grads()).jaxpr)
    assert not _host_primitives(names), names


def test_guarded_adam_100_step_scan_compiles_once(params, make_grads):
    tx = jaxstab.stability_guard(optax.adam(1e-3), adaptive="zclip", spike_z=4.0, history=8)
    traces = {"body": 0}
    rng = np.random.default_rng(0)
    gs = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(100, *p.shape)), p.dtype), params)
    gs["encoder"]["bias"] = gs["encoder"]["bias"].at[37, 0].set(jnp.nan)

    def body(carry, g):
        traces["body"] += 1
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), jaxstab.read_stats(s)["skip/skipped"]

    run = jax.jit(lambda p, s, g: jax.lax.scan(body, (p, s), g))
    state = tx.init(params)
    for _ in range(3):
        (p_out, state), skipped = run(params, state, gs)
    assert traces["body"] == 1 and run._cache_size() == 1
    assert int(np.sum(skipped)) >= 1 and bool(skipped[37])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p_out))


def test_stability_guard_validation():
    with pytest.raises(ValueError, match="adaptive"):
        jaxstab.stability_guard(optax.sgd(0.1), adaptive="other")
    with pytest.raises(ValueError, match="spike_z"):
        jaxstab.stability_guard(optax.sgd(0.1), skip=False, spike_z=3.0)
