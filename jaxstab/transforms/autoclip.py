"""``autoclip``: AutoClip percentile clipping (Seetharaman et al. 2020)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import stat_names as S
from jaxstab.transforms import _groups
from jaxstab.transforms.clip_by_global_norm import Scaler


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`.

    Attributes:
      norms: ring buffer ``[history]`` of the finite gradient norms seen.
      count: finite norms written so far (int32); entry ``count % history`` is next.
      threshold: clipping threshold of the latest step.
      pre_norm: norm of the latest gradient before clipping.
      clipped: whether the latest gradient was clipped.
    """

    norms: jax.Array
    count: jax.Array
    threshold: jax.Array
    pre_norm: jax.Array
    clipped: jax.Array

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        return {
            S.AUTOCLIP_COUNT: self.count,
            S.AUTOCLIP_THRESHOLD: self.threshold,
            S.AUTOCLIP_PRE_NORM: self.pre_norm,
            S.AUTOCLIP_CLIPPED: self.clipped,
        }


def percentile_of_buffer(
    buf: jax.Array, n: jax.Array, percentile: jax.typing.ArrayLike
) -> jax.Array:
    """``numpy.percentile(buf[:n], percentile)`` (linear interpolation) for a traced ``n``.

    Fixed-shape: the unused tail is masked with +Inf and sorted to the end. ``n == 0``
    gives +Inf.
    """
    size = buf.shape[0]
    valid = jnp.arange(size) < n
    s = jnp.sort(jnp.where(valid, buf, jnp.inf))
    rank = (percentile / 100.0) * jnp.maximum(n - 1, 0).astype(jnp.float32)
    lo = jnp.floor(rank).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = rank - lo.astype(jnp.float32)
    a, b = s[lo], s[hi]
    value = jnp.where(frac > 0, a + (b - a) * frac, a)
    return jnp.where(n > 0, value, jnp.inf)


def autoclip(
    percentile: jax.typing.ArrayLike = 10.0, history: int = 1024, *, axis_name: str | None = None
) -> optax.GradientTransformation:
    """AutoClip: clips the gradient to a percentile of the norms observed so far.

    Algorithm (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks"): append this step's global norm ``g`` to the history, take the
    ``percentile``-th percentile ``τ`` of the history (linear interpolation, as
    ``numpy.percentile``), and rescale the gradient to norm ``τ`` when ``g > τ``.

    The history is a bounded on-device ring buffer of the last ``history`` finite norms
    (the paper keeps all of them). A non-finite step passes through unchanged and never
    enters the history.

    Args:
      percentile: in (0, 100]; the paper recommends 10. May be an array or traced.
      history: number of past norms kept (>= 1); a shape, so static (with
        ``optax.inject_hyperparams`` list it in ``static_args``).
      axis_name: under ``shard_map``/``pmap``, norms are reduced across this axis.

    >>> import jax.numpy as jnp, jaxstab
    >>> tx = jaxstab.autoclip(percentile=50.0, history=8)
    >>> state = tx.init({"w": jnp.ones(1)})
    >>> for g in (1.0, 2.0, 3.0, 10.0):
    ...     out, state = tx.update({"w": jnp.array([g])}, state)
    >>> float(out["w"][0]), bool(jaxstab.read_stats(state)["autoclip/clipped"])
    (2.5, True)
    """
    _groups.check_range("percentile", percentile, 0.0, 100.0, closed_high=True)
    history = _groups.static_int("history", history, 1)

    def init_fn(params: Any) -> AutoClipState:
        del params
        return autoclip_init(history)

    def update_fn(
        updates: Any, state: AutoClipState, params: Any = None
    ) -> tuple[Any, AutoClipState]:
        del params
        updates = _groups.as_float_updates(updates)
        ts = _groups.tree_stats(updates, axis_name, full=False)
        g = _groups.global_norm(ts)
        new_state, scaler = autoclip_step(state, g, _groups.all_finite(ts), percentile)
        return jax.tree.map(scaler.apply, updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def autoclip_init(history: int) -> AutoClipState:
    """The initial :class:`AutoClipState` with a ``[history]`` ring buffer."""
    f = jnp.zeros((), jnp.float32)
    return AutoClipState(
        jnp.zeros((history,), jnp.float32), jnp.zeros((), jnp.int32), f, f, jnp.zeros((), jnp.bool_)
    )


def autoclip_step(
    state: AutoClipState,
    norm: jax.Array,
    finite: jax.Array,
    percentile: jax.typing.ArrayLike = 10.0,
) -> tuple[AutoClipState, Scaler]:
    """:func:`autoclip` on a precomputed global ``norm`` and finiteness: state, decision."""
    history = state.norms.shape[0]
    g = norm.astype(jnp.float32)
    pos = state.count % history
    norms = jnp.where(finite, state.norms.at[pos].set(g), state.norms)
    count = state.count + finite.astype(jnp.int32)
    tau = percentile_of_buffer(norms, jnp.minimum(count, history), percentile)
    clip = finite & (g > tau)
    new_state = _groups.keep_dtypes(AutoClipState(norms, count, tau, g, clip), state)
    return new_state, Scaler(g, tau, clip)
