"""Trajectories and OT pairing of ``benchmarks.fidelity_genoflow``: the reference against the port.

The reference is an adapter with the interface of
``benchmarks.fidelity_genoflow_original.OriginalAdapter`` (``encode``, ``trajectory``,
``ot_coupling``, ``state_dict``, ``as_float64``).

- :func:`compare_trajectory`: the original's ``ODEIntegrator`` (torchdiffeq ``dopri5``)
  against ``integrate_latent`` / ``simulate_trajectory`` (diffrax ``Dopri5``): two adaptive
  solvers at rtol 1e-5, atol 1e-6 (tolerance 1e-3), and in float64 both at 1e-10;
- :func:`compare_ot`: the original's ``compute_ot_coupling`` (POT) against ``pair_by_ot``
  (ott-jax), both against a better-converged log-domain plan (:func:`reference_plan`).

Example:
  >>> plan, info = reference_plan(np.eye(3), np.eye(3)[::-1], epsilon=0.1)
  >>> np.argmax(plan, 1).tolist(), info["converged"]
  ([2, 1, 0], True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks import fidelity_genoflow_port as ports
from benchmarks.fidelity_cfmvc import rel_err
from benchmarks.fidelity_genoflow_port import as_dtype, build_port, marginal_error

__all__ = ["compare_ot", "compare_trajectory", "reference_plan"]

TRAJECTORY_TOLERANCE = 1e-3  # two adaptive Dopri5 solvers at rtol 1e-5, atol 1e-6
TIGHT_TOLERANCE = 1e-7  # the same two at rtol = atol = 1e-10, float64
N_SAVE = 11
N_TRAJECTORY_CELLS = 16
OT_EPSILON = 0.01
REFERENCE_ITERATIONS = 20_000
TRAJ_TWO = "time points (0, 1)"
TRAJ_THREE = "the data's 3 time points"


# ---------------------------------------------------------------------------- trajectories
def compare_trajectory(
    adapter: Any,
    config: Any,
    inputs: Mapping[str, Any],
    *,
    float64: bool = False,
    tight: bool | None = None,
    full: bool = True,
    state_dict: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The reference's trajectory (``ODEIntegrator.simulate_trajectory``) from its latent
    means of ``N_TRAJECTORY_CELLS`` cells of time point 0 over ``linspace(0, 1, N_SAVE)``
    against ``integrate_latent`` (+ the decoder at the config's library size) on a port with
    time points (0, 1) and on one with the data's, and ``simulate_trajectory`` from the
    counts (the data's time points, ``t_span=(0, 1)``). ``tight`` (default: in float64) adds
    both at rtol = atol = 1e-10; ``full=False`` keeps the rows on time points (0, 1) only. The
    port's weights: ``state_dict`` (default the adapter's)."""
    state = adapter.state_dict() if state_dict is None else state_dict
    if not float64:
        return _compare_trajectory(adapter, state, config, inputs, np.float32, bool(tight), full)
    import jax

    with jax.enable_x64(True):
        inputs, tight = as_dtype(inputs, np.float64), True if tight is None else tight
        return _compare_trajectory(
            adapter.as_float64(), state, config, inputs, np.float64, tight, full
        )


def _compare_trajectory(
    adapter: Any, state: Any, config: Any, inputs: Any, dtype: Any, tight: bool, full: bool
) -> dict[str, Any]:
    from jaxstab.models.genoflow import simulate_trajectory

    meta, lib = inputs["meta"], config.library_size
    rows = np.flatnonzero(inputs["time"] == 0)[:N_TRAJECTORY_CELLS]
    x0, codes = inputs["x"][rows], inputs["condition"][rows]
    times = np.linspace(0.0, 1.0, N_SAVE).astype(dtype)
    z0 = adapter.encode(x0, codes)[0]
    theirs = adapter.trajectory(z0, codes, times)
    two = build_port(config, state, meta, dtype, time_points=(0.0, 1.0))
    ours2 = ports.port_trajectory(two, z0, codes, times, lib)
    lat, expr = theirs["latent"], theirs["expression"]
    errors = {
        f"latent: integrate_latent, {TRAJ_TWO}": rel_err(ours2["latent"], lat),
        f"expression: decoded at library 1e4, {TRAJ_TWO}": rel_err(ours2["expression"], expr),
    }
    steps = {
        "original_function_evaluations": theirs["function_evaluations"],
        f"port_accepted_steps ({TRAJ_TWO})": ours2["steps"],
    }
    if full:
        three = build_port(config, state, meta, dtype)
        ours3 = ports.port_trajectory(three, z0, codes, times, lib)
        sim = simulate_trajectory(
            three, x0, codes, n_save=N_SAVE, t_span=(0.0, 1.0), library_size=lib
        )
        errors[f"latent: integrate_latent, {TRAJ_THREE}"] = rel_err(ours3["latent"], lat)
        errors[f"latent: simulate_trajectory(x0), {TRAJ_THREE}"] = rel_err(sim.latent, lat)
        errors[f"expression: simulate_trajectory(x0), {TRAJ_THREE}"] = rel_err(sim.expression, expr)
        steps[f"port_accepted_steps ({TRAJ_THREE})"] = ours3["steps"]
    tolerance = dict.fromkeys(errors, TRAJECTORY_TOLERANCE)
    if tight:
        tight_theirs = adapter.trajectory(z0, codes, times, rtol=1e-10, atol=1e-10)
        steps["original_function_evaluations (1e-10)"] = tight_theirs["function_evaluations"]
        for label, port in ((TRAJ_TWO, two), (TRAJ_THREE, three if full else None)):
            if port is None:
                continue
            ours = ports.port_trajectory(port, z0, codes, times, lib, rtol=1e-10, atol=1e-10)
            name = f"latent: rtol = atol = 1e-10, {label}"
            errors[name] = rel_err(ours["latent"], tight_theirs["latent"])
            tolerance[name] = TIGHT_TOLERANCE
            steps[f"port_accepted_steps (1e-10, {label})"] = ours["steps"]
    within = {k: v <= tolerance[k] for k, v in errors.items()}
    return {
        "dtype": np.dtype(dtype).name,
        "n_cells": len(rows),
        "times": times.tolist(),
        "max_relative_error": errors,
        "tolerance": tolerance,
        "within_tolerance": within,
        "steps": steps,
        "ok": all(within.values()),
    }


