"""Names of pytree leaves, parameter groups and selection by name, shared by all of jaxstab.

A leaf's name is its ``jax.tree_util`` key path joined with ``"/"`` (dict keys, attribute
names and sequence indices as written; NNX's trailing ``.value`` dropped), so the NNX path
``('encoder', 'layers', 0, 'kernel')`` is ``"encoder/layers/0/kernel"``. A group is the
name cut at ``group_depth`` keys (``None``: the full name). The statistics of the
transforms (:func:`jaxstab.read_stats`), the gradient-flow report, the freezing of
:func:`jaxstab.train_only` and the report all use these names.

>>> import jax.numpy as jnp
>>> params = {"encoder": {"layers": [{"kernel": jnp.ones(2)}]}, "head": jnp.ones(1)}
>>> leaf_names(params)
['encoder/layers/0/kernel', 'head']
>>> select(params, lambda name: name.startswith("encoder"))
{'encoder': {'layers': [{'kernel': True}]}, 'head': False}
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "ROOT",
    "flat_dict",
    "group_layout",
    "key_name",
    "leaf_group_names",
    "leaf_names",
    "path_name",
    "path_names",
    "select",
]

ROOT = "<root>"
"""The name of a leaf that is the whole tree (an empty key path)."""

# NNX ``Variable`` leaves flatten with a trailing attribute key; it is not part of the
# parameter's name.
_VARIABLE_ATTRS = ("value", "raw_value", "_value")


def key_name(key: Any) -> str:
    """The name of one key of a ``jax.tree_util`` key path.

    >>> import jax
    >>> key_name(jax.tree_util.DictKey("w")), key_name(jax.tree_util.SequenceKey(2))
    ('w', '2')
    """
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_names(path: Sequence[Hashable]) -> list[str]:
    """Names of the keys of one key path, without NNX's trailing ``.value``.

    >>> import jax
    >>> path_names((jax.tree_util.DictKey("head"), jax.tree_util.GetAttrKey("value")))
    ['head']
    """
    names = [key_name(k) for k in path]
    if (
        len(names) > 1
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
        and names[-1] in _VARIABLE_ATTRS
    ):
        names = names[:-1]
    return names


def path_name(path: Sequence[Hashable], group_depth: int | None = None) -> str:
    """A key path as one ``"/"``-joined name, cut at ``group_depth`` keys (``None``: all).

    >>> import jax
    >>> path = (jax.tree_util.DictKey("encoder"), jax.tree_util.SequenceKey(0))
    >>> path_name(path), path_name(path, 1), path_name(())
    ('encoder/0', 'encoder', '<root>')
    """
    names = path_names(path)
    if group_depth is not None:
        names = names[:group_depth]
    return "/".join(names) if names else ROOT


def leaf_group_names(
    tree: Any, group_depth: int | None = 1, *, is_leaf: Callable[[Any], bool] | None = None
) -> list[str]:
    """The group name of every leaf of ``tree``, in ``jax.tree_util`` leaf order.

    >>> import jax.numpy as jnp
    >>> params = {"encoder": {"layers": [{"kernel": jnp.ones(2)}]}, "head": jnp.ones(1)}
    >>> leaf_group_names(params, group_depth=2)
    ['encoder/layers', 'head']
    """
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [path_name(p, group_depth) for p, _ in flat]


def leaf_names(tree: Any, *, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
    """The full name of every leaf of ``tree``, in leaf order (see the module example)."""
    return leaf_group_names(tree, None, is_leaf=is_leaf)


def group_layout(tree: Any, group_depth: int | None = 1) -> tuple[list[str], list[list[int]]]:
    """Ordered unique group names and, for each, the indices of its leaves.

    >>> group_layout({"a": {"x": 1.0, "y": 2.0}, "b": 3.0})
    (['a', 'b'], [[0, 1], [2]])
    """
    names: list[str] = []
    members: dict[str, list[int]] = {}
    for i, name in enumerate(leaf_group_names(tree, group_depth)):
        if name not in members:
            names.append(name)
            members[name] = []
        members[name].append(i)
    return names, [members[n] for n in names]


def flat_dict(tree: Any) -> dict[str, Any]:
    """``{leaf name: leaf}`` in leaf order; two leaves with one name are a ``ValueError``.

    >>> flat_dict({"enc": [1.0, 2.0], "head": {"w": 3.0}})
    {'enc/0': 1.0, 'enc/1': 2.0, 'head/w': 3.0}
    """
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_name(path)
        if name in out:
            raise ValueError(f"two leaves are both named {name!r}; names must be unique")
        out[name] = leaf
    return out


def select(tree: Any, predicate: Callable[[str], bool], group_depth: int | None = None) -> Any:
    """A tree like ``tree`` with ``predicate(name)`` at every leaf (an optax-style mask).

    ``name`` is the leaf's group name at ``group_depth`` (``None``: its full name).
    ``predicate`` must return a bool; anything else is a ``TypeError`` naming the leaf.

    >>> select({"enc": {"w": 1.0}, "dec": {"w": 2.0}}, lambda g: g == "dec", group_depth=1)
    {'dec': {'w': True}, 'enc': {'w': False}}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    mask = []
    for path, _ in flat:
        name = path_name(path, group_depth)
        value = predicate(name)
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"the predicate must return a bool; for {name!r} it returned {value!r}")
        mask.append(bool(value))
    return jax.tree_util.tree_unflatten(treedef, mask)
