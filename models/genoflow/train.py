"""Two-stage GenoFlow training on the library's stages, and the model's plugin entry ``ENTRY``.

Stage ``"vae"`` trains encoder, decoder and discriminator in one jitted step (the
discriminator at ``disc_lr_scale`` × the learning rate, :func:`optimizer`); stage ``"flow"``
first pairs the cells of each two adjacent time points by entropic OT on the trained
encoder's latent means (:func:`flow_pairs`, the stage's ``prepare``) and then trains the vector
field on those pairs, every other group frozen (``jaxstab.train_only``: exact zero updates).

Example:
  >>> import jax
  >>> from jaxstab.models.genoflow.config import GenoFlowConfig
  >>> from jaxstab.models.genoflow.data import load_anndata, simulate
  >>> data = load_anndata(simulate(40, 30, n_time_points=3, seed=0))
  >>> out = train_genoflow(data, epochs=1, key=jax.random.key(0), config=GenoFlowConfig.small())
  >>> [(name, r.fit.status) for name, r in out.stages.items()]
  [('vae', 'ok'), ('flow', 'ok')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxstab import tree as tree_lib
from jaxstab.models.genoflow import losses
from jaxstab.models.genoflow.config import GenoFlowConfig
from jaxstab.models.genoflow.data import default_data, load_anndata
from jaxstab.models.genoflow.model import GenoFlow
from jaxstab.models.genoflow.pairing import pair_time_points
from jaxstab.plugin import Dataset, ModelEntry, Stage
from jaxstab.train.stages import StageResult, run_stage

__all__ = [
    "ENTRY",
    "STAGES",
    "TrainedGenoFlow",
    "build_model",
    "encode_means",
    "flow_pairs",
    "optimizer",
    "train_genoflow",
    "train_stage",
]

ENCODE_BATCH = 1024  # cells per jitted encoder call when computing every latent mean


def encode_means(model: GenoFlow, x: np.ndarray, condition: np.ndarray) -> np.ndarray:
    """Posterior means ``[n, latent]`` of every cell, in eval mode (BatchNorm's running
    statistics), as the original's ``Z_all``.

    >>> from jaxstab.models.genoflow.config import GenoFlowConfig
    >>> m = GenoFlow(3, 2, np.zeros((2, 0), int), GenoFlowConfig.small(), rngs=nnx.Rngs(0))
    >>> encode_means(m, np.ones((5, 3), np.float32), np.zeros(5, np.int32)).shape
    (5, 4)
    """
    graphdef, state = nnx.split(model)
    work = nnx.merge(graphdef, state)
    work.eval()
    graphdef, state = nnx.split(work)

    @jax.jit
    def encode(state: Any, xb: jax.Array, cb: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state).encode_mean(xb, cb)

    out = [
        np.asarray(encode(state, x[i : i + ENCODE_BATCH], condition[i : i + ENCODE_BATCH]))
        for i in range(0, len(x), ENCODE_BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.config.latent_dim), np.float32)


def flow_pairs(model: GenoFlow, dataset: Dataset) -> Dataset:
    """Stage ``flow``'s data: each cell of time point k < last with its OT partner at k + 1.

    Latent means from :func:`encode_means`; pairing by
    :func:`jaxstab.models.genoflow.pairing.pair_time_points` with the config's ``ot_epsilon``,
    ``ot_cost`` and ``ot_ddof`` (z-scored sets, row argmax of the plan). Arrays ``z0``, ``z1``,
    ``condition`` (the source cell's), ``tau0``, ``tau1`` (flow times of the two time points)
    and ``source``, ``target`` (row indices into ``dataset``); meta is the dataset's plus
    ``n_pairs``.
    """
    c: GenoFlowConfig = model.config
    a = dataset.arrays
    latent = encode_means(model, np.asarray(a["x"]), np.asarray(a["condition"]))
    src, tgt, interval = pair_time_points(
        latent, np.asarray(a["time"]), len(model.time_points),
        epsilon=c.ot_epsilon, cost=c.ot_cost, ddof=c.ot_ddof,
    )  # fmt: skip
    tau = np.asarray(model.flow_times(), np.float32)
    arrays = {
        "z0": latent[src],
        "z1": latent[tgt],
        "condition": np.asarray(a["condition"])[src].astype(np.int32),
        "tau0": tau[interval],
        "tau1": tau[interval + 1],
        "source": src.astype(np.int32),
        "target": tgt.astype(np.int32),
    }
    return Dataset(arrays, {**dataset.meta, "n_pairs": len(src)})


STAGES: dict[str, Stage] = {
    "vae": Stage(
        name="vae", trainable=("encoder", "decoder", "discriminator"), loss_fn=losses.vae_loss
    ),
    "flow": Stage(
        name="flow", trainable=("vector_field",), loss_fn=losses.flow_loss, prepare=flow_pairs
    ),
}


def _is_discriminator(params: Any) -> Any:
    return tree_lib.select(params, lambda name: name.split("/")[0] == "discriminator")


def optimizer(config: GenoFlowConfig) -> optax.GradientTransformation:
    """Adam(W) at ``lr`` with the discriminator's updates scaled by ``disc_lr_scale``.

    Adam's update does not depend on the gradient's scale, so scaling the discriminator's
    *updates* by 0.5 is exactly the original's second Adam at half the learning rate.

    >>> import jax.numpy as jnp
    >>> tx = optimizer(GenoFlowConfig.small())
    >>> p = {"discriminator": jnp.ones(1), "encoder": jnp.ones(1)}
    >>> u, _ = tx.update(p, tx.init(p), p)
    >>> [round(float(u[k][0]), 6) for k in ("discriminator", "encoder")]
    [-0.0005, -0.001]
    """
    c = as_config(config)
    return optax.chain(
        optax.adamw(c.lr, weight_decay=c.weight_decay),
        optax.masked(optax.scale(c.disc_lr_scale), _is_discriminator),
    )


class TrainedGenoFlow(NamedTuple):
    """Output of :func:`train_genoflow`: the final model, per-stage results and the data meta."""

    model: GenoFlow
    stages: dict[str, StageResult]
    meta: Mapping[str, Any]


def as_config(config: GenoFlowConfig | Mapping[str, Any] | None) -> GenoFlowConfig:
    """A :class:`GenoFlowConfig` from a config, ``None`` (the default) or a dict of its fields.

    >>> as_config({"latent_dim": 8}).latent_dim
    8
    """
    if config is None:
        return GenoFlowConfig.default()
    if isinstance(config, GenoFlowConfig):
        return config
    return GenoFlowConfig.from_dict(config)


def build_model(
    dataset: Dataset, config: GenoFlowConfig | Mapping[str, Any] | None, rngs: nnx.Rngs
) -> GenoFlow:
    """A :class:`GenoFlow` sized for ``dataset`` (genes, conditions, gene graph, time points)."""
    m = dataset.meta
    return GenoFlow(
        m["n_genes"],
        m["n_conditions"],
        np.asarray(m["gene_graph"]),
        as_config(config),
        rngs=rngs,
        conditions=m.get("conditions"),
        time_points=m.get("time_points"),
    )


def train_stage(
    model: GenoFlow,
    data: Dataset,
    stage: str | Stage,
    *,
    key: jax.Array,
    epochs: int | None = None,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> StageResult:
    """Runs one stage with :func:`jaxstab.train.stages.run_stage` (settings not given here
    come from ``model.config``); the flow stage pairs the cells first."""
    mc: GenoFlowConfig = model.config
    fit_kwargs.setdefault("explosion_norm", mc.explosion_norm)
    return run_stage(
        model,
        STAGES[stage] if isinstance(stage, str) else stage,
        data,
        inner=optimizer(mc),
        loss_fn=losses.vae_loss,
        batch_size=mc.batch_size if batch_size is None else batch_size,
        epochs=mc.epochs if epochs is None else epochs,
        key=key,
        clip=mc.grad_clip or None,
        **fit_kwargs,
    )


def train_genoflow(
    data: Dataset | ad.AnnData | str,
    *,
    config: GenoFlowConfig | Mapping[str, Any] | None = None,
    epochs: int | Mapping[str, int] | None = None,
    key: jax.Array,
    stages: Sequence[str] = ("vae", "flow"),
    batch_size: int | None = None,
    model: GenoFlow | None = None,
    **fit_kwargs: Any,
) -> TrainedGenoFlow:
    """Validates ``data``, builds a model (unless given) and runs ``stages`` in order.

    Args:
      data: a loaded dataset (:func:`~jaxstab.models.genoflow.load_anndata`), an AnnData or
        an ``.h5ad`` path.
      config: a :class:`GenoFlowConfig` or a dict of its fields (ignored with ``model``).
      epochs: one number for every stage or ``{stage: epochs}`` (default: the config's).
      key: PRNG key (initialisation and training).
      stages: names from :data:`STAGES`.
      batch_size: cells (stage ``vae``) or pairs (stage ``flow``) per step.
      model: start from this model.

    ``result.model`` holds both stages' parameters; the run stops after a stage whose status
    is not ``'ok'``.
    """
    dataset = data if isinstance(data, Dataset) else load_anndata(data)
    k_init, k_train = jax.random.split(key)
    if model is None:
        seed = int(jax.random.randint(k_init, (), 0, 2**31 - 1))
        model = build_model(dataset, config, nnx.Rngs(params=seed, dropout=seed + 1))
    results: dict[str, StageResult] = {}
    for i, name in enumerate(stages):
        n_epochs = epochs.get(name) if isinstance(epochs, Mapping) else epochs
        res = train_stage(model, dataset, name, key=jax.random.fold_in(k_train, i),
                          epochs=n_epochs, batch_size=batch_size, **fit_kwargs)  # fmt: skip
        results[name] = res
        model = res.fit.model
        if res.fit.status != "ok":
            break
    return TrainedGenoFlow(model, results, dataset.meta)


# ---------------------------------------------------------------- plugin entry
N_FEATURE_COLUMNS = 4


def _summary(name: str, v: jax.Array) -> dict[str, jax.Array]:
    return {f"{name}_{s}": f(v) for s, f in
            (("min", jnp.min), ("max", jnp.max), ("mean", jnp.mean), ("std", jnp.std))}  # fmt: skip


def feature_stats(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Input statistics of either stage's batch: library size and the first columns of
    ``log1p(x)`` (stage ``vae``), or the norms of ``z0``, ``z1`` and of the step ``z1 − z0``
    (stage ``flow``); min / max / mean / std of each.

    >>> stats = feature_stats({"x": jnp.ones((3, 6))})
    >>> len(stats), float(stats["library_mean"])
    (20, 6.0)
    """
    out: dict[str, jax.Array] = {}
    if "x" in batch:
        x = batch["x"]
        out |= _summary("library", jnp.sum(x, -1))
        for j in range(min(N_FEATURE_COLUMNS, x.shape[1])):
            out |= _summary(f"x_col{j}", jnp.log1p(x[:, j]))
    else:
        z0, z1 = batch["z0"], batch["z1"]
        for name, v in (("z0", z0), ("z1", z1), ("step", z1 - z0)):
            out |= _summary(f"{name}_norm", jnp.linalg.norm(v, axis=-1))
    return out


ENTRY = ModelEntry(
    "genoflow",
    build_model,
    losses.vae_loss,
    default_data,
    load_data=load_anndata,
    config=GenoFlowConfig.default(),
    presets={
        "default": GenoFlowConfig.default,
        "original": GenoFlowConfig.original,
        "small": GenoFlowConfig.small,
    },
    feature_stats=feature_stats,
    optimizer=optimizer,
    stages=tuple(STAGES.values()),
)
