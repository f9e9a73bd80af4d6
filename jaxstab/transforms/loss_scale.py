"""``dynamic_loss_scale``: mixed-precision loss scaling as a gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import stat_names as S
from jaxstab.transforms import _groups


class DynamicLossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`.

    Attributes:
      scale: the current loss scale (float32); multiply the loss by it.
      good_steps: finite steps in a row since the last change of scale.
      overflow: whether the latest (scaled) gradient was non-finite.
      inner_state: the state of the wrapped transformation (``()`` without one).
    """

    scale: jax.Array
    good_steps: jax.Array
    overflow: jax.Array
    inner_state: Any

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        return {
            S.LOSS_SCALE: self.scale,
            S.LOSS_SCALE_GOOD_STEPS: self.good_steps,
            S.LOSS_SCALE_OVERFLOW: self.overflow,
        }


def dynamic_loss_scale(
    initial: jax.typing.ArrayLike = 2.0**15,
    period: jax.typing.ArrayLike = 2000,
    factor: jax.typing.ArrayLike = 2.0,
    *,
    inner: optax.GradientTransformation | None = None,
    min_scale: jax.typing.ArrayLike = 1.0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Dynamic loss scaling: unscales the gradient, shrinks on overflow, grows when stable.

    The user multiplies the loss by ``jaxstab.loss_scale(opt_state)`` before
    differentiating; this transform divides the gradient by the same scale (in float32).
    On overflow (a NaN/Inf in the gradient) the update is replaced by zeros *by
    selection* and the scale is divided by ``factor`` (not below ``min_scale``); after
    ``period`` finite steps in a row it is multiplied by ``factor``.

    With ``inner`` given (e.g. ``optax.adam(1e-3)``), an overflow step also leaves
    ``inner``'s state untouched, so the whole step is skipped; placed first in a plain
    ``optax.chain`` the later transforms still see the zero update.

    Args:
      initial: the starting scale (> 0).
      period: finite steps in a row before the scale grows (>= 1).
      factor: growth/shrink factor (> 1).
      inner: optional transformation applied to the unscaled gradient.
      min_scale: the scale never drops below this (> 0).
      axis_name: under ``shard_map``/``pmap``, overflow is decided across this axis.

    The numeric arguments may be arrays or traced values (``optax.inject_hyperparams``);
    only concrete values are checked.

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = jaxstab.dynamic_loss_scale(initial=8.0, inner=optax.sgd(1.0))
    >>> state = tx.init({"w": jnp.ones(1)})
    >>> out, state = tx.update({"w": jnp.array([4.0])}, state)
    >>> float(out["w"][0]), float(jaxstab.loss_scale(state))
    (-0.5, 8.0)
    >>> out, state = tx.update({"w": jnp.array([jnp.inf])}, state)
    >>> float(out["w"][0]), float(jaxstab.loss_scale(state))
    (0.0, 4.0)
    """
    _groups.check_positive("initial", initial)
    _groups.check_positive("min_scale", min_scale)
    _groups.check_count("period", period, 1)
    _groups.check_range("factor", factor, 1.0, float("inf"))
    wrapped = None if inner is None else optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> DynamicLossScaleState:
        return DynamicLossScaleState(
            jnp.asarray(initial, jnp.float32),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.bool_),
            () if wrapped is None else wrapped.init(params),
        )

    def update_fn(
        updates: Any, state: DynamicLossScaleState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, DynamicLossScaleState]:
        updates = _groups.as_float_updates(updates)
        finite = _groups.all_finite(_groups.tree_stats(updates, axis_name, full=False))
        inv = 1.0 / state.scale
        unscaled = _groups.scale_tree(updates, inv)
        unscaled = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), unscaled)
        inner_state = state.inner_state
        if wrapped is not None:
            new_updates, new_inner = wrapped.update(unscaled, inner_state, params, **extra_args)
            unscaled = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
            inner_state = _groups.select_tree(finite, new_inner, inner_state)
        grow = finite & (state.good_steps + 1 >= period)
        scale = jnp.where(
            finite,
            jnp.where(grow, state.scale * factor, state.scale),
            jnp.maximum(state.scale / factor, min_scale),
        ).astype(jnp.float32)
        good = jnp.where(finite & ~grow, state.good_steps + 1, 0)
        new_state = DynamicLossScaleState(scale, good, ~finite, inner_state)
        return unscaled, _groups.keep_dtypes(new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def loss_scale(opt_state: Any) -> jax.Array:
    """The current loss scale held by a :func:`dynamic_loss_scale` inside ``opt_state``.

    Works for any nesting (chains, ``inject_hyperparams``, ``multi_transform``, ...).

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = optax.chain(jaxstab.dynamic_loss_scale(initial=1024.0), optax.adam(1e-3))
    >>> float(jaxstab.loss_scale(tx.init({"w": jnp.ones(2)})))
    1024.0
    """
    from jaxstab.transforms.stats import find_states

    found = [s for _, s in find_states(opt_state) if isinstance(s, DynamicLossScaleState)]
    if not found:
        raise ValueError("opt_state holds no jaxstab.dynamic_loss_scale state")
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} dynamic_loss_scale states; expected one")
    return found[0].scale
