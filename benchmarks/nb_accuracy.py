"""Float32 accuracy of ``jaxstab.numerics.nb_log_prob`` against scipy, per range of means.

For each decade range of means, ``n`` means are drawn log-uniform in the range, ``theta``
log-uniform in 1e-2 … 1e4, and one NB-distributed count per pair (capped at 1e5). The jitted
float32 ``nb_log_prob`` and the seed's lgamma formula (:func:`benchmarks.bench_numerics.
seed_nb_log_prob`, also float32) are compared with ``scipy.stats.nbinom.logpmf`` in float64
at the float32-rounded inputs: largest and median relative error per range.

The numerics suite (``python -m benchmarks.run --suite numerics``) runs it and puts the table
into ``numerics-<platform>.md``; the README quotes it.

Example:
  >>> rows = measure(n=2_000, ranges=((1.0, 10.0),))
  >>> row = rows[0]
  >>> row["safe_max"] < 2e-5 < row["naive_max"]
  True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

import jaxstab.numerics as N

RANGES: tuple[tuple[float, float], ...] = (
    (1e-3, 1.0),
    (1.0, 10.0),
    (10.0, 100.0),
    (100.0, 1e3),
    (1e3, 1e4),
    (1e4, 1e5),
)
THETA_RANGE = (1e-2, 1e4)
MAX_COUNT = 100_000
N_PER_RANGE = 200_000


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.float32)


def _relative_error(got: jax.Array, ref: np.ndarray) -> np.ndarray:
    got = np.asarray(got, np.float64)
    ok = np.isfinite(ref) & (ref != 0)
    err = np.abs(got[ok] - ref[ok]) / np.abs(ref[ok])
    return np.where(np.isfinite(err), err, np.inf)


def measure(
    n: int = N_PER_RANGE, ranges: Sequence[tuple[float, float]] = RANGES, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per mean range: ``lo``, ``hi``, ``n``, and ``safe_max``/``safe_median``/
    ``naive_max``/``naive_median`` relative errors against scipy."""
    from benchmarks.bench_numerics import seed_nb_log_prob

    rng = np.random.default_rng(seed)
    safe = jax.jit(N.nb_log_prob)
    naive = jax.jit(seed_nb_log_prob)
    rows = []
    for lo, hi in ranges:
        mu = _log_uniform(rng, lo, hi, n)
        th = _log_uniform(rng, *THETA_RANGE, n)
        x64 = rng.negative_binomial(th.astype(np.float64), th / (th + mu.astype(np.float64)))
        x = np.minimum(x64, MAX_COUNT).astype(np.float32)
        mu64, th64 = mu.astype(np.float64), th.astype(np.float64)
        ref = scipy.stats.nbinom.logpmf(x.astype(np.float64), th64, th64 / (th64 + mu64))
        args = (jnp.asarray(x), jnp.asarray(mu), jnp.asarray(th))
        e_safe = _relative_error(safe(*args), ref)
        e_naive = _relative_error(naive(*args), ref)
        rows.append(
            {
                "lo": lo,
                "hi": hi,
                "n": n,
                "safe_max": float(e_safe.max()),
                "safe_median": float(np.median(e_safe)),
                "naive_max": float(e_naive.max()),
                "naive_median": float(np.median(e_naive)),
            }
        )
    return rows


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table, one column per range of means."""

    def label(r: dict[str, Any]) -> str:
        return f"{r['lo']:g} – {r['hi']:g}"

    lines = [
        "| mean | " + " | ".join(label(r) for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for key, name in (
        ("safe_max", "`nb_log_prob` largest relative error"),
        ("safe_median", "`nb_log_prob` median relative error"),
        ("naive_max", "lgamma formula (seed 002) largest"),
        ("naive_median", "lgamma formula (seed 002) median"),
    ):
        lines.append(f"| {name} | " + " | ".join(f"{r[key]:.1e}" for r in rows) + " |")
    return "\n".join(lines) + "\n"
