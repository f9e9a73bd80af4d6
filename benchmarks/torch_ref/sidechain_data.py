"""Data helpers of the PyTorch side-chain model: padded NumPy batches to tensors, toy chains,
fixed-length windows and designed-residue masks (the rules of ``jaxstab.models.sidechain``'s
:mod:`~jaxstab.models.sidechain.crop` and :func:`~jaxstab.models.sidechain.design_mask`, drawn
from a ``torch.Generator``).

Example:
  >>> a = toy_arrays(2, 6, seed=0)
  >>> batch = batch_to_tensors(a)
  >>> batch["atom14_pos"].dtype, tuple(crop_arrays(a, np.array([1, 2]), 4)["aatype"].shape)
  (torch.float32, (2, 4))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["batch_to_tensors", "crop_arrays", "design_mask", "random_crop", "toy_arrays"]

_INT_FIELDS = ("aatype", "residue_index", "chain_length")


def batch_to_tensors(
    arrays: Mapping[str, Any], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """NumPy (or JAX) arrays of a padded batch → tensors: floats as ``dtype``, ``aatype``,
    ``residue_index`` and ``chain_length`` as ``long``, ``design_mask`` as ``bool``.

    >>> import numpy as np
    >>> t = batch_to_tensors({"aatype": np.zeros((1, 3), np.int32), "design_mask": np.ones((1, 3))})
    >>> t["aatype"].dtype, t["design_mask"].dtype
    (torch.int64, torch.bool)
    """
    out = {}
    for name, value in arrays.items():
        x = torch.tensor(np.asarray(value), device=device)
        if name == "design_mask":
            x = x > 0
        elif name in _INT_FIELDS:
            x = x.long()
        elif x.is_floating_point():
            x = x.to(dtype)
        out[name] = x
    return out


def toy_arrays(n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random chains of ``length`` residues (ideal-ish backbone, random side chains)
    in the data loader's layout, for examples and tests that need no PDB file.

    >>> a = toy_arrays(2, 5)
    >>> a["atom14_pos"].shape, int(a["residue_mask"].sum())
    ((2, 5, 14, 3), 10)
    """
    rng = np.random.default_rng(seed)
    ca = np.cumsum(rng.normal(size=(n, length, 3)), axis=1) * 2.2
    offsets = np.array([[1.2, 0.8, 0.0], [0.0, 0.0, 0.0], [-0.5, 1.4, 0.1], [-0.3, 2.4, 0.4]])
    pos = np.empty((n, length, 14, 3))
    pos[:, :, :4] = ca[:, :, None] + offsets + 0.1 * rng.normal(size=(n, length, 4, 3))
    pos[:, :, 4:] = ca[:, :, None] + 1.6 * rng.normal(size=(n, length, 10, 3))
    aatype = rng.integers(0, 20, size=(n, length))
    n_side = rng.integers(0, 11, size=(n, length))
    atom_mask = np.zeros((n, length, 14), np.float32)
    atom_mask[:, :, :4] = 1
    atom_mask[:, :, 4:] = np.arange(10) < n_side[..., None]
    return {
        "aatype": aatype.astype(np.int32),
        "atom14_pos": (pos * atom_mask[..., None]).astype(np.float32),
        "atom14_mask": atom_mask,
        "residue_mask": np.ones((n, length), np.float32),
        "residue_index": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
        "chain_length": np.full(n, length, np.int32),
    }


def crop_arrays(
    arrays: Mapping[str, np.ndarray], starts: np.ndarray, max_len: int
) -> dict[str, np.ndarray]:
    """A window of ``max_len`` residues from ``starts[i]`` of every example (the rule of
    ``jaxstab.models.sidechain.crop``: residue arrays padded with zeros when narrower,
    ``chain_length`` capped).

    >>> a = {"aatype": np.arange(10)[None], "chain_length": np.array([10])}
    >>> crop_arrays(a, np.array([3]), 4)["aatype"].tolist()
    [[3, 4, 5, 6]]
    """
    n, width = np.shape(arrays["aatype"])
    out = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if name == "chain_length":
            out[name] = np.minimum(value, max_len).astype(value.dtype)
        elif value.ndim >= 2 and value.shape[:2] == (n, width):
            if width < max_len:
                pad = [(0, 0)] * value.ndim
                pad[1] = (0, max_len - width)
                value = np.pad(value, pad)
            out[name] = np.stack([value[i, s : s + max_len] for i, s in enumerate(starts)])
        else:
            out[name] = value
    return out


def random_crop(
    arrays: Mapping[str, np.ndarray], max_len: int, generator: torch.Generator | None = None
) -> dict[str, np.ndarray]:
    """A random window of ``max_len`` residues of every example (:func:`crop_arrays`), its
    start uniform over the chain's room, drawn from ``generator`` (default: PyTorch's global
    one); ``arrays`` unchanged when they are no wider than ``max_len``.

    >>> a = {"aatype": np.arange(10)[None], "chain_length": np.array([10])}
    >>> random_crop(a, 4, torch.Generator().manual_seed(0))["aatype"].shape
    (1, 4)
    """
    if np.shape(arrays["aatype"])[1] <= max_len:
        return dict(arrays)
    room = np.maximum(np.asarray(arrays["chain_length"]) - max_len, 0) + 1
    starts = (torch.rand(len(room), generator=generator).numpy() * room).astype(int)
    return crop_arrays(arrays, np.minimum(starts, room - 1), max_len)


def design_mask(
    residue_mask: torch.Tensor, mask_min: float, mask_max: float, generator: torch.Generator
) -> torch.Tensor:
    """Designed residues ``[b, L]`` bool: ``p ~ U(mask_min, mask_max)`` per example, each
    real residue designed with probability ``p``.

    >>> m = design_mask(torch.ones(2, 8), 1.0, 1.0, torch.Generator().manual_seed(0))
    >>> m.sum(dim=1).tolist()
    [8, 8]
    """
    real = residue_mask > 0
    b = real.shape[0]
    p = mask_min + (mask_max - mask_min) * torch.rand(b, 1, generator=generator)
    return (torch.rand(real.shape, generator=generator) < p) & real
