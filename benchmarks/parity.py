"""Numerical parity of the model ports with their PyTorch versions, at full size.

``python -m benchmarks.run --suite parity`` builds CFM-VC at the seed-002 sizes (2000 genes,
default widths) on both sides, for ``CFMVCConfig.default()`` and ``CFMVCConfig.original()``,
copies the PyTorch weights onto the Flax model with the
converter, feeds both the same batch of 64 simulated cells and the same noise, and reports the
largest relative error (max |ours − theirs| / max |theirs|) of each output and of the
gradients of each stage's loss, against the tolerances the parity tests use (1e-5 values,
1e-4 gradients). ``tests/models/test_cfmvc_parity.py`` asserts the same at a small size.

Example:
  >>> sorted(TOLERANCES)
  ['gradient', 'value']
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOLERANCES = {"value": 1e-5, "gradient": 1e-4}


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


PRESETS = ("default", "original")


def _cfmvc(
    n_cells: int = 64, n_genes: int = 2000, seed: int = 0, preset: str = "default"
) -> dict[str, Any]:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from benchmarks.torch_ref import cfmvc as tref
    from jaxstab.models.cfmvc import CFMVC, CFMVCConfig, load_anndata, simulate
    from jaxstab.models.cfmvc.losses import flow_terms, vae_terms

    config = getattr(CFMVCConfig, preset)()
    n_pert, n_batch, n_ct = 10, 2, 3
    torch.manual_seed(seed)
    tm = tref.CFMVCModel(n_genes, n_batch, n_ct, n_pert, config)
    tm.eval()  # dropout off on both sides
    model = CFMVC(n_genes, n_batch, n_ct, n_pert, config, rngs=nnx.Rngs(seed))
    tref.torch_state_dict_to_nnx(tm.state_dict(), model)
    model.eval()

    data = load_anndata(simulate(n_cells, n_genes, n_pert, n_batch, n_ct, seed=seed))
    a = data.arrays
    jb = {k: jnp.asarray(v) for k, v in a.items()}
    x, p = torch.tensor(a["x"]), torch.tensor(a["p"])
    b, c = torch.tensor(a["batch"]).long(), torch.tensor(a["cell_type"]).long()
    rng = np.random.default_rng(seed)
    eps_i = rng.normal(size=(n_cells, tm.dim_int)).astype(np.float32)
    eps_t = rng.normal(size=(n_cells, tm.dim_tech)).astype(np.float32)
    z0 = rng.normal(size=(n_cells, tm.dim_int)).astype(np.float32)
    t = rng.uniform(size=n_cells).astype(np.float32)
    eps_f = rng.normal(size=(n_cells, tm.dim_int)).astype(np.float32)  # a 'sample' flow target

    def grad_error(ours: Any, groups: set[str]) -> float:
        ours = dict(nnx.to_flat_state(ours))
        theirs = tref.torch_grads_to_nnx(tm, model)
        return max(_rel(ours[k][...], v[...]) for k, v in theirs.items() if k[0] in groups)

    # Forward values.
    with torch.no_grad():
        enc_t = tm.encoder(x, b, c)
        ctx_t, alpha_t = tm.context_encoder(p, b, c, None)
    enc = model.encoder(jb["x"], jb["batch"], jb["cell_type"])
    ctx, alpha = model.context_encoder(jb["p"], jb["batch"], jb["cell_type"], None)
    errors = {
        "encoder_outputs": max(_rel(o, t_.numpy()) for o, t_ in zip(enc, enc_t, strict=True)),
        "context": _rel(ctx, ctx_t.numpy()),
        "alpha": _rel(alpha, alpha_t.numpy()),
    }

    # Stage 1: NB-VAE loss (NB log-likelihood + KL) and its gradients.
    tm.zero_grad()
    loss_t, nll_t, _ = tm.vae_forward(x, b, c, torch.tensor(eps_i), torch.tensor(eps_t))
    loss_t.backward()
    (loss, aux), grads = _vg(vae_terms, model, jb, eps_i, eps_t)
    errors["nb_log_likelihood"] = _rel(aux["nll"], nll_t.detach().numpy())
    errors["vae_loss"] = _rel(loss, loss_t.detach().numpy())
    errors["vae_gradients"] = grad_error(grads, {"encoder", "decoder"})

    # Stage 2: flow-matching loss, velocity and gradients.
    tm.zero_grad()
    loss_t, v_t = tm.flow_step(
        x, p, b, c, torch.tensor(z0), torch.tensor(t), None, torch.tensor(eps_f)
    )
    loss_t.backward()
    (loss, aux), grads = _vg(flow_terms, model, jb, z0, t, eps_f)
    z1 = np.asarray(enc.int_mean)
    if config.flow_target == "sample":
        z1 = z1 + eps_f * np.exp(0.5 * np.asarray(enc.int_logvar))
    z_t = (1 - t)[:, None] * z0 + t[:, None] * z1
    v = model.velocity(jnp.asarray(z_t), jnp.asarray(t), jb["p"], jb["batch"], jb["cell_type"])
    errors["flow_velocity"] = _rel(v, v_t.detach().numpy())
    errors["flow_loss"] = _rel(loss, loss_t.detach().numpy())
    errors["flow_gradients"] = grad_error(grads, {"context_encoder", "flow"})

    kind = {k: "gradient" if k.endswith("gradients") else "value" for k in errors}
    return {
        "config": {
            "preset": preset,
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_perturbations": n_pert,
            "weights": "PyTorch init, copied by torch_state_dict_to_nnx",
        },
        "max_relative_error": errors,
        "within_tolerance": {k: errors[k] < TOLERANCES[kind[k]] for k in errors},
    }


def _vg(terms: Any, model: Any, jb: Any, *noise: np.ndarray) -> tuple[Any, Any]:
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(m: Any) -> Any:
        return terms(m, jb, *map(jnp.asarray, noise))

    return nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)


def run() -> dict[str, Any]:
    """Every port's parity result, keyed by model name (CFM-VC at both presets)."""
    import torch

    return {
        "torch": torch.__version__,
        "tolerances": TOLERANCES,
        "cfmvc": _cfmvc(),
        "cfmvc-original": _cfmvc(preset="original"),
    }


def parity_markdown(result: dict[str, Any]) -> str:
    """One table per model: quantity, max relative error, tolerance, within it."""
    lines = [f"# Parity with the PyTorch versions (torch {result['torch']})", ""]
    for name, res in result.items():
        if not isinstance(res, dict) or "max_relative_error" not in res:
            continue
        lines += [f"## {name}", "", "| quantity | max rel. error | tolerance | ok |"]
        lines.append("|---|---|---|---|")
        for k, err in res["max_relative_error"].items():
            tol = TOLERANCES["gradient" if k.endswith("gradients") else "value"]
            ok = "yes" if res["within_tolerance"][k] else "NO"
            lines.append(f"| {k} | {err:.1e} | {tol:.0e} | {ok} |")
        lines.append("")
    return "\n".join(lines)
