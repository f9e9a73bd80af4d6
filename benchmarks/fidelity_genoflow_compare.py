"""The values-and-gradients comparison of ``benchmarks.fidelity_genoflow``.

The reference is an adapter with the interface of
``benchmarks.fidelity_genoflow_original.OriginalAdapter`` (the original code, or in the tests
a stand-in over ``benchmarks/torch_ref/genoflow.py``); the port is built from the adapter's
``state_dict()``. :func:`compare` gives the max relative error
``max|ours - reference| / max|reference|`` (:func:`~benchmarks.fidelity_cfmvc.rel_err`; for a
group of gradient tensors the worst tensor's) of every row of :func:`reference_rows` and
:func:`port_rows`: encoder, decoder, the VAE loss and its terms and gradients in eval and
train mode, the discriminator, GATv2, velocity, flow matching. Trajectories and the OT
pairing: ``benchmarks.fidelity_genoflow_dynamics``.

Example:
  >>> _row_error({"w": np.ones(2)}, {"w": np.full(2, 2.0)})
  (0.5, 'w')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks import fidelity_genoflow_port as ports
from benchmarks.fidelity_cfmvc import (
    FLOAT64_TOLERANCE,
    FLOOR_FACTOR,
    TOLERANCE,
    grad_errors,
    rel_err,
)
from benchmarks.fidelity_genoflow_port import as_dtype, build_port

__all__ = ["FLOAT64_TOLERANCE", "TOLERANCE", "compare", "port_rows", "reference_rows"]

RUNNING_MEAN = "train: BatchNorm running_mean after the pass"
RUNNING_VAR = "train: BatchNorm running_var after the pass"
VELOCITY_AT_1 = "velocity at t = 1 (GenoFlow.velocity, 3 time points)"
# In train mode a bias feeding a BatchNorm has gradient 0 in exact arithmetic (the batch mean
# removes it): both sides' values are rounding noise, compared relative to the largest gradient.
PRE_BN = ("encoder.fc.0.bias", "encoder.fc.3.bias")
PRE_BN_ROW = "train: gradients of the biases before BatchNorm (0 exactly), error / largest gradient"
# Rows of the port's forward values: (row, key of port_quantities' "values").
_VALUE_ROWS = (
    ("encoder.mu", "mu"),
    ("encoder.logvar", "logvar"),
    ("z (fixed eps)", "z"),
    ("decoder.mean", "mean"),
    ("decoder.theta", "theta"),
    ("decoder.mean (original's z)", "mean_o"),
    ("GATv2 gene features", "genes"),
    ("velocity v(t, z, c)", "v"),
    ("velocity at t = 1 (vector_field)", "v1"),
    (VELOCITY_AT_1, "v1_velocity"),
)
_VAE_ROWS = (
    ("vae_total", "vae_total (vae_forward loss)"),
    ("recon", "recon (NB)"),
    ("kl", "kl"),
    ("disc_ce", "disc_ce (detached z)"),
)
_GRAD_ROWS = (
    ("vae_grads", "vae_total gradients (encoder, decoder)"),
    ("disc_grads", "disc_ce gradients (discriminator)"),
)


def compare(
    adapter: Any,
    config: Any,
    inputs: Mapping[str, Any],
    noise: Mapping[str, Any],
    *,
    float64: bool = False,
    state_dict: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Values and gradients of ``adapter`` (:func:`reference_rows`) against the port built
    at ``config`` from ``state_dict`` (default the adapter's; :func:`port_rows`):
    ``{"dtype", "tolerance", "max_relative_error", "within_tolerance",
    "float32_floor", "explained_by_float32_rounding", "worst_gradient", "checks", "ok",
    "ok_or_rounding"}``.

    ``float64``: the adapter's ``as_float64()`` and the port, inputs and noise in float64
    under ``jax.enable_x64`` (tolerance ``FLOAT64_TOLERANCE``). In float32 a row beyond the
    tolerance is recomputed by the reference in float64: ``float32_floor`` gives how far the
    reference's own float32 value and the port's are from it, and the row is
    ``explained_by_float32_rounding`` when the port's is within ``FLOOR_FACTOR`` (4) of the
    reference's own (or of the tolerance). ``ok_or_rounding``: every row within the
    tolerance or explained by float32 rounding.
    """
    state = adapter.state_dict() if state_dict is None else state_dict
    if not float64:
        return _compare(adapter, state, config, inputs, noise, np.float32)
    import jax

    with jax.enable_x64(True):
        inputs, noise = as_dtype(inputs, np.float64), as_dtype(noise, np.float64)
        return _compare(adapter.as_float64(), state, config, inputs, noise, np.float64)


