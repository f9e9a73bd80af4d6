"""Step-time overhead of ``jaxstab.stability_guard`` over a bare optax optimizer.

Measures a full training step (forward, backward, optimizer update, parameter update) of
a plain-pytree MLP with ``optax.adam(1e-3)`` against the same step with
``jaxstab.stability_guard(optax.adam(1e-3))`` (log_norms + skip_bad_steps +
clip_by_global_norm), both per-step ``jit`` and fused into a ``lax.scan``. The two
variants are timed alternately (to share any background load) and the median is kept.

The benchmark has no model part (``--model`` does not apply). Run ``python -m
benchmarks.run --suite overhead`` (or ``python -m benchmarks.bench_overhead``); it writes
``benchmarks/results/overhead-<platform>.json`` and ``.md``.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxstab
from benchmarks.meta import describe, environment

# name -> (hidden widths, batch, per-step repeats, steps per scan, scan repeats)
CONFIGS: dict[str, tuple[list[int], int, int, int, int]] = {
    "mlp-1M": ([256, 512, 512, 512, 512, 256], 64, 30, 20, 5),
    "mlp-50M": ([1024, 3584, 3584, 3584, 3584, 1024], 64, 5, 3, 3),
}


def init_mlp(widths: list[int], seed: int = 0) -> dict[str, dict[str, jax.Array]]:
    """Plain-pytree MLP parameters: ``layer_i/{kernel,bias}``."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        params[f"layer_{i}"] = {
            "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
            "bias": jnp.zeros((b,), jnp.float32),
        }
    return params


def mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"]
        if i < n - 1:
            h = jax.nn.gelu(h)
    return jnp.mean((h - y) ** 2)


def make_step(tx: optax.GradientTransformation):
    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def make_scan(tx: optax.GradientTransformation):
    step = make_step(tx)

    def run(params, state, xs, ys):
        def body(carry, batch):
            p, s = carry
            return step(p, s, *batch), None

        (params, state), _ = jax.lax.scan(body, (params, state), (xs, ys))
        return params, state

    return run


def _block(tree: Any) -> None:
    jax.block_until_ready(tree)


