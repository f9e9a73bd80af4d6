"""CFM-VC's benchmark spec: the port ``jaxstab.models.cfmvc`` and ``benchmarks/torch_ref/cfmvc.py``.

Sizes (simulated data, :func:`jaxstab.models.cfmvc.simulate`; 2 batches, 3 cell types):

- ``small``: 64 cells x 40 genes, 4 perturbations, batch 12, ``CFMVCConfig.small()`` widths;
- ``full``: 10 000 cells x 2000 genes, 10 perturbations, batch 64, the preset's own widths
  (the seed-002 configuration; parity compares one batch of 64 cells);
- ``faults``: 256 + 128 held-out cells x 100 genes, 3 perturbations, batch 32, small widths
  and no dropout.

Parity compares ``CFMVCConfig.default()`` and ``CFMVCConfig.original()``: encoder outputs,
context and alpha, the NB log-likelihood, the stage-1 loss and its gradients (encoder,
decoder), the flow velocity, the stage-2 loss and its gradients (context encoder, flow). The
speed and stability suites train stage ``"vae"``. The PyTorch version's seed guards for the
stability suite are its hard clamps (``logvar_bound`` and ``mean_bound`` ``"clip"``).

Example:
  >>> SPEC.stage, SPEC.presets, sorted(SPEC.sizes)
  ('vae', ('default', 'original'), ['faults', 'full', 'small'])
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.specs.base import ModelSpec

_SMALL_WIDTHS = {"dim_int": 8, "dim_tech": 4, "hidden_vae": 32, "hidden_ctx": 16,
                 "hidden_flow": 32, "n_basis": 4}  # fmt: skip
SIZES: dict[str, dict[str, Any]] = {
    "small": {"n_cells": 64, "n_genes": 40, "n_perturbations": 4, "n_batches": 2,
              "n_cell_types": 3, "batch_size": 12, "config": _SMALL_WIDTHS},
    "full": {"n_cells": 10_000, "n_genes": 2000, "n_perturbations": 10, "n_batches": 2,
             "n_cell_types": 3, "batch_size": 64},
    "faults": {"n_cells": 384, "n_eval": 128, "n_genes": 100, "n_perturbations": 3,
               "n_batches": 2, "n_cell_types": 3, "batch_size": 32,
               "config": {**_SMALL_WIDTHS, "hidden_flow": 16, "dropout": 0.0}},
}  # fmt: skip


def _simulated(size: str, n_cells: int, seed: int) -> Any:
    from jaxstab.models.cfmvc import load_anndata, simulate

    s = SPEC.size(size)
    counts = simulate(n_cells, s["n_genes"], s["n_perturbations"], s["n_batches"],
                      s["n_cell_types"], seed=seed)  # fmt: skip
    return load_anndata(counts)


@functools.lru_cache(maxsize=16)
def data(size: str, seed: int) -> Any:
    """``n_cells`` simulated cells at ``size`` (cached: callers must not change the arrays)."""
    return _simulated(size, SPEC.size(size)["n_cells"], seed)


def build_torch(size: str, preset: str, seed: int, **changes: Any) -> Any:
    """``benchmarks.torch_ref.cfmvc.CFMVCModel`` at the same sizes and config."""
    import torch

    from benchmarks.torch_ref.cfmvc import CFMVCModel

    s = SPEC.size(size)
    config = SPEC.config(size, preset).replace(**changes)
    torch.manual_seed(seed)
    return CFMVCModel(s["n_genes"], s["n_batches"], s["n_cell_types"], s["n_perturbations"],
                      config)  # fmt: skip


def name_map(path: tuple) -> str:
    """CFM-VC's NNX path → state-dict key (``benchmarks.torch_ref.cfmvc.nnx_name``)."""
    from benchmarks.torch_ref.cfmvc import nnx_name

    return nnx_name(path)


def inputs(size: str, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """A simulated batch of ``batch_size`` cells and the noise both sides are given."""
    n = SPEC.size(size)["batch_size"]
    config = SPEC.config(size)
    rng = np.random.default_rng(seed)
    f32 = np.float32
    noise = {
        "eps_int": rng.normal(size=(n, config.dim_int)).astype(f32),
        "eps_tech": rng.normal(size=(n, config.dim_tech)).astype(f32),
        "z0": rng.normal(size=(n, config.dim_int)).astype(f32),
        "t": rng.uniform(size=n).astype(f32),
        "eps_flow": rng.normal(size=(n, config.dim_int)).astype(f32),  # a 'sample' flow target
    }
    return {"arrays": dict(_simulated(size, n, seed).arrays), "noise": noise}


def _value_and_grad(terms: Any, model: Any, batch: Any, *noise: np.ndarray) -> Any:
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(m: Any) -> Any:
        return terms(m, batch, *map(jnp.asarray, noise))

    return nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)