def _row_error(ours: Any, theirs: Any) -> tuple[float, str]:
    """:func:`rel_err`, or for ``{name: array}`` rows the worst tensor's and its name."""
    if isinstance(theirs, Mapping):
        return grad_errors(ours, theirs)
    return rel_err(ours, theirs), ""


def reference_rows(adapter: Any, inputs: Mapping[str, Any], noise: Mapping[str, Any]) -> dict:
    """Every compared quantity of the reference ``adapter``, by row name (arrays, floats or
    ``{state-dict name: array}``), plus ``"_z"`` (its reparameterised sample) and
    ``"_vae_grads_train"`` (all train-mode VAE gradients, for :data:`PRE_BN_ROW`)."""
    x, codes, lib, eps = inputs["x"], inputs["condition"], inputs["library"], noise["eps"]
    mu, lv = adapter.encode(x, codes)
    z = adapter.sample(mu, lv, eps)
    mean, theta = adapter.decode(z, codes, lib)
    rows: dict[str, Any] = {
        "encoder.mu": mu,
        "encoder.logvar": lv,
        "z (fixed eps)": z,
        "decoder.mean": mean,
        "decoder.theta": theta,
        "decoder.mean (original's z)": mean,
        "_z": z,
    }
    runs = {
        "": adapter.vae(x, codes, lib, eps),
        "train: ": adapter.without_dropout().vae(x, codes, lib, eps, train=True),
    }
    for prefix, r in runs.items():
        for key, name in _VAE_ROWS:
            rows[prefix + name] = r[key]
        for key, name in _GRAD_ROWS:
            rows[prefix + name] = {k: g for k, g in r[key].items() if k not in PRE_BN}
    train = runs["train: "]
    rows["_vae_grads_train"] = train["vae_grads"]
    stats = train["batch_stats"]
    rows[RUNNING_MEAN] = {k: v for k, v in stats.items() if k.endswith("running_mean")}
    rows[RUNNING_VAR] = {k: v for k, v in stats.items() if k.endswith("running_var")}
    fc, z_v, t_v = codes[: len(noise["z0"])], noise["z_v"], noise["t_v"]
    rows["GATv2 gene features"] = adapter.gene_features()
    rows["velocity v(t, z, c)"] = adapter.velocity(t_v, z_v, fc)
    rows["velocity at t = 1 (vector_field)"] = adapter.velocity(np.ones_like(t_v), z_v, fc)
    rows[VELOCITY_AT_1] = rows["velocity at t = 1 (vector_field)"]
    loss, grads = adapter.flow(noise["z0"], noise["z1"], fc, noise["t"])
    rows["flow-matching loss"], rows["flow gradients (vector field)"] = loss, grads
    return rows


