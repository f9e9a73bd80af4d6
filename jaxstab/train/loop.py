"""``fit``: the training loop shared by every model.

The step is a pure jitted function of the NNX ``(graphdef, state)`` split; ``steps_per_call``
consecutive steps are fused with ``lax.scan`` into one call, and the host touches the device
once per call (one ``device_get`` of the stacked per-step outputs and the halt code).

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, optax
  >>> from flax import nnx
  >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
  >>> data = {"x": x, "y": x @ np.array([[1.0], [-2.0], [0.5]], np.float32)}
  >>> def loss_fn(model, batch, key):
  ...     err = model(batch["x"]) - batch["y"]
  ...     return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}
  >>> result = fit(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), optax.adam(0.05), loss_fn, data,
  ...              batch_size=16, epochs=30, key=jax.random.key(0))
  >>> result.status, result.steps, bool(result.history["loss"][-1] < 1e-2)
  ('ok', 120, True)

Testing hook: with the environment variable ``JAXSTAB_EXIT_AFTER_EPOCH=k`` the process ends
with ``os._exit(137)`` right after the ``latest`` checkpoint of epoch ``k`` is committed, the
way ``kill -9`` would end it (no cleanup runs); the crash-and-resume tests use it.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxstab.train import batching
from jaxstab.train import mesh as placement
from jaxstab.train.checkpoint import CheckpointError, CheckpointStore, CheckpointWarning
from jaxstab.train.progress import TrainProgress
from jaxstab.train.recorder import Recorder
from jaxstab.train.step import (
    RUNNING,
    STATUS_NAMES,
    Carry,
    carry_shardings,
    make_chunk_fn,
    make_eval_fn,
)


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      model: the trained module (in the train/eval mode the input model was in).
      opt_state: the final optimizer state.
      history: one entry per step (``loss``, every aux term, ``grad/global_norm``; with
        ``record`` every ``jaxstab.read_stats`` name and ``input/<name>``). When the run
        stops early, the last entry is the offending step, whose update was not applied.
      status: ``'ok'``, ``'explosion'`` or ``'nonfinite'``.
      steps: optimizer updates applied.
      epochs: epochs completed.
      epoch_history: per completed epoch, ``train_loss`` (mean step loss) and, with
        ``eval_data``, ``eval_loss``.
      best_metric: the best epoch metric (eval loss, else train loss), ``inf`` if none.
      steps_per_epoch: ``ceil(N / batch_size)``.
    """

    model: nnx.Module
    opt_state: Any
    history: dict[str, np.ndarray]
    status: str
    steps: int
    epochs: int
    epoch_history: dict[str, np.ndarray]
    best_metric: float
    steps_per_epoch: int


_permutation = jax.jit(batching.epoch_permutation, static_argnums=2)


@functools.lru_cache(maxsize=8)
def _permutation_on(mesh: Mesh) -> Callable:
    # Every device of the mesh (every process) computes the same permutation, replicated.
    return jax.jit(
        batching.epoch_permutation, static_argnums=2, out_shardings=placement.replicated(mesh)
    )


def _copy(tree: Any) -> Any:
    # Fresh buffers: the training calls donate their carry, the caller's model must survive.
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def _check_args(batch_size: int, epochs: int, steps_per_call: int | None) -> None:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(epochs, int | np.integer) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if steps_per_call is not None and (
        not isinstance(steps_per_call, int | np.integer) or steps_per_call < 1
    ):
        raise ValueError(
            f"steps_per_call must be None or a positive integer, got {steps_per_call!r}"
        )