def _time_variants(name: str, cfg: tuple) -> dict[str, Any]:
    widths, batch, step_reps, scan_len, scan_reps = cfg
    params = init_mlp(widths)
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(batch, widths[0])), jnp.float32)
    y = jnp.asarray(rng.normal(size=(batch, widths[-1])), jnp.float32)
    xs = jnp.broadcast_to(x, (scan_len, *x.shape))
    ys = jnp.broadcast_to(y, (scan_len, *y.shape))
    variants = {
        "adam": optax.adam(1e-3),
        "guard(adam)": jaxstab.stability_guard(optax.adam(1e-3)),
        # Breakdown: the same chain with zero_nonfinite instead of skip_bad_steps.
        "guard(adam, skip=False)": jaxstab.stability_guard(optax.adam(1e-3), skip=False),
        # Context: optax's own nearest chain (clip, then skip non-finite steps), no statistics.
        "optax clip + apply_if_finite": optax.chain(
            optax.clip_by_global_norm(1.0), optax.apply_if_finite(optax.adam(1e-3), 10)
        ),
    }
    fns, states = {}, {}
    for label, tx in variants.items():
        step = jax.jit(make_step(tx), donate_argnums=(0, 1))
        scan = jax.jit(make_scan(tx), donate_argnums=(0, 1))
        p = jax.tree.map(jnp.copy, params)
        s = jax.tree.map(lambda a: jnp.array(a, copy=True), tx.init(p))  # distinct buffers
        p, s = step(p, s, x, y)  # compile + warm up
        p, s = scan(p, s, xs, ys)
        _block((p, s))
        fns[label] = (step, scan)
        states[label] = (p, s)
    times: dict[str, dict[str, list[float]]] = {v: {"step": [], "scan": []} for v in variants}
    # mode -> (index into fns, repeats, inputs, steps per call)
    modes = {"step": (0, step_reps, (x, y), 1), "scan": (1, scan_reps, (xs, ys), scan_len)}
    for mode, (i, reps, inputs, n_steps) in modes.items():
        for _ in range(reps):
            for label in variants:
                p, s = states[label]
                t0 = time.perf_counter()
                p, s = fns[label][i](p, s, *inputs)
                _block((p, s))
                times[label][mode].append((time.perf_counter() - t0) / n_steps)
                states[label] = (p, s)
    out: dict[str, Any] = {"params": n_params, "batch": batch, "scan_length": scan_len}
    for mode in ("step", "scan"):
        noskip = statistics.median(times["guard(adam, skip=False)"][mode])
        optax_chain = statistics.median(times["optax clip + apply_if_finite"][mode])
        bare = statistics.median(times["adam"][mode])
        guarded = statistics.median(times["guard(adam)"][mode])
        bare_min, guarded_min = min(times["adam"][mode]), min(times["guard(adam)"][mode])
        out[mode] = {
            "adam_ms": 1e3 * bare,
            "guard_ms": 1e3 * guarded,
            "overhead_pct": 100.0 * (guarded / bare - 1.0),
            "adam_min_ms": 1e3 * bare_min,
            "guard_min_ms": 1e3 * guarded_min,
            "overhead_min_pct": 100.0 * (guarded_min / bare_min - 1.0),
            "noskip_ms": 1e3 * noskip,
            "noskip_overhead_pct": 100.0 * (noskip / bare - 1.0),
            "optax_chain_ms": 1e3 * optax_chain,
            "optax_chain_overhead_pct": 100.0 * (optax_chain / bare - 1.0),
            "repeats": len(times["adam"][mode]),
        }
    print(
        f"{name}: {n_params:,} params | per-step jit {out['step']['adam_ms']:.2f} -> "
        f"{out['step']['guard_ms']:.2f} ms ({out['step']['overhead_pct']:+.1f}%) | "
        f"scan {out['scan']['adam_ms']:.2f} -> {out['scan']['guard_ms']:.2f} ms/step "
        f"({out['scan']['overhead_pct']:+.1f}%)",
        flush=True,
    )
    return out


def run(configs: dict[str, tuple] | None = None, write: bool = True) -> dict[str, Any]:
    """Runs the benchmark; returns (and by default writes) the results."""
    result: dict[str, Any] = {
        "benchmark": "stability_guard(optax.adam(1e-3)) vs optax.adam(1e-3), full MLP step",
        "environment": environment(),
        "statistic": "median (and min) ms per step; the two variants timed alternately",
        "load_average": os.getloadavg(),
        "models": {},
    }
    for name, cfg in (configs or CONFIGS).items():
        result["models"][name] = _time_variants(name, cfg)
    if write:
        from benchmarks.run import write_results

        write_results("overhead", result, to_markdown(result))
    return result


def to_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# stability_guard overhead ({env['platform']})",
        "",
        f"{describe(env)}. {result['statistic']}. Load average during the run: "
        f"{', '.join(f'{x:.1f}' for x in result.get('load_average', []))} "
        "(a shared machine: medians are noisy).",
        "",
        "| model | params | mode | adam (ms/step) | guard(adam) (ms/step) | overhead "
        "(median) | overhead (min) | guard(adam, skip=False) overhead (median) | optax "
        "clip + apply_if_finite overhead (median) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["models"].items():
        for mode, label in (("step", "per-step jit"), ("scan", f"scan x{m['scan_length']}")):
            r = m[mode]
            lines.append(
                f"| {name} | {m['params']:,} | {label} | {r['adam_ms']:.2f} | "
                f"{r['guard_ms']:.2f} | {r['overhead_pct']:+.1f}% | "
                f"{r['overhead_min_pct']:+.1f}% | {r['noskip_overhead_pct']:+.1f}% | "
                f"{r['optax_chain_overhead_pct']:+.1f}% |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()
