"""Seed 004's OT failure table: the original's POT call against ``pair_by_ot`` on the same latents.

GenoFlow's phase 2 pairs the cells of adjacent time points by the row argmax of an entropic OT
plan between their z-scored latent means. The original (PyTorch + POT) does::

    Z = (Z - Z.mean(0)) / Z.std(0).clamp(min=1e-8)    # torch float32, std with ddof = 1
    plan = ot.sinkhorn(a, b, ot.dist(Za, Zb, metric="euclidean"), 0.01)

POT's default method ``"sinkhorn"`` iterates on the kernel ``exp(-M / ε)`` (1,000 iterations,
``stopThr = 1e-9``). This script measures, on the same latents, that call and
:func:`jaxstab.models.genoflow.pairing.pair_by_ot` (ott-jax, log-domain Sinkhorn, float32,
``safe_zscore`` with ``ddof = 1``, Euclidean cost) at ε ∈ {0.1, 0.01, 0.001}, on raw and
z-scored latents, with and without a constant latent dimension. Each row is ``REPEATS`` runs;
it reports how many plans hold a NaN, the median marginal error, the median number of source
cells whose plan row is empty (mass below 1 % of a cell's ``1/n``: their argmax pairing is
meaningless, index 0 for an all-zero row), the median number of distinct paired targets, how
many POT runs warned (numerical errors / not converged), each solver's own convergence, the
median iterations and the median milliseconds of one pairing (z-score, cost, Sinkhorn; ott
after compilation). A second table repeats POT's call in float64 NumPy (not the original:
its latents are float32 tensors) to show what depends on the precision.

Latents: for repeat ``s``, ``simulate(seed=s)`` (GenoFlow's simulator, default sizes), the
cells of time points 0 and 1 (``adata.obs["time"]``), ``log1p`` of ``adata.layers["counts"]``,
the first ``N_PCS`` principal components (NumPy SVD of the centred matrix of both time points)
multiplied by one factor so that their root-mean-square over all components is 1: a VAE's
latent means under an N(0, I) prior are of order 1 per dimension, values within a few units.
Then ``N_CELLS`` cells of each time point are drawn without replacement (``default_rng(s)``).
The constant-dimension variant sets column ``CONSTANT_COLUMN`` to ``CONSTANT`` in both sets
(float32), as a collapsed VAE unit would.

The marginal error is ``max_i |Σ_j P_ij - 1/n| + max_j |Σ_i P_ij - 1/m|`` (in mass units: a
cell weighs ``1/n = 0.005``; an all-zero plan scores ``2/n = 0.01``), computed in float64 from
the returned plan, NaN for a plan with a NaN (its median is over the finite runs).

Run ``python -m benchmarks.genoflow_ot [--out DIR] [--repeats R]``; it writes
``genoflow_ot-<platform>.json`` and ``.md`` in ``DIR`` (default ``benchmarks/results``).

Example:
  >>> s = plan_stats(np.array([[0.5, 0.0], [0.0, 0.0]]))
  >>> s["marginal_error"], s["empty_rows"], s["distinct_targets"], s["nan"]
  (1.0, 1, 1, False)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.meta import describe, environment, version

EPSILONS = (0.1, 0.01, 0.001)
N_CELLS = 200
REPEATS = 10
N_PCS = 10
CONSTANT = 0.7
CONSTANT_COLUMN = N_PCS - 1
TIME_POINTS = (0, 1)
EMPTY_ROW = 0.01  # a row is empty below this fraction of a cell's mass 1/n
LIBRARIES = {
    "pot": "POT `ot.sinkhorn` (original: torch float32)",
    "ott": "ott-jax `pair_by_ot` (float32)",
    "pot64": "POT `ot.sinkhorn`, float64 NumPy",
}


def _simulate():
    try:
        from jaxstab.models.genoflow.data import simulate
    except ImportError as err:
        raise SystemExit(
            "benchmarks.genoflow_ot needs GenoFlow's simulator, "
            f"jaxstab.models.genoflow.data.simulate, which could not be imported: {err}"
        ) from err
    return simulate


def latents(seed: int, n_cells: int = N_CELLS) -> tuple[np.ndarray, np.ndarray, float]:
    """Float32 latents ``[n_cells, N_PCS]`` of time points 0 and 1 for repeat ``seed``, and
    the scale factor applied to the principal components."""
    adata = _simulate()(seed=seed)
    t = np.asarray(adata.obs["time"])
    counts = np.asarray(adata.layers["counts"], np.float64)
    rows = np.flatnonzero(np.isin(t, TIME_POINTS))
    x = np.log1p(counts[rows])
    x -= x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    pcs = u[:, :N_PCS] * s[:N_PCS]
    scale = float(1.0 / np.sqrt(np.mean(pcs**2)))
    z = (pcs * scale).astype(np.float32)
    rng = np.random.default_rng(seed)
    t = t[rows]
    sets = []
    for k in TIME_POINTS:
        cells = np.flatnonzero(t == k)
        if len(cells) < n_cells:
            raise SystemExit(f"time point {k} of seed {seed} has {len(cells)} < {n_cells} cells")
        sets.append(z[rng.choice(cells, n_cells, replace=False)])
    return sets[0], sets[1], scale


def plan_stats(plan: np.ndarray) -> dict[str, Any]:
    """NaN, marginal error, empty rows and distinct argmax targets of a plan (uniform
    marginals)."""
    p = np.asarray(plan, np.float64)
    n, m = p.shape
    if np.isnan(p).any():
        return {"nan": True, "marginal_error": float("nan"), "empty_rows": None,
                "distinct_targets": None}  # fmt: skip
    rows, cols = p.sum(axis=1), p.sum(axis=0)
    error = np.abs(rows - 1.0 / n).max() + np.abs(cols - 1.0 / m).max()
    return {
        "nan": False,
        "marginal_error": float(error),
        "empty_rows": int((rows < EMPTY_ROW / n).sum()),
        "distinct_targets": len(np.unique(p.argmax(axis=1))),
    }


def _original_zscore(z):
    """The original's z-score, on a torch tensor: ``clamp(std(ddof=1), 1e-8)``."""
    return (z - z.mean(0)) / z.std(0).clamp(min=1e-8)


