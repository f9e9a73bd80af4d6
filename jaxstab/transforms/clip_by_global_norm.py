"""``clip_by_global_norm``: optax's global-norm clipping, overflow-safe and recorded."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import stat_names as S
from jaxstab.transforms import _groups


class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm` (values of the latest step).

    Attributes:
      pre_norm: global norm before clipping (finite entries; float32).
      scale: factor applied to the gradient (1 when not clipped).
      clipped: whether the gradient was clipped.
    """

    pre_norm: jax.Array
    scale: jax.Array
    clipped: jax.Array

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        return {
            S.CLIP_PRE_NORM: self.pre_norm,
            S.CLIP_SCALE: self.scale,
            S.CLIP_CLIPPED: self.clipped,
        }


def clip_leaf(
    x: jax.Array, norm: jax.Array, max_norm: jax.typing.ArrayLike, clip: jax.Array
) -> jax.Array:
    """``x / norm * max_norm`` where ``clip``, else ``x``; computed in float32 or wider.

    For float32 leaves this is exactly optax's formula; for float16/bfloat16 the division
    happens in float32, so a norm beyond the float16 range does not zero the gradient.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    safe = jnp.where(clip, norm, 1).astype(acc)
    scaled = ((x.astype(acc) / safe) * jnp.asarray(max_norm, acc)).astype(x.dtype)
    return jnp.where(clip, scaled, x)


class Scaler(NamedTuple):
    """One clipper's decision: ``clip_leaf(x, norm, target, clip)`` for every leaf.

    The clippers compute it from the norm alone (a scalar), so that
    :func:`jaxstab.stability_guard` can apply several of them leaf by leaf inside the
    inner update's own elementwise loops, without a pass over the gradient of their own.
    """

    norm: jax.Array
    target: jax.typing.ArrayLike
    clip: jax.Array

    def apply(self, x: jax.Array) -> jax.Array:
        return clip_leaf(x, self.norm, self.target, self.clip)

    def post_norm(self) -> jax.Array:
        """The norm (of the finite entries) after :meth:`apply`, without a pass.

        ``target`` where clipped (``0`` for an infinite norm: ``x / inf`` is 0), else
        ``norm``; equal to recomputing the norm of the clipped gradient up to rounding.
        """
        target = jnp.asarray(self.target, self.norm.dtype)
        clipped = jnp.where(jnp.isinf(self.norm), jnp.zeros_like(target), target)
        return jnp.where(self.clip, clipped, self.norm)


def clip_step(
    norm: jax.Array, max_norm: jax.typing.ArrayLike
) -> tuple[ClipByGlobalNormState, Scaler]:
    """:func:`clip_by_global_norm` on a precomputed global ``norm``: new state, decision."""
    clip = norm >= max_norm  # optax keeps the update when norm < max_norm
    scale = jnp.where(clip, max_norm / jnp.where(clip, norm, 1), 1.0)
    f32 = jnp.float32
    state = ClipByGlobalNormState(norm.astype(f32), scale.astype(f32), clip)
    return state, Scaler(norm, max_norm, clip)


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike, *, axis_name: str | None = None
) -> optax.GradientTransformation:
    """Clips the gradient to global L2 norm ``max_norm`` and records what it did.

    On finite gradients the updates equal ``optax.clip_by_global_norm(max_norm)``'s. The
    norm is accumulated in float32 with rescaling, so float16 gradients of 300 are clipped
    correctly where optax's float16 squared norm overflows to Inf and zeroes them.
    Records ``clip/pre_norm``, ``clip/scale`` and ``clip/clipped``.

    Integer and bool gradient leaves are promoted to float (int32 → float32), as
    ``optax.adam`` computes with them, never truncated.

    Args:
      max_norm: the largest global norm allowed (> 0); an array or a traced value too, so
        ``optax.inject_hyperparams(jaxstab.clip_by_global_norm)`` can schedule it.
      axis_name: under ``shard_map``/``pmap`` with a sharded gradient, squared norms are
        summed across this axis so every replica applies the same scale.

    >>> import jax.numpy as jnp, jaxstab
    >>> tx = jaxstab.clip_by_global_norm(1.0)
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> out, state = tx.update(grads, tx.init(grads))
    >>> out["w"].tolist(), float(jaxstab.read_stats(state)["clip/pre_norm"])
    ([0.6000000238418579, 0.800000011920929], 5.0)
    """
    _groups.check_positive("max_norm", max_norm)

    def init_fn(params: Any) -> ClipByGlobalNormState:
        del params
        return ClipByGlobalNormState(
            jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32), jnp.zeros((), jnp.bool_)
        )

    def update_fn(
        updates: Any, state: ClipByGlobalNormState, params: Any = None
    ) -> tuple[Any, ClipByGlobalNormState]:
        del params, state  # the state is only written (optax.EmptyState() works too)
        updates = _groups.as_float_updates(updates)
        norm = _groups.global_norm(_groups.tree_stats(updates, axis_name, full=False))
        new_state, scaler = clip_step(norm, max_norm)
        return jax.tree.map(scaler.apply, updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)
