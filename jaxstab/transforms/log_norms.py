"""``log_norms``: gradient-norm logging per group, on the device."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import stat_names as S
from jaxstab.transforms import _groups


class LogNormsState(NamedTuple):
    """State of :func:`log_norms`.

    Attributes:
      count: number of updates seen (int32).
      stats: statistics of the latest step, keyed by their flat names.
      history: for ``history=K > 0``, the same names mapped to ``[K]`` ring buffers; entry
        ``count % K`` is written at each step (read them in order with
        :func:`ordered_history`). Empty when ``history=0``.
    """

    count: jax.Array
    stats: dict[str, jax.Array]
    history: dict[str, jax.Array]

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        return dict(self.stats)


DETAILS = ("max_abs", "zero_frac", "update_ratio")
"""The optional statistics of :func:`log_norms`, each costing a pass of its own."""


def check_detail(detail: Any) -> frozenset[str]:
    """The set of optional statistics that ``detail`` asks for.

    ``"basic"``: none (global and per-group norms, NaN/Inf counts: one pass over the
    gradient); ``"full"``: all of :data:`DETAILS`; or any collection of their names.

    >>> sorted(check_detail("full")), sorted(check_detail(["zero_frac"]))
    (['max_abs', 'update_ratio', 'zero_frac'], ['zero_frac'])
    >>> check_detail("all")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: detail must be 'basic', 'full' or a collection of (...), got 'all'
    """
    if isinstance(detail, str):
        if detail == "full":
            return frozenset(DETAILS)
        if detail == "basic":
            return frozenset()
        names: Any = None
    else:
        try:
            names = frozenset(detail)
        except TypeError:
            names = None
    if names is None or not names <= set(DETAILS):
        raise ValueError(
            f"detail must be 'basic', 'full' or a collection of {DETAILS}, got {detail!r}"
        )
    return names


def _stat_names(groups: list[str], extras: frozenset[str]) -> list[tuple[str, Any]]:
    names: list[tuple[str, Any]] = [(S.GLOBAL_NORM, jnp.float32)]
    if "update_ratio" in extras:
        names.append((S.UPDATE_RATIO, jnp.float32))
    for g in groups:
        names.append((S.group_stat(S.GROUP_NORM, g), jnp.float32))
        if "max_abs" in extras:
            names.append((S.group_stat(S.GROUP_MAX_ABS, g), jnp.float32))
        names += [
            (S.group_stat(S.GROUP_NAN, g), jnp.int32),
            (S.group_stat(S.GROUP_INF, g), jnp.int32),
        ]
        if "zero_frac" in extras:
            names.append((S.group_stat(S.GROUP_ZERO_FRAC, g), jnp.float32))
    return names


def stats_options(extras: frozenset[str]) -> dict[str, bool]:
    """The :func:`jaxstab.transforms._groups.tree_stats` options that ``extras`` need."""
    return {"max_abs": "max_abs" in extras, "zeros": "zero_frac" in extras}


def log_norms_init(
    params: Any, group_depth: int | None, history: int, extras: frozenset[str]
) -> LogNormsState:
    """The initial :class:`LogNormsState` (zeros; ``[history]`` buffers when > 0)."""
    groups, _ = _groups.group_layout(params, group_depth)
    names = _stat_names(groups, extras)
    stats = {n: jnp.zeros((), dt) for n, dt in names}
    hist = {n: jnp.zeros((history,), dt) for n, dt in names} if history else {}
    return LogNormsState(jnp.zeros((), jnp.int32), stats, hist)


def log_norms_step(
    state: LogNormsState,
    ts: _groups.TreeStats,
    groups: list[str],
    members: list[list[int]],
    extras: frozenset[str],
    params: Any = None,
    axis_name: str | None = None,
) -> LogNormsState:
    """The new state from the gradient's statistics ``ts`` (from ``tree_stats`` with
    :func:`stats_options`) and its group layout; ``params`` only for ``update_ratio``."""
    gnorm = _groups.global_norm(ts)
    stats: dict[str, jax.Array] = {S.GLOBAL_NORM: gnorm}
    if "update_ratio" in extras:
        if params is None:
            ratio = jnp.zeros((), jnp.float32)
        else:
            ratio = _groups.ratio_to_params_norm(gnorm, params, axis_name)
        stats[S.UPDATE_RATIO] = ratio
    for g, idx in zip(groups, members, strict=True):
        stats[S.group_stat(S.GROUP_NORM, g)] = _groups.combined_norm(ts, idx)
        if "max_abs" in extras:
            stats[S.group_stat(S.GROUP_MAX_ABS, g)] = _groups.group_max(ts.max_abs, idx)
        stats[S.group_stat(S.GROUP_NAN, g)] = _groups.group_sum(ts.nan, idx)
        stats[S.group_stat(S.GROUP_INF, g)] = _groups.group_sum(ts.inf, idx)
        if "zero_frac" in extras:
            size = _groups.group_sum(ts.size, idx)
            zeros = _groups.group_sum(ts.zeros, idx)
            stats[S.group_stat(S.GROUP_ZERO_FRAC, g)] = jnp.where(
                size > 0, zeros.astype(jnp.float32) / jnp.maximum(size, 1), 0.0
            )
    hist = state.history
    if hist:
        k = next(iter(hist.values())).shape[0]
        pos = state.count % k
        hist = {n: buf.at[pos].set(stats[n].astype(buf.dtype)) for n, buf in hist.items()}
    new_state = LogNormsState(state.count + 1, stats, hist)
    return _groups.keep_dtypes(new_state, state)


def log_norms(
    group_depth: int | None = 1,
    history: int = 0,
    *,
    detail: str | Collection[str] = "full",
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """Records gradient statistics in the optimizer state; updates pass through unchanged.

    Recorded (read them with :func:`jaxstab.read_stats`): ``grad/global_norm``; per group
    ``grad/norm/<g>``, ``grad/nan/<g>`` and ``grad/inf/<g>``; and, as ``detail`` asks,
    ``grad/max_abs/<g>``, ``grad/zero_frac/<g>`` (fraction of exact zeros: 1.0 means a
    broken gradient path) and ``grad/update_ratio``.

    Norms and max-abs cover the finite entries (a NaN elsewhere does not hide the size of
    the rest; the NaN/Inf counts report it). They are accumulated in float32 and rescaled
    when needed, so float16/bfloat16 gradients never overflow the squared norm.

    ``grad/update_ratio`` is ``‖g‖ / ‖params‖``: this transform sits first in the chain and
    sees the raw gradient ``g``, not the final update, so it records the update/parameter
    ratio of a unit-learning-rate SGD step (multiply by the learning rate for SGD). It
    needs ``params`` in ``update``; without them it is 0.

    Args:
      group_depth: number of path keys that name a group; ``None``: one group per leaf.
      history: ``K > 0`` keeps the last ``K`` steps of every statistic in on-device ring
        buffers of fixed shape ``[K]``, so the host needs to read only every ``K`` steps.
        Every step is logged, bad ones included (that is how they are found).
      detail: ``"full"`` (all statistics), ``"basic"`` (norms and NaN/Inf counts only:
        one pass over the gradient on a finite step) or a collection of the optional
        names ``"max_abs"``, ``"zero_frac"``, ``"update_ratio"``. Each optional one costs
        a pass of its own (over the gradient, or over the parameters for the ratio).
      axis_name: under ``shard_map``/``pmap`` with a sharded gradient, the mapped axis;
        statistics are reduced across it.

    ``group_depth``, ``history`` and ``detail`` set the state's layout: with
    ``optax.inject_hyperparams`` list them in ``static_args``.

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> params = {"w": jnp.ones(3), "b": jnp.zeros(1)}
    >>> tx = optax.chain(jaxstab.log_norms(), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([3.0, 4.0, 0.0]), "b": jnp.array([jnp.nan])}
    >>> _, state = tx.update(grads, state, params)
    >>> stats = jaxstab.read_stats(state)
    >>> float(stats["grad/norm/w"]), int(stats["grad/nan/b"]), float(stats["grad/zero_frac/w"])
    (5.0, 1, 0.3333333432674408)
    >>> sorted(jaxstab.log_norms(detail="basic", group_depth=None).init({"w": params["w"]}).stats)
    ['grad/global_norm', 'grad/inf/w', 'grad/nan/w', 'grad/norm/w']
    """
    group_depth = _groups.check_group_depth(group_depth)
    history = _groups.static_int("history", history, 0)
    extras = check_detail(detail)
    options = stats_options(extras)

    def init_fn(params: Any) -> LogNormsState:
        return log_norms_init(params, group_depth, history, extras)

    def update_fn(
        updates: Any, state: LogNormsState, params: Any = None
    ) -> tuple[Any, LogNormsState]:
        updates = _groups.as_float_updates(updates)
        groups, members = _groups.group_layout(updates, group_depth)
        ts = _groups.tree_stats(updates, axis_name, **options)
        new_state = log_norms_step(state, ts, groups, members, extras, params, axis_name)
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def ordered_history(state: LogNormsState) -> dict[str, jax.Array]:
    """The ring buffers of a :func:`log_norms` state, oldest step first.

    Entries not yet written (fewer than ``K`` steps seen) come first and are zero; the
    ``"step"`` entry gives each row's step number (``-1`` for unwritten rows).

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = jaxstab.log_norms(history=4)
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> for scale in (1.0, 2.0, 3.0):
    ...     _, state = tx.update({"w": scale * jnp.ones(2)}, state)
    >>> ordered_history(state)["step"].tolist()
    [-1, 0, 1, 2]
    """
    out: dict[str, jax.Array] = {}
    if not state.history:
        return out
    k = next(iter(state.history.values())).shape[0]
    shift = -(state.count % k)
    for name, buf in state.history.items():
        out[name] = jnp.roll(buf, shift)
    steps = state.count - k + jnp.arange(k, dtype=jnp.int32)
    out["step"] = jnp.where(steps >= 0, steps, -1)
    return out