# ---------------------------------------------------------------------------- OT pairing
def reference_plan(
    za: Any, zb: Any, epsilon: float = OT_EPSILON, iterations: int = REFERENCE_ITERATIONS
) -> tuple[np.ndarray, dict[str, Any]]:
    """A better-converged plan of the original's problem: float64 z-scores (ddof 1, std
    floored at 1e-8), Euclidean cost, POT's log-domain ``sinkhorn_log`` (no underflow) for up
    to ``iterations`` (``stopThr`` 1e-12, checked every 10). At ε = 0.01 Sinkhorn converges
    slowly: on the benchmark's 64 + 64 latents its marginal error is ~1e-5 after 5,000
    iterations, ~1e-6 after 50,000."""
    import ot

    def zscore(v: Any) -> np.ndarray:
        v = np.asarray(v, np.float64)
        return (v - v.mean(0)) / np.maximum(v.std(0, ddof=1), 1e-8)

    a, b = zscore(za), zscore(zb)
    cost = ot.dist(a, b, metric="euclidean")
    plan, log = ot.sinkhorn(
        ot.unif(len(a)),
        ot.unif(len(b)),
        cost,
        epsilon,
        method="sinkhorn_log",
        numItermax=iterations,
        stopThr=1e-12,
        log=True,
        warn=False,
    )
    err = float(log["err"][-1])
    info = {
        "method": f"POT sinkhorn_log, float64, <= {iterations} iterations, stopThr 1e-12",
        "iterations": int(log["niter"]),
        "last_error": err,
        "converged": err < 1e-12,
        "marginal_error": marginal_error(plan),
    }
    return np.asarray(plan), info


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if np.all(np.isfinite(a)) else float("nan")


def compare_ot(
    adapter: Any,
    inputs: Mapping[str, Any],
    *,
    float64: bool = False,
    reference_iterations: int = REFERENCE_ITERATIONS,
) -> dict[str, Any]:
    """The reference's ``ot_coupling`` (the original's ``compute_ot_coupling``) against
    ``pair_by_ot`` on the reference's latent means of time points 0 and 1, and both against
    :func:`reference_plan` (``reference_iterations``)."""
    if float64:
        import jax

        with jax.enable_x64(True):
            inputs = as_dtype(inputs, np.float64)
            return compare_ot(
                adapter.as_float64(), inputs, reference_iterations=reference_iterations
            )
    t, x, codes = inputs["time"], inputs["x"], inputs["condition"]
    za, zb = (adapter.encode(x[t == k], codes[t == k])[0] for k in (0, 1))
    theirs = adapter.ot_coupling(za, zb)
    ours = ports.port_pairing(za, zb, OT_EPSILON)
    ref, ref_info = reference_plan(za, zb, iterations=reference_iterations)
    pot, port, ref_target = theirs["plan"], ours["plan"], np.argmax(ref, axis=1)
    finite = bool(np.all(np.isfinite(pot)))
    numerical = any("umerical" in w for w in theirs["warnings"])
    last = theirs["last_error"]
    original = {
        "nan_in_plan": not finite,
        "all_zero_plan": bool(np.all(pot == 0)),
        "warnings": theirs["warnings"],
        "printed_nan_warning": theirs["printed_nan_warning"],
        "iterations": theirs["iterations"],
        "last_error": last,
        "converged": finite and not numerical and last is not None and last < 1e-9,
        "marginal_error": marginal_error(pot),
        "distinct_targets": len(set(theirs["target"].tolist())),
        "cost_dtype": theirs["cost_dtype"],
        "method": theirs["method"],
    }
    return {
        "dtype": str(np.asarray(za).dtype),
        "n_source": len(za),
        "n_target": len(zb),
        "original": original,
        "port": {
            "converged": ours["converged"],
            "iterations": ours["iterations"],
            "marginal_error": marginal_error(port),
            "distinct_targets": len(set(ours["target"].tolist())),
        },
        "plan_max_abs_diff": _max_abs(pot, port),
        "plan_max": float(np.max(np.abs(ref))),
        "argmax_agreement": float(np.mean(ours["target"] == theirs["target"])),
        "reference": {
            **ref_info,
            "original_plan_max_abs_diff": _max_abs(pot, ref),
            "port_plan_max_abs_diff": _max_abs(port, ref),
            "original_argmax_agreement": float(np.mean(theirs["target"] == ref_target)),
            "port_argmax_agreement": float(np.mean(ours["target"] == ref_target)),
        },
    }
