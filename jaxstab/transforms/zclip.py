"""``zclip``: ZClip adaptive clipping (Kumar et al. 2025)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import stat_names as S
from jaxstab.transforms import _groups
from jaxstab.transforms.clip_by_global_norm import Scaler

_EPS = 1e-12


class ZClipState(NamedTuple):
    """State of :func:`zclip`.

    Attributes:
      count: finite steps that entered the statistics (int32).
      mean: running mean of the gradient norm (Welford during warm-up, then EMA).
      var: running variance of the gradient norm.
      pre_norm: norm of the latest gradient before clipping.
      z: z-score of the latest norm (0 during warm-up).
      clipped: whether the latest gradient was clipped.
      scale: factor applied to the latest gradient.
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array
    pre_norm: jax.Array
    z: jax.Array
    clipped: jax.Array
    scale: jax.Array

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        return {
            S.ZCLIP_COUNT: self.count,
            S.ZCLIP_MEAN: self.mean,
            S.ZCLIP_STD: jnp.sqrt(self.var),
            S.ZCLIP_PRE_NORM: self.pre_norm,
            S.ZCLIP_Z: self.z,
            S.ZCLIP_CLIPPED: self.clipped,
            S.ZCLIP_SCALE: self.scale,
        }


def zclip(
    alpha: jax.typing.ArrayLike = 0.97,
    z_threshold: jax.typing.ArrayLike = 2.5,
    warmup_steps: jax.typing.ArrayLike = 25,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """ZClip: clips gradient-norm outliers by their z-score under running statistics.

    Algorithm (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training"), with ``g`` the global gradient norm of this step:

    1. Warm-up: the first ``warmup_steps`` finite steps are not clipped; their norms give
       the initial mean ``μ`` and (population) variance ``σ²``.
    2. Afterwards ``z = (g − μ) / σ``; if ``z > z_threshold`` the gradient is rescaled to
       norm ``g* = μ + z_threshold·σ``, else ``g* = g``.
    3. The statistics are fed the clipped norm: ``μ ← α·μ + (1 − α)·g*`` and then
       ``σ² ← α·σ² + (1 − α)·(g* − μ)²`` with the updated ``μ``.

    A step whose gradient holds a NaN/Inf passes through unchanged and never enters the
    statistics (combine with :func:`jaxstab.skip_bad_steps` to drop it).

    Args:
      alpha: EMA decay in (0, 1).
      z_threshold: z-score above which the gradient is clipped (> 0).
      warmup_steps: number of finite steps that initialise the statistics (>= 1).

    The three hyperparameters may be arrays or traced values
    (``optax.inject_hyperparams``); only concrete values are checked.
      axis_name: under ``shard_map``/``pmap``, norms are reduced across this axis.

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = jaxstab.zclip(warmup_steps=3)
    >>> state = tx.init({"w": jnp.ones(1)})
    >>> for g in (1.0, 1.1, 0.9, 50.0):
    ...     out, state = tx.update({"w": jnp.array([g])}, state)
    >>> round(float(out["w"][0]), 3), bool(jaxstab.read_stats(state)["zclip/clipped"])
    (1.204, True)
    """
    _groups.check_range("alpha", alpha, 0.0, 1.0)
    _groups.check_positive("z_threshold", z_threshold)
    _groups.check_count("warmup_steps", warmup_steps, 1)

    def init_fn(params: Any) -> ZClipState:
        del params
        return zclip_init()

    def update_fn(updates: Any, state: ZClipState, params: Any = None) -> tuple[Any, ZClipState]:
        del params
        updates = _groups.as_float_updates(updates)
        ts = _groups.tree_stats(updates, axis_name, full=False)
        g = _groups.global_norm(ts)
        new_state, scaler = zclip_step(
            state, g, _groups.all_finite(ts), alpha, z_threshold, warmup_steps
        )
        return jax.tree.map(scaler.apply, updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def zclip_init() -> ZClipState:
    """The initial :class:`ZClipState`."""
    f = jnp.zeros((), jnp.float32)
    return ZClipState(
        jnp.zeros((), jnp.int32), f, f, f, f, jnp.zeros((), jnp.bool_), jnp.ones((), jnp.float32)
    )


def zclip_step(
    state: ZClipState,
    norm: jax.Array,
    finite: jax.Array,
    alpha: jax.typing.ArrayLike = 0.97,
    z_threshold: jax.typing.ArrayLike = 2.5,
    warmup_steps: jax.typing.ArrayLike = 25,
) -> tuple[ZClipState, Scaler]:
    """:func:`zclip` on a precomputed global ``norm`` and finiteness: new state, decision."""
    g = norm.astype(jnp.float32)
    warm = state.count >= warmup_steps
    std = jnp.sqrt(state.var)
    z = jnp.where(warm, (g - state.mean) / jnp.maximum(std, _EPS), 0.0)
    clip = warm & finite & (z > z_threshold)
    g_star = jnp.where(clip, state.mean + z_threshold * std, g)

    # Warm-up: Welford's running mean and population variance.
    n = (state.count + 1).astype(jnp.float32)
    delta = g - state.mean
    w_mean = state.mean + delta / n
    w_var = state.var + (delta * (g - w_mean) - state.var) / n
    # After warm-up: EMA of the clipped norm.
    e_mean = alpha * state.mean + (1 - alpha) * g_star
    e_var = alpha * state.var + (1 - alpha) * (g_star - e_mean) ** 2
    new_mean = jnp.where(warm, e_mean, w_mean)
    new_var = jnp.where(warm, e_var, w_var)
    scale = jnp.where(clip, g_star / jnp.where(clip, g, 1.0), 1.0)
    new_state = ZClipState(
        count=state.count + finite.astype(jnp.int32),
        mean=jnp.where(finite, new_mean, state.mean),
        var=jnp.where(finite, new_var, state.var),
        pre_norm=g,
        z=z,
        clipped=clip,
        scale=scale,
    )
    return _groups.keep_dtypes(new_state, state), Scaler(g, g_star, clip)
