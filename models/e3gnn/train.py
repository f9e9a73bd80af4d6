"""E3 GNN training on the library's loop, and the model's plugin entry ``ENTRY``.

:func:`train_e3gnn` builds an encoder sized for the data and trains every parameter group on
``config.loss`` with :func:`jaxstab.train.stages.run_stage`: the stability guard (clip at
``grad_clip``) around AdamW (``lr``, ``weight_decay``), the chain ``jaxstab diagnose --model
e3gnn`` trains with.

Example:
  >>> import jax
  >>> from jaxstab.models.e3gnn.config import E3GNNConfig
  >>> from jaxstab.models.e3gnn.data import default_data
  >>> data = default_data()
  >>> small = {k: v[:16] for k, v in data.arrays.items()}
  >>> out = train_e3gnn(small, epochs=1, key=jax.random.key(0), config=E3GNNConfig.small())
  >>> out.fit.status
  'ok'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxstab.models.e3gnn import losses
from jaxstab.models.e3gnn.config import E3GNNConfig
from jaxstab.models.e3gnn.data import default_data, load_sdf
from jaxstab.models.e3gnn.model import E3PocketEncoder
from jaxstab.plugin import Dataset, ModelEntry, Stage
from jaxstab.train.stages import StageResult, run_stage

__all__ = ["ENTRY", "STAGE", "as_config", "build_model", "feature_stats", "train_e3gnn"]

STAGE = Stage(name="all", loss_fn=losses.e3gnn_loss)
INPUT_COLUMNS = ("charge", "atomic_number", "mass")


def as_config(config: E3GNNConfig | Mapping[str, Any] | None) -> E3GNNConfig:
    """An :class:`E3GNNConfig` from a config, ``None`` (the default) or a dict of its fields.

    >>> as_config({"num_layers": 3}).num_layers
    3
    """
    if config is None:
        return E3GNNConfig.default()
    if isinstance(config, E3GNNConfig):
        return config
    return E3GNNConfig.from_dict(config)


def build_model(
    dataset: Dataset | Mapping[str, Any],
    config: E3GNNConfig | Mapping[str, Any] | None,
    rngs: nnx.Rngs,
) -> E3PocketEncoder:
    """An encoder sized for ``dataset`` (its attribute column counts and target size).

    >>> from flax import nnx
    >>> from jaxstab.models.e3gnn.data import default_data
    >>> build_model(default_data(), {"num_layers": 1}, nnx.Rngs(0)).config.output_dim
    1536
    """
    arrays = getattr(dataset, "arrays", dataset)
    c = as_config(config)
    target_dim = int(arrays["target"].shape[-1])
    if target_dim != c.output_dim:
        c = c.replace(output_dim=target_dim)
    return E3PocketEncoder(
        c,
        rngs=rngs,
        input_dim=int(arrays["x"].shape[-1]),
        bond_attr_dim=int(arrays["bond_attr"].shape[-1]),
        angle_attr_dim=int(arrays["angle_attr"].shape[-1]),
        torsion_attr_dim=int(arrays["torsion_attr"].shape[-1]),
        nb_attr_dim=int(arrays["nb_attr"].shape[-1]),
    )


def train_e3gnn(
    data: Dataset | Mapping[str, Any] | str,
    *,
    key: jax.Array,
    config: E3GNNConfig | Mapping[str, Any] | None = None,
    model: E3PocketEncoder | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> StageResult:
    """Trains an encoder on ``data`` (a ``Dataset``, its arrays, or an SDF path).

    Settings not given come from the config (``epochs``, ``batch_size``, ``lr``,
    ``weight_decay``, ``grad_clip``, ``explosion_norm``); ``fit_kwargs`` go to
    :func:`jaxstab.train.fit`. ``result.fit.model`` is the trained encoder.
    """
    if isinstance(data, str):
        data = load_sdf(data)
    k_init, k_train = jax.random.split(key)
    if model is None:
        seed = int(jax.random.randint(k_init, (), 0, 2**31 - 1))
        model = build_model(data, config, nnx.Rngs(params=seed, dropout=seed + 1))
    c: E3GNNConfig = model.config
    fit_kwargs.setdefault("explosion_norm", c.explosion_norm)
    return run_stage(
        model,
        STAGE,
        data,
        inner=optax.adamw(c.lr, weight_decay=c.weight_decay),
        loss_fn=losses.e3gnn_loss,
        batch_size=c.batch_size if batch_size is None else batch_size,
        epochs=c.epochs if epochs is None else epochs,
        key=k_train,
        clip=c.grad_clip or None,
        **fit_kwargs,
    )


def feature_stats(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Seed 001's input statistics of a batch (real atoms only): min / mean / max / std of
    each input column (charge, atomic number, mass, as scaled by the loader) and the spread
    of the positions (root-mean-square distance of the atoms from their molecule's centroid,
    Å: mean and max over the batch's molecules). 14 values.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 2, 3)); pos = jnp.array([[[0.0, 0, 0], [2.0, 0, 0]]])
    >>> stats = feature_stats({"x": x, "pos": pos, "atom_mask": jnp.ones((1, 2), bool)})
    >>> len(stats), float(stats["charge_mean"]), float(stats["pos_spread_max"])
    (14, 1.0, 1.0)
    """
    mask = jnp.asarray(batch["atom_mask"]).astype(jnp.float32)
    x = jnp.asarray(batch["x"], jnp.float32)
    real = mask[..., None] > 0
    count = jnp.maximum(jnp.sum(mask), 1.0)
    out: dict[str, jax.Array] = {}
    for j, name in enumerate(INPUT_COLUMNS):
        v = x[..., j]
        mean = jnp.sum(v * mask) / count
        out[f"{name}_min"] = jnp.min(jnp.where(real[..., 0], v, jnp.inf))
        out[f"{name}_mean"] = mean
        out[f"{name}_max"] = jnp.max(jnp.where(real[..., 0], v, -jnp.inf))
        out[f"{name}_std"] = jnp.sqrt(jnp.sum(jnp.square(v - mean) * mask) / count)
    pos = jnp.asarray(batch["pos"], jnp.float32)
    n = jnp.maximum(jnp.sum(mask, -1), 1.0)
    centroid = jnp.sum(pos * mask[..., None], 1) / n[:, None]
    sq = jnp.sum(jnp.square(pos - centroid[:, None]), -1)
    spread = jnp.sqrt(jnp.sum(sq * mask, -1) / n)
    out["pos_spread_mean"] = jnp.mean(spread)
    out["pos_spread_max"] = jnp.max(spread)
    return out


ENTRY = ModelEntry(
    "e3gnn",
    build_model,
    losses.e3gnn_loss,
    default_data,
    load_data=load_sdf,
    config=E3GNNConfig.default(),
    presets={
        "default": E3GNNConfig.default,
        "original": E3GNNConfig.original,
        "seed": E3GNNConfig.seed,
        "small": E3GNNConfig.small,
    },
    feature_stats=feature_stats,
    stages=(STAGE,),
)