def pot_pair(a: np.ndarray, b: np.ndarray, epsilon: float, zscore: bool, float64: bool) -> dict:
    """The original's pairing step with POT's defaults; torch float32, or NumPy float64."""
    import ot

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        if float64:
            za, zb = a.astype(np.float64), b.astype(np.float64)
            if zscore:
                za, zb = ((x - x.mean(0)) / np.maximum(x.std(0, ddof=1), 1e-8) for x in (za, zb))
            m = ot.dist(za, zb, metric="euclidean")
            plan, log = ot.sinkhorn(ot.unif(len(a)), ot.unif(len(b)), m, epsilon, log=True)
        else:
            import torch

            za, zb = torch.from_numpy(a), torch.from_numpy(b)
            if zscore:
                za, zb = _original_zscore(za), _original_zscore(zb)
            m = ot.dist(za, zb, metric="euclidean")
            ua = torch.full((len(a),), 1.0 / len(a), dtype=torch.float32)
            ub = torch.full((len(b),), 1.0 / len(b), dtype=torch.float32)
            plan, log = ot.sinkhorn(ua, ub, m, epsilon, log=True)
            plan = plan.numpy()
        seconds = time.perf_counter() - start
    messages = [str(w.message) for w in caught]
    numerical = any("numerical errors" in s for s in messages)
    not_converged = any("did not converge" in s for s in messages)
    return {
        "plan": plan,
        "seconds": seconds,
        # niter is the index of the last iteration; after numerical errors POT returns the
        # previous one's scalings, so that iteration does not count.
        "iterations": int(log["niter"]) + (0 if numerical else 1),
        "warn_numerical": numerical,
        "warn_not_converged": not_converged,
        "other_warnings": sorted(
            {s for s in messages if "numerical" not in s and "converge" not in s}
        ),
        "converged": not (numerical or not_converged),
    }


def ott_pair(a: np.ndarray, b: np.ndarray, epsilon: float, zscore: bool) -> dict:
    """:func:`pair_by_ot` (ddof = 1, the original's z-score scale; Euclidean cost)."""
    import jax

    from jaxstab.models.genoflow.pairing import pair_by_ot

    start = time.perf_counter()
    out = jax.block_until_ready(pair_by_ot(a, b, epsilon=epsilon, zscore=zscore, ddof=1))
    seconds = time.perf_counter() - start
    return {
        "plan": np.asarray(out.plan),
        "seconds": seconds,
        "iterations": int(out.n_iterations),
        "converged": bool(out.converged),
        "marginal_error_reported": float(out.marginal_error),
    }


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return statistics.median(finite) if finite else None


