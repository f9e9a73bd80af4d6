"""Orbax checkpoints of a training run: ``latest`` (every epoch) and ``best`` (by eval loss).

Each kind lives in its own ``orbax.checkpoint.CheckpointManager``; ``latest`` keeps the last
:data:`KEEP_LATEST` steps, ``best`` one. Orbax writes a step into a temporary directory and
renames it into place when complete. Once it is committed, :meth:`CheckpointStore.save` writes
a manifest into the step directory (:data:`MANIFEST`: the size and sha256 of every other file
in it); :meth:`CheckpointStore.restore` reads the newest step whose manifest matches its files
and which orbax can read, and names every newer step it passed over in
:attr:`RestoreResult.skipped` (a step without a manifest, e.g. killed between the commit and
the manifest, counts as unverified). When no step verifies, it raises
:class:`CheckpointError`.

Restored arrays take the sharding of the template's leaves (the mesh of the resuming run), so
a checkpoint written on N devices restores on M. With several processes
(``jax.distributed.initialize()``) every process calls the same methods on the same
(shared) directory; orbax writes each array shard from the process that holds it, and
process 0 alone writes the manifests.

A checkpoint holds every leaf of ``(params, opt_state, rest)`` (typed PRNG keys stored as key
data), the per-step history so far and a JSON record (epoch, step, best metric, run key), i.e.
everything needed to continue a run so that it ends bit for bit where the uninterrupted run
ends.

Example:
  >>> import tempfile, numpy as np, jax.numpy as jnp
  >>> store = CheckpointStore(tempfile.mkdtemp())
  >>> store.save("latest", 3, [jnp.ones(2)], {"loss": np.zeros(3)}, {"epoch": 1})
  >>> got = store.restore("latest", [jnp.zeros(2)])
  >>> got.leaves[0].tolist(), got.meta["epoch"], got.step, got.skipped
  ([1.0, 1.0], 1, 3, [])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxstab.train.mesh import sync_processes

KINDS = ("latest", "best")
KEEP_LATEST = 3
MANIFEST = "jaxstab_manifest.json"


class CheckpointError(ValueError):
    """No checkpoint that can be trusted (missing, corrupt or from another run)."""


class CheckpointWarning(UserWarning):
    """A newer checkpoint failed verification and an older one is used instead."""


class RestoreResult(NamedTuple):
    """What :meth:`CheckpointStore.restore` read.

    Attributes:
      leaves: the restored leaves, shaped like the template.
      history: the per-step history saved with the checkpoint.
      meta: the JSON record saved with it.
      step: the step that was restored.
      skipped: ``(step, reason)`` of every newer step that failed verification.
    """

    leaves: list[Any]
    history: dict[str, np.ndarray]
    meta: dict[str, Any]
    step: int
    skipped: list[tuple[int, str]]


class _Mismatch(Exception):
    pass


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(leaf: Any) -> Any:
    return jax.random.key_data(leaf) if _is_key(leaf) else leaf


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    # The template's own sharding is the target: a checkpoint written on N devices restores
    # onto the template's mesh (or single device), whatever N was.
    leaf = _to_savable(leaf)
    sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: str) -> dict[str, str]:
    """Relative path -> absolute path of every file under ``step_dir`` but the manifest."""
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel != MANIFEST:
                out[rel] = path
    return out


def write_manifest(step_dir: str) -> None:
    """Records the size and sha256 of every file of a committed step directory.

    >>> import tempfile, pathlib
    >>> d = tempfile.mkdtemp(); _ = pathlib.Path(d, "a").write_bytes(b"xyz")
    >>> write_manifest(d); verify_manifest(d) is None
    True
    """
    files = {
        rel: {"size": os.path.getsize(p), "sha256": _sha256(p)}
        for rel, p in sorted(_files(step_dir).items())
    }
    tmp = os.path.join(step_dir, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> str | None:
    """``None`` when every file matches the manifest, else the first problem in words.

    >>> import tempfile, pathlib
    >>> d = tempfile.mkdtemp(); _ = pathlib.Path(d, "a").write_bytes(b"xyz"); write_manifest(d)
    >>> _ = pathlib.Path(d, "a").write_bytes(b"xyZ"); verify_manifest(d)
    'a: checksum mismatch'
    """
    try:
        with open(os.path.join(step_dir, MANIFEST)) as f:
            expected = json.load(f)["files"]
    except FileNotFoundError:
        return "no manifest (not committed)"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    present = _files(step_dir)
    for rel, want in expected.items():
        path = present.get(rel)
        if path is None:
            return f"{rel}: missing"
        if os.path.getsize(path) != want["size"]:
            return f"{rel}: size {os.path.getsize(path)}, expected {want['size']}"
        if _sha256(path) != want["sha256"]:
            return f"{rel}: checksum mismatch"
    extra = sorted(set(present) - set(expected))
    return f"{extra[0]}: not in the manifest" if extra else None


class CheckpointStore:
    """The ``latest`` and ``best`` checkpoints of one run under ``directory``.

    >>> import tempfile
    >>> CheckpointStore(tempfile.mkdtemp()).latest_step("latest") is None
    True
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self._managers = {
            kind: ocp.CheckpointManager(
                os.path.join(self.directory, kind),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=KEEP_LATEST if kind == "latest" else 1,
                    create=True,
                    enable_async_checkpointing=False,
                ),
                item_names=("state", "history", "meta"),
            )
            for kind in KINDS
        }

    def steps(self, kind: str) -> list[int]:
        """Every committed step of ``kind``, oldest first (verified or not)."""
        return sorted(self._managers[kind].all_steps())

    def latest_step(self, kind: str) -> int | None:
        """The newest committed step of ``kind``, or ``None`` when there is none."""
        steps = self.steps(kind)
        return steps[-1] if steps else None

    def step_dir(self, kind: str, step: int) -> str:
        """The directory of one committed step."""
        return os.path.join(self.directory, kind, str(step))

    def save(
        self,
        kind: str,
        step: int,
        leaves: Sequence[Any],
        history: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
    ) -> None:
        """Writes one checkpoint (synchronously) with its manifest; drops the oldest ones.

        A step of that number already stored (e.g. one that failed verification) is replaced.
        """
        names = list(history)
        meta = {**meta, "history_names": names}
        manager = self._managers[kind]
        if step in manager.all_steps():
            manager.delete(step)
        items = {
            "state": ocp.args.StandardSave([_to_savable(x) for x in leaves]),
            "meta": ocp.args.JsonSave(meta),
        }
        if names:  # orbax refuses empty trees
            items["history"] = ocp.args.StandardSave([np.asarray(history[k]) for k in names])
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
        if jax.process_index() == 0:
            write_manifest(self.step_dir(kind, step))
        # No process reads a step before its manifest is there.
        sync_processes(f"jaxstab manifest {kind}/{step}")

    def drop_after(self, kind: str, step: int) -> None:
        """Deletes every ``kind`` step newer than ``step`` (unverified leftovers)."""
        manager = self._managers[kind]
        for s in manager.all_steps():
            if s > step:
                manager.delete(s)

    def _read(
        self, kind: str, step: int, template_leaves: Sequence[Any], expect: Mapping[str, Any]
    ):
        manager = self._managers[kind]
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        for name, value in expect.items():
            if name in meta and meta[name] != value:
                raise _Mismatch(
                    f"the checkpoint under {self.directory} was written with "
                    f"{name}={meta[name]!r}, this run has {name}={value!r}"
                )
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

    def restore(
        self,
        kind: str,
        template_leaves: Sequence[Any],
        expect: Mapping[str, Any] | None = None,
    ) -> RestoreResult:
        """Reads the newest verified ``kind`` checkpoint into leaves shaped like the template.

        ``expect`` maps ``meta`` names to the values this run has (``batch_size`` ...); a
        checkpoint recorded with another value raises :class:`CheckpointError` naming it.
        Raises :class:`CheckpointError` naming the folder when no step verifies.
        """
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.steps(kind)):
            problem = verify_manifest(self.step_dir(kind, step))
            if problem is None:
                try:
                    leaves, history, meta = self._read(kind, step, template_leaves, expect or {})
                except _Mismatch as e:
                    raise CheckpointError(str(e)) from None
                except Exception as e:  # orbax raises many types for unreadable data
                    problem = f"unreadable ({type(e).__name__})"
                else:
                    return RestoreResult(leaves, history, meta, step, skipped)
            skipped.append((step, problem))
        folder = os.path.join(self.directory, kind)
        if not skipped:
            raise CheckpointError(f"no {kind!r} checkpoint under {folder}")
        bad = "; ".join(f"step {s}: {why}" for s, why in skipped)
        raise CheckpointError(f"no verified {kind!r} checkpoint under {folder} ({bad})")

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
