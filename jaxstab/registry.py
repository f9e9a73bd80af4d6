"""Model registry: what ``jaxstab diagnose`` and ``jaxstab train`` need to know about a model.

Each model package registers one :class:`ModelEntry` (in its ``train.py``); the CLI looks the
entry up by name, so a new port plugs in without touching the CLI.

Example:
  >>> from jaxstab import registry
  >>> "cfmvc" in registry.names()
  True
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

# loss_fn(model, batch, key) -> (scalar loss, {term name: scalar}); pure and jittable.
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Validated training data: per-example arrays with a shared leading axis, plus metadata.

    ``arrays`` holds numpy arrays (moved to the device once by the training loop); ``meta``
    holds sizes and vocabularies the model builder needs (``n_genes``, category names, ...).
    """

    arrays: Mapping[str, np.ndarray]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {k: np.shape(v)[0] for k, v in self.arrays.items()}
        if len(set(sizes.values())) > 1:
            first = next(iter(sizes))
            bad = next(k for k, n in sizes.items() if n != sizes[first])
            raise ValueError(
                f"Dataset field {bad!r} has {sizes[bad]} rows but {first!r} has {sizes[first]}"
            )

    def __len__(self) -> int:
        return int(np.shape(next(iter(self.arrays.values())))[0])


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """Everything the generic training loop and the diagnosis report need for one model.

    Attributes:
      name: registry name (``cfmvc``, ``e3gnn``, ``sidechain``, ``genoflow``).
      default_data: ``seed -> Dataset``; bundled data that needs no download.
      load_data: ``path -> Dataset``; validates before returning and raises ``ValueError``
        naming the field and the first bad index.
      build_model: ``(dataset, config, rngs) -> nnx.Module``.
      loss_fn: ``(model, batch, key) -> (loss, aux)``, aux a dict of scalar loss terms.
      default_config: model keyword arguments and training defaults (``epochs``,
        ``batch_size``, ``lr``, ``weight_decay``, ``grad_clip``).
      feature_stats: ``batch -> {name: scalar}``, jittable, a few dozen input statistics at most
        (``x_col0_min`` ...), recorded every step into ``input_features.csv``.
      optimizer: optional ``(config) -> optax.GradientTransformation`` for the inner optimizer
        (default AdamW with ``lr`` and ``weight_decay``).
    """

    name: str
    default_data: Callable[[int], Dataset]
    load_data: Callable[[str], Dataset]
    build_model: Callable[[Dataset, Mapping[str, Any], nnx.Rngs], nnx.Module]
    loss_fn: LossFn
    default_config: Mapping[str, Any]
    feature_stats: Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]
    optimizer: Callable[[Mapping[str, Any]], Any] | None = None


# name -> "module:attribute" of its ModelEntry; imported only when asked for.
_ENTRIES: dict[str, str] = {
    "cfmvc": "models.cfmvc.train:ENTRY",
}
_EXTRA: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> None:
    """Registers ``entry`` under ``entry.name`` (replacing an earlier one of that name)."""
    _EXTRA[entry.name] = entry


def names() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted({*_ENTRIES, *_EXTRA})


def get(name: str) -> ModelEntry:
    """Returns the entry for ``name``; ``KeyError`` with the known names if there is none."""
    if name in _EXTRA:
        return _EXTRA[name]
    if name not in _ENTRIES:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}")
    module, attr = _ENTRIES[name].split(":")
    return getattr(importlib.import_module(module), attr)
