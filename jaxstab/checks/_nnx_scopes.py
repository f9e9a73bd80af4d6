"""Name scopes for Flax NNX module calls, so that traced equations carry the module path.

NNX pushes no JAX name scope when a module is called. While `module_scopes` is active,
the ``__call__`` of every ``nnx.Module`` subclass is wrapped: a call enters
``jax.named_scope(PREFIX + path)``, where ``path`` is the callee's path relative to the
calling module (found with ``nnx.iter_graph`` on the caller), so nested scopes spell the
full path from the outermost module (``encoder`` then ``layers/0``). The outermost module
gets ``PREFIX`` alone. Paths are found by object identity inside the trace, so copies made
by ``nnx.grad``/``nnx.jit`` (split/merge) are handled.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

PREFIX = "nnx:"

_lock = threading.RLock()
_local = threading.local()


def _children(module: nnx.Module) -> dict[int, str]:
    found: dict[int, str] = {}
    for path, node in nnx.iter_graph(module):
        if path and isinstance(node, nnx.Module):
            found.setdefault(id(node), "/".join(str(p) for p in path))
    return found


def _wrap(call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def scoped_call(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        stack: list[dict[int, str]] = getattr(_local, "stack", [])
        _local.stack = stack
        relative = stack[-1].get(id(self), "") if stack else ""
        stack.append(_children(self))
        try:
            with jax.named_scope(PREFIX + relative):
                return call(self, *args, **kwargs)
        finally:
            stack.pop()

    scoped_call.__jaxstab_scoped__ = True  # type: ignore[attr-defined]
    return scoped_call


def _module_classes() -> list[type]:
    seen: list[type] = []
    todo = [nnx.Module]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


@contextlib.contextmanager
def module_scopes() -> Iterator[None]:
    """Within the block, calls of NNX modules push a name scope with their path."""
    with _lock:
        patched: list[tuple[type, Callable[..., Any]]] = []
        try:
            for cls in _module_classes():
                call = cls.__dict__.get("__call__")
                if call is None or getattr(call, "__jaxstab_scoped__", False):
                    continue
                patched.append((cls, call))
                cls.__call__ = _wrap(call)  # type: ignore[method-assign]
            yield
        finally:
            for cls, call in reversed(patched):
                cls.__call__ = call  # type: ignore[method-assign]


def module_path(name_stack: Any) -> str | None:
    """The NNX module path in a JAX name stack, or None outside module calls."""
    parts: list[str] = []
    inside = False
    for elem in getattr(name_stack, "stack", ()):
        name = getattr(elem, "name", "")
        if type(elem).__name__ == "Scope" and name.startswith(PREFIX):
            inside = True
            if name[len(PREFIX) :]:
                parts.append(name[len(PREFIX) :])
    return "/".join(parts) if inside else None