def outputs_jax(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The port's quantities (forward values, both stages' losses and gradients)."""
    import jax.numpy as jnp

    from benchmarks.convert import nnx_to_state_dict
    from jaxstab.models.cfmvc.losses import flow_terms, vae_terms

    jb = {k: jnp.asarray(v) for k, v in inputs["arrays"].items()}
    n = inputs["noise"]
    enc = model.encoder(jb["x"], jb["batch"], jb["cell_type"])
    ctx, alpha = model.context_encoder(jb["p"], jb["batch"], jb["cell_type"], None)
    (vae, vae_aux), vae_grads = _value_and_grad(vae_terms, model, jb, n["eps_int"], n["eps_tech"])
    (flow, _), flow_grads = _value_and_grad(flow_terms, model, jb, n["z0"], n["t"], n["eps_flow"])
    z1 = np.asarray(enc.int_mean)
    if model.config.flow_target == "sample":
        z1 = z1 + n["eps_flow"] * np.exp(0.5 * np.asarray(enc.int_logvar))
    t = n["t"]
    z_t = (1 - t)[:, None] * n["z0"] + t[:, None] * z1
    v = model.velocity(jnp.asarray(z_t), jnp.asarray(t), jb["p"], jb["batch"], jb["cell_type"])
    return {
        "encoder_outputs": tuple(enc),
        "context": ctx,
        "alpha": alpha,
        "nb_log_likelihood": vae_aux["nll"],
        "vae_loss": vae,
        "vae_gradients": nnx_to_state_dict(vae_grads, name_map, groups=("encoder", "decoder")),
        "flow_velocity": v,
        "flow_loss": flow,
        "flow_gradients": nnx_to_state_dict(
            flow_grads, name_map, groups=("context_encoder", "flow")
        ),
    }


def outputs_torch(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The same quantities from the PyTorch version."""
    import torch

    from benchmarks.convert import torch_grads

    a = inputs["arrays"]
    n = {k: torch.tensor(v) for k, v in inputs["noise"].items()}
    x, p = torch.tensor(a["x"]), torch.tensor(a["p"])
    b, c = torch.tensor(a["batch"]).long(), torch.tensor(a["cell_type"]).long()
    with torch.no_grad():
        enc = model.encoder(x, b, c)
        ctx, alpha = model.context_encoder(p, b, c, None)
    model.zero_grad()
    vae, nll, _ = model.vae_forward(x, b, c, n["eps_int"], n["eps_tech"])
    vae.backward()
    vae_grads = torch_grads(model)
    model.zero_grad()
    flow, v = model.flow_step(x, p, b, c, n["z0"], n["t"], None, n["eps_flow"])
    flow.backward()
    return {
        "encoder_outputs": tuple(enc),
        "context": ctx,
        "alpha": alpha,
        "nb_log_likelihood": nll,
        "vae_loss": vae,
        "vae_gradients": vae_grads,
        "flow_velocity": v,
        "flow_loss": flow,
        "flow_gradients": torch_grads(model),
    }


def train_torch(
    model: Any, dataset: Any, *, epochs: int, batch_size: int, seed: int, compile: bool = False
) -> dict[str, Any]:
    """Stage 1 in PyTorch with the seed's loop (``torch_ref.cfmvc.train_stage1``)."""
    from benchmarks.torch_ref.cfmvc import train_stage1

    c = model.config
    return train_stage1(model, dataset.arrays, epochs=epochs, batch_size=batch_size, lr=c.lr,
                        weight_decay=c.weight_decay, clip=c.grad_clip, seed=seed,
                        compile=compile)  # fmt: skip


def torch_loss(model: Any, batch: Mapping[str, Any]) -> Any:
    """The stage-1 loss (fresh reparameterisation noise) on a batch of tensors."""
    return model.vae_forward(batch["x"], batch["batch"], batch["cell_type"])[0]


def eval_loss_jax(model: Any, held: Mapping[str, Any]) -> Any:
    """The stage-1 loss at the posterior means (zero noise), deterministic."""
    import jax.numpy as jnp

    from jaxstab.models.cfmvc.losses import vae_terms

    n = held["x"].shape[0]
    zeros_i, zeros_t = jnp.zeros((n, model.dim_int)), jnp.zeros((n, model.dim_tech))
    return vae_terms(model, held, zeros_i, zeros_t, deterministic=True)[0]


def eval_loss_torch(model: Any, held: Mapping[str, Any]) -> float:
    """The same in PyTorch."""
    import torch

    n = held["x"].shape[0]
    loss, _, _ = model.vae_forward(held["x"], held["batch"], held["cell_type"],
                                   eps_int=torch.zeros(n, model.dim_int),
                                   eps_tech=torch.zeros(n, model.dim_tech))  # fmt: skip
    return float(loss)


SPEC = ModelSpec(
    name="cfmvc",
    entry="cfmvc",
    sizes=SIZES,
    presets=("default", "original"),
    stage="vae",
    data=data,
    build_torch=build_torch,
    name_map=name_map,
    inputs=inputs,
    outputs_jax=outputs_jax,
    outputs_torch=outputs_torch,
    train_torch=train_torch,
    torch_loss=torch_loss,
    eval_loss_jax=eval_loss_jax,
    eval_loss_torch=eval_loss_torch,
    seed_guards={"logvar_bound": "clip", "mean_bound": "clip"},
)
