"""Parameter groups, fused per-leaf statistics and overflow-safe norms.

Every jaxstab transform computes its gradient statistics through :func:`tree_stats`, so that
inside one jitted step the identical reductions of several transforms are merged by XLA's
common-subexpression elimination into a single pass over the gradient.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Group naming lives in ``jaxstab.tree``; re-exported for the transforms.
from jaxstab.tree import group_layout as group_layout
from jaxstab.tree import leaf_group_names as leaf_group_names
from jaxstab.tree import path_name
from jaxstab.tree import path_names as path_names

_State = TypeVar("_State", bound=tuple)


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array, or ``None`` when it is traced (checked at run time)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _scalar(name: str, value: Any) -> np.ndarray | None:
    # Numeric hyperparameters are scalars: Python numbers or (traced) 0-d arrays, as
    # ``optax.inject_hyperparams`` passes them. Booleans are not numbers here.
    if isinstance(value, (bool, np.bool_)) or (
        hasattr(value, "dtype") and jnp.dtype(value.dtype) == jnp.bool_
    ):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    arr = _concrete(value)
    if arr is not None and not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return arr


def check_positive(name: str, value: Any) -> None:
    """Raises a ``ValueError`` unless ``value`` is a finite positive number.

    Traced values (``optax.inject_hyperparams`` under ``jit``, schedules) are not checked.

    >>> check_positive("max_norm", -1.0)
    Traceback (most recent call last):
    ValueError: max_norm must be a finite positive number, got -1.0
    """
    arr = _scalar(name, value)
    if arr is not None and not (np.isfinite(arr) and arr > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def check_range(
    name: str, value: Any, low: float, high: float, *, closed_high: bool = False
) -> None:
    """Raises a ``ValueError`` unless ``low < value < high`` (``<= high`` when closed).

    Traced values are not checked.

    >>> check_range("alpha", 1.0, 0.0, 1.0)
    Traceback (most recent call last):
    ValueError: alpha must be in (0.0, 1.0), got 1.0
    """
    arr = _scalar(name, value)
    if arr is None:
        return
    ok = bool(low < arr) and bool(arr <= high if closed_high else arr < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in ({low}, {high}{bracket}, got {value!r}")


def check_count(name: str, value: Any, minimum: int) -> None:
    """Raises a ``ValueError`` unless ``value`` is an integer ``>= minimum``.

    For step counts compared against the state (warm-up length, period): a Python int or
    an integer array, possibly traced (then not checked).

    >>> check_count("period", 0, 1)
    Traceback (most recent call last):
    ValueError: period must be an int >= 1, got 0
    """
    arr = _scalar(name, value)
    if arr is None:
        if not jnp.issubdtype(jnp.result_type(value), jnp.integer):
            raise ValueError(f"{name} must be an int >= {minimum}, got a {value.dtype} value")
        return
    if not np.issubdtype(arr.dtype, np.integer) or int(arr) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def static_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum``, for arguments that set a shape or a layout.

    Concrete integer arrays are accepted; a traced value cannot set a shape, which is a
    ``TypeError`` that says how to keep it static under ``optax.inject_hyperparams``.

    >>> import numpy as np
    >>> static_int("history", np.int32(8), 1)
    8
    >>> static_int("window", 0, 2)
    Traceback (most recent call last):
    ValueError: window must be an int >= 2, got 0
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} sets a shape or a layout and cannot be traced; with "
            f"optax.inject_hyperparams pass static_args=({name!r},)"
        )
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return out


def check_group_depth(group_depth: Any) -> int | None:
    """``group_depth`` as a positive int or ``None``; anything else is a ``ValueError``."""
    if group_depth is None:
        return None
    try:
        return static_int("group_depth", group_depth, 1)
    except ValueError:
        raise ValueError(
            f"group_depth must be a positive int or None, got {group_depth!r}"
        ) from None


def as_float_updates(updates: Any) -> Any:
    """``updates`` with integer and bool leaves promoted to floating point.

    Every jaxstab transform calls this first, so a non-float gradient is never truncated
    (an int32 gradient clipped by 0.27 must not become 0). The promotion is the dtype of
    the leaf's arithmetic with a Python float, as in ``optax.adam``: int32 → float32
    (float64 under ``jax_enable_x64``). Complex and ``float0`` leaves have no real norm:
    a ``TypeError`` names the first such leaf.

    >>> import jax.numpy as jnp
    >>> as_float_updates({"w": jnp.array([3, 4])})["w"].dtype
    dtype('float32')
    """
    leaves = jax.tree_util.tree_leaves(updates)
    if all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
        return updates
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    out = []
    for path, x in flat:
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.floating):
            out.append(x)
        elif jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_:
            out.append(jnp.asarray(x).astype(jnp.result_type(dtype, float)))
        else:
            raise TypeError(
                f"gradient leaf {path_name(path)!r} has dtype {dtype}; jaxstab transforms "
                "take real gradients (floating, or integer/bool, promoted to float)"
            )
    return jax.tree_util.tree_unflatten(treedef, out)


def keep_dtypes(new: _State, old: _State, *, skip: Sequence[str] = ("inner_state",)) -> _State:
    """``new`` with every field's arrays cast to the dtypes of ``old`` (``skip`` kept).

    A transform's state keeps the dtypes of its ``init`` (int32 counters, float32
    statistics) under ``jax_enable_x64`` and with float64 hyperparameters, so that a
    ``lax.scan`` over steps has a fixed carry.
    """
    fields = {
        f: jax.tree.map(
            lambda n, o: jnp.asarray(n).astype(o.dtype), getattr(new, f), getattr(old, f)
        )
        for f in new._fields
        if f not in skip
    }
    return new._replace(**fields)


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


def _fast_leaf(
    x: jax.Array, max_abs: bool = True, zeros: bool = True
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    # The per-step path: plain reductions that XLA vectorizes well on CPU (compare and
    # select ops inside a reduction do not; see benchmarks/bench_overhead.py). Valid when
    # the leaf is finite: a NaN/Inf makes ``sumsq`` non-finite, which sends the whole tree
    # to ``_exact_leaf`` (so the NaN/Inf counts need no pass of their own). ``sumsq`` is
    # the same ``jnp.sum`` optax uses, hence bit-identical norms; it is the only pass when
    # ``max_abs`` and ``zeros`` are not asked for. The non-zero count is a float32 sum of
    # ceil(min(|x|·2**126, 1)), 1 for every non-zero entry (also subnormal ones) and 0 for
    # zeros, without compare or sign ops (3-5x slower inside a CPU reduction); exact up to
    # 2**24 entries per leaf. The optimization barrier keeps XLA from merging the count
    # with the other reductions into one multi-output reduction, which on CPU is ~3x
    # slower than the separate ones.
    xf = x.astype(_acc_dtype(x.dtype))
    sumsq = jnp.sum(jnp.square(xf))
    mx = jnp.max(jnp.abs(xf), initial=0) if max_abs else None
    nonzero = None
    if zeros:
        xb = lax.optimization_barrier(xf)
        nonzero = jnp.sum(jnp.ceil(jnp.minimum(jnp.abs(xb) * _NONZERO_SCALE, 1.0)))
    return sumsq, mx, nonzero


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
    count = lambda b: jnp.sum(b, dtype=jnp.int32)
    return scale, sumsq, max_abs, count(jnp.isnan(xf)), count(jnp.isinf(xf)), count(xf == 0)


def tree_stats(
    tree: Any,
    axis_name: str | None = None,
    *,
    full: bool = True,
    max_abs: bool | None = None,
    zeros: bool | None = None,
) -> TreeStats:
    """Per-leaf statistics of ``tree``; reduced over ``axis_name`` when given.

    On a finite step this costs one vectorized reduction per leaf (the sum of squares),
    plus one each for ``max_abs`` and ``zeros`` when asked for; only when a leaf holds a
    NaN/Inf (or its float32 sum of squares overflows) does a ``lax.cond`` take the slower
    exact path (masked norms, max-abs, NaN/Inf/zero counts, rescaled sums of squares).
    The NaN/Inf counts of a finite step are 0 without a pass of their own: a non-finite
    entry makes its leaf's sum of squares non-finite.

    Under ``shard_map``/``pmap`` each replica holds a slice of every leaf: sums and counts
    are ``psum``-med and maxima ``pmax``-ed, so every replica sees identical statistics
    and takes the same branch.

    ``max_abs`` and ``zeros`` (default: ``full``) choose whether a finite step computes
    the per-leaf max-abs and zero count; a field not computed is only valid on the exact
    path, so read only the norms and the NaN/Inf counts from such a result.

    >>> import jax.numpy as jnp
    >>> s = tree_stats({"a": jnp.array([3.0, 4.0, jnp.nan]), "b": jnp.zeros(2)})
    >>> s.sumsq.tolist(), s.nan.tolist(), s.zeros.tolist()
    ([25.0, 0.0], [1, 0], [0, 2])
    """
    want_max = full if max_abs is None else bool(max_abs)
    want_zeros = full if zeros is None else bool(zeros)
    leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    if not leaves:
        z = jnp.zeros((0,), jnp.float32)
        zi = jnp.zeros((0,), jnp.int32)
        return TreeStats(z, z, z, zi, zi, zi, zi)
    acc = jnp.result_type(*[_acc_dtype(x.dtype) for x in leaves])
    size = jnp.array([x.size for x in leaves], jnp.int32)
    fast = [_fast_leaf(x, want_max, want_zeros) for x in leaves]
    col = lambda i: jnp.stack([jnp.asarray(f[i]).astype(acc) for f in fast])
    sumsq = col(0)
    max_abs_v = col(1) if want_max else None
    nonzero = col(2) if want_zeros else None
    if axis_name is not None:
        if want_zeros:
            sumsq, nonzero, size = lax.psum((sumsq, nonzero, size), axis_name)
        else:
            sumsq, size = lax.psum((sumsq, size), axis_name)
        if want_max:
            max_abs_v = lax.pmax(max_abs_v, axis_name)
    if not want_max:  # after the psum: replicated, as the exact path's
        max_abs_v = jnp.zeros_like(sumsq)

    def fast_path(_: Any) -> TreeStats:
        none = jnp.zeros_like(size)
        zeros_v = size - jnp.round(nonzero).astype(jnp.int32) if want_zeros else none
        return TreeStats(jnp.ones_like(sumsq), sumsq, max_abs_v, none, none, zeros_v, size)

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


def ratio_to_params_norm(norm: jax.Array, params: Any, axis_name: str | None = None) -> jax.Array:
    """``norm / ‖params‖`` (finite entries, reduced over ``axis_name``); 0 for zero params.

    >>> import jax.numpy as jnp
    >>> round(float(ratio_to_params_norm(jnp.float32(1.0), {"w": jnp.array([3.0, 4.0])})), 6)
    0.2
    """
    pnorm = global_norm(tree_stats(params, axis_name, full=False))
    return jnp.where(pnorm > 0, norm / jnp.where(pnorm > 0, pnorm, 1), 0)


def all_finite(stats: TreeStats) -> jax.Array:
    """True when no leaf holds a NaN or an Inf (already reduced over the axis)."""
    return jnp.sum(stats.nan) + jnp.sum(stats.inf) == 0


def group_sum(values: jax.Array, index: Sequence[int]) -> jax.Array:
    """Sum of ``values`` over the leaves in ``index`` (in ``values.dtype``, also under x64)."""
    return jnp.sum(values[jnp.asarray(list(index), jnp.int32)], dtype=values.dtype)


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
