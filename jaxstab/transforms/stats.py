"""``read_stats``: every jaxstab statistic inside a (nested) optax state, by flat name."""

from __future__ import annotations

from collections import Counter
from typing import Any

import jax

from jaxstab.transforms._groups import path_names


def _is_jaxstab_state(node: Any) -> bool:
    return hasattr(type(node), "_jaxstab_stats") and isinstance(node, tuple)


def find_states(opt_state: Any, _prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """All jaxstab states in ``opt_state`` with their key paths, outermost first.

    Any pytree container is searched (chain tuples, ``inject_hyperparams``,
    ``apply_if_finite``, ``multi_transform``, ...), including the inner states held by
    jaxstab wrappers such as :func:`jaxstab.skip_bad_steps`.
    """
    found: list[tuple[tuple, Any]] = []
    if _is_jaxstab_state(opt_state):
        found.append((_prefix, opt_state))
        for field in opt_state._fields:
            child = getattr(opt_state, field)
            found += find_states(child, (*_prefix, jax.tree_util.GetAttrKey(field)))
        return found
    flat, _ = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: x is not opt_state and _is_jaxstab_state(x)
    )
    for path, leaf in flat:
        if _is_jaxstab_state(leaf):
            found += find_states(leaf, (*_prefix, *path))
    return found


def _label(path: tuple) -> str:
    # Dict keys along the path name the branch (e.g. a multi_transform label).
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def read_stats(opt_state: Any) -> dict[str, jax.Array]:
    """Flat dict of every statistic of every jaxstab transform in ``opt_state``.

    Names are those documented by each transform (``grad/global_norm``,
    ``grad/norm/<group>``, ``clip/pre_norm``, ``skip/halt``, ``loss_scale/scale``, ...).
    When a name occurs more than once (the same transform used twice, e.g. in two
    branches of ``optax.multi_transform``), every occurrence is prefixed with its branch:
    the dict keys on its path (``"<label>/grad/global_norm"``), or the whole path when
    those do not tell them apart. Values are the state's arrays, so this works inside
    ``jit`` and on ``jax.eval_shape`` results.

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = jaxstab.stability_guard(optax.adam(1e-3))
    >>> params = {"w": jnp.ones(2)}
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    >>> stats = jaxstab.read_stats(state)
    >>> float(stats["grad/global_norm"]), bool(stats["clip/clipped"])
    (5.0, True)
    """
    entries: list[tuple[tuple, str, jax.Array]] = []
    for path, state in find_states(opt_state):
        for name, value in state._jaxstab_stats().items():
            entries.append((path, name, value))
    counts = Counter(name for _, name, _ in entries)
    out: dict[str, jax.Array] = {}
    for path, name, value in entries:
        key = name
        if counts[name] > 1:
            label = _label(path)
            same = [_label(p) for p, n, _ in entries if n == name]
            if not label or same.count(label) > 1:
                label = "/".join(path_names(path)) or "<root>"
            key = f"{label}/{name}"
        out[key] = value
    return out
