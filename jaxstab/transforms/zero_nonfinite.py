"""``zero_nonfinite``: NaN, +Inf and -Inf entries of the gradient become 0."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import stat_names as S
from jaxstab.transforms import _groups


class ZeroNonfiniteState(NamedTuple):
    """State of :func:`zero_nonfinite`.

    Attributes:
      count: per group, the number of entries replaced at the latest step.
      total: number of steps so far that had at least one non-finite entry.
    """

    count: dict[str, jax.Array]
    total: jax.Array

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        out = {S.group_stat(S.NONFINITE_COUNT, g): c for g, c in self.count.items()}
        out[S.NONFINITE_STEPS] = self.total
        return out


def zero_nonfinite(
    *, group_depth: int | None = 1, axis_name: str | None = None
) -> optax.GradientTransformation:
    """Replaces NaN, +Inf and -Inf gradient entries by 0 and counts them per group.

    ``optax.zero_nans`` only handles NaN; an Inf survives it and poisons Adam's moments.
    The replacement is a selection (``jnp.where``), so the finite entries are untouched.

    Args:
      group_depth: how groups are named (see :func:`jaxstab.log_norms`).
      axis_name: under ``shard_map``/``pmap``, counts are summed across this axis.

    >>> import jax.numpy as jnp, jaxstab
    >>> tx = jaxstab.zero_nonfinite()
    >>> grads = {"w": jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf])}
    >>> out, state = tx.update(grads, tx.init(grads))
    >>> out["w"].tolist(), int(jaxstab.read_stats(state)["nonfinite/count/w"])
    ([1.0, 0.0, 0.0, 0.0], 3)
    """
    group_depth = _groups.check_group_depth(group_depth)

    def init_fn(params: Any) -> ZeroNonfiniteState:
        groups, _ = _groups.group_layout(params, group_depth)
        return ZeroNonfiniteState(
            {g: jnp.zeros((), jnp.int32) for g in groups}, jnp.zeros((), jnp.int32)
        )

    def update_fn(
        updates: Any, state: ZeroNonfiniteState, params: Any = None
    ) -> tuple[Any, ZeroNonfiniteState]:
        del params
        updates = _groups.as_float_updates(updates)
        groups, members = _groups.group_layout(updates, group_depth)
        ts = _groups.tree_stats(updates, axis_name, full=False)
        out = jax.tree.map(zero_leaf, updates)
        return out, zero_nonfinite_step(state, ts, groups, members)

    return optax.GradientTransformation(init_fn, update_fn)


def zero_leaf(x: jax.Array) -> jax.Array:
    """``x`` with its NaN, +Inf and -Inf entries replaced by 0 (a selection)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def zero_nonfinite_step(
    state: ZeroNonfiniteState,
    ts: _groups.TreeStats,
    groups: list[str],
    members: list[list[int]],
) -> ZeroNonfiniteState:
    """The new state from the gradient's statistics and group layout."""
    bad = ts.nan + ts.inf
    count = {g: _groups.group_sum(bad, idx) for g, idx in zip(groups, members, strict=True)}
    any_bad = jnp.sum(bad) > 0
    new_state = ZeroNonfiniteState(count, state.total + any_bad.astype(jnp.int32))
    return _groups.keep_dtypes(new_state, state)
