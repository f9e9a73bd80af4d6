"""Parameter groups, fused per-leaf statistics and overflow-safe norms.

Every jaxstab transform computes its gradient statistics through :func:`tree_stats`, so that
inside one jitted step the identical reductions of several transforms are merged by XLA's
common-subexpression elimination into a single pass over the gradient.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# NNX ``Variable`` leaves flatten with a trailing attribute key; it is not part of the
# parameter's name.
_VARIABLE_ATTRS = ("value", "raw_value", "_value")


def check_group_depth(group_depth: int | None) -> None:
    """Raises a ``ValueError`` unless ``group_depth`` is ``None`` or a positive int."""
    if group_depth is None:
        return
    if isinstance(group_depth, bool) or not isinstance(group_depth, int) or group_depth < 1:
        raise ValueError(f"group_depth must be a positive int or None, got {group_depth!r}")


def check_positive(name: str, value: Any) -> None:
    """Raises a ``ValueError`` unless ``value`` is a finite positive number."""
    try:
        ok = float(value) > 0 and float(value) != float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def _key_name(key: Any) -> str:
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
    """Names of the keys of one ``jax.tree_util`` key path, without NNX's ``.value``."""
    names = [_key_name(k) for k in path]
    if (
        len(names) > 1
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
        and names[-1] in _VARIABLE_ATTRS
    ):
        names = names[:-1]
    return names


def leaf_group_names(tree: Any, group_depth: int | None = 1) -> list[str]:
    """The group name of every leaf of ``tree``, in ``jax.tree_util`` leaf order.

    The group is the leaf's path cut at ``group_depth`` keys and joined with ``"/"``;
    ``group_depth=None`` keeps the full path (one group per leaf).

    >>> import jax.numpy as jnp
    >>> params = {"encoder": {"layers": [{"kernel": jnp.ones(2)}]}, "head": jnp.ones(1)}
    >>> leaf_group_names(params, group_depth=2)
    ['encoder/layers', 'head']
    """
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    out = []
    for path in paths:
        names = path_names(path)
        if group_depth is not None:
            names = names[:group_depth]
        out.append("/".join(names) if names else "<root>")
    return out


def group_layout(tree: Any, group_depth: int | None = 1) -> tuple[list[str], list[list[int]]]:
    """Ordered unique group names and, for each, the indices of its leaves."""
    per_leaf = leaf_group_names(tree, group_depth)
    names: list[str] = []
    members: dict[str, list[int]] = {}
    for i, name in enumerate(per_leaf):
        if name not in members:
            names.append(name)
            members[name] = []
        members[name].append(i)
    return names, [members[n] for n in names]


def _acc_dtype(dtype: Any) -> Any:
    # float32 accumulation for float16/bfloat16/float32 leaves; float64 stays float64.
    return jnp.promote_types(dtype, jnp.float32)


class TreeStats(NamedTuple):
    """Per-leaf statistics, each an array of shape ``[num_leaves]``.

    The squared norm of leaf ``i`` is ``scale[i]**2 * sumsq[i]`` (kept factored so that it
    never overflows; ``scale`` is 1 unless a plain float32 sum of squares would overflow).
    Norms and ``max_abs`` cover the finite entries only; ``nan``/``inf`` count the others.
    """

    scale: jax.Array
    sumsq: jax.Array
    max_abs: jax.Array
    nan: jax.Array
    inf: jax.Array
    zeros: jax.Array
    size: jax.Array


def _leaf_reduce(x: jax.Array, scale: jax.Array | None = None) -> tuple[jax.Array, ...]:
    # Sum of squares, max-abs and the NaN/Inf/zero counts of one leaf. The sum of squares
    # is a plain ``jnp.sum`` (the same reduction optax uses, hence bit-identical norms on
    # finite input); the other four are one variadic reduction. XLA fuses both into a
    # single pass over the leaf. Hand-written: optax/chex offer no such fused statistics.
    acc = _acc_dtype(x.dtype)
    xf = x.astype(acc)
    finite = jnp.isfinite(xf)
    xa = jnp.where(finite, jnp.abs(xf), 0)
    xs = xa if scale is None else xa / scale
    sumsq = jnp.sum(xs * xs)
    flat = (
        xa.reshape(-1),
        jnp.isnan(xf).astype(jnp.int32).reshape(-1),
        jnp.isinf(xf).astype(jnp.int32).reshape(-1),
        (xf == 0).astype(jnp.int32).reshape(-1),
    )
    zero_i = jnp.zeros((), jnp.int32)
    inits = (jnp.zeros((), acc), zero_i, zero_i, zero_i)

    def combine(a: tuple, b: tuple) -> tuple:
        return (jnp.maximum(a[0], b[0]), a[1] + b[1], a[2] + b[2], a[3] + b[3])

    return (sumsq, *lax.reduce(flat, inits, combine, (0,)))


