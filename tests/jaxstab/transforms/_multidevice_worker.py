"""Multi-device checks of the stability transforms, run in a subprocess on 8 CPU devices.

Started by ``test_multidevice.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Every check runs independently
and records ``{"ok": bool, "detail": str}``; the result is printed as one JSON line
after ``RESULT_MARKER``. Reference for every sharded run: the same transform with
``axis_name=None`` on the full, unsharded arrays on one device.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxstab

RESULT_MARKER = "JAXSTAB_MULTIDEVICE_RESULT "
N_DEV = 8
AXIS = "d"
RTOL = 2e-5
ATOL = 1e-6

# Each factory takes the axis name (or None) and returns a fresh transformation.
TRANSFORMS: dict[str, Callable[[str | None], optax.GradientTransformation]] = {
    "clip_by_global_norm": lambda ax: jaxstab.clip_by_global_norm(1.0, axis_name=ax),
    "clip_by_group_norm": lambda ax: jaxstab.clip_by_group_norm(0.5, axis_name=ax),
    "log_norms": lambda ax: jaxstab.log_norms(1, history=4, axis_name=ax),
    "zero_nonfinite": lambda ax: jaxstab.zero_nonfinite(axis_name=ax),
    "zclip": lambda ax: jaxstab.zclip(warmup_steps=2, axis_name=ax),
    "autoclip": lambda ax: jaxstab.autoclip(history=8, axis_name=ax),
    "skip_bad_steps": lambda ax: jaxstab.skip_bad_steps(
        optax.sgd(0.1), spike_z=3.0, window=8, min_window=2, axis_name=ax
    ),
    "dynamic_loss_scale": lambda ax: jaxstab.dynamic_loss_scale(
        initial=4.0, period=2, axis_name=ax
    ),
    "stability_guard": lambda ax: jaxstab.stability_guard(
        optax.adam(1e-2), clip=1.0, adaptive="zclip", spike_z=4.0, history=4, axis_name=ax
    ),
}

# The sharded runs use a few chains that together contain every transform above (each
# compile costs seconds on CPU, so one chain per group keeps the module fast).
SUITES: dict[str, Callable[[str | None], optax.GradientTransformation]] = {
    # clip_by_global_norm alone: the headline equality with the single-device result.
    "clip_by_global_norm": TRANSFORMS["clip_by_global_norm"],
    # log_norms -> skip_bad_steps(zclip -> clip_by_global_norm -> adam)
    # (log_norms keeps a 4-step history here)
    "guard_zclip_skip": TRANSFORMS["stability_guard"],
    # spike skipping with a short window (the guard's default window never fills here)
    "skip_bad_steps": TRANSFORMS["skip_bad_steps"],
    # the transforms outside stability_guard's default chain, without an optimizer
    "zero_autoclip_group_scale": lambda ax: optax.chain(
        TRANSFORMS["zero_nonfinite"](ax),
        TRANSFORMS["autoclip"](ax),
        TRANSFORMS["clip_by_group_norm"](ax),
        TRANSFORMS["dynamic_loss_scale"](ax),
    ),
}


def _params() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "encoder": {"w": jnp.asarray(rng.normal(size=64), jnp.float32)},
        "head": {"w": jnp.asarray(rng.normal(size=32), jnp.float32)},
    }


def _grad_steps(n: int = 5) -> dict[str, Any]:
    """``n`` gradients of varying size (one spike), stacked on a leading step axis."""
    rng = np.random.default_rng(1)
    scales = np.array([0.3, 0.5, 0.4, 20.0, 0.35][:n], np.float32)[:, None]
    # NaN-free; the spike at step 3 trips the z-score rules and the clippers.
    return {
        "encoder": {"w": jnp.asarray(scales * rng.normal(size=(n, 64)), jnp.float32)},
        "head": {"w": jnp.asarray(scales * rng.normal(size=(n, 32)), jnp.float32)},
    }


def _run_steps(tx: optax.GradientTransformation, params: Any, grads: Any) -> tuple:
    """Applies ``tx`` to each stacked gradient with ``lax.scan``; (updates, stats) per step."""

    def step(carry: tuple, g: Any) -> tuple:
        p, state = carry
        u, state = tx.update(g, state, p)
        return (optax.apply_updates(p, u), state), (u, jaxstab.read_stats(state))

    _, (ups, stats) = jax.lax.scan(step, (params, tx.init(params)), grads)
    return ups, stats


def _close(a: Any, b: Any, what: str) -> None:
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    if ta != tb:
        raise AssertionError(f"{what}: tree structures differ: {ta} vs {tb}")
    for (path, x), (_, y) in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
            ok = np.array_equal(x, y)
        else:
            ok = np.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True)
        if not ok or x.shape != y.shape:
            raise AssertionError(f"{what}{jax.tree_util.keystr(path)}: {x} != {y}")


def _mesh_1d(axis_type: AxisType = AxisType.Auto) -> jax.sharding.Mesh:
    return jax.make_mesh((N_DEV,), (AXIS,), axis_types=(axis_type,))


# ----------------------------------------------------------------------------- checks


_REFERENCE: dict[str, tuple] = {}


def _reference(name: str) -> tuple:
    """Single-device run without axis name (computed once per transform)."""
    if name not in _REFERENCE:
        run = jax.jit(lambda p, gs: _run_steps(SUITES[name](None), p, gs))
        single = jax.devices()[0]
        _REFERENCE[name] = jax.device_get(
            run(jax.device_put(_params(), single), jax.device_put(_grad_steps(), single))
        )
    return _REFERENCE[name]


def check_shard_map_matches_single_device(name: str) -> str:
    """shard_map over gradients sharded along AXIS equals the single-device run."""
    params, grads = _params(), _grad_steps()
    ref_ups, ref_stats = _reference(name)

    def body(p: Any, gs: Any) -> tuple:
        return _run_steps(SUITES[name](AXIS), p, gs)

    spec_p = jax.tree.map(lambda _: P(AXIS), params)
    spec_gs = jax.tree.map(lambda _: P(None, AXIS), grads)
    sharded = jax.jit(
        jax.shard_map(body, mesh=_mesh_1d(), in_specs=(spec_p, spec_gs), out_specs=(spec_gs, P()))
    )
    ups, stats = sharded(params, grads)
    _close(ups, ref_ups, f"{name} updates")
    _close(stats, ref_stats, f"{name} stats")
    return f"{len(ref_stats)} stats equal over {ref_ups['head']['w'].shape[0]} steps"


def _skip_flags(name: str, axis_name: str | None) -> tuple[np.ndarray, Any, Any]:
    """Per-shard skip flag, updates and read_stats for a gradient with one bad shard."""
    params = _params()
    grads = jax.tree.map(lambda g: g[0], _grad_steps(1))
    per_shard = 64 // N_DEV
    bad = np.asarray(grads["encoder"]["w"]).copy()
    bad[3 * per_shard + 1] = np.nan  # only shard 3 sees the NaN
    grads = {"encoder": {"w": jnp.asarray(bad)}, "head": grads["head"]}
    mesh = _mesh_1d()

    def body(p: Any, g: Any) -> tuple:
        tx = TRANSFORMS[name](axis_name)
        u, state = tx.update(g, tx.init(p), p)
        flag = jaxstab.read_stats(state)["skip/skipped"]
        new_p = optax.apply_updates(p, u)
        return jnp.reshape(flag, (1,)), u, new_p

    spec_p = jax.tree.map(lambda _: P(AXIS), params)
    fn = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(spec_p, spec_p),
            out_specs=(P(AXIS), spec_p, spec_p),
            check_vma=False,
        )
    )
    flags, u, new_p = fn(params, grads)
    return np.asarray(flags), u, (params, new_p)


def check_one_bad_shard_skips_everywhere(name: str) -> str:
    flags, u, (params, new_p) = _skip_flags(name, AXIS)
    if not flags.all():
        raise AssertionError(f"{name}: skip flags per shard {flags.tolist()}, expected all True")
    for leaf in jax.tree_util.tree_leaves(u):
        if np.any(np.asarray(leaf) != 0):
            raise AssertionError(f"{name}: a skipped step produced a non-zero update")
    _close(new_p, params, f"{name} params after a skipped step")
    # Control: without the axis name only the shard holding the NaN skips, so the
    # check above is sensitive to the cross-device reduction.
    control, _, _ = _skip_flags(name, None)
    expected = [i == 3 for i in range(N_DEV)]
    if control.tolist() != expected:
        raise AssertionError(f"{name}: control flags {control.tolist()} != {expected}")
    return f"flags {flags.tolist()}; control without axis_name {control.tolist()}"


def check_jit_named_sharding_matches_single_device(name: str) -> str:
    """Plain jit on NamedSharding-sharded inputs (GSPMD) equals the single-device run."""
    sharding = NamedSharding(_mesh_1d(), P(AXIS))
    stacked = NamedSharding(_mesh_1d(), P(None, AXIS))
    run = jax.jit(lambda p, gs: _run_steps(SUITES[name](None), p, gs))
    out = run(jax.device_put(_params(), sharding), jax.device_put(_grad_steps(), stacked))
    n_devices = len(out[0]["encoder"]["w"].sharding.device_set)
    _close(out, _reference(name), f"{name} jit+NamedSharding")
    return f"equal; updates live on {n_devices} devices"


def _types(tree: Any) -> list[tuple[str, str]]:
    return [
        (jax.tree_util.keystr(p), str(jax.typeof(x)))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def check_abstract_init(name: str) -> str:
    params = _params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    concrete = TRANSFORMS[name](None).init(params)
    via_eval_shape = jax.eval_shape(TRANSFORMS[name](None).init, abstract)
    want = [(k, (tuple(np.shape(v)), str(jnp.asarray(v).dtype))) for k, v in _leaves(concrete)]
    got = [(k, (tuple(v.shape), str(v.dtype))) for k, v in _leaves(via_eval_shape)]
    if want != got:
        raise AssertionError(f"{name}: eval_shape(init) {got} != init {want}")
    # optax's own optimizers also accept ShapeDtypeStruct leaves in a direct init call.
    direct = TRANSFORMS[name](None).init(abstract)
    got_direct = [(k, (tuple(np.shape(v)), str(v.dtype))) for k, v in _leaves(direct)]
    if want != got_direct:
        raise AssertionError(f"{name}: init(ShapeDtypeStruct) {got_direct} != init {want}")
    return f"{len(got)} state leaves"


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_explicit_sharding_types(name: str) -> str:
    """Under explicit sharding the state's types/shardings survive update and jit."""
    mesh = _mesh_1d(AxisType.Explicit)
    with jax.set_mesh(mesh):
        sharding = NamedSharding(mesh, P(AXIS))
        params = jax.device_put(_params(), sharding)
        grads = jax.device_put(jax.tree.map(lambda g: g[0], _grad_steps(1)), sharding)
        tx = SUITES[name](None)
        state0 = tx.init(params)
        _, state1 = tx.update(grads, state0, params)
        state_jit_init = jax.jit(tx.init)(params)
        _, state_jit_update = jax.jit(tx.update)(grads, state0, params)
        t0, t1 = _types(state0), _types(state1)
        problems = []
        if t0 != t1:
            problems.append(f"init vs update: {_diff(t0, t1)}")
        if t0 != _types(state_jit_init):
            problems.append(f"init vs jit(init): {_diff(t0, _types(state_jit_init))}")
        if t1 != _types(state_jit_update):
            problems.append(f"update vs jit(update): {_diff(t1, _types(state_jit_update))}")
        if problems:
            raise AssertionError(f"{name}: " + "; ".join(problems))
        return f"{len(t0)} state leaves keep their types"


