"""Fixed-length residue windows of side-chain model batches: random for training, central for
evaluation.

Both take the arrays of :func:`jaxstab.models.sidechain.data.load_pdb` (or a batch of them),
are pure JAX and jit with ``max_len`` static, and give every example exactly ``max_len``
residue slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["center_crop", "crop"]


def crop(arrays: Mapping[str, Any], key: jax.Array, max_len: int) -> dict[str, jax.Array]:
    """A random contiguous window of ``max_len`` residues of every example (for training).

    Each example draws its own window start, uniform in ``0 .. chain_length - max_len``
    (0 for chains of at most ``max_len`` residues, which are kept whole and padded), so the
    window lies inside the chain. Every array whose axis 1 has the residue width (that of
    ``aatype``) is sliced along axis 1 and comes out with exactly ``max_len`` slots (padded
    with zeros when the input is narrower); ``chain_length`` becomes
    ``min(chain_length, max_len)``; other arrays pass through. Pair arrays (two residue axes)
    are not supported: build them after cropping. Pure JAX; jit it with ``max_len`` static.

    Args:
      arrays: a batch of :func:`load_pdb` arrays (``aatype`` and ``chain_length`` needed).
      key: a JAX random key; a different key gives different windows.
      max_len: the window length (a Python int >= 1).

    >>> import jax, numpy as np
    >>> arrays = {"aatype": np.arange(10, dtype=np.int32)[None],
    ...           "chain_length": np.array([10], np.int32)}
    >>> out = jax.jit(crop, static_argnums=2)(arrays, jax.random.key(0), 4)
    >>> window = out["aatype"][0].tolist()
    >>> len(window), window == list(range(window[0], window[0] + 4)), int(out["chain_length"][0])
    (4, True, 4)
    """
    length = _lengths(arrays, max_len)
    start = jax.random.randint(key, length.shape, 0, jnp.maximum(length - max_len, 0) + 1)
    return _window(arrays, start, max_len)


def center_crop(arrays: Mapping[str, Any], max_len: int) -> dict[str, jax.Array]:
    """The central window of ``max_len`` residues of every example (for evaluation).

    The window starts at ``(chain_length - max_len) // 2`` (0 for shorter chains); otherwise
    as :func:`crop`.

    >>> import numpy as np
    >>> arrays = {"aatype": np.arange(10, dtype=np.int32)[None],
    ...           "chain_length": np.array([10], np.int32)}
    >>> center_crop(arrays, 4)["aatype"].tolist()
    [[3, 4, 5, 6]]
    """
    length = _lengths(arrays, max_len)
    return _window(arrays, jnp.maximum(length - max_len, 0) // 2, max_len)


def _lengths(arrays: Mapping[str, Any], max_len: int) -> jax.Array:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1 (static under jit); got {max_len!r}")
    for name in ("aatype", "chain_length"):
        if name not in arrays:
            raise ValueError(f"arrays have no field {name!r}; crop needs aatype and chain_length")
    if np.ndim(arrays["aatype"]) != 2:
        raise ValueError(
            f"field 'aatype' has shape {np.shape(arrays['aatype'])}; expected [examples, residues]"
        )
    return jnp.asarray(arrays["chain_length"], jnp.int32)


def _window(arrays: Mapping[str, Any], start: jax.Array, max_len: int) -> dict[str, jax.Array]:
    n, width = np.shape(arrays["aatype"])
    out: dict[str, jax.Array] = {}
    for name, value in arrays.items():
        value = jnp.asarray(value)
        if name == "chain_length":
            out[name] = jnp.minimum(value, max_len).astype(value.dtype)
        elif value.ndim >= 2 and value.shape[:2] == (n, width):
            if width < max_len:
                pad = [(0, 0)] * value.ndim
                pad[1] = (0, max_len - width)
                value = jnp.pad(value, pad)
            out[name] = jax.vmap(lambda v, s: jax.lax.dynamic_slice_in_dim(v, s, max_len, axis=0))(
                value, start
            )
        else:
            out[name] = value
    return out
