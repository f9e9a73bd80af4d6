"""Finding a model's :class:`~jaxstab.plugin.ModelEntry` from what ``--model`` says.

``--model`` takes one of:

- a registered name: an entry point of the group ``jaxstab.models`` (the built-in ports
  register there in jaxstab's ``pyproject.toml``; a user's package registers the same way) or
  an entry added with :func:`register` in this process;
- ``package.module:ATTR``, an importable module and the name of its ``ModelEntry``;
- ``path/to/file.py:ATTR``, a Python file (imported under a private module name) and the name
  of its ``ModelEntry``.

jaxstab itself names no model. A spec that resolves to nothing raises :class:`ModelSpecError`
(a ``KeyError`` for an unknown name, listing the known ones).

Example:
  >>> "cfmvc" in names()
  True
  >>> get("cfmvc").name
  'cfmvc'
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys

from jaxstab.plugin import ModelEntry

GROUP = "jaxstab.models"
_EXTRA: dict[str, ModelEntry] = {}


class ModelSpecError(KeyError):
    """A ``--model`` spec that names no model entry; ``str()`` is one line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register(entry: ModelEntry) -> None:
    """Registers ``entry`` under ``entry.name`` for this process (replacing one of that name).

    >>> import jax.numpy as jnp, numpy as np
    >>> from jaxstab.plugin import Dataset
    >>> toy = ModelEntry("toy-registered", lambda d, c, r: None, lambda m, b, k: (0.0, {}),
    ...                  lambda seed: Dataset({"x": np.zeros((4, 1))}))
    >>> register(toy); get("toy-registered") is toy
    True
    """
    if not isinstance(entry, ModelEntry):
        raise TypeError(f"register() takes a ModelEntry, got {type(entry).__name__}")
    _EXTRA[entry.name] = entry


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def names() -> list[str]:
    """Names of every registered model (entry points and :func:`register`), sorted."""
    return sorted({*_entry_points(), *_EXTRA})


def _checked(entry: object, spec: str) -> ModelEntry:
    if not isinstance(entry, ModelEntry):
        name = getattr(entry, "__name__", None)
        kind = type(entry).__name__
        what = f"{name} (a {kind})" if name else f"a {kind}"
        raise ModelSpecError(f"--model {spec}: {what} is not a jaxstab.ModelEntry")
    return entry


def _from_file(path: str, spec: str) -> object:
    if not os.path.isfile(path):
        raise ModelSpecError(f"--model {spec}: no such file {path}")
    # One private module name per file, so two user files never shadow each other and the
    # file can import its own neighbours (its folder goes on sys.path while it loads).
    full = os.path.abspath(path)
    name = "_jaxstab_user_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, full)
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"--model {spec}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    folder = os.path.dirname(full)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _attribute(module: object, attr: str, spec: str) -> object:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(
                f"--model {spec}: no attribute {attr!r} in {spec.rpartition(':')[0]}"
            )
        obj = getattr(obj, part)
    return obj


def get(spec: str) -> ModelEntry:
    """The :class:`ModelEntry` that ``spec`` names (see the module docstring).

    Raises :class:`ModelSpecError` for an unknown name (listing the known ones), a missing
    file, module or attribute, or an object that is not a ``ModelEntry``. An exception raised
    while the user's module runs propagates unchanged.
    """
    if spec in _EXTRA:
        return _EXTRA[spec]
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or os.sep in attr or attr.endswith(".py"):
        eps = _entry_points()
        if spec not in eps:
            raise ModelSpecError(
                f"unknown model {spec!r}; known models: {', '.join(names()) or 'none'} "
                "(or give package.module:ATTR or path/to/file.py:ATTR)"
            )
        return _checked(eps[spec].load(), spec)
    if not attr:
        raise ModelSpecError(f"--model {spec}: name the ModelEntry after the colon")
    if target.endswith(".py") or os.sep in target or (os.altsep and os.altsep in target):
        module = _from_file(target, spec)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name is not None and target.startswith(e.name):
                raise ModelSpecError(f"--model {spec}: no module named {e.name!r}") from None
            raise
    return _checked(_attribute(module, attr, spec), spec)
