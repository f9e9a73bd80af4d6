"""Side-chain model training on the library's loop, and the model's plugin entry ``ENTRY``.

Chains are stored whole (the bundled ones 173 residue slots wide). Every training step cuts
each example of the batch to a random window of ``config.max_len`` residues inside
:func:`~jaxstab.models.sidechain.losses.sidechain_loss` (with part of the step's key; the
design mask is drawn from the other part), so the windows change from step to step and the
compiled step has one static shape. Evaluation data given to :func:`train_sidechain` is cut
to the central window (:func:`~jaxstab.models.sidechain.crop.center_crop`) once, so its loss
compares across epochs.

:func:`train_sidechain` trains every parameter group with
:func:`jaxstab.train.stages.run_stage`: the stability guard (clip at ``grad_clip``) around
AdamW (``lr``, ``weight_decay``), the chain ``jaxstab diagnose --model sidechain`` trains with.
Its gradient-flow check reports, and does not stop on, the edge groups whose gradient is zero
at initialisation (:data:`ZERO_AT_INIT`).

Example:
  >>> import jax
  >>> from jaxstab.models.sidechain.config import SideChainConfig
  >>> from jaxstab.models.sidechain.data import default_data
  >>> chains = {k: v[:4] for k, v in default_data("train").arrays.items()}
  >>> cfg = SideChainConfig.small().replace(n_blocks=1, max_len=16)
  >>> out = train_sidechain(chains, epochs=1, key=jax.random.key(0), config=cfg)
  >>> out.fit.status, out.fit.steps
  ('ok', 2)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxstab.models.sidechain import residue_constants as rc
from jaxstab.models.sidechain.config import SIDECHAIN_ATOMS, SideChainConfig
from jaxstab.models.sidechain.crop import center_crop
from jaxstab.models.sidechain.data import default_data, load_pdb
from jaxstab.models.sidechain.losses import sidechain_loss
from jaxstab.models.sidechain.model import SideChainModel
from jaxstab.plugin import Dataset, ModelEntry, Stage
from jaxstab.train.stages import StageResult, run_stage

__all__ = [
    "ENTRY",
    "FEATURE_NAMES",
    "STAGE",
    "ZERO_AT_INIT",
    "as_config",
    "build_model",
    "default_train_data",
    "feature_stats",
    "train_sidechain",
]

# The edge groups reach the loss only through the attention's output layer, which starts at
# zero (the original's "final" initialisation), so at initialisation their gradient is exactly
# zero; it is not after the first step. The stage therefore trains without the flow gate
# (``result.report`` still shows the check, with these groups listed; ``ZERO_AT_INIT``).
STAGE = Stage(name="all", loss_fn=sidechain_loss, check_flow=False)
ZERO_AT_INIT: tuple[str, ...] = (
    "edge_feature_net",
    "edge_feature_fusion",
    "edge_init_ln",
    "edge_graph_ln",
    "edge_esm_ln",
)
FEATURE_NAMES: tuple[str, ...] = (
    "residues_mean",
    "residues_min",
    "residues_max",
    "masked_residue_share",
    "sidechain_atoms_present",
    "sidechain_atoms_per_residue",
    "ca_ca_mean",
    "ca_ca_max",
    "ca_spread_mean",
    "ca_spread_max",
    "coord_abs_max",
)


def as_config(config: SideChainConfig | Mapping[str, Any] | None) -> SideChainConfig:
    """A :class:`SideChainConfig` from a config, ``None`` (the default) or a dict of fields.

    >>> as_config({"n_blocks": 3}).n_blocks
    3
    """
    if config is None:
        return SideChainConfig.default()
    if isinstance(config, SideChainConfig):
        return config
    return SideChainConfig.from_dict(config)


def build_model(
    dataset: Dataset | Mapping[str, Any],
    config: SideChainConfig | Mapping[str, Any] | None,
    rngs: nnx.Rngs,
) -> SideChainModel:
    """A :class:`SideChainModel` of ``config``; its sizes do not depend on the data, which
    must hold the ESM inputs when ``use_esm`` is set.

    >>> from flax import nnx
    >>> from jaxstab.models.sidechain.data import default_data
    >>> build_model(default_data("val"), {"n_blocks": 1, "c_s": 16}, nnx.Rngs(0)).config.c_s
    16
    """
    arrays = getattr(dataset, "arrays", dataset)
    c = as_config(config)
    if c.use_esm:
        missing = [k for k in ("esm_single", "esm_pair") if k not in arrays]
        if missing:
            raise ValueError(
                f"side-chain config use_esm needs data fields {', '.join(missing)}; the data "
                f"has {', '.join(sorted(arrays))}"
            )
    return SideChainModel(c, rngs=rngs)


def _as_data(data: Dataset | Mapping[str, Any] | str | os.PathLike | Sequence) -> Any:
    if isinstance(data, (str, os.PathLike)) or (
        isinstance(data, Sequence) and not isinstance(data, Mapping)
    ):
        return load_pdb(data)
    return data


def train_sidechain(
    data: Dataset | Mapping[str, Any] | str | os.PathLike | Sequence,
    *,
    key: jax.Array,
    config: SideChainConfig | Mapping[str, Any] | None = None,
    model: SideChainModel | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> StageResult:
    """Trains a side-chain model on ``data`` (a ``Dataset``, its arrays, or structure files).

    Settings not given come from the model's config (``epochs``, ``batch_size``, ``lr``,
    ``weight_decay``, ``grad_clip``, ``explosion_norm``, ``max_len``); ``fit_kwargs`` go to
    :func:`jaxstab.train.fit`, and an ``eval_data`` among them is cut to its central
    ``max_len`` residues first. ``result.fit.model`` is the trained model. See the module
    docstring for an example and for how the chains are cropped.
    """
    data = _as_data(data)
    k_init, k_train = jax.random.split(key)
    if model is None:
        seed = int(jax.random.randint(k_init, (), 0, 2**31 - 1))
        model = build_model(data, config, nnx.Rngs(seed))
    c: SideChainConfig = model.config
    fit_kwargs.setdefault("explosion_norm", c.explosion_norm)
    eval_data = fit_kwargs.get("eval_data")
    if eval_data is not None:
        arrays = _as_data(eval_data)
        arrays = getattr(arrays, "arrays", arrays)
        if np.shape(arrays["aatype"])[1] > c.max_len:
            arrays = {k: np.asarray(v) for k, v in center_crop(arrays, c.max_len).items()}
        fit_kwargs["eval_data"] = arrays
    return run_stage(
        model,
        STAGE,
        data,
        inner=optax.adamw(c.lr, weight_decay=c.weight_decay),
        loss_fn=sidechain_loss,
        batch_size=c.batch_size if batch_size is None else batch_size,
        epochs=c.epochs if epochs is None else epochs,
        key=k_train,
        clip=c.grad_clip or None,
        **fit_kwargs,
    )


def feature_stats(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Input statistics of a batch of chains (as stored, before the loss's crop); 11 values.

    ``residues_mean`` / ``_min`` / ``_max``: real residues (``residue_mask``) per chain;
    ``masked_residue_share``: share of the chains' residues masked out (no N, CA or C);
    ``sidechain_atoms_present``: share of the side-chain atoms (slots 4–13) their residue
    types have that are present, over real residues; ``sidechain_atoms_per_residue``: present
    side-chain atoms per real residue; ``ca_ca_mean`` / ``ca_ca_max``: CA–CA distance (Å) of
    neighbouring slots that are both real (about 3.8; a large maximum is a chain break or a
    misplaced atom); ``ca_spread_mean`` / ``_max``: root-mean-square distance (Å) of a chain's
    CAs from their centroid, over the chains; ``coord_abs_max``: the largest absolute
    coordinate of a present atom (Å). Jittable.

    >>> import numpy as np
    >>> pos = np.zeros((1, 3, 14, 3), np.float32)
    >>> pos[0, :, 1, 0] = [0.0, 3.8, 7.6]  # CA atoms on a line
    >>> mask = np.zeros((1, 3, 14), np.float32); mask[0, :, :3] = 1
    >>> batch = {"aatype": np.full((1, 3), 7), "atom14_pos": pos, "atom14_mask": mask,
    ...          "residue_mask": np.ones((1, 3)), "chain_length": np.array([3])}  # glycines
    >>> s = feature_stats(batch)
    >>> len(s), round(float(s["ca_ca_max"]), 3), float(s["sidechain_atoms_present"])
    (11, 3.8, 1.0)
    """
    start, stop = SIDECHAIN_ATOMS
    res = jnp.asarray(batch["residue_mask"]) > 0
    resf = res.astype(jnp.float32)
    width = res.shape[1]
    length = jnp.minimum(jnp.asarray(batch["chain_length"]), width).astype(jnp.float32)
    per_chain = jnp.sum(resf, axis=1)
    out: dict[str, jax.Array] = {
        "residues_mean": jnp.mean(per_chain),
        "residues_min": jnp.min(per_chain),
        "residues_max": jnp.max(per_chain),
        "masked_residue_share": 1.0 - jnp.sum(per_chain) / jnp.maximum(jnp.sum(length), 1.0),
    }
    atom_mask = (jnp.asarray(batch["atom14_mask"]) > 0) & res[..., None]
    aatype = jnp.clip(jnp.asarray(batch["aatype"]), 0, rc.UNKNOWN)
    expected = jnp.asarray(rc.ATOM14_MASK, jnp.float32)[aatype][..., start:stop] * resf[..., None]
    present = jnp.sum(atom_mask[..., start:stop].astype(jnp.float32))
    out["sidechain_atoms_present"] = jnp.where(
        jnp.sum(expected) > 0, present / jnp.maximum(jnp.sum(expected), 1.0), 1.0
    )
    out["sidechain_atoms_per_residue"] = present / jnp.maximum(jnp.sum(resf), 1.0)

    pos = jnp.asarray(batch["atom14_pos"], jnp.float32)
    ca = pos[..., 1, :]
    pair = res[:, 1:] & res[:, :-1]
    step = jnp.sqrt(jnp.sum(jnp.square(ca[:, 1:] - ca[:, :-1]), -1))
    n_pair = jnp.sum(pair)
    out["ca_ca_mean"] = jnp.sum(jnp.where(pair, step, 0.0)) / jnp.maximum(n_pair, 1)
    out["ca_ca_max"] = jnp.max(jnp.where(pair, step, 0.0))
    n = jnp.maximum(per_chain, 1.0)
    centroid = jnp.sum(ca * resf[..., None], 1) / n[:, None]
    sq = jnp.sum(jnp.square(ca - centroid[:, None]), -1)
    spread = jnp.sqrt(jnp.sum(sq * resf, -1) / n)
    out["ca_spread_mean"] = jnp.mean(spread)
    out["ca_spread_max"] = jnp.max(spread)
    out["coord_abs_max"] = jnp.max(jnp.where(atom_mask[..., None], jnp.abs(pos), 0.0))
    return out


def default_train_data(seed: int = 0) -> Dataset:
    """The bundled training chains, ``default_data("train")``; ``seed`` is not used (the
    split is fixed by chain name).

    >>> len(default_train_data(0))
    40
    """
    del seed
    return default_data("train")


ENTRY = ModelEntry(
    "sidechain",
    build_model,
    sidechain_loss,
    default_train_data,
    load_data=load_pdb,
    config=SideChainConfig.default(),
    presets={
        "default": SideChainConfig.default,
        "original": SideChainConfig.original,
        "small": SideChainConfig.small,
    },
    feature_stats=feature_stats,
    stages=(STAGE,),
)
