"""Staged CFM-VC training on the library's stages, and the model's plugin entry ``ENTRY``.

Stage ``"vae"`` trains encoder + decoder (β = 1); stage ``"flow"`` trains context encoder +
flow with the VAE frozen twice over: ``jaxstab.train_only`` sends exact zero updates to the
VAE (so AdamW's weight decay cannot move it either) and the flow target is
``stop_gradient``-ed; the optional stage ``"joint"`` fine-tunes everything. Each stage's
optimizer is :func:`jaxstab.train.stages.stage_optimizer` (the guard inside the freezing,
AdamW with the model's :class:`~jaxstab.models.cfmvc.CFMVCConfig` settings), the same
chain ``jaxstab diagnose --model cfmvc`` trains with, and each stage first checks that
gradient reaches exactly its trainable groups.

Example:
  >>> import jax
  >>> from jaxstab.models.cfmvc.config import CFMVCConfig
  >>> from jaxstab.models.cfmvc.data import load_anndata, simulate
  >>> data = load_anndata(simulate(256, 40, n_perturbations=3, seed=0))
  >>> out = train_cfmvc(data, stages=("vae", "flow"), epochs=1, key=jax.random.key(0),
  ...                   config=CFMVCConfig.small())
  >>> [(name, r.fit.status) for name, r in out.stages.items()]
  [('vae', 'ok'), ('flow', 'ok')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import anndata as ad
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxstab.models.cfmvc import losses
from jaxstab.models.cfmvc.config import CFMVCConfig
from jaxstab.models.cfmvc.data import load_anndata, simulate
from jaxstab.models.cfmvc.model import CFMVC
from jaxstab.plugin import Dataset, ModelEntry, Stage
from jaxstab.train.stages import StageResult, run_stage

GROUPS = ("encoder", "decoder", "context_encoder", "flow")

STAGES: dict[str, Stage] = {
    "vae": Stage(name="vae", trainable=("encoder", "decoder"), loss_fn=losses.vae_loss),
    "flow": Stage(name="flow", trainable=("context_encoder", "flow"), loss_fn=losses.flow_loss),
    "joint": Stage(name="joint", trainable=GROUPS, loss_fn=losses.joint_loss),
}


class TrainedCFMVC(NamedTuple):
    """Output of :func:`train_cfmvc`: the final model, per-stage results and the data meta."""

    model: CFMVC
    stages: dict[str, StageResult]
    meta: Mapping[str, Any]


def train_stage(
    model: CFMVC,
    data: Dataset | Mapping[str, Any],
    stage: str | Stage,
    *,
    key: jax.Array,
    epochs: int | None = None,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> StageResult:
    """Runs one stage with :func:`jaxstab.train.stages.run_stage`.

    Raises ``RuntimeError`` before training if a frozen group would get gradient or a
    trainable group gets none. ``fit_kwargs`` go to :func:`jaxstab.train.fit`
    (``steps_per_call``, ``record``, ...). Settings not given here come from ``model.config``
    (``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``grad_clip``, ``explosion_norm``).
    """
    mc: CFMVCConfig = model.config
    fit_kwargs.setdefault("explosion_norm", mc.explosion_norm)
    return run_stage(
        model,
        STAGES[stage] if isinstance(stage, str) else stage,
        data,
        inner=optax.adamw(mc.lr, weight_decay=mc.weight_decay),
        loss_fn=losses.vae_loss,
        batch_size=mc.batch_size if batch_size is None else batch_size,
        epochs=mc.epochs if epochs is None else epochs,
        key=key,
        clip=mc.grad_clip or None,
        **fit_kwargs,
    )


def as_config(config: CFMVCConfig | Mapping[str, Any] | None) -> CFMVCConfig:
    """A :class:`CFMVCConfig` from a config, ``None`` (the default) or a dict of its fields.

    A dict is applied to ``CFMVCConfig.default()``; an unknown key is a ``KeyError`` that
    names it.

    Example:
      >>> as_config({"hidden_vae": 32}).hidden_vae
      32
    """
    if config is None:
        return CFMVCConfig.default()
    if isinstance(config, CFMVCConfig):
        return config
    return CFMVCConfig.from_dict(config)


def build_model(
    dataset: Dataset, config: CFMVCConfig | Mapping[str, Any] | None, rngs: nnx.Rngs
) -> CFMVC:
    """A :class:`CFMVC` sized for ``dataset`` with ``config`` (see :func:`as_config`)."""
    meta = dataset.meta
    return CFMVC(
        meta["n_genes"],
        meta["n_batches"],
        meta["n_cell_types"],
        meta["n_perturbations"],
        as_config(config),
        rngs=rngs,
        spatial_dim=meta.get("spatial_dim"),
    )


def train_cfmvc(
    data: Dataset | ad.AnnData | str,
    *,
    stages: Sequence[str] = ("vae", "flow"),
    epochs: int | Mapping[str, int] | None = None,
    batch_size: int | None = None,
    key: jax.Array,
    config: CFMVCConfig | Mapping[str, Any] | None = None,
    model: CFMVC | None = None,
    **fit_kwargs: Any,
) -> TrainedCFMVC:
    """Validates ``data``, builds a model (unless given) and runs ``stages`` in order.

    Args:
      data: a loaded :class:`~jaxstab.registry.Dataset`, an AnnData or an ``.h5ad`` path.
      stages: names from :data:`STAGES` (``"vae"``, ``"flow"``, ``"joint"``).
      epochs: one number for every stage or ``{stage: epochs}`` (default: the config's).
      batch_size: cells per step (default: the config's).
      key: PRNG key (model init and training).
      config: a :class:`~jaxstab.models.cfmvc.CFMVCConfig` or a dict of its fields applied to
        the default; ignored when ``model`` is given (its own config is used).
      model: start from this model instead of a fresh one.

    The run stops after a stage whose ``fit`` status is not ``'ok'``.
    """
    dataset = data if isinstance(data, Dataset) else load_anndata(data)
    k_init, k_train = jax.random.split(key)
    if model is None:
        seed = int(jax.random.randint(k_init, (), 0, 2**31 - 1))
        model = build_model(dataset, config, nnx.Rngs(params=seed, dropout=seed + 1))
    results: dict[str, StageResult] = {}
    for i, name in enumerate(stages):
        n_epochs = epochs.get(name) if isinstance(epochs, Mapping) else epochs
        res = train_stage(
            model,
            dataset,
            name,
            key=jax.random.fold_in(k_train, i),
            epochs=n_epochs,
            batch_size=batch_size,
            **fit_kwargs,
        )
        results[name] = res
        model = res.fit.model
        if res.fit.status != "ok":
            break
    return TrainedCFMVC(model, results, dataset.meta)


# ---------------------------------------------------------------- plugin entry
N_FEATURE_COLUMNS = 4


def default_data(seed: int) -> Dataset:
    """2000 simulated cells × 500 genes, 5 perturbations, 2 batches, 3 cell types."""
    return load_anndata(simulate(2000, 500, n_perturbations=5, seed=seed))


def feature_stats(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Library size and the first columns of ``log1p(x)``: min / max / mean / std (20 values).

    Example:
      >>> import jax.numpy as jnp
      >>> stats = feature_stats({"x": jnp.ones((3, 6))})
      >>> len(stats), float(stats["library_mean"])
      (20, 6.0)
    """
    x = batch["x"]
    cols = {"library": jnp.sum(x, -1)}
    log_x = jnp.log1p(x[:, :N_FEATURE_COLUMNS])
    for j in range(log_x.shape[1]):
        cols[f"x_col{j}"] = log_x[:, j]
    out: dict[str, jax.Array] = {}
    for name, v in cols.items():
        out[f"{name}_min"] = jnp.min(v)
        out[f"{name}_max"] = jnp.max(v)
        out[f"{name}_mean"] = jnp.mean(v)
        out[f"{name}_std"] = jnp.std(v)
    return out


ENTRY = ModelEntry(
    "cfmvc",
    build_model,
    losses.vae_loss,
    default_data,
    load_data=load_anndata,
    config=CFMVCConfig.default(),
    presets={
        "default": CFMVCConfig.default,
        "original": CFMVCConfig.original,
        "small": CFMVCConfig.small,
    },
    feature_stats=feature_stats,
    stages=tuple(STAGES.values()),
)
