"""GenoFlow's benchmark spec: the port ``jaxstab.models.genoflow`` and
``benchmarks/torch_ref/genoflow.py``.

Data: :func:`jaxstab.models.genoflow.data.simulate` (branching NB time course with its true
gene graph, 2 conditions), loaded by ``load_anndata``, the cells then shuffled by the seed (the
simulator orders them by time point; shuffled, the parity batch and the held-out cells mix
time points and conditions):

- ``small``: 3 time points x 24 cells x 30 genes (3 regulators, so targets have several
  in-edges), batch 16, ``GenoFlowConfig.small()`` widths;
- ``full``: the default data (5 time points x 300 cells x 200 genes), batch 32, the preset's
  own widths (the original's: encoder 512, vector field 64 x 2 heads); 47 steps per epoch,
  which the speed suite times;
- ``faults``: 4 time points x 128 cells x 50 genes (the last 128 shuffled cells held out),
  batch 32, small widths and no dropout.

Parity compares ``GenoFlowConfig.default()`` and ``GenoFlowConfig.original()``: encoder outputs
(mean, log-variance) in eval mode, decoder mean and dispersion at a fixed latent, the per-entry
NB log-likelihood, the stage-``vae`` loss and its terms, its gradients (encoder, decoder,
discriminator), the GATv2 gene features, the velocity, the flow loss and its gradients
(vector field). :func:`parity_weights` puts noise on the weights that start at zero or one
(every bias, BatchNorm's scale), so they take part.

BatchNorm's running statistics are buffers, not parameters: :meth:`ModelSpec.convert` (the
suites' converter) fills the port's ``Param`` state only, so :func:`optional_keys` accepts
``running_mean`` / ``running_var`` there, and the parity suite compares both sides at their
initial statistics (0 and 1 on both). ``benchmarks.torch_ref.genoflow.torch_state_dict_to_nnx``
converts the statistics too (the parity test checks eval mode with trained ones).

The speed and stability suites train stage ``"vae"`` (its PyTorch loop:
``torch_ref.genoflow.train_stage1``, the original's two optimizers per batch). The PyTorch
version's seed guards are the original's loss formulas (``kl="clamp"``, ``nb="original"``).

Example:
  >>> SPEC.stage, SPEC.presets, sorted(SPEC.sizes)
  ('vae', ('default', 'original'), ['faults', 'full', 'small'])
  >>> name_map(("encoder", "fc_4", "scale")), optional_keys("encoder.fc.4.running_var")
  ('encoder.fc.4.weight', True)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.specs.base import ModelSpec, as_numpy

_SMALL_WIDTHS = {"latent_dim": 4, "hidden_encoder": 32, "hidden_decoder": 32, "hidden_disc": 16,
                 "gene_dim": 8, "time_dim": 8, "cond_dim": 8, "hidden_flow": 32}  # fmt: skip
_NO_DROPOUT = {"disc_dropout": 0.0, "gat_dropout": 0.0, "flow_dropout": 0.0}
SIZES: dict[str, dict[str, Any]] = {
    "small": {"n_cells": 72, "n_time_points": 3, "n_genes": 30, "n_conditions": 2,
              "n_regulators": 3, "batch_size": 16, "config": _SMALL_WIDTHS},
    "full": {"n_cells": 1500, "n_time_points": 5, "n_genes": 200, "n_conditions": 2,
             "batch_size": 32},
    "faults": {"n_cells": 512, "n_eval": 128, "n_time_points": 4, "n_genes": 50,
               "n_conditions": 2, "batch_size": 32,
               "config": {**_SMALL_WIDTHS, **_NO_DROPOUT}},
}  # fmt: skip
_BUFFERS = (".running_mean", ".running_var", ".num_batches_tracked")


def optional_keys(key: str) -> bool:
    """State-dict entries the port's ``Param`` state lacks: BatchNorm's buffers and the raw
    gene graph ``vector_field.edge_index`` (the port holds it with self loops, as a
    non-``Param`` variable).

    >>> optional_keys("vector_field.edge_index"), optional_keys("vector_field.gat.att")
    (True, False)
    """
    return key.endswith(_BUFFERS) or key == "vector_field.edge_index"


def name_map(path: tuple) -> str:
    """GenoFlow's NNX path → state-dict key (``benchmarks.torch_ref.genoflow.nnx_name``)."""
    from benchmarks.torch_ref.genoflow import nnx_name

    return nnx_name(path)