def fit(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    data: Mapping[str, Any],
    *,
    batch_size: int,
    epochs: int,
    key: jax.Array,
    steps_per_call: int | None = None,
    eval_data: Mapping[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    explosion_norm: float | None = 100.0,
    record: bool = False,
    progress: bool = False,
    batch_stats_fn: Callable[[Mapping[str, jax.Array]], dict] | None = None,
    halt_on_nonfinite: bool = True,
    mesh: Mesh | None = None,
    shard_params: bool = False,
) -> FitResult:
    """Trains ``model`` on ``data`` with ``tx``; see the module docstring for an example.

    Args:
      model: an ``nnx.Module``; not modified (the trained copy is ``result.model``).
      tx: optimizer over ``nnx.state(model, nnx.Param)``.
      loss_fn: ``(model, batch, key) -> (loss, aux)``; pure and jittable.
      data: arrays with a shared leading size ``N``; moved to the device once.
      batch_size: ``B``; each epoch has ``ceil(N / B)`` steps, the last batch wraps around.
      epochs: number of passes.
      key: the run's key (typed or raw). With ``perm_key, step_key, eval_key =
        jax.random.split(key, 3)``, epoch ``e`` visits the examples in the order
        ``jax.random.permutation(jax.random.fold_in(perm_key, e), N)`` and step ``t`` of the
        run (counting from 0 over all epochs) calls ``loss_fn`` with
        ``jax.random.fold_in(step_key, t)``.
      steps_per_call: steps fused per jitted call; ``None`` is one whole epoch per call.
      eval_data: evaluated in eval mode after every epoch (mean of ``loss_fn``).
      checkpoint_dir: keeps orbax ``latest`` (every epoch) and ``best`` (by eval loss, else
        train loss) checkpoints there.
      resume: continue from the newest verified ``latest`` checkpoint in ``checkpoint_dir``
        (a newer one that fails verification is passed over with a ``CheckpointWarning``
        naming both steps, and deleted); the run key is then the checkpointed one. Raises
        ``CheckpointError`` when there is no verified checkpoint, or when it was written with
        another ``batch_size`` or number of examples. Without ``resume`` a ``checkpoint_dir``
        that already holds checkpoints is refused (``CheckpointError``) before any step.
      explosion_norm: stop when the global gradient norm exceeds it or is non-finite
        (``None``: never).
      record: keep every ``jaxstab.read_stats`` value per step in ``history``.
      progress: draw a rich progress bar on stderr.
      batch_stats_fn: with ``record``, ``batch -> {name: scalar}`` kept as ``input/<name>``.
      halt_on_nonfinite: stop when the loss is non-finite.
      mesh: data-parallel training over the mesh's ``data`` axis (see
        :mod:`jaxstab.train.mesh`; e.g. ``jaxstab.train.mesh.data_mesh("all")``): the data
        sets live on the devices with their examples sharded over ``data``, every batch is
        split evenly over it, and parameters and optimizer state are replicated. The run is
        the same computation as on one device (the same batches, keys and schedule; global
        gradient norms, batch statistics and skip decisions), up to the order of floating
        point reductions. ``batch_size`` must divide by the number of devices along
        ``data`` (``ValueError`` before any step). Checkpoints restore onto any mesh.
      shard_params: with ``mesh``, shard parameters and optimizer state over ``data`` too
        (FSDP-style: each array along its largest dimension that the device count divides;
        the others replicated), for models that do not fit on one device.

    Returns:
      A :class:`FitResult`.
    """
    _check_args(batch_size, epochs, steps_per_call)
    if mesh is not None:
        mesh = placement.check_mesh(mesh, int(batch_size))
    elif shard_params:
        raise ValueError("shard_params=True needs a mesh")
    n = batching.check_data(data, "data")
    n_eval = batching.check_data(eval_data, "eval_data") if eval_data is not None else None
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    spe = batching.steps_per_epoch(n, batch_size)
    chunk = spe if steps_per_call is None else min(steps_per_call, spe)

    # One graphdef per mode: train()/eval() flags are static attributes of the graph.
    out_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    work = nnx.merge(out_graphdef, params, rest, copy=True)
    work.train()
    train_graphdef = nnx.split(work, nnx.Param, ...)[0]
    work.eval()
    eval_graphdef = nnx.split(work, nnx.Param, ...)[0]
    opt_state = tx.init(params)
    if mesh is not None:
        placed = carry_shardings(Carry(params, opt_state, rest, jnp.int32(0)), mesh, shard_params)
        params, opt_state, rest = placement.put_state((params, opt_state, rest), placed[:3])

    store = CheckpointStore(checkpoint_dir) if checkpoint_dir is not None else None
    start_epoch, global_step, best = 0, 0, float("inf")
    history: dict[str, np.ndarray] = {}
    epoch_hist: dict[str, list[float]] = {"train_loss": [], "eval_loss": []}
    run_facts = {"batch_size": int(batch_size), "n_examples": int(n)}
    if store is not None and not resume and any(store.steps(k) for k in ("latest", "best")):
        store.close()
        raise CheckpointError(
            f"checkpoint_dir {store.directory} already holds checkpoints; resume=True continues "
            "them, or use an empty directory"
        )
    if resume and store is not None:
        leaves, treedef = jax.tree.flatten((params, opt_state, rest))
        try:
            got = store.restore("latest", leaves, expect=run_facts)
        except CheckpointError:
            store.close()
            raise
        for step, why in got.skipped:
            warnings.warn(
                f"checkpoint latest/{step} failed verification ({why}); "
                f"resuming from latest/{got.step}",
                CheckpointWarning,
                stacklevel=2,
            )
        store.drop_after("latest", got.step)
        history, meta = got.history, got.meta
        params, opt_state, rest = jax.tree.unflatten(treedef, got.leaves)
        start_epoch, global_step, best = meta["epoch"], meta["step"], float(meta["best"])
        epoch_hist = {k: list(v) for k, v in meta["epoch_history"].items()}
        key = jax.random.wrap_key_data(jnp.asarray(meta["key"], jnp.uint32), impl=meta["impl"])

    typed_key = key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else None
    if typed_key is None:
        typed_key = jax.random.wrap_key_data(key)
    perm_key, step_key, eval_key = jax.random.split(typed_key, 3)
    permutation = _permutation
    if mesh is not None:
        keys = (perm_key, step_key, eval_key)
        keys = placement.put_state(keys, placement.state_shardings(keys, mesh, shard=False))
        perm_key, step_key, eval_key = keys
        permutation = _permutation_on(mesh)

    run = make_chunk_fn(
        train_graphdef,
        tx,
        loss_fn,
        batch_size=batch_size,
        explosion_norm=explosion_norm,
        halt_on_nonfinite=halt_on_nonfinite,
        record=record,
        batch_stats_fn=batch_stats_fn,
        mesh=mesh,
        shard_params=bool(shard_params),
    )
    evaluate = (
        make_eval_fn(eval_graphdef, loss_fn, batch_size=batch_size, mesh=mesh)
        if eval_data
        else None
    )
    if mesh is None:
        device_data = jax.device_put({k: jnp.asarray(v) for k, v in data.items()})
        device_eval = (
            jax.device_put({k: jnp.asarray(v) for k, v in eval_data.items()}) if eval_data else None
        )
    else:
        device_data = placement.put_data(data, mesh)
        device_eval = placement.put_data(eval_data, mesh) if eval_data else None

    # Fresh, distinct buffers: every call donates its carry, and optimizer states may share
    # one array between fields (or with the caller's model). On a mesh, put_state (or the
    # restore) already made one fresh buffer per leaf: no second copy of a sharded model.
    if mesh is None:
        carry = Carry(*_copy((params, opt_state, rest)), jnp.int32(RUNNING))
    else:
        halt0 = jax.device_put(np.int32(RUNNING), placement.replicated(mesh))
        carry = Carry(params, opt_state, rest, halt0)
    del params, opt_state, rest  # the carry owns the state now
    recorder = Recorder(history)
    bar = TrainProgress(epochs * spe, enabled=progress, completed=min(global_step, epochs * spe))
    halt = RUNNING
    try:
        for epoch in range(start_epoch, epochs):
            perm = permutation(perm_key, epoch, n)
            first, epoch_loss = 0, 0.0
            while first < spe and halt == RUNNING:
                n_steps = min(chunk, spe - first)
                carry, out = run(
                    carry, device_data, perm, first, global_step, step_key, n_steps=n_steps
                )
                n_valid, halt = recorder.pull(out, carry.halt)
                epoch_loss += float(np.sum(recorder.tail("loss")))
                applied = n_valid - (halt != RUNNING)
                global_step += applied
                first += n_steps
                bar.update(applied, recorder.last, epoch=epoch + 1)
            if halt != RUNNING:
                break
            train_loss = epoch_loss / spe
            epoch_hist["train_loss"].append(train_loss)
            metric = train_loss
            if evaluate is not None:
                metric = float(evaluate(carry.params, carry.rest, device_eval, eval_key, n=n_eval))
                epoch_hist["eval_loss"].append(metric)
            if store is not None:
                leaves = jax.tree.leaves((carry.params, carry.opt_state, carry.rest))
                meta = {
                    **run_facts,
                    "epoch": epoch + 1,
                    "step": global_step,
                    "best": min(best, metric) if np.isfinite(metric) else best,
                    "epoch_history": epoch_hist,
                    "key": np.asarray(jax.random.key_data(typed_key)).tolist(),
                    "impl": str(jax.random.key_impl(typed_key)),
                }
                if np.isfinite(metric) and metric < best:
                    store.save("best", global_step, leaves, {}, meta)
                store.save("latest", global_step, leaves, recorder.history(), meta)
                if os.environ.get("JAXSTAB_EXIT_AFTER_EPOCH") == str(epoch + 1):
                    os._exit(137)  # testing hook, see the module docstring
            if np.isfinite(metric) and metric < best:
                best = metric
    finally:
        bar.close()
        if store is not None:
            store.close()

    completed = len(epoch_hist["train_loss"])
    return FitResult(
        model=nnx.merge(out_graphdef, carry.params, carry.rest),
        opt_state=carry.opt_state,
        history=recorder.history(),
        status=STATUS_NAMES[halt],
        steps=global_step,
        epochs=completed,
        epoch_history={k: np.asarray(v, dtype=np.float64) for k, v in epoch_hist.items()},
        best_metric=best,
        steps_per_epoch=spe,
    )
