"""E3 GNN's benchmark spec: the port ``jaxstab.models.e3gnn`` and ``benchmarks/torch_ref/e3gnn.py``.

Data: RDKit's bundled EGFR ligands (``egfr.sdf``, 365 molecules with hydrogens, MMFF94 terms,
Morgan count targets; :func:`jaxstab.models.e3gnn.default_data`), the first molecules of the
file at each size:

- ``small``: 24 molecules, batch 4, ``E3GNNConfig.small()`` widths;
- ``full``: all 365, batch 8, the preset's own widths (6 layers, ``32x0e+16x1o+8x2e``);
- ``speed``: the first 32 at the preset's widths, batch 8 (the speed suite's size: a full-width
  step takes seconds on a CPU);
- ``faults``: 40 molecules (the last 8 held out), batch 8, small widths, no dropout, 4 epochs,
  3 seeds (the stability suite's size, cut to what a CPU runs in half an hour).

Parity compares ``E3GNNConfig.default()`` and ``E3GNNConfig.original()``: the embedding, the
cosine loss and its gradient for every parameter. The speed and stability suites train the
single stage ``"all"``; the PyTorch version's seed guards are the seed's branch weights
``exp(clamp(raw, -5, 5))``.

Example:
  >>> SPEC.stage, SPEC.presets, sorted(SPEC.sizes)
  ('all', ('default', 'original'), ['faults', 'full', 'small', 'speed'])
  >>> name_map(("bonded_mp_layers", 0, "radial_mlp", "layers", 4, "kernel"))
  'bonded_mp_layers.0.radial_mlp.4.weight'
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.specs.base import ModelSpec, as_numpy

_SMALL = {"num_layers": 2, "hidden_irreps": "8x0e+4x1o+2x2e", "embed_hidden": 16,
          "num_radial": 4, "radial_hidden": 16, "branch_hidden": 16,
          "pooling_hidden": 16}  # fmt: skip
SIZES: dict[str, dict[str, Any]] = {
    "small": {"n_molecules": 24, "batch_size": 4, "config": _SMALL},
    "full": {"n_molecules": 365, "batch_size": 8},
    "speed": {"n_molecules": 32, "batch_size": 8},
    "faults": {"n_molecules": 40, "n_eval": 8, "batch_size": 8, "epochs": 4, "seeds": 3,
               "config": {**_SMALL, "dropout": 0.0}},
}  # fmt: skip
# State-dict entries the port computes instead of storing: the Bessel frequencies n·π; e3nn's
# buffers (which output channels a path reaches, the Wigner 3j tables of its compiled tensor
# products); the branch weights of weight_param "fixed" (buffers on the PyTorch side); and the
# empty weight and bias placeholders of e3nn modules.
_COMPUTED_SUFFIXES = (".bessel_basis.frequencies", ".output_mask")
_BRANCH_KEYS = ("angle_weight", "dihedral_weight", "nonbonded_weight")
_E3NN_MODULES = (".irreps_projection.", ".linear_in.", ".self_connection.", ".tp.",
                 ".nonlinearity.mul.")  # fmt: skip


def optional_keys(key: str) -> bool:
    """Whether ``key`` is a state-dict entry the port may lack (see ``_COMPUTED_SUFFIXES``).

    A ``.weight`` or ``.bias`` is optional only on e3nn modules (those of ``_E3NN_MODULES``
    and a message layer's ``output_projection``), whose non-empty weights are also parameters
    of the port, so a missing one still fails.

    >>> optional_keys("bonded_mp_layers.3.bessel_basis.frequencies")
    True
    >>> optional_keys("pooling_mlp.0.bias")
    False
    """
    if key in _BRANCH_KEYS or "._w3j_" in key or key.endswith(_COMPUTED_SUFFIXES):
        return True
    owner, _, leaf = key.rpartition(".")
    owner += "."
    is_e3nn = any(m in owner for m in _E3NN_MODULES) or (
        "_mp_layers." in owner and owner.endswith(".output_projection.")
    )
    return is_e3nn and leaf in ("weight", "bias")


def name_map(path: tuple) -> str:
    """The port's NNX path → the original's state-dict key.

    Sequential layers drop NNX's ``layers`` level (their indices are the original's
    ``nn.Sequential`` indices); Linear ``kernel`` and LayerNorm ``scale`` are ``weight``.
    """
    names = {"kernel": "weight", "scale": "weight"}
    parts = [str(p) for p in path if p != "layers"]
    parts[-1] = names.get(parts[-1], parts[-1])
    return ".".join(parts)


@functools.lru_cache(maxsize=4)
def data(size: str, seed: int) -> Any:
    """The first ``n_molecules`` of the EGFR set (fixed; ``seed`` does not change it)."""
    from jaxstab.models.e3gnn import default_data
    from jaxstab.plugin import Dataset

    full = default_data()
    n = SPEC.size(size)["n_molecules"]
    return Dataset({k: v[:n] for k, v in full.arrays.items()}, dict(full.meta))


def build_torch(size: str, preset: str, seed: int, **changes: Any) -> Any:
    """``benchmarks.torch_ref.e3gnn.E3GNNTorch`` at the same sizes and config."""
    import torch

    from benchmarks.torch_ref.e3gnn import E3GNNTorch

    config = SPEC.config(size, preset).replace(**changes)
    torch.manual_seed(seed)
    return E3GNNTorch(config)


def inputs(size: str, seed: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` molecules (fixed; ``seed`` does not change them)."""
    n = SPEC.size(size)["batch_size"]
    return {k: v[:n] for k, v in data(size, seed).arrays.items()}