@functools.lru_cache(maxsize=16)
def data(size: str, seed: int) -> Any:
    """The simulated cells at ``size``, shuffled by ``seed`` (cached: callers must not change
    the arrays)."""
    from jaxstab.models.genoflow.data import load_anndata, simulate
    from jaxstab.plugin import Dataset

    s = SPEC.size(size)
    t = s["n_time_points"]
    adata = simulate(s["n_cells"] // t, s["n_genes"], n_time_points=t,
                     n_conditions=s["n_conditions"], n_regulators=s.get("n_regulators"),
                     seed=seed)  # fmt: skip
    loaded = load_anndata(adata)
    order = np.random.default_rng(seed).permutation(len(loaded))
    return Dataset({k: np.asarray(v)[order] for k, v in loaded.arrays.items()}, loaded.meta)


def build_torch(size: str, preset: str, seed: int, **changes: Any) -> Any:
    """``benchmarks.torch_ref.genoflow.GenoFlowModel`` on ``data(size, seed)``'s genes,
    conditions, gene graph and time points, with the same config."""
    import torch

    from benchmarks.torch_ref.genoflow import GenoFlowModel

    meta = data(size, seed).meta
    config = SPEC.config(size, preset).replace(**changes)
    torch.manual_seed(seed)
    return GenoFlowModel(meta["n_genes"], meta["n_conditions"], np.asarray(meta["gene_graph"]),
                         config, time_points=meta["time_points"])  # fmt: skip


