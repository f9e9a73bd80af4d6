"""Cost of jaxstab.numerics' safe primitives against the naive formulas they replace.

For each elementwise primitive, the jitted safe and naive versions run on the same ~1M
float32 elements, value only and value + gradient of the sum. After warm-up the two variants
are timed alternately (so they share any background load) with ``block_until_ready`` and the
median is kept.

Run ``python -m benchmarks.bench_numerics``; it writes
``benchmarks/results/numerics-<platform>.json`` and ``.md``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxstab.numerics as N
from benchmarks import nb_accuracy
from benchmarks.meta import describe, environment

N_ELEMENTS = 1 << 20
REPEATS = 41  # at most; expensive cases get fewer (see TIME_PER_VARIANT_S), never below 7
TIME_PER_VARIANT_S = 3.0
SAMPLE_S = 0.02


class Case(NamedTuple):
    """One safe-vs-naive pair: functions of the same arrays, and the arrays' maker."""

    safe: Callable[..., jax.Array]
    naive: Callable[..., jax.Array]
    naive_formula: str
    make_inputs: Callable[[np.random.Generator], tuple[np.ndarray, ...]]
    argnums: tuple[int, ...] = (0,)


def _f32(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(a.astype(np.float32) for a in arrays)


def seed_nb_log_prob(x, mean, theta, eps=1e-8):
    """Seed 002's eps-and-clamp negative binomial log-pmf: the naive baseline.

    >>> abs(float(jax.grad(seed_nb_log_prob, argnums=1)(0.0, 0.0, 5.0)))  # clamped: no gradient
    0.0
    """
    mean, theta = jnp.maximum(mean, eps), jnp.maximum(theta, eps)
    return (
        jax.lax.lgamma(x + theta)
        - jax.lax.lgamma(theta)
        - jax.lax.lgamma(x + 1)
        + theta * (jnp.log(theta + eps) - jnp.log(theta + mean + eps))
        + x * (jnp.log(mean + eps) - jnp.log(theta + mean + eps))
    )


def _naive_zinb(x, mean, theta, gate, eps=1e-8):
    pi = jax.nn.sigmoid(gate)
    nb = seed_nb_log_prob(x, mean, theta, eps)
    nb0 = theta * (jnp.log(theta + eps) - jnp.log(theta + mean + eps))
    return jnp.where(
        x < eps, jnp.log(pi + (1 - pi) * jnp.exp(nb0) + eps), jnp.log(1 - pi + eps) + nb
    )


def _counts(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    mean = rng.lognormal(0.0, 1.5, N_ELEMENTS)
    theta = rng.lognormal(0.0, 1.0, N_ELEMENTS)
    x = rng.poisson(mean).astype(np.float64)
    return _f32(x, mean, theta)


CASES: dict[str, Case] = {
    "safe_log": Case(N.safe_log, jnp.log, "log(x)", lambda r: _f32(r.uniform(0, 10, N_ELEMENTS))),
    "safe_exp": Case(N.safe_exp, jnp.exp, "exp(x)", lambda r: _f32(r.normal(0, 10, N_ELEMENTS))),
    "safe_div": Case(
        N.safe_div,
        jnp.divide,
        "n / d",
        lambda r: _f32(r.normal(size=N_ELEMENTS), r.uniform(0.5, 2, N_ELEMENTS)),
        (0, 1),
    ),
    "safe_sqrt": Case(
        N.safe_sqrt, jnp.sqrt, "sqrt(x)", lambda r: _f32(r.uniform(0, 10, N_ELEMENTS))
    ),
    "safe_norm": Case(
        N.safe_norm,
        lambda x: jnp.sqrt(jnp.sum(x * x, axis=-1)),
        "sqrt(sum(x², -1)) on [N/3, 3]",
        lambda r: _f32(r.normal(size=(N_ELEMENTS // 3, 3))),
    ),
    "bounded_positive": Case(
        lambda raw: N.bounded_positive(raw, 0.1, 10.0),
        lambda raw: jnp.exp(jnp.clip(raw, -5.0, 5.0)),
        "exp(clip(raw, -5, 5)) (seed 000)",
        lambda r: _f32(r.normal(0, 5, N_ELEMENTS)),
    ),
    # The same map without the custom slope: what the sigmoid itself costs against exp.
    "bounded_positive (vs sigmoid)": Case(
        lambda raw: N.bounded_positive(raw, 0.1, 10.0),
        lambda raw: 0.1 + 9.9 * jax.nn.sigmoid(raw),
        "0.1 + 9.9 sigmoid(raw), autodiff slope",
        lambda r: _f32(r.normal(0, 5, N_ELEMENTS)),
    ),
    "soft_clip": Case(
        lambda x: N.soft_clip(x, -1.0, 1.0),
        jnp.tanh,
        "tanh(x) (tanh clip to [-1, 1])",
        lambda r: _f32(r.normal(0, 3, N_ELEMENTS)),
    ),
    "straight_through_clip": Case(
        lambda x: N.straight_through_clip(x, -1.0, 1.0),
        lambda x: x + jax.lax.stop_gradient(jnp.clip(x, -1.0, 1.0) - x),
        "x + stop_gradient(clip(x) - x)",
        lambda r: _f32(r.normal(0, 3, N_ELEMENTS)),
    ),
    "gaussian_kl": Case(
        N.gaussian_kl,
        lambda mu, lv: 0.5 * jnp.sum(mu * mu + jnp.exp(lv) - 1 - lv, axis=-1),
        "0.5 * sum(mu² + exp(v) - 1 - v) on [N/16, 16]",
        lambda r: _f32(
            r.normal(size=(N_ELEMENTS // 16, 16)), r.normal(size=(N_ELEMENTS // 16, 16))
        ),
        (0, 1),
    ),
    "nb_log_prob": Case(
        N.nb_log_prob,
        seed_nb_log_prob,
        "lgamma/log with eps and clamps (seed 002)",
        _counts,
        (1, 2),
    ),
    "zinb_log_prob": Case(
        N.zinb_log_prob,
        _naive_zinb,
        "log(pi + (1 - pi) NB(0) + eps) / log(1 - pi + eps) + NB",
        lambda r: (*_counts(r), *_f32(r.normal(size=N_ELEMENTS))),
        (1, 2, 3),
    ),
}


def _value_and_grad(fn: Callable[..., jax.Array], argnums: tuple[int, ...]):
    return jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=argnums)


def _median_ms(
    fns: dict[str, Callable[..., Any]], args: tuple[jax.Array, ...], repeats: int
) -> dict[str, float]:
    slowest = 0.0
    for fn in fns.values():  # compile and warm up
        for _ in range(2):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            slowest = max(slowest, time.perf_counter() - start)
    # A sample is ``calls`` back-to-back calls lasting at least SAMPLE_S, so that a
    # sub-millisecond call is not timed against the scheduler's jitter.
    calls = max(1, math.ceil(SAMPLE_S / max(slowest, 1e-6)))
    per_sample = calls * slowest
    repeats = max(7, min(repeats, int(TIME_PER_VARIANT_S / max(per_sample, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
            times[key].append((time.perf_counter() - start) / calls)
    medians = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    minima = {f"{k}_min": 1e3 * min(v) for k, v in times.items()}
    return medians | minima | {"repeats": repeats, "calls_per_sample": calls}


def time_case(case: Case, repeats: int = REPEATS, seed: int = 0) -> dict[str, Any]:
    """Median milliseconds of safe vs naive, value only and value + gradient (of the sum)."""
    args = tuple(jnp.asarray(a) for a in case.make_inputs(np.random.default_rng(seed)))
    out: dict[str, Any] = {
        "naive_formula": case.naive_formula,
        "shapes": [list(a.shape) for a in args],
    }
    modes = {
        "value": (case.safe, case.naive),
        "value_and_grad": (
            _value_and_grad(case.safe, case.argnums),
            _value_and_grad(case.naive, case.argnums),
        ),
    }
    for mode, (safe, naive) in modes.items():
        ms = _median_ms({"naive": jax.jit(naive), "safe": jax.jit(safe)}, args, repeats)
        out[mode] = {
            "naive_ms": ms["naive"],
            "safe_ms": ms["safe"],
            "ratio": ms["safe"] / ms["naive"],
            "naive_min_ms": ms["naive_min"],
            "safe_min_ms": ms["safe_min"],
            "ratio_of_minima": ms["safe_min"] / ms["naive_min"],
            "repeats": ms["repeats"],
        }
    return out


def run(
    names: list[str] | None = None,
    repeats: int = REPEATS,
    write: bool = True,
    accuracy_n: int = nb_accuracy.N_PER_RANGE,
) -> dict[str, Any]:
    """Runs the benchmark; returns (and by default writes) the results.

    ``accuracy_n``: NB counts per range of means for :mod:`benchmarks.nb_accuracy`
    (0: not measured)."""
    result: dict[str, Any] = {
        "benchmark": "jaxstab.numerics safe primitives vs naive formulas, jitted, float32",
        "environment": environment(),
        "n_elements": N_ELEMENTS,
        "repeats": repeats,
        "statistic": (
            "median ms per call after warm-up; safe and naive timed alternately; a sample "
            f"is >= {SAMPLE_S * 1e3:.0f} ms of back-to-back calls; 7 to {repeats} samples "
            f"(about {TIME_PER_VARIANT_S} s per variant)"
        ),
        "load_average_1min": os.getloadavg()[0],
        "cases": {},
    }
    for name in names or list(CASES):
        result["cases"][name] = time_case(CASES[name], repeats)
    if accuracy_n:
        result["nb_accuracy"] = nb_accuracy.measure(n=accuracy_n)
    if write:
        from benchmarks.run import write_results

        write_results("numerics", result, to_markdown(result))
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table."""
    env = result["environment"]
    lines = [
        f"# jaxstab.numerics: safe vs naive ({env['platform']})",
        "",
        f"{describe(env)}. {result['n_elements']:,} float32 elements per call; "
        f"{result['statistic']}. 1-minute load average at start: "
        f"{result['load_average_1min']:.1f} (shared machine).",
        "",
        "Ratios are safe/naive of the medians; in brackets, of the minima (less sensitive to "
        "other processes on a shared machine).",
        "",
        "| primitive | naive formula | value: naive ms | safe ms | ratio "
        "| value+grad: naive ms | safe ms | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, case in result["cases"].items():
        v, g = case["value"], case["value_and_grad"]
        lines.append(
            f"| `{name}` | {case['naive_formula']} | {v['naive_ms']:.2f} | {v['safe_ms']:.2f} "
            f"| {v['ratio']:.2f}x ({v['ratio_of_minima']:.2f}x) | {g['naive_ms']:.2f} "
            f"| {g['safe_ms']:.2f} | {g['ratio']:.2f}x ({g['ratio_of_minima']:.2f}x) |"
        )
    rows = result.get("nb_accuracy")
    if rows:
        lines += [
            "",
            f"## Float32 accuracy of `nb_log_prob` ({rows[0]['n']:,} NB counts per range)",
            "",
            "Against `scipy.stats.nbinom.logpmf` in float64 at the float32-rounded inputs; "
            f"θ log-uniform in {nb_accuracy.THETA_RANGE[0]:g} … "
            f"{nb_accuracy.THETA_RANGE[1]:g}, counts capped at {nb_accuracy.MAX_COUNT:,} "
            "(`benchmarks/nb_accuracy.py`).",
            "",
            nb_accuracy.to_markdown(rows).rstrip("\n"),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(to_markdown(run()))