def run(
    repeats: int = REPEATS, n_cells: int = N_CELLS, write: bool = True, out_dir: Path | None = None
) -> dict[str, Any]:
    """Runs every (library, ε, input, constant dim) on ``repeats`` latent draws."""
    import jax

    from jaxstab.models.genoflow.pairing import pair_by_ot

    draws = [latents(seed, n_cells) for seed in range(repeats)]
    # Compile pair_by_ot once per static configuration (ε is traced) before timing.
    for zscore in (False, True):
        jax.block_until_ready(pair_by_ot(draws[0][0], draws[0][1], zscore=zscore, ddof=1))

    rows = []
    for library in LIBRARIES:
        for epsilon in EPSILONS:
            for zscore in (False, True):
                for constant in (False, True):
                    runs = []
                    for a, b, _ in draws:
                        if constant:
                            a, b = a.copy(), b.copy()
                            a[:, CONSTANT_COLUMN] = b[:, CONSTANT_COLUMN] = CONSTANT
                        if library == "ott":
                            r = ott_pair(a, b, epsilon, zscore)
                        else:
                            r = pot_pair(a, b, epsilon, zscore, float64=library == "pot64")
                        plan = r.pop("plan")
                        runs.append({**r, **plan_stats(plan)})
                    rows.append(_summarise(library, epsilon, zscore, constant, runs))
                    print(_row_line(rows[-1]), file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "benchmark": "GenoFlow phase-2 OT pairing: POT's default sinkhorn (the original) vs "
        "ott-jax pair_by_ot (seed 004's failures)",
        "environment": environment(),
        "versions": {k: version(k) for k in ("jax", "ott-jax", "pot", "torch", "numpy")},
        "load_average_1min": os.getloadavg()[0],
        "settings": {
            "repeats": repeats,
            "n_cells_per_set": n_cells,
            "latents": f"first {N_PCS} PCs (NumPy SVD) of log1p counts of simulate(seed=s), "
            f"time points {TIME_POINTS}, scaled to root-mean-square 1; {n_cells} cells of each "
            "time point drawn with default_rng(s); float32",
            "pc_scale_factors": [d[2] for d in draws],
            "constant_dimension": {"column": CONSTANT_COLUMN, "value": CONSTANT, "sets": "both"},
            "epsilons": list(EPSILONS),
            "cost": "euclidean (ot.dist metric='euclidean'; ott costs.Euclidean), not squared",
            "pot": "ot.sinkhorn(a, b, M, eps) method='sinkhorn', numItermax=1000, "
            "stopThr=1e-9 (defaults; log=True only to read the iteration count); "
            "z-score (Z - mean) / clamp(std(ddof=1), 1e-8); 'pot' in torch float32 "
            "(a, b uniform float32 tensors), 'pot64' in float64 NumPy (ot.unif)",
            "ott": "pair_by_ot(a, b, epsilon=eps, zscore=..., ddof=1): safe_zscore, "
            "log-domain Sinkhorn, absolute epsilon, max_iterations=2000, threshold=1e-6 "
            "(L1 row-marginal error), float32",
            "marginal_error": "max_i |row_i - 1/n| + max_j |col_j - 1/m| of the returned plan, "
            "float64; NaN for a NaN plan; medians over finite runs",
            "empty_row": f"plan row mass below {EMPTY_ROW} / n",
            "timing": "median wall seconds of one pairing (z-score, cost, Sinkhorn) per run; "
            "ott after compilation; 2-core shared CPU",
        },
        "rows": rows,
    }
    if write:
        from benchmarks.run import write_results

        write_results("genoflow_ot", result, to_markdown(result), out_dir)
    return result


