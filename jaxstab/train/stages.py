"""Staged training: train some parameter groups, freeze the rest, check that gradient agrees.

A stage (:class:`jaxstab.plugin.Stage`) names the top-level groups that train and the loss.
:func:`stage_optimizer` is the one way a stage's optimizer is built, by the command line and
by a model's own Python API alike: the guard inside the freezing,

    ``jaxstab.train_only(jaxstab.stability_guard(inner, clip=clip), trainable)``

so the guard sees, clips and records only the gradient of the groups that train (a frozen
group's gradient, zero or not, can neither shrink the clip scale nor trigger a skip), and the
frozen groups get exact zero updates (AdamW's weight decay cannot move them).
:func:`run_stage` checks with :func:`jaxstab.gradient_flow_report` on the first batch that
gradient reaches exactly the trainable groups, then trains with :func:`jaxstab.train.fit`.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, optax
  >>> from flax import nnx
  >>> from jaxstab.plugin import Stage
  >>> class Two(nnx.Module):
  ...     def __init__(self, rngs):
  ...         self.a, self.b = nnx.Linear(2, 2, rngs=rngs), nnx.Linear(2, 1, rngs=rngs)
  ...     def __call__(self, x):  # the head trains on features that are held fixed
  ...         return self.b(jax.lax.stop_gradient(self.a(x)))
  >>> def loss(m, batch, key):
  ...     return jnp.mean((m(batch["x"]) - batch["y"]) ** 2), {}
  >>> x = np.ones((8, 2), np.float32)
  >>> model = Two(nnx.Rngs(0))
  >>> res = run_stage(model, Stage(name="head", trainable=("b",)), {"x": x, "y": x[:, :1]},
  ...                 inner=optax.adamw(1e-2), loss_fn=loss, batch_size=4, epochs=2,
  ...                 key=jax.random.key(0))
  >>> bool(jnp.all(res.fit.model.a.kernel[...] == model.a.kernel[...]))  # frozen: unchanged
  True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxstab
from jaxstab.plugin import Dataset, Stage
from jaxstab.train.loop import FitResult, fit


class StageResult(NamedTuple):
    """``fit``'s result for one stage and the gradient-flow check made before it."""

    fit: FitResult
    report: jaxstab.GradientFlowReport


def stage_optimizer(
    inner: optax.GradientTransformation,
    trainable: Sequence[str] | None = None,
    *,
    guard: bool = True,
    clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """``inner`` guarded and restricted to the ``trainable`` top-level groups.

    ``trainable=None`` trains everything. ``guard=False`` only records norms
    (``jaxstab.log_norms``), never changing an update.

    >>> import jax.numpy as jnp, optax
    >>> tx = stage_optimizer(optax.adamw(1e-3), ["flow"])
    >>> params = {"flow": jnp.ones(2), "encoder": jnp.ones(2)}
    >>> updates, _ = tx.update({"flow": jnp.ones(2), "encoder": jnp.ones(2)},
    ...                        tx.init(params), params)
    >>> updates["encoder"].tolist()
    [0.0, 0.0]
    """
    if guard:
        tx = jaxstab.stability_guard(inner, clip=clip)
    else:  # log_norms only records, it never changes an update
        tx = optax.chain(jaxstab.log_norms(), inner)
    return tx if trainable is None else jaxstab.train_only(tx, tuple(trainable))


def check_gradient_flow(
    model: nnx.Module,
    loss_fn: Callable,
    batch: Mapping[str, jax.Array],
    trainable: Sequence[str] | None,
    key: jax.Array,
) -> jaxstab.GradientFlowReport:
    """Gradient of ``loss_fn`` on ``batch``, reported per top-level group.

    The report is ``ok`` when every trainable group gets finite non-zero gradient and every
    other group gets none.
    """
    grads = nnx.jit(nnx.grad(lambda m: loss_fn(m, batch, key)[0]))(model)
    groups = None if trainable is None else frozenset(trainable)
    return jaxstab.gradient_flow_report(grads, lambda g: groups is None or g in groups)


def gate_gradient_flow(
    model: nnx.Module,
    stage: Stage,
    loss_fn: Callable,
    arrays: Mapping[str, Any],
    batch_size: int,
    key: jax.Array,
) -> jaxstab.GradientFlowReport:
    """:func:`check_gradient_flow` of ``stage`` on the first ``batch_size`` examples; raises
    ``RuntimeError`` with the report when the stage checks its flow (``stage.check_flow``) and
    the report is not ``ok``. ``loss_fn`` is the stage's loss.

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from jaxstab.plugin import Stage
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> loss = lambda m, batch, key: ((m(batch["x"]) - 1.0) ** 2).mean()
    >>> x = {"x": np.ones((4, 2), np.float32)}
    >>> gate_gradient_flow(model, Stage(name="all"), lambda m, b, k: (loss(m, b, k), {}), x, 4,
    ...                    jax.random.key(0)).ok
    True
    """
    first = {k: jnp.asarray(v[:batch_size]) for k, v in arrays.items()}
    report = check_gradient_flow(model, loss_fn, first, stage.trainable, key)
    if stage.check_flow and not report.ok:
        raise RuntimeError(f"stage {stage.name!r}: gradient flow is wrong\n{report}")
    return report


def run_stage(
    model: nnx.Module,
    stage: Stage,
    data: Dataset | Mapping[str, Any],
    *,
    inner: optax.GradientTransformation,
    loss_fn: Callable,
    batch_size: int,
    epochs: int,
    key: jax.Array,
    guard: bool = True,
    clip: float | None = 1.0,
    **fit_kwargs: Any,
) -> StageResult:
    """Checks gradient flow, then trains ``stage`` with :func:`jaxstab.train.fit`.

    ``loss_fn`` is used when the stage names none. Raises ``RuntimeError`` before training if
    a frozen group would get gradient or a trainable group gets none. ``fit_kwargs`` go to
    ``fit`` (``steps_per_call``, ``record``, ``explosion_norm``, ...);
    ``result.fit.model`` is the trained model.
    """
    loss = stage.loss_fn or loss_fn
    arrays = stage.data(model, data).arrays
    k_check, k_fit = jax.random.split(key)
    report = gate_gradient_flow(model, stage, loss, arrays, batch_size, k_check)
    tx = stage_optimizer(inner, stage.trainable, guard=guard, clip=clip)
    result = fit(
        model, tx, loss, arrays, batch_size=batch_size, epochs=epochs, key=k_fit, **fit_kwargs
    )
    return StageResult(result, report)
