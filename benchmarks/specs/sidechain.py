"""Side-chain model's benchmark spec: the port ``jaxstab.models.sidechain`` and
``benchmarks/torch_ref/sidechain.py``.

Data: the bundled DSSP chains of MDAnalysisTests (:func:`jaxstab.models.sidechain.default_data`,
40 training and 10 validation chains, padded to 173 residues), training chains first:

- ``small``: 8 training chains, batch 2, ``SideChainConfig.small()`` widths, windows of 24;
- ``full``: all 40 training chains, batch 4, the preset's own widths (c_s 384, c_z 128,
  6 blocks), windows of 64 residues;
- ``speed``: the first 8 training chains at the preset's widths, batch 2, windows of 64 (the
  speed suite's size: a full-width step takes seconds on a CPU);
- ``faults``: 24 training chains and the 8 first validation chains held out, batch 4, small
  widths, windows of 32, 4 epochs, 3 seeds (the stability suite's size, cut to what a CPU
  runs in half an hour).

Training draws a random window of ``max_len`` residues per chain and a design mask per step
(``sidechain_loss``). Parity and evaluation use fixed inputs: the central ``max_len`` residues
(``center_crop``) and a design mask drawn with a fixed key and the config's share range
(:func:`fixed_design`), the same arrays on both sides. The evaluation
loss is the full weighted training loss on the held-out chains.

Parity compares ``SideChainConfig.default()`` and ``original()``: predicted atoms, sequence
logits, the loss and its gradient for every parameter, at the PyTorch version's initial
weights plus noise (:func:`parity_weights`). The speed and stability suites train
the single stage ``"all"``. The PyTorch version needs no seed guards: the original's one guard,
the clamp of the updated log-scale, is ``log_scale_clip="hard"`` on both sides.

Example:
  >>> SPEC.stage, SPEC.presets, sorted(SPEC.sizes)
  ('all', ('default', 'original'), ['faults', 'full', 'small', 'speed'])
  >>> fixed_design(np.ones((1, 6), np.float32), 1.0, 1.0).tolist()
  [[True, True, True, True, True, True]]
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.specs.base import ModelSpec, as_numpy
from benchmarks.specs.sidechain_names import name_map, optional_keys

_SMALL = {"c_s": 32, "c_z": 16, "n_blocks": 2, "n_heads": 4, "c_hidden": 8,
          "n_qk_gaussians": 2, "n_v_points": 4, "seq_heads": 2, "seq_layers": 1,
          "c_pos_emb": 16, "c_timestep_emb": 8, "edge_feat_dim": 8, "sidechain_hidden": 32,
          "seq_head_layers": 1, "backbone_rbf": 4}  # fmt: skip
SIZES: dict[str, dict[str, Any]] = {
    "small": {"n_train": 8, "batch_size": 2, "config": {**_SMALL, "max_len": 24}},
    "full": {"n_train": 40, "batch_size": 4, "config": {"max_len": 64}},
    "speed": {"n_train": 8, "batch_size": 2, "config": {"max_len": 64}},
    "faults": {"n_train": 24, "n_eval": 8, "batch_size": 4, "epochs": 4, "seeds": 3,
               "config": {**_SMALL, "max_len": 32}},
}  # fmt: skip
DESIGN_SEED = 0
PARITY_NOISE = 0.1
# Gradients that are 0 in exact arithmetic: the attention's pair bias ``linear_b`` and the
# per-head Gaussian-term bias add the same number to every logit of a query's row, which the
# softmax ignores.
ZERO_GRADIENTS = ("trunk.iga_*.linear_b.bias", "trunk.iga_*.geo_bias")


@functools.lru_cache(maxsize=4)
def data(size: str, seed: int) -> Any:
    """The first ``n_train`` training chains, then (size ``faults``) the first ``n_eval``
    validation chains (fixed; ``seed`` does not change them)."""
    from jaxstab.models.sidechain import default_data
    from jaxstab.plugin import Dataset

    settings = SPEC.size(size)
    train = default_data("train")
    arrays = {k: np.asarray(v)[: settings["n_train"]] for k, v in train.arrays.items()}
    if "n_eval" in settings:
        val = default_data("val").arrays
        arrays = {k: np.concatenate([v, np.asarray(val[k])[: settings["n_eval"]]])
                  for k, v in arrays.items()}  # fmt: skip
    return Dataset(arrays, {"split": train.meta["split_rule"]})


def fixed_design(residue_mask: Any, mask_min: float, mask_max: float) -> Any:
    """A design mask ``[n, L]`` bool: ``jaxstab.models.sidechain.design_mask`` with the fixed
    key ``jax.random.key(DESIGN_SEED)`` (traceable; the same on both sides)."""
    import jax

    from jaxstab.models.sidechain import design_mask

    return design_mask(jax.random.key(DESIGN_SEED), residue_mask, mask_min, mask_max)


def fixed_batch(arrays: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """The central ``config.max_len`` residues of ``arrays`` with :func:`fixed_design`
    (JAX arrays; traceable)."""
    from jaxstab.models.sidechain import center_crop

    out = center_crop(dict(arrays), config.max_len)
    out["design_mask"] = fixed_design(out["residue_mask"], config.mask_min, config.mask_max)
    return out


def parity_weights(model: Any, seed: int) -> None:
    """Adds ``PARITY_NOISE · N(0, 1)`` (``torch.Generator`` seeded ``seed + 1``) to every
    parameter: the sequence head's last layer, ``post_tfmr`` and the Gaussian updates start
    at zero, so at the initial weights the logits are exactly 0 and half the trunk is idle."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(PARITY_NOISE * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def build_torch(size: str, preset: str, seed: int, **changes: Any) -> Any:
    """``benchmarks.torch_ref.sidechain.SideChainTorch`` at the same sizes and config."""
    import torch

    from benchmarks.torch_ref.sidechain import SideChainTorch

    config = SPEC.config(size, preset).replace(**changes)
    torch.manual_seed(seed)
    return SideChainTorch(config)


