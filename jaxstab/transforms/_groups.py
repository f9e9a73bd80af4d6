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


_NONZERO_SCALE = 2.0**126  # maps the smallest normal float32 to 1


def _fast_leaf(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # The per-step path: three plain reductions that XLA vectorizes well on CPU (compare
    # and select ops inside a reduction do not; see benchmarks/bench_overhead.py). Valid
    # when the leaf is finite: a NaN/Inf makes ``sumsq`` non-finite, which sends the
    # whole tree to ``_exact_leaf``. ``sumsq`` is the same ``jnp.sum`` optax uses, hence
    # bit-identical norms. The non-zero count is a float32 sum of ceil(min(|x|·2**126, 1)),
    # 1 for every non-zero entry (also subnormal ones) and 0 for zeros, without compare
    # or sign ops (3-5x slower inside a CPU reduction); exact up to 2**24 entries per leaf.
    # The optimization barrier keeps XLA from merging the count with the two other
    # reductions into one multi-output reduction, which on CPU is ~3x slower than the
    # separate ones.
    xf = x.astype(_acc_dtype(x.dtype))
    xb = lax.optimization_barrier(xf)
    nonzero = jnp.sum(jnp.ceil(jnp.minimum(jnp.abs(xb) * _NONZERO_SCALE, 1.0)))
    return jnp.sum(jnp.square(xf)), jnp.max(jnp.abs(xf), initial=0), nonzero


def _exact_leaf(x: jax.Array) -> tuple[jax.Array, ...]:
    # The bad-step path (only run when some leaf is non-finite or overflowed): the norm
    # and max-abs of the finite entries, NaN/Inf/zero counts, and a sum of squares scaled
    # by the max-abs so that it cannot overflow. Hand-written: optax/chex offer no such
    # fused statistics.
    acc = _acc_dtype(x.dtype)
    xf = x.astype(acc)
    xa = jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0)
    max_abs = jnp.max(xa, initial=0)
    plain = jnp.sum(xa * xa)
    scale = jnp.where(jnp.isinf(plain) & (max_abs > 0), max_abs, jnp.ones_like(max_abs))
    xs = xa / scale
    sumsq = jnp.where(jnp.isinf(plain), jnp.sum(xs * xs), plain)
    count = lambda b: jnp.sum(b.astype(jnp.int32))
    return scale, sumsq, max_abs, count(jnp.isnan(xf)), count(jnp.isinf(xf)), count(xf == 0)


def tree_stats(tree: Any, axis_name: str | None = None, *, full: bool = True) -> TreeStats:
    """Per-leaf statistics of ``tree``; reduced over ``axis_name`` when given.

    On a finite step this costs three vectorized reductions per leaf; only when a leaf
    holds a NaN/Inf (or its float32 sum of squares overflows) does a ``lax.cond`` take
    the slower exact path (masked norms, NaN/Inf counts, rescaled sums of squares).

    Under ``shard_map``/``pmap`` each replica holds a slice of every leaf: sums and counts
    are ``psum``-med and maxima ``pmax``-ed, so every replica sees identical statistics
    and takes the same branch.

    With ``full=False`` a finite step computes only the sums of squares (one reduction
    per leaf, what a norm needs); ``max_abs`` and ``zeros`` are then only valid on the
    exact path, so read only the norms and the NaN/Inf counts from such a result.

    >>> import jax.numpy as jnp
    >>> s = tree_stats({"a": jnp.array([3.0, 4.0, jnp.nan]), "b": jnp.zeros(2)})
    >>> s.sumsq.tolist(), s.nan.tolist(), s.zeros.tolist()
    ([25.0, 0.0], [1, 0], [0, 2])
    """
    leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    if not leaves:
        z = jnp.zeros((0,), jnp.float32)
        zi = jnp.zeros((0,), jnp.int32)
        return TreeStats(z, z, z, zi, zi, zi, zi)
    acc = jnp.result_type(*[_acc_dtype(x.dtype) for x in leaves])
    size = jnp.array([x.size for x in leaves], jnp.int32)
    if full:
        fast = [_fast_leaf(x) for x in leaves]
    else:
        fast = [(jnp.sum(jnp.square(x.astype(_acc_dtype(x.dtype)))), 0, 0) for x in leaves]
    sumsq = jnp.stack([jnp.asarray(f[0]).astype(acc) for f in fast])
    max_abs = jnp.stack([jnp.asarray(f[1]).astype(acc) for f in fast])
    nonzero = jnp.stack([jnp.asarray(f[2]).astype(acc) for f in fast])
    if axis_name is not None:
        sumsq, nonzero, size = lax.psum((sumsq, nonzero, size), axis_name)
        max_abs = lax.pmax(max_abs, axis_name)

    def fast_path(_: Any) -> TreeStats:
        zeros = size - jnp.round(nonzero).astype(jnp.int32)
        none = jnp.zeros_like(size)
        return TreeStats(jnp.ones_like(sumsq), sumsq, max_abs, none, none, zeros, size)

    def exact_path(_: Any) -> TreeStats:
        ex = [_exact_leaf(x) for x in leaves]
        col = lambda i, dt: jnp.stack([e[i].astype(dt) for e in ex])
        scale, ssq, mx = col(0, acc), col(1, acc), col(2, acc)
        counts = jnp.stack([col(3, jnp.int32), col(4, jnp.int32), col(5, jnp.int32)])
        if axis_name is not None:
            # Every replica rescales by the same (global) per-leaf scale before summing.
            gscale = lax.pmax(scale, axis_name)
            ssq = lax.psum(ssq * (scale / gscale) ** 2, axis_name)
            scale = gscale
            mx = lax.pmax(mx, axis_name)
            counts = lax.psum(counts, axis_name)
        return TreeStats(scale, ssq, mx, counts[0], counts[1], counts[2], size)

    # ``sumsq`` is reduced over the axis already, so every replica takes the same branch.
    return lax.cond(jnp.all(jnp.isfinite(sumsq)), fast_path, exact_path, None)


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
