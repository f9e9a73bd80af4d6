"""``log_update_ratio``: the norm of the final update over the norm of the parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import stat_names as S
from jaxstab.transforms import _groups


class UpdateRatioState(NamedTuple):
    """State of :func:`log_update_ratio`.

    Attributes:
      ratio: ``‖update‖ / ‖params‖`` of the latest step (finite entries only; 0 for
        all-zero parameters).
    """

    ratio: jax.Array

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        return {S.UPDATE_PARAM_RATIO: self.ratio}


def log_update_ratio(*, axis_name: str | None = None) -> optax.GradientTransformation:
    """Records ``‖update‖ / ‖params‖``, the relative size of each step; updates unchanged.

    Put it last in a chain, after the optimizer, so that it sees the update that
    ``optax.apply_updates`` adds (learning rate, momentum and clipping included). About
    1e-3 is usual for Adam-type training; a median far above it is the report's
    ``lr_too_high`` finding. It costs two sums of squares (update and parameters) per leaf.
    :func:`jaxstab.log_norms`' ``grad/update_ratio`` is the gradient's ratio instead.

    Args:
      axis_name: under ``shard_map``/``pmap``, the norms are summed across this axis.

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = optax.chain(optax.sgd(0.1), jaxstab.log_update_ratio())
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update({"w": jnp.array([1.0, 0.0])}, tx.init(params), params)
    >>> round(float(jaxstab.read_stats(state)["update/param_ratio"]), 4)  # 0.1 / 5
    0.02
    """

    def init_fn(params: Any) -> UpdateRatioState:
        del params
        return UpdateRatioState(jnp.zeros((), jnp.float32))

    def update_fn(
        updates: Any, state: UpdateRatioState, params: Any = None
    ) -> tuple[Any, UpdateRatioState]:
        if params is None:
            raise ValueError("log_update_ratio needs the parameters: tx.update(g, s, params)")
        u = _groups.global_norm(_groups.tree_stats(updates, axis_name, full=False))
        ratio = _groups.ratio_to_params_norm(u, params, axis_name)
        return updates, UpdateRatioState(ratio.astype(jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)
