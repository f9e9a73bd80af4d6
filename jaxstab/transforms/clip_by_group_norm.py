"""``clip_by_group_norm``: clipping of every parameter group to its own norm bound."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import stat_names as S
from jaxstab.transforms import _groups
from jaxstab.transforms.clip_by_global_norm import clip_leaf


class ClipByGroupNormState(NamedTuple):
    """State of :func:`clip_by_group_norm` (latest step), keyed by group name.

    Attributes:
      pre_norm: each group's norm before clipping.
      clipped: whether each group was clipped.
    """

    pre_norm: dict[str, jax.Array]
    clipped: dict[str, jax.Array]

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        out = {S.group_stat(S.CLIP_GROUP_NORM, g): v for g, v in self.pre_norm.items()}
        out.update({S.group_stat(S.CLIP_GROUP_CLIPPED, g): v for g, v in self.clipped.items()})
        out[S.CLIP_GROUPS_CLIPPED] = sum(
            (v.astype(jnp.int32) for v in self.clipped.values()), jnp.zeros((), jnp.int32)
        )
        return out


def clip_by_group_norm(
    max_norm: jax.typing.ArrayLike, group_depth: int | None = 1, *, axis_name: str | None = None
) -> optax.GradientTransformation:
    """Clips each parameter group to L2 norm ``max_norm`` independently.

    A group is the parameter path cut at ``group_depth`` keys (``None``: every leaf is a
    group, as ``optax.clip_by_block_rms`` treats blocks, but by norm). Records
    ``clip/group_norm/<g>``, ``clip/clipped/<g>`` and ``clip/groups_clipped``.

    Args:
      max_norm: the largest norm allowed per group (> 0); may be an array or traced.
      group_depth: how groups are named (see :func:`jaxstab.log_norms`); static (with
        ``optax.inject_hyperparams`` list it in ``static_args``).
      axis_name: under ``shard_map``/``pmap``, norms are reduced across this axis.

    >>> import jax.numpy as jnp, jaxstab
    >>> tx = jaxstab.clip_by_group_norm(1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> out, state = tx.update(grads, tx.init(grads))
    >>> out["a"].tolist(), out["b"].tolist()
    ([0.6000000238418579, 0.800000011920929], [0.5])
    >>> bool(jaxstab.read_stats(state)["clip/clipped/a"])
    True
    """
    _groups.check_positive("max_norm", max_norm)
    group_depth = _groups.check_group_depth(group_depth)

    def init_fn(params: Any) -> ClipByGroupNormState:
        groups, _ = _groups.group_layout(params, group_depth)
        return ClipByGroupNormState(
            {g: jnp.zeros((), jnp.float32) for g in groups},
            {g: jnp.zeros((), jnp.bool_) for g in groups},
        )

    def update_fn(
        updates: Any, state: ClipByGroupNormState, params: Any = None
    ) -> tuple[Any, ClipByGroupNormState]:
        del params, state  # the state is only written
        updates = _groups.as_float_updates(updates)
        groups, members = _groups.group_layout(updates, group_depth)
        ts = _groups.tree_stats(updates, axis_name, full=False)  # norms only
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        out = list(leaves)
        norms, clipped = {}, {}
        for g, idx in zip(groups, members, strict=True):
            norm = _groups.combined_norm(ts, idx)
            clip = norm >= max_norm
            for i in idx:
                out[i] = clip_leaf(leaves[i], norm, max_norm, clip)
            norms[g] = norm.astype(jnp.float32)
            clipped[g] = clip
        return jax.tree_util.tree_unflatten(treedef, out), ClipByGroupNormState(norms, clipped)

    return optax.GradientTransformation(init_fn, update_fn)
