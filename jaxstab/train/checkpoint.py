"""Orbax checkpoints of a training run: ``latest`` (every epoch) and ``best`` (by eval loss).

Each kind lives in its own ``orbax.checkpoint.CheckpointManager`` with ``max_to_keep=1``.
Orbax writes a step into a temporary directory and renames it into place when complete, and
removes the older step only after the new one is committed, so a crash mid-save leaves the
last good checkpoint readable (the half-written temporary directory is ignored and cleaned).

A checkpoint holds every leaf of ``(params, opt_state, rest)`` (typed PRNG keys stored as key
data), the per-step history so far and a JSON record (epoch, step, best metric, run key), i.e.
everything needed to continue a run so that it ends bit for bit where the uninterrupted run
ends.

Example:
  >>> import tempfile, numpy as np, jax.numpy as jnp
  >>> store = CheckpointStore(tempfile.mkdtemp())
  >>> store.save("latest", 3, [jnp.ones(2)], {"loss": np.zeros(3)}, {"epoch": 1})
  >>> leaves, history, meta = store.restore("latest", [jnp.zeros(2)])
  >>> leaves[0].tolist(), meta["epoch"]
  ([1.0, 1.0], 1)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

KINDS = ("latest", "best")


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(leaf: Any) -> Any:
    return jax.random.key_data(leaf) if _is_key(leaf) else leaf


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    leaf = _to_savable(leaf)
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)


class CheckpointStore:
    """The ``latest`` and ``best`` checkpoints of one run under ``directory``.

    >>> import tempfile
    >>> CheckpointStore(tempfile.mkdtemp()).latest_step("latest") is None
    True
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        )
        self._managers = {
            kind: ocp.CheckpointManager(
                os.path.join(self.directory, kind),
                options=options,
                item_names=("state", "history", "meta"),
            )
            for kind in KINDS
        }

    def latest_step(self, kind: str) -> int | None:
        """The step of the stored ``kind`` checkpoint, or ``None`` when there is none."""
        return self._managers[kind].latest_step()

    def save(
        self,
        kind: str,
        step: int,
        leaves: Sequence[Any],
        history: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
    ) -> None:
        """Writes one checkpoint (synchronously) and drops the previous one of that kind."""
        names = list(history)
        meta = {**meta, "history_names": names}
        manager = self._managers[kind]
        items = {
            "state": ocp.args.StandardSave([_to_savable(x) for x in leaves]),
            "meta": ocp.args.JsonSave(meta),
        }
        if names:  # orbax refuses empty trees
            items["history"] = ocp.args.StandardSave([np.asarray(history[k]) for k in names])
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()

    def restore(
        self, kind: str, template_leaves: Sequence[Any]
    ) -> tuple[list[Any], dict[str, np.ndarray], dict[str, Any]]:
        """Reads the ``kind`` checkpoint into leaves shaped like ``template_leaves``.

        Returns ``(leaves, history, meta)``; raises ``FileNotFoundError`` when there is none.
        """
        manager = self._managers[kind]
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no {kind!r} checkpoint under {self.directory}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        names = meta.pop("history_names")
        items = {"state": ocp.args.StandardRestore([_abstract(x) for x in template_leaves])}
        if names:
            items["history"] = ocp.args.StandardRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        leaves = [
            jax.random.wrap_key_data(v, impl=jax.random.key_impl(t)) if _is_key(t) else v
            for v, t in zip(restored["state"], template_leaves, strict=True)
        ]
        values = restored["history"] if names else []
        history = {k: np.asarray(v) for k, v in zip(names, values, strict=True)}
        return leaves, history, meta

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
