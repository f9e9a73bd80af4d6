"""``rollback``: recovery from damage by returning to an on-device snapshot."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxstab.transforms import _groups

_EPS = 1e-12
_NORMAL, _ROLLBACK, _SKIP = 0, 1, 2

# Statistic names (read by jaxstab.read_stats).
COUNT = "rollback/count"
LAST_STEP = "rollback/last_step"
ARMED = "rollback/armed"
SKIPPING = "rollback/skipping"
ROLLED_BACK = "rollback/rolled_back"
CONSECUTIVE = "rollback/consecutive"
SNAPSHOT_STEP = "rollback/snapshot_step"
NORM_Z = "rollback/z"
LOSS_Z = "rollback/loss_z"


class RollbackState(NamedTuple):
    """State of :func:`rollback`.

    Attributes:
      inner_state: the wrapped transformation's state.
      snapshot_params: the parameters of the latest snapshot.
      snapshot_inner: ``inner``'s state at the latest snapshot, as the tuple of its leaves
        (so that :func:`jaxstab.read_stats` and ``jaxstab.loss_scale`` see ``inner``'s
        statistics once, not the snapshot's copy too).
      step: number of updates so far (int32).
      seen: finite steps that entered the running statistics.
      since_snapshot: good steps since the latest snapshot.
      snapshot_step: the step at which the latest snapshot was taken (0: ``init``).
      norm_mean, norm_var: running mean and variance of the global gradient norm.
      loss_mean, loss_var: running mean and variance of the loss (``value=``).
      consecutive: excursion steps in a row, ending at the latest step.
      skipping: steps still to skip after the latest rollback.
      count: rollbacks so far.
      last_step: the step of the latest rollback (-1: none yet).
      rolled_back: whether the latest step was a rollback.
      z: z-score of the latest gradient norm (0 during warm-up).
      loss_z: z-score of the latest loss (0 during warm-up or without ``value``).
      armed: whether an excursion could trigger a rollback at the latest step.
    """

    inner_state: Any
    snapshot_params: Any
    snapshot_inner: Any
    step: jax.Array
    seen: jax.Array
    since_snapshot: jax.Array
    snapshot_step: jax.Array
    norm_mean: jax.Array
    norm_var: jax.Array
    loss_mean: jax.Array
    loss_var: jax.Array
    consecutive: jax.Array
    skipping: jax.Array
    count: jax.Array
    last_step: jax.Array
    rolled_back: jax.Array
    z: jax.Array
    loss_z: jax.Array
    armed: jax.Array

    def _jaxstab_stats(self) -> dict[str, jax.Array]:
        return {
            COUNT: self.count,
            LAST_STEP: self.last_step,
            ARMED: self.armed,
            SKIPPING: self.skipping,
            ROLLED_BACK: self.rolled_back,
            CONSECUTIVE: self.consecutive,
            SNAPSHOT_STEP: self.snapshot_step,
            NORM_Z: self.z,
            LOSS_Z: self.loss_z,
        }


def rollback(
    inner: optax.GradientTransformation,
    *,
    every: jax.typing.ArrayLike = 8,
    z: jax.typing.ArrayLike = 4.0,
    patience: jax.typing.ArrayLike = 5,
    skip_after: jax.typing.ArrayLike = 0,
    loss_z: jax.typing.ArrayLike | None = None,
    warmup: jax.typing.ArrayLike = 8,
    alpha: jax.typing.ArrayLike = 0.9,
    nonfinite_params: bool = True,
    max_rollbacks: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Returns to an on-device snapshot of the parameters and of ``inner``'s state on damage.

    Every ``every`` good steps, when no excursion is in progress, the parameters passed
    to ``update`` (those whose gradient and loss this step has just found healthy) and
    ``inner``'s state before the step are copied into the state: the *snapshot* (``init``
    takes the first). A rollback is triggered by

    - a persistent gradient-norm excursion: the z-score of the global gradient norm
      against a running mean and variance above ``z`` for ``patience`` steps in a row.
      A one-step spike (what :func:`jaxstab.skip_bad_steps` and the clippers handle)
      does not trigger; a regime change after damage does;
    - non-finite parameters (``nonfinite_params``), whatever the statistics say;
    - a loss excursion, when the loss is passed as ``tx.update(g, s, params, value=loss)``
      (as ``optax.contrib.reduce_on_plateau`` takes it): its z-score against its own
      running statistics above ``loss_z`` (default: ``z``) counts as an excursion step
      like the norm's (a non-finite loss with a finite gradient counts too). Pass the
      unscaled loss; ``loss_z=math.inf`` ignores it.

    A rollback step emits the update ``snapshot - params`` (so ``optax.apply_updates``
    returns finite parameters to the snapshot, up to one rounding of the difference) and
    puts back ``inner``'s snapshot state, bit for bit. :func:`jaxstab.restore_or_apply`
    in place of ``optax.apply_updates`` returns the snapshot itself, bit for bit, also
    from NaN/Inf parameters (which no update can bring back). The next ``skip_after`` steps are
    skipped: ``inner`` does not run and its state is untouched; their update is again
    ``snapshot - params``, which is exactly zero once the parameters equal the snapshot
    and otherwise removes the rounding of the rollback step, so after one skipped step
    the parameters equal the snapshot exactly.

    The statistics (Welford over the first ``warmup`` finite steps, then an EMA with
    decay ``alpha``) take only good steps: excursion steps, skipped steps and steps with
    a non-finite gradient never enter them, and no excursion can fire during the warm-up.
    A step with a non-finite gradient (a NaN batch, a loss-scale overflow) is neither an
    excursion nor a good step: the skip or the loss scale handles it, the excursion count
    is held. When ``inner`` holds a :func:`jaxstab.dynamic_loss_scale`, the norm is divided
    by its current scale, so the scale's changes are no excursion either.

    Memory: one copy of the parameters and one of ``inner``'s state (with Adam: three
    parameter-sized trees more than ``inner`` alone). The snapshot copy is a
    ``lax.cond``: it costs only on the steps that take it; the rollback and the skipped
    steps are branches of a ``lax.switch``, so a normal step runs ``inner`` once.

    Placement: outermost, ``rollback(jaxstab.stability_guard(adam, clip=1.0))``, the
    norm is the raw gradient's (before any clip), and a rollback restores the guard's
    statistics too; with ``spike_z`` in the guard (or a :func:`jaxstab.skip_bad_steps`
    inside) a spike that persists for ``patience`` steps stops being skipped and becomes
    a rollback, and the skip's own statistics return with the snapshot. Inside a guard
    (``stability_guard(rollback(adam))``) it sees the clipped gradient, whose norm hardly
    moves, so only the loss and the parameters can trigger it: prefer outermost. With
    loss scaling, ``dynamic_loss_scale(inner=rollback(...))`` leaves an overflow step's
    rollback state untouched; outermost works too (see above).

    Args:
      inner: the transformation to protect, e.g. ``jaxstab.stability_guard(adam)``.
      every: good steps between snapshots (>= 1); a rollback loses at most this many
        steps plus ``patience``.
      z: gradient-norm z-score above which a step is an excursion step (> 0).
      patience: excursion steps in a row that trigger a rollback (>= 1).
      skip_after: steps skipped after a rollback (>= 0), e.g. to skip the batches that
        follow a bad stretch of data.
      loss_z: loss z-score above which a step is an excursion step; ``None``: ``z``.
      warmup: finite steps that initialise the statistics before an excursion can fire.
      alpha: EMA decay of the statistics after the warm-up, in (0, 1).
      nonfinite_params: roll back when a parameter is NaN/Inf (one reduction over the
        parameters each step).
      max_rollbacks: after this many rollbacks no excursion triggers another (a
        regime change that is real would otherwise roll back forever); ``None``: no limit.
      axis_name: under ``shard_map``/``pmap``, the norms, the parameter check and the
        loss are reduced across this axis, so every replica takes the same decision.

    Records ``rollback/count``, ``rollback/last_step``, ``rollback/armed``,
    ``rollback/skipping``, ``rollback/rolled_back``, ``rollback/consecutive``,
    ``rollback/snapshot_step``, ``rollback/z`` and ``rollback/loss_z``.

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = jaxstab.rollback(optax.sgd(0.125), every=2, warmup=2, patience=2)
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> for g in (1.0, 2.0, 1.0, 2.0, 400.0, 400.0):  # damage from step 4 on
    ...     updates, state = tx.update({"w": jnp.full(2, g)}, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> stats = jaxstab.read_stats(state)
    >>> int(stats["rollback/count"]), int(stats["rollback/snapshot_step"]), params["w"].tolist()
    (1, 3, [0.5, 0.5])
    """
    _groups.check_count("every", every, 1)
    _groups.check_positive("z", z)
    _groups.check_count("patience", patience, 1)
    _groups.check_count("skip_after", skip_after, 0)
    if loss_z is not None and not (isinstance(loss_z, float) and loss_z == float("inf")):
        _groups.check_positive("loss_z", loss_z)
    _groups.check_count("warmup", warmup, 1)
    _groups.check_range("alpha", alpha, 0.0, 1.0)
    if max_rollbacks is not None:
        _groups.check_count("max_rollbacks", max_rollbacks, 0)
    level_loss = z if loss_z is None else loss_z
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> RollbackState:
        copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
        inner_state = inner.init(params)
        i0 = lambda: jnp.zeros((), jnp.int32)
        f0 = lambda: jnp.zeros((), jnp.float32)
        b0 = lambda: jnp.zeros((), jnp.bool_)
        return RollbackState(
            inner_state=inner_state,
            snapshot_params=copy(params),
            snapshot_inner=tuple(jax.tree.leaves(copy(inner_state))),
            step=i0(),
            seen=i0(),
            since_snapshot=i0(),
            snapshot_step=i0(),
            norm_mean=f0(),
            norm_var=f0(),
            loss_mean=f0(),
            loss_var=f0(),
            consecutive=i0(),
            skipping=i0(),
            count=i0(),
            last_step=jnp.full((), -1, jnp.int32),
            rolled_back=b0(),
            z=f0(),
            loss_z=f0(),
            armed=b0(),
        )

    def update_fn(
        updates: Any, state: RollbackState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, RollbackState]:
        if params is None:
            raise ValueError("rollback needs the parameters: tx.update(grads, state, params)")
        updates = _groups.as_float_updates(updates)
        ts = _groups.tree_stats(updates, axis_name, full=False)
        finite = _groups.all_finite(ts)
        g = _groups.global_norm(ts).astype(jnp.float32) / _loss_scale(state.inner_state)
        if nonfinite_params:
            p_finite = _groups.all_finite(_groups.tree_stats(params, axis_name, full=False))
        else:
            p_finite = jnp.ones((), jnp.bool_)
        value = extra_args.get("value")
        has_loss = value is not None
        if has_loss:
            loss = jnp.mean(jnp.asarray(value, jnp.float32))
            if axis_name is not None:
                loss = lax.pmean(loss, axis_name)
        else:
            loss = jnp.zeros((), jnp.float32)

        warm = state.seen >= warmup
        zg = _zscore(g, state.norm_mean, state.norm_var, warm)
        zl = _zscore(loss, state.loss_mean, state.loss_var, warm) if has_loss else 0.0 * zg
        excursion = zg > z
        if has_loss:
            excursion = excursion | (zl > level_loss) | ~jnp.isfinite(loss)
        skipping = state.skipping > 0
        check = finite & p_finite & ~skipping
        excursion = warm & check & excursion
        good = check & ~excursion
        consecutive = jnp.where(
            excursion, state.consecutive + 1, jnp.where(good, 0, state.consecutive)
        )
        armed = warm & ~skipping
        if max_rollbacks is not None:
            armed = armed & (state.count < max_rollbacks)
        trigger = ~skipping & ((armed & (consecutive >= patience)) | ~p_finite)
        if axis_name is not None:  # one decision for all replicas
            trigger = lax.pmax(trigger.astype(jnp.int32), axis_name) > 0
        mode = jnp.where(skipping, _SKIP, jnp.where(trigger, _ROLLBACK, _NORMAL))

        def normal() -> tuple[Any, Any]:
            return inner.update(updates, state.inner_state, params, **extra_args)

        out_shape, inner_shape = jax.eval_shape(normal)
        restore = lambda: _restore(out_shape, state.snapshot_params, params)
        cast = lambda tree: _cast_like(tree, inner_shape)
        treedef = jax.tree.structure(state.inner_state)
        snapshot_inner = jax.tree.unflatten(treedef, state.snapshot_inner)
        out, inner_state = lax.switch(
            mode,
            [
                normal,
                lambda: (restore(), cast(snapshot_inner)),
                lambda: (restore(), cast(state.inner_state)),
            ],
        )

        take = good & (state.consecutive == 0) & (state.since_snapshot + 1 >= every)
        snap_params, snap_inner = lax.cond(
            take,
            lambda: (params, tuple(jax.tree.leaves(state.inner_state))),
            lambda: (state.snapshot_params, state.snapshot_inner),
        )

        # Statistics: good steps only (Welford during the warm-up, then an EMA).
        norm_mean, norm_var = _fold(g, state.norm_mean, state.norm_var, state.seen, warm, alpha)
        loss_mean, loss_var = _fold(loss, state.loss_mean, state.loss_var, state.seen, warm, alpha)
        fold = good  # a good step has finite parameters, so it never triggers
        rolled = mode == _ROLLBACK
        new_state = RollbackState(
            inner_state=inner_state,
            snapshot_params=snap_params,
            snapshot_inner=snap_inner,
            step=state.step + 1,
            seen=state.seen + fold.astype(jnp.int32),
            since_snapshot=jnp.where(
                take | rolled, 0, state.since_snapshot + fold.astype(jnp.int32)
            ),
            snapshot_step=jnp.where(take, state.step, state.snapshot_step),
            norm_mean=jnp.where(fold, norm_mean, state.norm_mean),
            norm_var=jnp.where(fold, norm_var, state.norm_var),
            loss_mean=jnp.where(fold, loss_mean, state.loss_mean),
            loss_var=jnp.where(fold, loss_var, state.loss_var),
            consecutive=jnp.where(rolled, 0, consecutive),
            skipping=jnp.where(rolled, skip_after, jnp.maximum(state.skipping - 1, 0)),
            count=state.count + rolled.astype(jnp.int32),
            last_step=jnp.where(rolled, state.step, state.last_step),
            rolled_back=rolled,
            z=zg,
            loss_z=zl,
            armed=armed,
        )
        return out, _groups.keep_dtypes(
            new_state, state, skip=("inner_state", "snapshot_params", "snapshot_inner")
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def restore_or_apply(params: Any, updates: Any, opt_state: Any) -> Any:
    """``optax.apply_updates``, except on a rollback step: then the snapshot itself.

    ``params + (snapshot - params)`` equals the snapshot only up to one rounding, and a
    NaN/Inf parameter cannot be updated back at all (``NaN + x`` is NaN); this returns
    the snapshot held by the :func:`rollback` inside ``opt_state`` (the state after the
    step), bit for bit, on the step that rolled back, and ``params + updates`` otherwise.
    It is a ``lax.cond``, so a normal step costs what ``optax.apply_updates`` costs.

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = jaxstab.rollback(optax.sgd(0.1))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> bad = {"w": jnp.array([jnp.nan, 2.0])}
    >>> updates, state = tx.update({"w": jnp.ones(2)}, state, bad)
    >>> jaxstab.restore_or_apply(bad, updates, state)["w"].tolist()
    [1.0, 1.0]
    """
    from jaxstab.transforms.stats import find_states

    found = [s for _, s in find_states(opt_state) if isinstance(s, RollbackState)]
    if len(found) != 1:
        raise ValueError(f"opt_state holds {len(found)} rollback states; expected one")
    state = found[0]
    return lax.cond(
        state.rolled_back,
        lambda: jax.tree.map(
            lambda s, p: jnp.asarray(s).astype(jnp.result_type(p)), state.snapshot_params, params
        ),
        lambda: optax.apply_updates(params, updates),
    )


def _zscore(x: jax.Array, mean: jax.Array, var: jax.Array, warm: jax.Array) -> jax.Array:
    return jnp.where(warm, (x - mean) / jnp.maximum(jnp.sqrt(var), _EPS), 0.0)


def _fold(
    x: jax.Array, mean: jax.Array, var: jax.Array, seen: jax.Array, warm: jax.Array, alpha: Any
) -> tuple[jax.Array, jax.Array]:
    n = (seen + 1).astype(jnp.float32)
    delta = x - mean
    w_mean = mean + delta / n
    w_var = var + (delta * (x - w_mean) - var) / n
    e_mean = alpha * mean + (1 - alpha) * x
    e_var = alpha * var + (1 - alpha) * (x - e_mean) ** 2
    return jnp.where(warm, e_mean, w_mean), jnp.where(warm, e_var, w_var)


def _restore(out_shape: Any, snapshot: Any, params: Any) -> Any:
    """``snapshot - params`` in the dtypes of ``inner``'s updates."""
    return jax.tree.map(
        lambda sd, s, p: (jnp.asarray(s) - jnp.asarray(p)).astype(sd.dtype),
        out_shape,
        snapshot,
        params,
    )


def _cast_like(tree: Any, shapes: Any) -> Any:
    return jax.tree.map(
        lambda old, sd: old if old.dtype == sd.dtype else old.astype(sd.dtype), tree, shapes
    )


def _loss_scale(inner_state: Any) -> jax.Array:
    """The scale of a :func:`jaxstab.dynamic_loss_scale` inside ``inner_state`` (else 1)."""
    from jaxstab.transforms.loss_scale import DynamicLossScaleState
    from jaxstab.transforms.stats import find_states

    found = [s for _, s in find_states(inner_state) if isinstance(s, DynamicLossScaleState)]
    if len(found) != 1:
        return jnp.ones((), jnp.float32)
    return found[0].scale.astype(jnp.float32)
