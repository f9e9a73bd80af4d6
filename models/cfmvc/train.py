"""Staged CFM-VC training on ``jaxstab.train.fit``, and the registry entry ``ENTRY``.

Stage ``"vae"`` trains encoder + decoder (β = 1); stage ``"flow"`` trains context encoder +
flow with the VAE frozen twice over: the optimizer sends ``optax.set_to_zero()`` updates to
the VAE (so AdamW's weight decay cannot move it either) and the flow target is
``stop_gradient``-ed; the optional stage ``"joint"`` fine-tunes everything. Each stage uses
``jaxstab.stability_guard(optax.adamw(lr, weight_decay=wd), clip=grad_clip)`` (settings from
the model's :class:`~models.cfmvc.config.CFMVCConfig`) on its trainable groups and first
checks with ``jaxstab.gradient_flow_report`` that gradient reaches exactly those groups.

Example:
  >>> import jax
  >>> from models.cfmvc.config import CFMVCConfig
  >>> from models.cfmvc.data import load_anndata, simulate
  >>> data = load_anndata(simulate(256, 40, n_perturbations=3, seed=0))
  >>> out = train_cfmvc(data, stages=("vae", "flow"), epochs=1, key=jax.random.key(0),
  ...                   config=CFMVCConfig.small())
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
from models.cfmvc.config import RUN_KEYS, CFMVCConfig
from models.cfmvc.data import load_anndata, simulate
from models.cfmvc.model import CFMVC

GROUPS = ("encoder", "decoder", "context_encoder", "flow")
EXPLOSION_NORM = CFMVCConfig.default().explosion_norm  # the loop's stop bound (see the config)


class StageConfig(NamedTuple):
    """One training stage: which top-level groups train, on which loss, for how long.

    ``None`` hyperparameters come from the model's :class:`~models.cfmvc.config.CFMVCConfig`
    (``epochs``, ``lr``, ``weight_decay``, ``grad_clip``).
    """

    name: str
    trainable: tuple[str, ...]
    loss_fn: Callable
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    clip: float | None = None


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
    trainable: Sequence[str],
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    clip: float | None = None,
) -> optax.GradientTransformation:
    """Guarded AdamW on the ``trainable`` top-level groups, zero updates everywhere else.

    ``None`` settings come from ``CFMVCConfig.default()`` (``lr``, ``weight_decay``,
    ``grad_clip``).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = stage_optimizer(["flow"])
      >>> params = {"flow": jnp.ones(2), "encoder": jnp.ones(2)}
      >>> updates, _ = tx.update({"flow": jnp.ones(2), "encoder": jnp.ones(2)},
      ...                        tx.init(params), params)
      >>> updates["encoder"].tolist()
      [0.0, 0.0]
    """
    d = CFMVCConfig.default()
    lr = d.lr if lr is None else lr
    weight_decay = d.weight_decay if weight_decay is None else weight_decay
    clip = d.grad_clip if clip is None else clip
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
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> StageResult:
    """Runs one stage with ``jaxstab.train.fit``; ``result.fit.model`` is the trained model.

    Raises ``RuntimeError`` before training if a frozen group would get gradient or a
    trainable group gets none (``jaxstab.gradient_flow_report`` on the first batch).
    ``fit_kwargs`` go to :func:`jaxstab.train.fit` (``steps_per_call``, ``record``, ...).
    Settings not given here or in the stage come from ``model.config`` (``epochs``,
    ``batch_size``, ``lr``, ``weight_decay``, ``grad_clip``, ``explosion_norm``).
    """
    mc: CFMVCConfig = model.config
    cfg = STAGES[stage] if isinstance(stage, str) else stage
    batch_size = mc.batch_size if batch_size is None else batch_size
    arrays = data.arrays if isinstance(data, Dataset) else data
    k_check, k_fit = jax.random.split(key)
    first = {k: jnp.asarray(v[:batch_size]) for k, v in arrays.items()}
    report = check_gradient_flow(model, first, cfg, k_check)
    if not report.ok:
        raise RuntimeError(f"stage {cfg.name!r}: gradient flow is wrong\n{report}")
    tx = stage_optimizer(
        cfg.trainable,
        lr=mc.lr if cfg.lr is None else cfg.lr,
        weight_decay=mc.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        clip=mc.grad_clip if cfg.clip is None else cfg.clip,
    )
    fit_kwargs.setdefault("explosion_norm", mc.explosion_norm)
    result = fit(
        model,
        tx,
        cfg.loss_fn,
        arrays,
        batch_size=batch_size,
        epochs=(mc.epochs if cfg.epochs is None else cfg.epochs) if epochs is None else epochs,
        key=k_fit,
        **fit_kwargs,
    )
    return StageResult(result, report)


def as_config(config: CFMVCConfig | Mapping[str, Any] | None) -> CFMVCConfig:
    """A :class:`CFMVCConfig` from a config, ``None`` (the default) or a settings dict.

    A dict is applied to ``CFMVCConfig.default()``; the run keys of ``jaxstab diagnose``
    (``seed``, ``model``, ``data``, ``guard``) are left out, any other unknown key is a
    ``KeyError`` that names it.

    Example:
      >>> as_config({"hidden_vae": 32, "seed": 0}).hidden_vae
      32
    """
    if config is None:
        return CFMVCConfig.default()
    if isinstance(config, CFMVCConfig):
        return config
    return CFMVCConfig.from_dict({k: v for k, v in config.items() if k not in RUN_KEYS})


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
      config: a :class:`~models.cfmvc.config.CFMVCConfig` or a dict of its fields applied to
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


# ---------------------------------------------------------------- registry entry
# A plain dict for the command line, which merges its options into it.
DEFAULT_CONFIG: dict[str, Any] = CFMVCConfig.default().to_dict()
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
    cfg = as_config(config)
    inner = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
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
