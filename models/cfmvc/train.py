"""Staged CFM-VC training on ``jaxstab.train.fit``, and the registry entry ``ENTRY``.

Stage ``"vae"`` trains encoder + decoder (β = 1); stage ``"flow"`` trains context encoder +
flow with the VAE frozen twice over: the optimizer sends ``optax.set_to_zero()`` updates to
the VAE (so AdamW's weight decay cannot move it either) and the flow target is
``stop_gradient``-ed; the optional stage ``"joint"`` fine-tunes everything. Each stage uses
``jaxstab.stability_guard(optax.adamw(lr, weight_decay=wd), clip=clip)`` on its trainable
groups and first checks with ``jaxstab.gradient_flow_report`` that gradient reaches exactly
those groups.

Example:
  >>> import jax
  >>> from models.cfmvc.data import load_anndata, simulate
  >>> data = load_anndata(simulate(256, 40, n_perturbations=3, seed=0))
  >>> out = train_cfmvc(data, stages=("vae", "flow"), epochs=1, key=jax.random.key(0),
  ...                   config={"hidden_vae": 32, "hidden_flow": 32})
  >>> [(name, r.fit.status) for name, r in out.stages.items()]
  [('vae', 'ok'), ('flow', 'ok')]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import anndata as ad
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxstab
from jaxstab.registry import Dataset, ModelEntry
from jaxstab.train import FitResult, fit
from models.cfmvc import losses
from models.cfmvc.data import load_anndata, simulate
from models.cfmvc.model import CFMVC

GROUPS = ("encoder", "decoder", "context_encoder", "flow")
# The NB likelihood is summed over genes, so healthy raw gradient norms are in the hundreds to
# thousands (the guard clips them to ``clip``); ``fit``'s default explosion bound of 100 would
# stop a normal run at its first step.
EXPLOSION_NORM = 1e5
MODEL_KEYS = (
    "dim_int",
    "dim_tech",
    "hidden_vae",
    "hidden_ctx",
    "hidden_flow",
    "n_basis",
    "dropout",
    "use_library_size",
    "lambda_dist",
)


class StageConfig(NamedTuple):
    """One training stage: which top-level groups train, on which loss, for how long."""

    name: str
    trainable: tuple[str, ...]
    loss_fn: Callable
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-5
    clip: float = 1.0


STAGES: dict[str, StageConfig] = {
    "vae": StageConfig("vae", ("encoder", "decoder"), losses.vae_loss),
    "flow": StageConfig("flow", ("context_encoder", "flow"), losses.flow_loss),
    "joint": StageConfig("joint", GROUPS, losses.joint_loss),
}


class StageResult(NamedTuple):
    """``fit``'s result for one stage and the gradient-flow check made before it."""

    fit: FitResult
    report: jaxstab.GradientFlowReport


class TrainedCFMVC(NamedTuple):
    """Output of :func:`train_cfmvc`: the final model, per-stage results and the data meta."""

    model: CFMVC
    stages: dict[str, StageResult]
    meta: Mapping[str, Any]


def _top_group(path: tuple) -> str:
    first = path[0]
    return str(getattr(first, "key", getattr(first, "name", first)))


def freeze_except(
    inner: optax.GradientTransformation, trainable: Sequence[str]
) -> optax.GradientTransformation:
    """``inner`` on the ``trainable`` top-level groups, ``optax.set_to_zero()`` on the rest."""
    keep = frozenset(trainable)

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "trainable" if _top_group(path) in keep else "frozen", params
        )

    tx = optax.multi_transform({"trainable": inner, "frozen": optax.set_to_zero()}, labels)

    return tx


def stage_optimizer(
    trainable: Sequence[str], *, lr: float = 1e-3, weight_decay: float = 1e-5, clip: float = 1.0
) -> optax.GradientTransformation:
    """Guarded AdamW on the ``trainable`` top-level groups, zero updates everywhere else.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = stage_optimizer(["flow"])
      >>> params = {"flow": jnp.ones(2), "encoder": jnp.ones(2)}
      >>> updates, _ = tx.update({"flow": jnp.ones(2), "encoder": jnp.ones(2)},
      ...                        tx.init(params), params)
      >>> updates["encoder"].tolist()
      [0.0, 0.0]
    """
    guard = jaxstab.stability_guard(optax.adamw(lr, weight_decay=weight_decay), clip=clip)
    return freeze_except(guard, trainable)


def check_gradient_flow(
    model: CFMVC, batch: Mapping[str, jax.Array], stage: StageConfig, key: jax.Array
) -> jaxstab.GradientFlowReport:
    """Gradient of the stage loss on ``batch``, reported per top-level group."""
    grads = nnx.jit(nnx.grad(lambda m: stage.loss_fn(m, batch, key)[0]))(model)
    return jaxstab.gradient_flow_report(grads, lambda group: group in stage.trainable)


