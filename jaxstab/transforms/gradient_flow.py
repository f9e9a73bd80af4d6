"""``gradient_flow_report``: which parameter groups get gradients, and which should."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxstab.transforms import _groups


@dataclasses.dataclass(frozen=True)
class GradientFlowReport:
    """Result of :func:`gradient_flow_report`.

    Attributes:
      frozen_with_grad: groups expected frozen whose gradient has a non-zero entry.
      trainable_without_grad: groups expected trainable whose gradient is exactly zero
        everywhere (a broken path: a stop-gradient, a detached input, an unused layer).
      norms: every group's gradient L2 norm (float64, NaN/Inf propagate).
    """

    frozen_with_grad: list[str]
    trainable_without_grad: list[str]
    norms: dict[str, float]
    trainable: dict[str, bool] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when gradients flow exactly where they are expected."""
        return not self.frozen_with_grad and not self.trainable_without_grad

    def __str__(self) -> str:
        lines = [f"Gradient flow: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        bad_frozen = set(self.frozen_with_grad)
        bad_train = set(self.trainable_without_grad)
        for name, norm in self.norms.items():
            expected = self.trainable.get(name)
            kind = "trainable" if expected else "frozen" if expected is not None else "?"
            if name in bad_frozen:
                mark, note = "[x]", "frozen but receives a gradient"
            elif name in bad_train:
                mark, note = "[x]", "trainable but its gradient is exactly zero"
            else:
                mark, note = "[ok]", "as expected"
            lines.append(f"  {mark} {name:<32} {kind:<9} norm={norm:.4g}  {note}")
        return "\n".join(lines)


def _leaf_mask(grads: Any, expected: Any) -> list[bool]:
    try:
        full = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub),
            expected,
            grads,
            is_leaf=lambda x: x is None,
        )
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"expected_trainable must be a pytree of bools matching grads (or a prefix of "
            f"it), or a callable group_name -> bool: {err}"
        ) from err
    leaves = jax.tree_util.tree_leaves(full, is_leaf=lambda x: isinstance(x, (bool, np.bool_)))
    for i, m in enumerate(leaves):
        if not isinstance(m, (bool, np.bool_)):
            raise TypeError(
                f"expected_trainable leaf {i} must be a bool, got {type(m).__name__}: {m!r}"
            )
    return [bool(m) for m in leaves]


def gradient_flow_report(
    grads: Any,
    expected_trainable: Any | Callable[[str], bool],
    group_depth: int | None = 1,
) -> GradientFlowReport:
    """Checks, on the host, that gradients reach exactly the parameters meant to train.

    Args:
      grads: a concrete gradient pytree (e.g. from ``nnx.grad`` or ``jax.grad``).
      expected_trainable: a pytree of bools matching ``grads`` (like an optax mask), or
        a callable ``group_name -> bool``.
      group_depth: how groups are named (see :func:`jaxstab.log_norms`).

    Returns:
      A :class:`GradientFlowReport`; a group is listed in ``frozen_with_grad`` if one of
      its frozen leaves has a non-zero entry, and in ``trainable_without_grad`` if all of
      its trainable leaves are exactly zero.

    >>> import jax.numpy as jnp, jaxstab
    >>> grads = {"vae": jnp.array([0.5]), "flow": jnp.zeros(2)}
    >>> report = jaxstab.gradient_flow_report(grads, lambda g: g == "flow")
    >>> report.frozen_with_grad, report.trainable_without_grad, report.ok
    (['vae'], ['flow'], False)
    """
    _groups.check_group_depth(group_depth)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(grads)]
    names = _groups.leaf_group_names(grads, group_depth)
    if callable(expected_trainable):
        mask = []
        for name in names:
            value = expected_trainable(name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"expected_trainable({name!r}) must return a bool, got {value!r}")
            mask.append(bool(value))
    else:
        mask = _leaf_mask(grads, expected_trainable)
    order: list[str] = []
    sumsq: dict[str, float] = {}
    frozen_hit: dict[str, bool] = {}
    train_any: dict[str, bool] = {}
    train_nonzero: dict[str, bool] = {}
    for leaf, name, trainable in zip(leaves, names, mask, strict=True):
        if name not in sumsq:
            order.append(name)
            sumsq[name] = 0.0
            frozen_hit[name] = False
            train_any[name] = False
            train_nonzero[name] = False
        x = leaf.astype(np.float64)
        sumsq[name] += float(np.sum(x * x))
        nonzero = bool(np.any(x != 0))
        if trainable:
            train_any[name] = True
            train_nonzero[name] |= nonzero
        else:
            frozen_hit[name] |= nonzero
    return GradientFlowReport(
        frozen_with_grad=[n for n in order if frozen_hit[n]],
        trainable_without_grad=[n for n in order if train_any[n] and not train_nonzero[n]],
        norms={n: float(np.sqrt(sumsq[n])) for n in order},
        trainable={n: train_any[n] for n in order},
    )