def port_rows(
    port: Any, inputs: Mapping[str, Any], noise: Mapping[str, Any], z_ref: Any
) -> tuple[dict[str, Any], dict[str, bool]]:
    """The port's rows (as :func:`reference_rows`; ``z_ref`` is the reference's sample, the
    decoder's input of row ``decoder.mean (original's z)``) and its structural checks."""
    arrays = {k: inputs[k] for k in ("x", "condition", "library")}
    arrays |= {k: noise[k] for k in ("eps", "t_v", "z_v", "z0", "z1", "t")}
    arrays |= {"z_o": z_ref, "c_v": inputs["condition"][: len(noise["z0"])]}
    ours = ports.port_quantities(port, arrays)
    v = ours["values"]
    rows: dict[str, Any] = {row: v[key] for row, key in _VALUE_ROWS}
    checks = {}
    for prefix, mode in (("", "eval"), ("train: ", "train")):
        r = ours["vae"][mode]
        for key, name in (*_VAE_ROWS, *_GRAD_ROWS):
            rows[prefix + name] = r[key]
        no_disc, no_vae = r["vae_total_disc_grad_max"] == 0.0, r["disc_ce_vae_grad_max"] == 0.0
        checks[f"port_vae_total_reaches_no_discriminator_weight ({mode})"] = no_disc
        checks[f"port_disc_ce_reaches_no_encoder_decoder_weight ({mode})"] = no_vae
    rows[RUNNING_MEAN] = rows[RUNNING_VAR] = ours["vae"]["train"]["batch_stats"]
    rows["flow-matching loss"], rows["flow gradients (vector field)"] = ours["flow"]
    return rows, checks


def _errors(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> tuple[dict, dict]:
    errors, worst = {}, {}
    for name, ref in theirs.items():
        if name.startswith("_"):
            continue
        errors[name], tensor = _row_error(ours[name], ref)
        if tensor:
            worst[name] = tensor
    # PRE_BN: rounding noise on both sides, relative to the largest train-mode VAE gradient
    grads = theirs["_vae_grads_train"]
    scale = max(float(np.max(np.abs(g))) for g in grads.values())
    train_grads = ours["train: vae_total gradients (encoder, decoder)"]
    diff = max(float(np.max(np.abs(train_grads[k] - grads[k]))) for k in PRE_BN)
    errors[PRE_BN_ROW] = diff / scale
    return errors, worst


def _compare(adapter: Any, state: Any, config: Any, inputs: Any, noise: Any, dtype: Any) -> dict:
    is_f32 = np.dtype(dtype) == np.float32
    tolerance = TOLERANCE if is_f32 else FLOAT64_TOLERANCE
    port = build_port(config, state, inputs["meta"], dtype)
    theirs = reference_rows(adapter, inputs, noise)
    ours, checks = port_rows(port, inputs, noise, theirs["_z"])
    errors, worst = _errors(ours, theirs)
    within = {k: v <= tolerance for k, v in errors.items()}
    # A float32 row beyond the tolerance: how far are the reference's own float32 values from
    # the reference run in float64 (same weights, inputs and noise), and the port's?
    floor: dict[str, dict[str, float]] = {}
    failing = [k for k, ok in within.items() if not ok and k in theirs]
    if is_f32 and failing:
        ref64 = reference_rows(
            adapter.as_float64(), as_dtype(inputs, np.float64), as_dtype(noise, np.float64)
        )
        for k in failing:
            floor[k] = {
                "original_f32_vs_f64": _row_error(theirs[k], ref64[k])[0],
                "port_vs_f64": _row_error(ours[k], ref64[k])[0],
            }
    explained = [
        k
        for k, f in floor.items()
        if f["port_vs_f64"] <= FLOOR_FACTOR * max(f["original_f32_vs_f64"], tolerance)
    ]
    checks_ok = all(checks.values())
    return {
        "dtype": np.dtype(dtype).name,
        "tolerance": tolerance,
        "max_relative_error": errors,
        "within_tolerance": within,
        "float32_floor": floor,
        "explained_by_float32_rounding": explained,
        "worst_gradient": worst,
        "checks": checks,
        "ok": all(within.values()) and checks_ok,
        "ok_or_rounding": checks_ok and all(ok or k in explained for k, ok in within.items()),
    }
