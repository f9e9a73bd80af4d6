"""Side-chain model losses: coordinates, Gaussian parameters, Gaussian NLL, sequence.

Every term is over the designed residues (``design_mask``) and, for atoms, the side-chain
atoms 4–13 present in the true structure. Coordinates are compared in the residue frame
(the model's ``sidechain_local`` against the true atoms in the input backbone frame, Å):

- ``mse``: squared error summed over x, y, z, averaged over atoms (weighted by
  ``atom_weights``: ``Σ w e / Σ w``);
- ``pair``: squared difference of the intra-residue pair distances among the atoms;
- ``huber``: Huber loss (δ = ``huber_delta`` Å) per coordinate, summed over x, y, z, averaged
  over atoms (``atom_weights`` as for ``mse``);
- ``offset`` and ``logscale``: squared error, summed over the 3 axes and averaged over
  residues, of the final Gaussian's local mean (Å) and log-scale against the true side
  chain's Gaussian (thickness ``target_thickness``);
- ``nll``: ``½ (Mahalanobis² + log det Σ)`` of the true atoms (global Å) under the predicted
  Gaussian (:func:`jaxstab.numerics.gaussian_nll_3d` minus ``1.5 log 2π``), per atom; with
  ``per_atom_gaussians`` each atom under its own Gaussian;
- ``ce``: cross entropy of the 21-class logits against ``aatype`` (unknown type excluded).

``loss = w_mse·mse + w_pair·pair + w_huber·huber + w_offset·offset + w_logscale·logscale
+ w_nll·nll + w_ce·ce``. Metrics: each term raw and weighted (``mse``, ``mse_weighted`` …),
``atom04_mse`` … ``atom13_mse`` (unweighted, per slot), ``seq_recovery``.

Example:
  >>> import jax
  >>> from flax import nnx
  >>> from jaxstab.models.sidechain.config import SideChainConfig
  >>> from jaxstab.models.sidechain.crop import center_crop
  >>> from jaxstab.models.sidechain.data import default_data
  >>> from jaxstab.models.sidechain.model import SideChainModel
  >>> batch = center_crop({k: v[:1] for k, v in default_data("val").arrays.items()}, 12)
  >>> model = SideChainModel(SideChainConfig.small(), rngs=nnx.Rngs(0))
  >>> loss, metrics = sidechain_loss(model, batch, jax.random.key(0))
  >>> bool(loss > 0), "atom13_mse" in metrics
  (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxstab.models.sidechain.config import SIDECHAIN_ATOMS, SideChainConfig, atom_weight_table
from jaxstab.models.sidechain.crop import crop
from jaxstab.models.sidechain.geometry import OffsetGaussianRigid
from jaxstab.models.sidechain.model import SideChainModel, design_mask, input_geometry
from jaxstab.numerics import gaussian_nll_3d, safe_norm

__all__ = ["TERMS", "loss_terms", "sidechain_loss"]

TERMS: tuple[str, ...] = ("mse", "pair", "huber", "offset", "logscale", "nll", "ce")
_HALF_LOG_2PI_3 = 1.5 * math.log(2 * math.pi)


def _mean(x: jax.Array, w: jax.Array) -> jax.Array:
    # Σ w x / Σ w, 0 when Σ w = 0.
    total = jnp.sum(w)
    return jnp.sum(x * w) / jnp.maximum(total, 1e-10) * (total > 0)


def loss_terms(
    outputs: Mapping[str, Any], batch: Mapping[str, Any], config: SideChainConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted loss and metrics of model ``outputs`` for ``batch`` (module docstring).

    ``batch`` needs ``atom14_pos``, ``atom14_mask``, ``residue_mask``, ``aatype`` and the
    ``design_mask`` the outputs were computed with (``outputs["design_mask"]`` is used).
    """
    c = config
    start, stop = SIDECHAIN_ATOMS
    batch = {**batch, "design_mask": outputs["design_mask"]}
    rigid, _, pos, res, designed = input_geometry(batch, c)
    dtype = pos.dtype
    des = designed.astype(dtype)
    present = (jnp.asarray(batch["atom14_mask"]) > 0) & res[..., None]
    m = present[..., start:stop].astype(dtype) * des[..., None]  # [b, L, 10]
    true_global = pos[..., start:stop, :]
    true_local = rigid.expand().invert_apply(true_global)
    pred_local = outputs["sidechain_local"]
    w_atom = jnp.asarray(atom_weight_table(c.atom_weights), dtype)

    diff = pred_local - true_local
    sq = jnp.sum(diff * diff, axis=-1)  # [b, L, 10]
    terms = {"mse": _mean(sq, m * w_atom)}
    d_pred = safe_norm(pred_local[..., :, None, :] - pred_local[..., None, :, :], axis=-1)
    d_true = safe_norm(true_local[..., :, None, :] - true_local[..., None, :, :], axis=-1)
    terms["pair"] = _mean(jnp.square(d_pred - d_true), m[..., :, None] * m[..., None, :])
    hub = jnp.sum(optax.huber_loss(pred_local, true_local, delta=c.huber_delta), axis=-1)
    terms["huber"] = _mean(hub, m * w_atom)

    g: OffsetGaussianRigid = outputs["gaussian"]
    target = OffsetGaussianRigid.from_rigid_and_sidechain(
        rigid, pos, present, jnp.zeros_like(designed), (c.target_thickness,) * 2,
        atoms=c.gaussian_atoms,
    )  # fmt: skip
    terms["offset"] = _mean(jnp.sum(jnp.square(g.local_mean - target.local_mean), -1), des)
    terms["logscale"] = _mean(jnp.sum(jnp.square(g.scaling_log - target.scaling_log), -1), des)
    if c.per_atom_gaussians:
        nll = gaussian_nll_3d(
            true_global,
            outputs["atom14_pos"][..., start:stop, :],
            outputs["atom_gaussian_scaling_log"],
            outputs["atom_gaussian_rotation"],
        )
    else:
        nll = g.nll(true_global)
    terms["nll"] = _mean(nll - _HALF_LOG_2PI_3, m)

    aatype = jnp.asarray(batch["aatype"])
    logits = outputs["aatype_logits"]
    known = des * (aatype < 20)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.clip(aatype, 0, 20))
    terms["ce"] = _mean(ce, known)

    weights = {
        "mse": c.w_mse,
        "pair": c.w_pair,
        "huber": c.w_huber,
        "offset": c.w_offset,
        "logscale": c.w_logscale,
        "nll": c.w_nll,
        "ce": c.w_ce,
    }
    metrics: dict[str, jax.Array] = {}
    loss = jnp.zeros((), dtype)
    for name in TERMS:
        weighted = weights[name] * terms[name]
        metrics[name], metrics[f"{name}_weighted"] = terms[name], weighted
        loss = loss + weighted
    per_atom_count = jnp.sum(m, axis=(0, 1))
    per_atom = jnp.sum(sq * m, axis=(0, 1)) / jnp.maximum(per_atom_count, 1.0)
    for i in range(stop - start):
        metrics[f"atom{start + i:02d}_mse"] = per_atom[i]
    metrics["seq_recovery"] = _mean((jnp.argmax(logits, -1) == aatype).astype(dtype), known)
    metrics["n_designed"] = jnp.sum(des)
    return loss, metrics


