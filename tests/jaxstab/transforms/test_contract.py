"""Rules shared by every transform: optax chaining, fixed state, jit/scan/cond safety."""

from __future__ import annotations

import chex
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


# --- No silent zero: integer gradients are promoted, never truncated. --------------------


@pytest.mark.parametrize("name", IDS)
def test_integer_gradients_are_promoted_not_truncated(name, params, transform_cases):
    tx = transform_cases[name]()
    rng = np.random.default_rng(3)
    ints = jax.tree.map(lambda p: jnp.asarray(rng.integers(-9, 10, p.shape), jnp.int32), params)
    floats = jax.tree.map(lambda g: g.astype(jnp.float32), ints)
    state = tx.init(params)
    out_i, state_i = tx.update(ints, state, params)
    out_f, state_f = tx.update(floats, state, params)
    for a, b in zip(jax.tree.leaves(out_i), jax.tree.leaves(out_f), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    assert any(np.any(np.abs(a) > 0) for a in jax.tree.leaves(out_i))
    chex.assert_trees_all_equal(jaxstab.read_stats(state_i), jaxstab.read_stats(state_f))


def test_integer_gradient_clip_matches_its_stats():
    tx = jaxstab.clip_by_global_norm(1.0)
    out, state = tx.update({"w": jnp.array([3, 4], jnp.int32)}, tx.init({"w": jnp.ones(2)}))
    scale = float(jaxstab.read_stats(state)["clip/scale"])
    np.testing.assert_allclose(out["w"], scale * np.array([3.0, 4.0]), rtol=1e-6)


@pytest.mark.parametrize("name", IDS)
def test_complex_gradient_is_refused_naming_the_leaf(name, params, transform_cases):
    tx = transform_cases[name]()
    grads = jax.tree.map(lambda p: p.astype(jnp.complex64), params)
    with pytest.raises(TypeError, match="'encoder/bias'"):
        tx.update(grads, tx.init(params), params)


# --- optax.inject_hyperparams: numeric hyperparameters may be traced. ---------------------

# name -> (factory, numeric kwargs, other kwargs, static_args)
INJECTED = {
    "clip_by_global_norm": (jaxstab.clip_by_global_norm, {"max_norm": 1.0}, {}, ()),
    "clip_by_group_norm": (jaxstab.clip_by_group_norm, {"max_norm": 1.0}, {}, ("group_depth",)),
    "zclip": (jaxstab.zclip, {"warmup_steps": 2, "alpha": 0.9, "z_threshold": 2.0}, {}, ()),
    "autoclip": (jaxstab.autoclip, {"percentile": 50.0}, {"history": 16}, ("history",)),
    "skip_bad_steps": (
        jaxstab.skip_bad_steps,
        {"spike_z": 3.0, "max_consecutive": 5, "min_window": 2},
        {"inner": optax.adam(1e-3), "window": 8},
        ("window",),
    ),
    "dynamic_loss_scale": (
        jaxstab.dynamic_loss_scale,
        {"initial": 8.0, "period": 2, "factor": 2.0, "min_scale": 1.0},
        {"inner": optax.adam(1e-3)},
        (),
    ),
    "stability_guard": (
        jaxstab.stability_guard,
        {"clip": 1.0, "spike_z": 4.0},
        {"inner": optax.adam(1e-3), "history": 4},
        ("group_depth", "history"),
    ),
}


def test_every_transform_with_numeric_hyperparameters_is_injected():
    # log_norms and zero_nonfinite take only layout arguments (group_depth, history).
    assert set(INJECTED) == (UNPROTECTED | PROTECTING) - {
        "log_norms",
        "zero_nonfinite",
        "guard_autoclip_noskip",
    }


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_inject_hyperparams_under_jit_matches_plain(name, params, make_grads, nan_grads):
    factory, numeric, other, static = INJECTED[name]
    injected = optax.inject_hyperparams(factory, static_args=static)(**numeric, **other)
    plain = factory(**numeric, **other)
    step = jax.jit(injected.update)
    s_inj, s_plain = injected.init(params), plain.init(params)
    for g in (make_grads(1), make_grads(2, scale=30.0), nan_grads, make_grads(3, scale=5.0)):
        u_inj, s_inj = step(g, s_inj, params)
        u_plain, s_plain = plain.update(g, s_plain, params)
        chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-6, atol=1e-7)
    stats_inj, stats_plain = jaxstab.read_stats(s_inj), jaxstab.read_stats(s_plain)
    assert set(stats_inj) == set(stats_plain)
    chex.assert_trees_all_close(stats_inj, stats_plain, rtol=1e-6, atol=1e-7)
    assert step._cache_size() == 1


def test_scheduled_clip_level_takes_effect_under_jit():
    tx = optax.inject_hyperparams(jaxstab.clip_by_global_norm)(
        max_norm=optax.linear_schedule(1.0, 2.0, transition_steps=1)
    )
    step = jax.jit(tx.update)
    g = {"w": jnp.array([30.0, 40.0])}
    state = tx.init(g)
    out1, state = step(g, state)
    out2, state = step(g, state)
    np.testing.assert_allclose(np.linalg.norm(out1["w"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out2["w"]), 2.0, rtol=1e-6)


def test_traced_layout_argument_names_static_args(params):
    tx = optax.inject_hyperparams(jaxstab.log_norms)(history=4)
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"static_args=\('group_depth',\)"):
        jax.jit(tx.update)(params, state, params)


@pytest.mark.parametrize(
    ("factory", "kwargs", "field"),
    [
        (jaxstab.clip_by_global_norm, {"max_norm": jnp.float32(-1.0)}, "max_norm"),
        (jaxstab.clip_by_global_norm, {"max_norm": float("nan")}, "max_norm"),
        (jaxstab.zclip, {"alpha": jnp.array(1.5)}, "alpha"),
        (jaxstab.zclip, {"warmup_steps": 2.5}, "warmup_steps"),
        (jaxstab.autoclip, {"percentile": 0.0}, "percentile"),
        (jaxstab.autoclip, {"history": 0}, "history"),
        (jaxstab.dynamic_loss_scale, {"factor": jnp.array(1.0)}, "factor"),
        (jaxstab.dynamic_loss_scale, {"period": True}, "period"),
        (jaxstab.clip_by_group_norm, {"max_norm": jnp.ones(2)}, "max_norm"),
    ],
)
def test_concrete_bad_values_are_refused(factory, kwargs, field):
    with pytest.raises(ValueError, match=field):
        factory(**kwargs)


# --- jax_enable_x64: state dtypes stay those of init. --------------------------------------


@pytest.mark.parametrize("name", IDS)
def test_state_dtypes_fixed_under_x64_in_a_scan(name, params, transform_cases, same_layout):
    with jax.enable_x64(True):
        tx = transform_cases[name]()
        state0 = tx.init(params)
        rng = np.random.default_rng(0)
        gs = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(4, *p.shape)), p.dtype), params)

        def body(state, g):
            updates, state = tx.update(g, state, params)
            return state, updates

        state, updates = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(state0, gs)
        same_layout(state, state0)
        same_layout(jax.tree.map(lambda u: u[0], updates), params)