def inputs(size: str, seed: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` chains as a :func:`fixed_batch` (fixed; ``seed`` unused)."""
    n = SPEC.size(size)["batch_size"]
    arrays = {k: v[:n] for k, v in data(size, seed).arrays.items()}
    return {k: np.asarray(v) for k, v in fixed_batch(arrays, SPEC.config(size)).items()}


def outputs_jax(model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Predicted atoms, sequence logits, the loss and its gradient by state-dict key."""
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.convert import nnx_to_state_dict
    from jaxstab.models.sidechain import loss_terms

    batch = {k: jnp.asarray(v) for k, v in inputs.items()}

    def loss_fn(m: Any) -> Any:
        out = m(batch)
        return loss_terms(out, batch, m.config)[0], out

    (loss, out), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    return {"atom14_pos": out["atom14_pos"], "aatype_logits": out["aatype_logits"],
            "loss": loss, "gradients": nnx_to_state_dict(grads, name_map)}  # fmt: skip


def outputs_torch(model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The same quantities from the PyTorch version."""
    from benchmarks.convert import torch_grads
    from benchmarks.torch_ref.sidechain import loss_terms
    from benchmarks.torch_ref.sidechain_data import batch_to_tensors

    batch = batch_to_tensors(inputs)
    model.zero_grad()
    out = model(batch)
    loss = loss_terms(out, batch, model.config)[0]
    loss.backward()
    return {"atom14_pos": out["atom14_pos"].detach(),
            "aatype_logits": out["aatype_logits"].detach(), "loss": loss.detach(),
            "gradients": torch_grads(model)}  # fmt: skip


def train_torch(
    model: Any, dataset: Any, *, epochs: int, batch_size: int, seed: int, compile: bool = False
) -> dict[str, Any]:
    """The PyTorch version's own loop (``torch_ref.sidechain.train``; AdamW, clip, its
    non-finite check every 10 steps)."""
    from benchmarks.torch_ref.sidechain import train

    return train(model, dataset.arrays, epochs=epochs, batch_size=batch_size, seed=seed,
                 compile=compile)  # fmt: skip


def torch_loss(model: Any, batch: Mapping[str, Any]) -> Any:
    """The training loss on a batch of padded tensors: a random window of ``max_len``
    residues per chain and a design mask, both drawn from PyTorch's global generator (seeded
    by :func:`build_torch`)."""
    import torch

    from benchmarks.torch_ref.sidechain import loss_terms
    from benchmarks.torch_ref.sidechain_data import batch_to_tensors, design_mask, random_crop

    c = model.config
    arrays = as_numpy(batch)
    arrays = random_crop(arrays, c.max_len)
    tensors = batch_to_tensors(arrays, next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, ())))
    tensors["design_mask"] = design_mask(tensors["residue_mask"], c.mask_min, c.mask_max, gen)
    return loss_terms(model(tensors), tensors, c)[0]


def eval_loss_jax(model: Any, held: Mapping[str, Any]) -> Any:
    """The weighted loss on the held-out chains as a :func:`fixed_batch` (eval mode;
    traceable)."""
    from jaxstab.models.sidechain import loss_terms

    batch = fixed_batch(held, model.config)
    return loss_terms(model(batch), batch, model.config)[0]


def eval_loss_torch(model: Any, held: Mapping[str, Any]) -> float:
    """The same in PyTorch."""
    import torch

    from benchmarks.torch_ref.sidechain import loss_terms
    from benchmarks.torch_ref.sidechain_data import batch_to_tensors

    arrays = as_numpy(held)
    batch = batch_to_tensors(fixed_batch(arrays, model.config), next(model.parameters()).dtype)
    with torch.no_grad():
        return float(loss_terms(model(batch), batch, model.config)[0])


SPEC = ModelSpec(
    name="sidechain",
    entry="sidechain",
    sizes=SIZES,
    presets=("default", "original"),
    stage="all",
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
    optional_keys=optional_keys,
    parity_weights=parity_weights,
    zero_gradients=ZERO_GRADIENTS,
)