def sidechain_loss(
    model: SideChainModel, batch: Mapping[str, Any], key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss (``jaxstab.train.fit`` signature ``(model, batch, key)``).

    ``key`` is split in two. A batch wider than the config's ``max_len`` residues (full chains
    as :func:`~jaxstab.models.sidechain.data.load_pdb` stores them) is first cut to a random
    window of ``max_len`` residues per example with
    :func:`~jaxstab.models.sidechain.crop.crop` (first half of the key; the width is static,
    so this jits); narrower batches are used as they are. Then ``batch["design_mask"]`` is
    used when present (cropped with the rest), else one is drawn from the second half with
    :func:`~jaxstab.models.sidechain.model.design_mask` (``mask_min``, ``mask_max``).
    Pair inputs (``esm_pair``) cannot be cropped here: crop them with the batch beforehand.

    >>> import jax
    >>> from flax import nnx
    >>> from jaxstab.models.sidechain.config import SideChainConfig
    >>> from jaxstab.models.sidechain.data import default_data
    >>> full = {k: v[:1] for k, v in default_data("val").arrays.items()}  # 173 residue slots
    >>> cfg = SideChainConfig.small().replace(max_len=8, n_blocks=1)
    >>> model = SideChainModel(cfg, rngs=nnx.Rngs(0))
    >>> loss, metrics = sidechain_loss(model, full, jax.random.key(0))
    >>> bool(0 < metrics["n_designed"] <= 8)
    True
    """
    c = model.config
    k_crop, k_mask = jax.random.split(key)
    if np.shape(batch["aatype"])[1] > c.max_len:
        if "esm_pair" in batch:
            raise ValueError(
                f"batch is {np.shape(batch['aatype'])[1]} residues wide, more than max_len="
                f"{c.max_len}, and holds esm_pair: crop pair inputs before the loss"
            )
        batch = crop(batch, k_crop, c.max_len)
    if "design_mask" not in batch:
        mask = design_mask(k_mask, batch["residue_mask"], c.mask_min, c.mask_max)
        batch = {**batch, "design_mask": mask}
    return loss_terms(model(batch), batch, c)