def parity_weights(model: Any, seed: int) -> None:
    """Noise N(0, 0.1) on every bias (the GATv2's starts at zero) and on BatchNorm's scale
    (starts at one), in place."""
    import torch

    gen = torch.Generator().manual_seed(1000 + seed)
    bn_scales = {f"encoder.fc.{i}.weight" for i in (1, 4)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in bn_scales:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def inputs(size: str, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """The first ``batch_size`` (shuffled) cells and the noise both sides are given."""
    n = SPEC.size(size)["batch_size"]
    latent = SPEC.config(size).latent_dim
    rng = np.random.default_rng(seed)
    f32 = np.float32
    noise = {
        "eps": rng.normal(size=(n, latent)).astype(f32),  # reparameterisation
        "z": rng.normal(size=(n, latent)).astype(f32),  # the decoder's input
        "z0": rng.normal(size=(n, latent)).astype(f32),
        "z1": rng.normal(size=(n, latent)).astype(f32),
        "t": rng.uniform(size=n).astype(f32),
    }
    arrays = {k: np.array(v[:n]) for k, v in data(size, seed).arrays.items()}
    return {"arrays": arrays, "noise": noise}


def _flow_batch(flow_times: tuple[float, ...], arrays: Mapping[str, Any], noise: Mapping) -> dict:
    # Each cell flows from its own time point (the last one from the one before) to the next.
    k = np.minimum(np.asarray(arrays["time"]), len(flow_times) - 2)
    tau = np.asarray(flow_times, np.float32)
    return {"z0": noise["z0"], "z1": noise["z1"], "condition": np.asarray(arrays["condition"]),
            "tau0": tau[k], "tau1": tau[k + 1]}  # fmt: skip


def outputs_jax(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The port's quantities (forward values, both stages' losses and gradients)."""
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.convert import nnx_to_state_dict
    from jaxstab.models.genoflow.losses import flow_terms, nb_log_likelihood, vae_terms

    a, n = inputs["arrays"], inputs["noise"]
    jb = {k: jnp.asarray(v) for k, v in a.items()}
    fb = {k: jnp.asarray(v) for k, v in _flow_batch(model.flow_times(), a, n).items()}
    eps, z, t = jnp.asarray(n["eps"]), jnp.asarray(n["z"]), jnp.asarray(n["t"])
    c = model.config

    @nnx.jit  # one program for every quantity: one compilation per preset
    def quantities(m: Any) -> Any:
        enc = m.encoder(jnp.log1p(jb["x"]), jb["condition"])
        mean, theta = m.decoder(z, jb["condition"], jb["library"])
        ll = nb_log_likelihood(jb["x"], mean, jnp.clip(theta, *c.theta_bounds)[None], c.nb)
        z_t = fb["z0"] + t[:, None] * (fb["z1"] - fb["z0"])
        v = m.velocity(fb["tau0"] + t * (fb["tau1"] - fb["tau0"]), z_t, fb["condition"])
        vae = nnx.value_and_grad(lambda inner: vae_terms(inner, jb, eps), has_aux=True)(m)
        flow = nnx.value_and_grad(lambda inner: flow_terms(inner, fb, t)[0])(m)
        return enc, (mean, theta), ll, m.vector_field.gene_features(), v, vae, flow

    enc, dec, ll, genes, v, ((vae, aux), vae_grads), (flow, flow_grads) = quantities(model)
    groups = ("encoder", "decoder", "discriminator")
    return {
        "encoder_outputs": tuple(enc),
        "decoder_outputs": dec,
        "nb_log_likelihood": ll,
        "vae_loss": vae,
        "vae_recon": aux["recon"],
        "vae_kl": aux["kl"],
        "vae_total": aux["vae_total"],
        "disc_ce": aux["disc_ce"],
        "vae_gradients": nnx_to_state_dict(vae_grads, name_map, groups=groups),
        "gat_features": genes,
        "flow_velocity": v,
        "flow_loss": flow,
        "flow_gradients": nnx_to_state_dict(flow_grads, name_map, groups=("vector_field",)),
    }


def outputs_torch(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The same quantities from the PyTorch version."""
    import torch

    from benchmarks.convert import torch_grads
    from benchmarks.torch_ref.genoflow import nb_log_likelihood

    a = {k: torch.as_tensor(v) for k, v in inputs["arrays"].items()}
    n = {k: torch.as_tensor(v) for k, v in inputs["noise"].items()}
    fb = {k: torch.as_tensor(v) for k, v in
          _flow_batch(model.flow_times(), inputs["arrays"], inputs["noise"]).items()}  # fmt: skip
    fb["condition"] = fb["condition"].long()
    x, cond, lib = a["x"], a["condition"].long(), a["library"]
    c = model.config
    with torch.no_grad():
        enc = model.encoder(torch.log1p(x), cond)
        mean, theta = model.decoder(n["z"], cond, lib)
        ll = nb_log_likelihood(x, mean, torch.clamp(theta, *c.theta_bounds)[None], c.nb)
        genes = model.vector_field.gene_features()
        t = n["t"]
        z_t = fb["z0"] + t[:, None] * (fb["z1"] - fb["z0"])
        v = model.velocity(fb["tau0"] + t * (fb["tau1"] - fb["tau0"]), z_t, fb["condition"])
    model.zero_grad()
    vae, aux = model.vae_terms(x, cond, lib, n["eps"])
    vae.backward()
    vae_grads = torch_grads(model)
    model.zero_grad()
    flow, _ = model.flow_terms(fb["z0"], fb["z1"], fb["condition"], fb["tau0"], fb["tau1"], t)
    flow.backward()
    return {
        "encoder_outputs": tuple(enc),
        "decoder_outputs": (mean, theta),
        "nb_log_likelihood": ll,
        "vae_loss": vae,
        "vae_recon": aux["recon"],
        "vae_kl": aux["kl"],
        "vae_total": aux["vae_total"],
        "disc_ce": aux["disc_ce"],
        "vae_gradients": vae_grads,
        "gat_features": genes,
        "flow_velocity": v,
        "flow_loss": flow,
        "flow_gradients": torch_grads(model),
    }


def train_torch(
    model: Any, dataset: Any, *, epochs: int, batch_size: int, seed: int, compile: bool = False
) -> dict[str, Any]:
    """Stage ``vae`` in PyTorch with the original's loop (``torch_ref.genoflow.train_stage1``:
    discriminator step, then VAE step, every guard of ``GUARDS``)."""
    from benchmarks.torch_ref.genoflow import train_stage1

    c = model.config
    return train_stage1(model, dataset.arrays, epochs=epochs, batch_size=batch_size, lr=c.lr,
                        clip=c.grad_clip, seed=seed, compile=compile)  # fmt: skip


def torch_loss(model: Any, batch: Mapping[str, Any]) -> Any:
    """Stage ``vae``'s loss (fresh reparameterisation noise) on a batch of tensors."""
    return model.vae_terms(batch["x"], batch["condition"], batch["library"])[0]


def eval_loss_jax(model: Any, held: Mapping[str, Any]) -> Any:
    """Stage ``vae``'s loss at the posterior means (zero noise; eval mode), deterministic."""
    import jax.numpy as jnp

    from jaxstab.models.genoflow.losses import vae_terms

    eps = jnp.zeros((held["x"].shape[0], model.config.latent_dim))
    return vae_terms(model, held, eps)[0]


def eval_loss_torch(model: Any, held: Mapping[str, Any]) -> float:
    """The same in PyTorch."""
    import torch

    arrays = {k: torch.as_tensor(v) for k, v in as_numpy(held).items()}
    eps = torch.zeros(arrays["x"].shape[0], model.config.latent_dim)
    with torch.no_grad():
        return float(model.vae_terms(arrays["x"], arrays["condition"], arrays["library"], eps)[0])


SPEC = ModelSpec(
    name="genoflow",
    entry="genoflow",
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
    seed_guards={"kl": "clamp", "nb": "original"},
    optional_keys=optional_keys,
    parity_weights=parity_weights,
)
