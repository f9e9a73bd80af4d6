"""What the many-run experiments share: a partial file that keeps every finished run, and a
persistent compilation cache with one run's executables dropped after it.

A long experiment (dozens of training runs on a CPU) must not lose its finished runs to a
crash or a time limit, and one process that keeps every run's compiled executables runs out
of memory mappings (``vm.max_map_count``) after ~17 runs. :class:`PartialRuns` writes each
finished run to ``<result>.partial.json`` (atomically) and, with ``resume``, starts from the
runs saved under the same settings; :func:`compile_cache` points JAX's persistent cache at a
temporary folder, so runs of one configuration (several seeds) share their compiled steps
after :func:`finish_run` has cleared the in-memory caches.

Example:
  >>> import tempfile, pathlib
  >>> d = pathlib.Path(tempfile.mkdtemp())
  >>> runs = PartialRuns(d / "x.json", {"epochs": 2}, resume=True)
  >>> runs.add("a/seed=0", {"loss": 1.0})
  >>> "a/seed=0" in PartialRuns(d / "x.json", {"epochs": 2}, resume=True)
  True
  >>> "a/seed=0" in PartialRuns(d / "x.json", {"epochs": 3}, resume=True)  # doctest: +ELLIPSIS
  /.../x.partial.json: other settings {'epochs': 2}; starting afresh
  False
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["PartialRuns", "compile_cache", "finish_run"]


class PartialRuns:
    """The finished runs of one experiment, by key, mirrored to ``<path>.partial.json``.

    ``settings`` identify the experiment: a partial file saved under other settings is not
    resumed (a line says so). :meth:`finish` writes the whole result to ``path`` and removes
    the partial file.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any], resume: bool = False) -> None:
        self.path = Path(path)
        self.partial = self.path.with_suffix(".partial.json")
        self.settings = json.loads(json.dumps(settings))
        self.runs: dict[str, Any] = {}
        if resume and self.partial.exists():
            saved = json.loads(self.partial.read_text())
            if saved.get("settings") == self.settings:
                self.runs = saved["runs"]
            else:
                print(f"{self.partial}: other settings {saved.get('settings')}; starting afresh")

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def __getitem__(self, key: str) -> Any:
        return self.runs[key]

    def add(self, key: str, run: Any) -> None:
        """Keeps ``run`` under ``key`` and rewrites the partial file."""
        self.runs[key] = run
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.partial.with_suffix(".tmp")
        payload = {"settings": self.settings, "runs": self.runs}
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(self.partial)

    def finish(self, result: dict[str, Any]) -> Path:
        """Writes ``result`` to :attr:`path` and removes the partial file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(result, indent=2) + "\n")
        self.partial.unlink(missing_ok=True)
        return self.path


@contextlib.contextmanager
def compile_cache(min_compile_seconds: float = 1.0) -> Iterator[str]:
    """JAX's persistent compilation cache in a temporary folder for the ``with`` block."""
    import jax

    with tempfile.TemporaryDirectory() as folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
        try:
            yield folder
        finally:
            jax.config.update("jax_compilation_cache_dir", None)


def finish_run() -> None:
    """Drops the in-memory executables of the run just finished (the persistent cache keeps
    them on disk for the next seed)."""
    import jax

    jax.clear_caches()
