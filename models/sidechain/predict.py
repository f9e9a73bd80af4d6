"""Side-chain model inference: sequence and side chains for fixed backbones.

:func:`predict` runs the model (eval mode, deterministic) over every chain of a data set on
its full residue width, with no crop: the model takes any number of residues, so every
residue sees the whole chain as context (memory grows with the square of the width; load
very long chains with ``load_pdb(..., max_len=...)`` or crop them first).

Which residues are designed (their side chains and types hidden from the model):

- ``design="all"`` (the default): every real residue, as in fixed-backbone sequence design,
  where only the backbone is known;
- ``design="random"``: each chain designs a share ``p ~ U(mask_min, mask_max)`` of its
  residues drawn from ``key``, as in training (the rest are context);
- a ``design_mask [n, L]`` array in the data overrides both.

Example:
  >>> import jax
  >>> from flax import nnx
  >>> from jaxstab.models.sidechain.config import SideChainConfig
  >>> from jaxstab.models.sidechain.crop import center_crop
  >>> from jaxstab.models.sidechain.data import default_data
  >>> from jaxstab.models.sidechain.model import SideChainModel
  >>> model = SideChainModel(SideChainConfig.small().replace(n_blocks=1), rngs=nnx.Rngs(0))
  >>> chains = center_crop({k: v[:2] for k, v in default_data("val").arrays.items()}, 20)
  >>> out = predict(model, chains)
  >>> out["atom14_pos"].shape, out["aatype_logits"].shape, bool(out["design_mask"].all())
  ((2, 20, 14, 3), (2, 20, 21), True)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstab.models.sidechain import residue_constants as rc
from jaxstab.models.sidechain.features import design_mask
from jaxstab.models.sidechain.model import SideChainModel
from jaxstab.plugin import Dataset

__all__ = ["DESIGN_MODES", "MODEL_INPUTS", "predict"]

DESIGN_MODES: tuple[str, ...] = ("all", "random")
# The data fields the model reads (ESM ones only with ``use_esm``).
MODEL_INPUTS: tuple[str, ...] = (
    "aatype",
    "atom14_pos",
    "atom14_mask",
    "residue_mask",
    "residue_index",
    "design_mask",
    "esm_single",
    "esm_pair",
)


def predict(
    model: SideChainModel,
    dataset: Dataset | Mapping[str, Any],
    key: jax.Array | None = None,
    *,
    batch_size: int = 8,
    design: str = "all",
) -> dict[str, np.ndarray]:
    """The model's sequence and side chains for every chain of ``dataset`` (module docstring).

    Args:
      model: a :class:`SideChainModel` (not modified).
      dataset: a :class:`~jaxstab.plugin.Dataset` of :func:`load_pdb` arrays, or the arrays.
      key: draws the designed residues with ``design="random"``; unused otherwise.
      batch_size: chains per forward call (the last call is filled up with earlier chains
        and their outputs dropped, so there is one compilation).
      design: ``"all"`` or ``"random"`` (see the module docstring); a ``design_mask`` in the
        data is used instead.

    Returns:
      numpy arrays over the ``n`` chains and ``L`` residue slots of the data:
      ``atom14_pos [n, L, 14, 3]`` global Å (atoms 0–3 the input backbone, zero where absent;
      4–13 predicted for every real residue, designed or not; zeros on padding),
      ``aatype_logits [n, L, 21]``, ``design_mask [n, L]`` bool (the residues designed),
      ``aatype [n, L]`` int32 (the most likely of the 20 standard types) and ``atom14_mask
      [n, L, 14]`` float32 (the atoms that type has, on real residues).
    """
    if design not in DESIGN_MODES:
        raise ValueError(f"design must be one of {DESIGN_MODES}; got {design!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    source = dataset.arrays if isinstance(dataset, Dataset) else dataset
    arrays = {k: np.asarray(source[k]) for k in MODEL_INPUTS if k in source}
    n = arrays["aatype"].shape[0]
    if n == 0:
        raise ValueError("dataset holds no chains")
    res = arrays["residue_mask"] > 0
    c = model.config
    if "design_mask" in arrays:
        arrays["design_mask"] = (arrays["design_mask"] > 0) & res
    elif design == "all":
        arrays["design_mask"] = res
    else:
        if key is None:
            raise ValueError('design="random" needs a key')
        arrays["design_mask"] = np.asarray(design_mask(key, res, c.mask_min, c.mask_max))

    graphdef, state = nnx.split(model)
    forward = _forward_fn(graphdef)
    size = min(batch_size, n)
    pos_parts, logit_parts = [], []
    for start in range(0, n, size):
        index = np.arange(start, start + size) % n
        pos, logits = forward(state, {k: jnp.asarray(v[index]) for k, v in arrays.items()})
        keep = min(size, n - start)
        pos_parts.append(np.asarray(pos)[:keep])
        logit_parts.append(np.asarray(logits)[:keep])
    logits = np.concatenate(logit_parts).astype(np.float32)
    aatype = np.argmax(logits[..., :20], axis=-1).astype(np.int32)
    return {
        "atom14_pos": np.concatenate(pos_parts).astype(np.float32),
        "aatype_logits": logits,
        "design_mask": arrays["design_mask"].astype(bool),
        "aatype": aatype,
        "atom14_mask": rc.ATOM14_MASK[aatype].astype(np.float32) * res[..., None],
    }


@functools.lru_cache(maxsize=8)
def _forward_fn(graphdef: nnx.GraphDef) -> Any:
    """The jitted eval forward of one model structure (shared by calls on the same model)."""

    @jax.jit
    def forward(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        m = nnx.merge(graphdef, state, copy=True)
        m.eval()
        out = m(batch)
        return out["atom14_pos"], out["aatype_logits"]

    return forward
