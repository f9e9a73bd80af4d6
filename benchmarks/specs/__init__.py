"""The benchmark specs of the model ports, by name: what ``--model`` takes.

Each port supplies one :class:`~benchmarks.specs.base.ModelSpec` in
``benchmarks/specs/<name>.py`` and is listed in :data:`SPECS`; the per-model suites loop over
:func:`names` or the ``--model`` names given. Importing this package imports neither JAX
models nor PyTorch (a spec's fields import what they need when called).

Example:
  >>> names()
  ['cfmvc', 'e3gnn', 'genoflow', 'sidechain']
  >>> get("cfmvc").entry
  'cfmvc'
  >>> try:
  ...     get("nosuch")
  ... except UnknownModel as err:
  ...     print(err)
  unknown model 'nosuch'; known models: cfmvc, e3gnn, genoflow, sidechain
"""

from __future__ import annotations

from collections.abc import Iterable

from benchmarks.specs import cfmvc, e3gnn, genoflow, sidechain
from benchmarks.specs.base import ModelSpec

SPECS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (cfmvc.SPEC, e3gnn.SPEC, genoflow.SPEC, sidechain.SPEC)
}


class UnknownModel(KeyError):
    """A model name with no spec; ``str()`` is one line listing the known ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def names() -> list[str]:
    """Every spec's name, sorted."""
    return sorted(SPECS)


def get(name: str) -> ModelSpec:
    """The spec called ``name``; :class:`UnknownModel` (a ``KeyError``) listing the names."""
    if name not in SPECS:
        raise UnknownModel(f"unknown model {name!r}; known models: {', '.join(names())}")
    return SPECS[name]


def select(models: Iterable[str] | None = None) -> list[ModelSpec]:
    """The specs of ``models`` in the order given, repeats dropped (``None``: every spec).

    >>> [s.name for s in select(["cfmvc", "cfmvc"])]
    ['cfmvc']
    """
    chosen = names() if models is None else list(dict.fromkeys(models))
    return [get(name) for name in chosen]


__all__ = ["SPECS", "ModelSpec", "UnknownModel", "get", "names", "select"]