def _diff(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} leaves"
    return ", ".join(f"{k}: {x} -> {y}" for (k, x), (_, y) in zip(a, b, strict=True) if x != y)


def main() -> None:
    if jax.device_count() != N_DEV:
        raise SystemExit(f"expected {N_DEV} devices, got {jax.device_count()}")
    checks: dict[str, Callable[[], str]] = {}
    for name in TRANSFORMS:
        checks[f"abstract_init/{name}"] = lambda n=name: check_abstract_init(n)
    for name in SUITES:
        checks[f"shard_map/{name}"] = lambda n=name: check_shard_map_matches_single_device(n)
    for name in ("clip_by_global_norm", "guard_zclip_skip", "zero_autoclip_group_scale"):
        checks[f"jit_sharding/{name}"] = lambda n=name: (
            check_jit_named_sharding_matches_single_device(n)
        )
    for name in ("guard_zclip_skip", "zero_autoclip_group_scale"):
        checks[f"explicit_types/{name}"] = lambda n=name: check_explicit_sharding_types(n)
    for name in ("skip_bad_steps", "stability_guard"):
        checks[f"bad_shard/{name}"] = lambda n=name: check_one_bad_shard_skips_everywhere(n)
    only = set(sys.argv[1:])
    results = {}
    for key, fn in checks.items():
        if only and key not in only:
            continue
        start = time.perf_counter()
        try:
            results[key] = {"ok": True, "detail": fn()}
        except Exception as exc:
            tb = traceback.format_exc(limit=-3)
            results[key] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}\n{tb}"}
        results[key]["seconds"] = round(time.perf_counter() - start, 2)
    print(RESULT_MARKER + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