def tree_stats(tree: Any, axis_name: str | None = None) -> TreeStats:
    """Fused per-leaf statistics of ``tree``; reduced over ``axis_name`` when given.

    Under ``shard_map``/``pmap`` each replica holds a slice of every leaf: sums and counts
    are ``psum``-med and maxima ``pmax``-ed, so every replica sees identical statistics.

    >>> import jax.numpy as jnp
    >>> s = tree_stats({"a": jnp.array([3.0, 4.0, jnp.nan]), "b": jnp.zeros(2)})
    >>> s.sumsq.tolist(), s.nan.tolist(), s.zeros.tolist()
    ([25.0, 0.0], [1, 0], [0, 2])
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        z = jnp.zeros((0,), jnp.float32)
        zi = jnp.zeros((0,), jnp.int32)
        return TreeStats(z, z, z, zi, zi, zi, zi)
    acc = jnp.result_type(*[_acc_dtype(jnp.asarray(x).dtype) for x in leaves])
    parts = [_leaf_reduce(jnp.asarray(x)) for x in leaves]
    sumsq = jnp.stack([p[0].astype(acc) for p in parts])
    max_abs = jnp.stack([p[1].astype(acc) for p in parts])
    counts = jnp.stack([jnp.stack(p[2:]) for p in parts])  # [L, 3]
    size = jnp.array([jnp.size(x) for x in leaves], jnp.int32)
    if axis_name is not None:
        max_abs = lax.pmax(max_abs, axis_name)
        counts, size = lax.psum((counts, size), axis_name)

    if axis_name is not None:
        sumsq = lax.psum(sumsq, axis_name)

    def rescaled(_: Any) -> tuple[jax.Array, jax.Array]:
        # Rare path: a finite gradient overflowed the float32 sum of squares. Recompute
        # every leaf scaled by its (global) max-abs; the norm is then scale * sqrt(sumsq).
        scale = jnp.where(max_abs > 0, max_abs, jnp.ones_like(max_abs))
        ss = jnp.stack(
            [_leaf_reduce(jnp.asarray(x), scale[i])[0].astype(acc) for i, x in enumerate(leaves)]
        )
        if axis_name is not None:
            ss = lax.psum(ss, axis_name)
        return scale, ss

    def plain(_: Any) -> tuple[jax.Array, jax.Array]:
        return jnp.ones_like(max_abs), sumsq

    # ``sumsq`` is identical on every replica here, so all take the same branch.
    scale, sumsq = lax.cond(jnp.any(jnp.isinf(sumsq)), rescaled, plain, None)
    return TreeStats(scale, sumsq, max_abs, counts[:, 0], counts[:, 1], counts[:, 2], size)


def combined_norm(stats: TreeStats, index: Sequence[int] | None = None) -> jax.Array:
    """Overflow-safe L2 norm of the finite entries of the leaves in ``index`` (all if None)."""
    scale, sumsq = stats.scale, stats.sumsq
    if index is not None:
        idx = jnp.asarray(list(index), jnp.int32)
        scale, sumsq = scale[idx], sumsq[idx]
    if scale.shape[0] == 0:
        return jnp.zeros((), jnp.float32)
    top = jnp.max(scale)
    ratio = scale / top
    terms = ratio * ratio * sumsq  # == sumsq exactly when nothing overflowed (scale 1)
    # A left-to-right chain of adds, as optax sums its per-leaf squared norms.
    total = terms[0]
    for i in range(1, terms.shape[0]):
        total = total + terms[i]
    return top * jnp.sqrt(total)


def global_norm(stats: TreeStats) -> jax.Array:
    """Overflow-safe global L2 norm from :func:`tree_stats` (finite entries only)."""
    return combined_norm(stats)


def all_finite(stats: TreeStats) -> jax.Array:
    """True when no leaf holds a NaN or an Inf (already reduced over the axis)."""
    return jnp.sum(stats.nan) + jnp.sum(stats.inf) == 0


def group_sum(values: jax.Array, index: Sequence[int]) -> jax.Array:
    """Sum of ``values`` over the leaves in ``index``."""
    return jnp.sum(values[jnp.asarray(list(index), jnp.int32)])


def group_max(values: jax.Array, index: Sequence[int]) -> jax.Array:
    """Max of ``values`` over the leaves in ``index``."""
    return jnp.max(values[jnp.asarray(list(index), jnp.int32)])


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``jnp.where(pred, on_true, on_false)`` (selection, never multiplication)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def scale_tree(tree: Any, factor: jax.Array) -> Any:
    """Multiplies every leaf by ``factor`` computed in float32 (or float64), cast back."""

    def one(x: jax.Array) -> jax.Array:
        acc = _acc_dtype(x.dtype)
        return (x.astype(acc) * factor.astype(acc)).astype(x.dtype)

    return jax.tree.map(one, tree)
