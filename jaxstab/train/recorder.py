"""Host-side history: one ``jax.device_get`` per jitted call.

Each call of the fused training chunk returns its per-step outputs stacked along a leading
axis plus the halt code; :meth:`Recorder.pull` fetches both in a single transfer, drops the
steps skipped after a halt and appends the rest to the history.

Example:
  >>> import jax.numpy as jnp
  >>> rec = Recorder()
  >>> n, halt = rec.pull({"loss": jnp.array([1.0, 2.0]), "_valid": jnp.array([True, False])},
  ...                    jnp.int32(1))
  >>> n, halt, rec.history()["loss"].tolist()
  (1, 1, [1.0])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxstab.train.step import VALID


class Recorder:
    """Accumulates per-step outputs on the host.

    >>> Recorder({"loss": np.array([0.5])}).history()["loss"].tolist()
    [0.5]
    """

    def __init__(self, initial: Mapping[str, np.ndarray] | None = None) -> None:
        self._chunks: dict[str, list[np.ndarray]] = {
            k: [np.asarray(v)] for k, v in (initial or {}).items()
        }
        self.last: dict[str, Any] = {}

    def pull(self, outputs: Mapping[str, jax.Array], halt: jax.Array) -> tuple[int, int]:
        """Fetches a call's outputs and halt code together; returns ``(valid steps, halt)``."""
        host, host_halt = jax.device_get((dict(outputs), halt))
        valid = np.asarray(host.pop(VALID), dtype=bool)
        n = int(valid.sum())  # valid steps form a prefix: after a halt every step is a no-op
        for k, v in host.items():
            self._chunks.setdefault(k, []).append(np.asarray(v)[:n])
        if n:
            self.last = {k: np.asarray(v)[n - 1] for k, v in host.items()}
        return n, int(host_halt)

    def tail(self, name: str) -> np.ndarray:
        """The values of ``name`` from the latest :meth:`pull`."""
        return self._chunks[name][-1]

    def history(self) -> dict[str, np.ndarray]:
        """Every output name mapped to its values over all steps so far."""
        return {k: np.concatenate(v) for k, v in self._chunks.items()}

    def __len__(self) -> int:
        if not self._chunks:
            return 0
        return sum(len(c) for c in next(iter(self._chunks.values())))