def train_stage(
    model: CFMVC,
    data: Dataset | Mapping[str, Any],
    stage: str | StageConfig,
    *,
    key: jax.Array,
    epochs: int | None = None,
    batch_size: int = 64,
    **fit_kwargs: Any,
) -> StageResult:
    """Runs one stage with ``jaxstab.train.fit``; ``result.fit.model`` is the trained model.

    Raises ``RuntimeError`` before training if a frozen group would get gradient or a
    trainable group gets none (``jaxstab.gradient_flow_report`` on the first batch).
    ``fit_kwargs`` go to :func:`jaxstab.train.fit` (``steps_per_call``, ``record``, ...);
    ``explosion_norm`` defaults to :data:`EXPLOSION_NORM`.
    """
    cfg = STAGES[stage] if isinstance(stage, str) else stage
    arrays = data.arrays if isinstance(data, Dataset) else data
    k_check, k_fit = jax.random.split(key)
    first = {k: jnp.asarray(v[:batch_size]) for k, v in arrays.items()}
    report = check_gradient_flow(model, first, cfg, k_check)
    if not report.ok:
        raise RuntimeError(f"stage {cfg.name!r}: gradient flow is wrong\n{report}")
    tx = stage_optimizer(cfg.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip)
    fit_kwargs.setdefault("explosion_norm", EXPLOSION_NORM)
    result = fit(
        model,
        tx,
        cfg.loss_fn,
        arrays,
        batch_size=batch_size,
        epochs=cfg.epochs if epochs is None else epochs,
        key=k_fit,
        **fit_kwargs,
    )
    return StageResult(result, report)


def build_model(dataset: Dataset, config: Mapping[str, Any], rngs: nnx.Rngs) -> CFMVC:
    """A :class:`CFMVC` sized for ``dataset``; model keys of ``config`` override defaults."""
    meta = dataset.meta
    kwargs = {k: config[k] for k in MODEL_KEYS if k in config}
    return CFMVC(
        meta["n_genes"],
        meta["n_batches"],
        meta["n_cell_types"],
        meta["n_perturbations"],
        rngs=rngs,
        spatial_dim=meta.get("spatial_dim"),
        **kwargs,
    )


def train_cfmvc(
    data: Dataset | ad.AnnData | str,
    *,
    stages: Sequence[str] = ("vae", "flow"),
    epochs: int | Mapping[str, int] = 50,
    batch_size: int = 64,
    key: jax.Array,
    config: Mapping[str, Any] | None = None,
    model: CFMVC | None = None,
    **fit_kwargs: Any,
) -> TrainedCFMVC:
    """Validates ``data``, builds a model (unless given) and runs ``stages`` in order.

    Args:
      data: a loaded :class:`~jaxstab.registry.Dataset`, an AnnData or an ``.h5ad`` path.
      stages: names from :data:`STAGES` (``"vae"``, ``"flow"``, ``"joint"``).
      epochs: one number for every stage or ``{stage: epochs}``.
      batch_size: cells per step.
      key: PRNG key (model init and training).
      config: model keyword arguments (``dim_int``, ``lambda_dist``, ...).
      model: start from this model instead of a fresh one.

    The run stops after a stage whose ``fit`` status is not ``'ok'``.
    """
    dataset = data if isinstance(data, Dataset) else load_anndata(data)
    k_init, k_train = jax.random.split(key)
    if model is None:
        seed = int(jax.random.randint(k_init, (), 0, 2**31 - 1))
        model = build_model(dataset, config or {}, nnx.Rngs(params=seed, dropout=seed + 1))
    results: dict[str, StageResult] = {}
    for i, name in enumerate(stages):
        n_epochs = epochs[name] if isinstance(epochs, Mapping) else epochs
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


# ---------------------------------------------------------------- registry entry
DEFAULT_CONFIG: dict[str, Any] = {
    "dim_int": 32,
    "dim_tech": 8,
    "hidden_vae": 256,
    "hidden_ctx": 64,
    "hidden_flow": 128,
    "n_basis": 16,
    "dropout": 0.1,
    "lambda_dist": 0.0,
    "epochs": 10,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 1e-5,
    "grad_clip": 1.0,
    "explosion_norm": EXPLOSION_NORM,
    # The NB log-likelihood is summed over genes, so healthy raw gradient norms are in the
    # tens to hundreds (about 500 at initialisation with 500 genes); the seed's levels
    # (warning 5, danger 10) were set for a per-example loss of order 1. Same ratios,
    # scaled to this loss: warning and danger a decade apart, explosion a decade above.
    "thresholds": {
        "total_low": 1.0,
        "total_warning": 1e3,
        "total_danger": 1e4,
        "group_warning": 1e3,
        "group_danger": 1e4,
    },
}
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


def _stage1_optimizer(config: Mapping[str, Any]) -> optax.GradientTransformation:
    # The CLI wraps this inner optimizer in its own guard; freezing keeps AdamW's weight decay
    # off the flow and context parameters, which stage 1 does not train.
    inner = optax.adamw(config.get("lr", 1e-3), weight_decay=config.get("weight_decay", 1e-5))
    return freeze_except(inner, STAGES["vae"].trainable)


ENTRY = ModelEntry(
    name="cfmvc",
    default_data=default_data,
    load_data=load_anndata,
    build_model=build_model,
    loss_fn=losses.vae_loss,
    default_config=DEFAULT_CONFIG,
    feature_stats=feature_stats,
    optimizer=_stage1_optimizer,
)