def outputs_jax(model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Embedding, the cosine loss and its gradient by state-dict key."""
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.convert import nnx_to_state_dict
    from jaxstab.models.e3gnn.losses import embedding_loss

    batch = {k: jnp.asarray(v) for k, v in inputs.items()}

    def loss_fn(m: Any) -> Any:
        pred = m(batch)
        return embedding_loss(pred, batch["target"], m.config)[1]["cosine"], pred

    (loss, emb), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    return {"embedding": emb, "loss": loss, "gradients": nnx_to_state_dict(grads, name_map)}


def outputs_torch(model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The same quantities from the PyTorch version."""
    import torch

    from benchmarks.convert import torch_grads
    from benchmarks.torch_ref.e3gnn import batch_to_graph, cosine_loss

    graph = batch_to_graph(inputs)
    with torch.no_grad():
        emb = model(graph)
    model.zero_grad()
    loss = cosine_loss(model(graph), torch.as_tensor(np.array(inputs["target"])))
    loss.backward()
    return {"embedding": emb, "loss": loss, "gradients": torch_grads(model)}


def train_torch(
    model: Any, dataset: Any, *, epochs: int, batch_size: int, seed: int, compile: bool = False
) -> dict[str, Any]:
    """The PyTorch version's own loop with the original's guards (``torch_ref.e3gnn.train``)."""
    from benchmarks.torch_ref.e3gnn import train

    c = model.config
    return train(model, dataset.arrays, epochs=epochs, batch_size=batch_size, seed=seed,
                 compile=compile, lr=c.lr, weight_decay=c.weight_decay,
                 clip=c.grad_clip)  # fmt: skip


def torch_loss(model: Any, batch: Mapping[str, Any]) -> Any:
    """The training loss (``config.loss``) on a batch of padded tensors."""
    import torch

    from benchmarks.torch_ref.e3gnn import batch_to_graph, loss

    arrays = as_numpy(batch)
    return loss(model, batch_to_graph(arrays), torch.as_tensor(arrays["target"]))


def eval_loss_jax(model: Any, held: Mapping[str, Any]) -> Any:
    """The cosine loss on the held-out molecules (eval mode)."""
    from jaxstab.models.e3gnn.losses import embedding_loss

    return embedding_loss(model(held), held["target"], model.config)[1]["cosine"]


def eval_loss_torch(model: Any, held: Mapping[str, Any]) -> float:
    """The same in PyTorch."""
    import torch

    from benchmarks.torch_ref.e3gnn import batch_to_graph, cosine_loss

    arrays = as_numpy(held)
    with torch.no_grad():
        return float(cosine_loss(model(batch_to_graph(arrays)), torch.as_tensor(arrays["target"])))


SPEC = ModelSpec(
    name="e3gnn",
    entry="e3gnn",
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
    seed_guards={"weight_param": "exp_clamp"},
    optional_keys=optional_keys,
)
