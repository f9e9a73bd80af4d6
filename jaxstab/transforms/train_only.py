"""Train only some parameters: ``inner`` on the selected leaves, exact zero updates elsewhere.

Built on ``optax.partition``: the selected leaves go to ``inner`` (which sees only them, so a
guard inside it clips and records only the gradient of what trains), every other leaf to
``optax.set_to_zero()``, so a frozen parameter cannot move, not even by weight decay.

Example:
  >>> import jax.numpy as jnp, optax, jaxstab
  >>> tx = jaxstab.train_only(optax.adamw(0.1, weight_decay=0.5), ["head"])
  >>> params = {"head": jnp.ones(2), "body": jnp.ones(2)}
  >>> updates, _ = tx.update(params, tx.init(params), params)
  >>> updates["body"].tolist(), bool(jnp.all(updates["head"] < 0))
  ([0.0, 0.0], True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jaxstab import tree as tree_lib

TRAIN, FREEZE = "train", "freeze"


def _under(name: str, groups: Sequence[str]) -> bool:
    return any(name == g or name.startswith(g + "/") for g in groups)


def train_only(
    inner: optax.GradientTransformation,
    trainable: Sequence[str] | Callable[[str], bool],
) -> optax.GradientTransformationExtraArgs:
    """``inner`` on the leaves that ``trainable`` selects, zero updates on all the others.

    Args:
      inner: the transformation for the trained leaves (e.g. a guarded AdamW).
      trainable: group names (a leaf trains when its name, see :mod:`jaxstab.tree`, is one of
        them or lies below one: ``"encoder"`` selects ``encoder/layers/0/kernel``), or a
        predicate ``name -> bool`` on full leaf names.

    A name that selects no leaf is a ``ValueError`` when the state is first built (a typo would
    otherwise freeze the whole model in silence).

    >>> import jax.numpy as jnp, optax
    >>> tx = train_only(optax.sgd(1.0), lambda name: name.endswith("bias"))
    >>> p = {"layer": {"kernel": jnp.ones(1), "bias": jnp.ones(1)}}
    >>> u, _ = tx.update(p, tx.init(p))
    >>> u["layer"]["kernel"].tolist(), u["layer"]["bias"].tolist()
    ([0.0], [-1.0])
    """
    if callable(trainable):
        selected, named = trainable, None
    else:
        named = (trainable,) if isinstance(trainable, str) else tuple(trainable)
        if not named:
            raise ValueError("train_only: no trainable group named; pass at least one")
        selected = lambda name: _under(name, named)

    def labels(params: Any) -> Any:
        mask = tree_lib.select(params, selected)
        if named is not None:
            names = tree_lib.leaf_names(params)
            for group in named:
                if not any(_under(n, (group,)) for n in names):
                    known = ", ".join(sorted({n.split("/")[0] for n in names}))
                    raise ValueError(
                        f"train_only: no parameter under {group!r}; top-level groups: {known}"
                    )
        return jax.tree_util.tree_map(lambda keep: TRAIN if keep else FREEZE, mask)

    return optax.partition({TRAIN: inner, FREEZE: optax.set_to_zero()}, labels)