def _summarise(library: str, epsilon: float, zscore: bool, constant: bool, runs: list[dict]):
    n = len(runs)
    out = {
        "library": library,
        "epsilon": epsilon,
        "input": "z-scored" if zscore else "raw",
        "constant_dim": constant,
        "repeats": n,
        "nan_plans": sum(r["nan"] for r in runs),
        "median_marginal_error": _median([r["marginal_error"] for r in runs]),
        "median_empty_rows": _median([r["empty_rows"] for r in runs]),
        "median_distinct_targets": _median([r["distinct_targets"] for r in runs]),
        "converged": sum(r["converged"] for r in runs),
        "median_iterations": _median([r["iterations"] for r in runs]),
        "median_ms": 1e3 * statistics.median(r["seconds"] for r in runs),
        "runs": runs,
    }
    if library != "ott":
        out["warned_numerical_errors"] = sum(r["warn_numerical"] for r in runs)
        out["warned_not_converged"] = sum(r["warn_not_converged"] for r in runs)
        out["other_warnings"] = sorted({w for r in runs for w in r["other_warnings"]})
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _row_line(row: dict) -> str:
    n = row["repeats"]
    if row["library"] == "ott":
        warned = "—"
    else:
        warned = f"{row['warned_numerical_errors']}/{n} / {row['warned_not_converged']}/{n}"
    nan = f"NaN in {row['nan_plans']}/{n}" if row["nan_plans"] else f"0/{n}"
    return (
        f"| {LIBRARIES[row['library']]} | {row['epsilon']:g} | {row['input']} "
        f"| {'yes' if row['constant_dim'] else 'no'} | {nan} "
        f"| {_fmt(row['median_marginal_error'], '.1e')} "
        f"| {_fmt(row['median_empty_rows'], '.0f')} "
        f"| {_fmt(row['median_distinct_targets'], '.0f')} | {warned} "
        f"| {row['converged']}/{n} | {_fmt(row['median_iterations'], '.0f')} "
        f"| {row['median_ms']:.1f} |"
    )


def to_markdown(result: dict[str, Any]) -> str:
    """The two tables (original vs port; POT in float64) as markdown."""
    s = result["settings"]
    n, r = s["n_cells_per_set"], s["repeats"]
    header = [
        "| library | ε | input | constant dim | NaN plans | median marginal error "
        "| median empty rows | median distinct targets | POT warned: numerical errors / "
        "not converged | converged (own criterion) | median iterations | median ms |",
        "|---|---:|---|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    main = [_row_line(row) for row in result["rows"] if row["library"] in ("pot", "ott")]
    f64 = [_row_line(row) for row in result["rows"] if row["library"] == "pot64"]
    v = result["versions"]
    return "\n".join(
        [
            "# GenoFlow OT pairing: POT's default Sinkhorn (the original) vs `pair_by_ot`",
            "",
            f"{describe(result['environment'])}; ott-jax {v['ott-jax']}, POT {v['pot']}. "
            f"1-minute load average at start: {result['load_average_1min']:.1f} (shared).",
            "",
            f"{r} repeats of {n} + {n} cells: latents are the first {N_PCS} principal "
            "components of log1p counts of GenoFlow's simulator (`simulate(seed=s)`, time "
            "points 0 and 1), scaled to root-mean-square 1 (a VAE latent's spread), float32. "
            f"Constant dim: column {CONSTANT_COLUMN} set to {CONSTANT} in both sets. Euclidean "
            "cost (not squared). POT: `ot.sinkhorn(a, b, M, ε)` with its defaults (method "
            "`sinkhorn`, 1,000 iterations, `stopThr` 1e-9), z-score `(Z - mean) / "
            "clamp(std(ddof=1), 1e-8)` in torch. ott-jax: `pair_by_ot(..., ddof=1)` "
            "(`safe_zscore`, log-domain Sinkhorn, ≤ 2,000 iterations, threshold 1e-6).",
            "",
            f"Marginal error: `max|row sums - 1/n| + max|col sums - 1/n|` (a cell weighs "
            f"1/n = {1 / n:g}; an all-zero plan scores {2 / n:g}). Empty rows: source cells "
            f"whose plan row holds under {EMPTY_ROW:g}/n (their argmax pairing is arbitrary: "
            "target 0 for an all-zero row). Distinct targets: of the argmax pairing "
            f"(at most {n}). Medians over the repeats (the marginal error's over finite plans).",
            "",
            *header,
            *main,
            "",
            "The same POT call in float64 NumPy (not the original's precision):",
            "",
            *header,
            *f64,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.genoflow_ot", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--cells", type=int, default=N_CELLS, help="cells per set")
    args = parser.parse_args(argv)
    result = run(args.repeats, args.cells, write=True, out_dir=args.out)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
