"""The pure training step on NNX ``(graphdef, state)`` and its ``lax.scan``-fused chunk.

A chunk runs ``n`` consecutive steps of one epoch inside one jitted call. The carry holds the
parameters, the optimizer state, the model's other state (batch statistics, RNG counters) and a
halt code; once a step detects an explosion or a non-finite loss, its update is not applied and
every later step of the chunk is a no-op, so the stop is exact whatever the chunk length.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> gd, params, rest = nnx.split(model, nnx.Param, ...)
  >>> def loss_fn(m, batch, key):
  ...     return jnp.mean((m(batch["x"]) - batch["y"]) ** 2), {}
  >>> tx = optax.sgd(0.1)
  >>> run = make_chunk_fn(gd, tx, loss_fn, batch_size=2, explosion_norm=None)
  >>> data = {"x": jnp.ones((4, 2)), "y": jnp.zeros((4, 1))}
  >>> carry = Carry(params, tx.init(params), rest, jnp.int32(0))
  >>> carry, out = run(carry, data, jnp.arange(4), 0, 0, jax.random.key(0), n_steps=2)
  >>> out["loss"].shape
  (2,)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxstab import stat_names as S
from jaxstab.train import batching
from jaxstab.train import mesh as placement

# Halt codes carried on the device; the host reads them once per call.
RUNNING, EXPLOSION, NONFINITE = 0, 1, 2
STATUS_NAMES = {RUNNING: "ok", EXPLOSION: "explosion", NONFINITE: "nonfinite"}

# Per-step outputs that are always present.
VALID = "_valid"
GLOBAL_NORM = S.GLOBAL_NORM


class Carry(NamedTuple):
    """What one training step reads and writes."""

    params: Any
    opt_state: Any
    rest: Any  # every non-Param variable of the model (BatchStat, RngCount, ...)
    halt: jax.Array  # int32 RUNNING / EXPLOSION / NONFINITE


def carry_shardings(carry: Carry, mesh: Mesh, shard_params: bool = False) -> Carry:
    """The ``NamedSharding`` of every leaf of ``carry`` on ``mesh``: parameters and optimizer
    state replicated or, with ``shard_params``, by :func:`jaxstab.train.mesh.fsdp_spec`; the
    model's other state and the halt code replicated."""
    shard = functools.partial(placement.state_shardings, mesh=mesh, shard=shard_params)
    return Carry(
        shard(carry.params),
        shard(carry.opt_state),
        placement.state_shardings(carry.rest, mesh, shard=False),
        placement.replicated(mesh),
    )


def stats_reader() -> Callable[[Any], dict[str, jax.Array]] | None:
    """``jaxstab.read_stats`` when the transforms are installed, else ``None``."""
    try:
        from jaxstab import read_stats  # imported lazily: optional at this layer
    except ImportError:
        return None
    return read_stats


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    # lax.cond rather than jnp.where: the trees may hold typed PRNG keys (nnx.Rngs state).
    return jax.lax.cond(pred, lambda: on_true, lambda: on_false)


def make_step_fn(
    train_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    *,
    explosion_norm: float | None,
    halt_on_nonfinite: bool = True,
    record: bool = False,
    batch_stats_fn: Callable[[Mapping[str, jax.Array]], dict] | None = None,
) -> Callable[[Carry, Mapping[str, jax.Array], jax.Array], tuple[Carry, dict]]:
    """Builds ``step(carry, batch, key) -> (carry, outputs)`` (pure, not jitted).

    ``outputs`` holds ``loss``, every aux term, ``grad/global_norm`` and, with ``record``,
    every ``jaxstab.read_stats`` value and ``input/<name>`` from ``batch_stats_fn``.

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> m = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    >>> gd, p, r = nnx.split(m, nnx.Param, ...)
    >>> step = make_step_fn(gd, optax.sgd(0.1), lambda m, b, k: (m(b["x"]).sum(), {}),
    ...                     explosion_norm=1e-9)
    >>> c, out = step(Carry(p, optax.sgd(0.1).init(p), r, jnp.int32(0)),
    ...               {"x": jnp.ones((1, 1))}, jax.random.key(0))
    >>> int(c.halt)  # the norm exceeded 1e-9: EXPLOSION, update not applied
    1
    """
    read_stats = stats_reader()

    def loss_and_state(params, rest, batch, key):
        # copy=True: fresh Variables owned by this trace, so BatchNorm may update them.
        model = nnx.merge(train_graphdef, params, rest, copy=True)
        loss, aux = loss_fn(model, batch, key)
        new_rest = nnx.split(model, nnx.Param, ...)[2]
        return loss, (aux, new_rest)

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    def step(carry: Carry, batch: Mapping[str, jax.Array], key: jax.Array):
        (loss, (aux, new_rest)), grads = grad_fn(carry.params, carry.rest, batch, key)
        updates, new_opt_state = tx.update(grads, carry.opt_state, carry.params)
        new_params = optax.apply_updates(carry.params, updates)
        gnorm = optax.tree.norm(grads)

        halt = jnp.int32(RUNNING)
        if explosion_norm is not None:
            halt = jnp.where(gnorm > explosion_norm, EXPLOSION, halt)
            halt = jnp.where(jnp.isfinite(gnorm), halt, NONFINITE)
        if halt_on_nonfinite:
            halt = jnp.where(jnp.isfinite(loss), halt, NONFINITE)
        # A step after a halt still runs (no lax.cond around the step: cheaper to compile) but
        # its update is dropped, the first halt code is kept and its outputs are invalid.
        running = carry.halt == RUNNING
        apply = running & (halt == RUNNING)
        halt = jnp.where(running, halt, carry.halt)
        stats = read_stats(new_opt_state) if read_stats is not None else {}
        if S.SKIP_SKIPPED in stats:
            # A step the guard skips leaves the model's other state (BatchNorm statistics) as
            # it was too: the batch that made its gradient non-finite would poison them.
            new_rest = _select(stats[S.SKIP_SKIPPED] > 0, carry.rest, new_rest)
        kept = _select(
            apply,
            (new_params, new_opt_state, new_rest),
            (carry.params, carry.opt_state, carry.rest),
        )
        new_carry = Carry(*kept, halt.astype(jnp.int32))

        out: dict[str, jax.Array] = {S.LOSS: loss}
        out.update({str(k): jnp.asarray(v) for k, v in aux.items()})
        if record:
            out.update(stats)
        else:  # the progress bar still shows skips and clips when the chain keeps them
            out.update({k: stats[k] for k in (S.SKIP_TOTAL, S.CLIP_CLIPPED) if k in stats})
        out.setdefault(GLOBAL_NORM, gnorm)
        if record and batch_stats_fn is not None:
            out.update({S.INPUT + str(k): jnp.asarray(v) for k, v in batch_stats_fn(batch).items()})
        out[VALID] = running
        return new_carry, out

    return step


# Cached so that repeated ``fit`` calls with the same graph, optimizer and loss function (seeds
# of one experiment, a resumed run) reuse one compiled executable; all arguments are hashable.
@functools.lru_cache(maxsize=32)
def make_chunk_fn(
    train_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    *,
    batch_size: int,
    explosion_norm: float | None,
    halt_on_nonfinite: bool = True,
    record: bool = False,
    batch_stats_fn: Callable | None = None,
    mesh: Mesh | None = None,
    shard_params: bool = False,
) -> Callable:
    """Jitted ``run(carry, data, perm, first_step, global_step, step_key, n_steps)``.

    Runs steps ``first_step … first_step + n_steps - 1`` of the epoch whose permutation is
    ``perm``; step ``t`` of the whole run draws its key as ``fold_in(step_key, t)``. Returns
    the new carry and the per-step outputs stacked along a leading axis of size ``n_steps``
    (``_valid`` is False for steps skipped after a halt).

    With a ``mesh`` (see :mod:`jaxstab.train.mesh`) every gathered batch is constrained to be
    sharded over its ``data`` axis, the carry's parameters and optimizer state to be
    replicated (or, with ``shard_params``, sharded FSDP-style) and the rest of the model's
    state and the per-step outputs to be replicated; XLA inserts the collectives.
    """
    step = make_step_fn(
        train_graphdef,
        tx,
        loss_fn,
        explosion_norm=explosion_norm,
        halt_on_nonfinite=halt_on_nonfinite,
        record=record,
        batch_stats_fn=batch_stats_fn,
    )

    @functools.partial(jax.jit, static_argnames=("n_steps",), donate_argnums=(0,))
    def run(carry, data, perm, first_step, global_step, step_key, *, n_steps: int):
        def body(c: Carry, t):
            idx = batching.batch_indices(perm, first_step + t, batch_size)
            batch = batching.take(data, idx)
            key = jax.random.fold_in(step_key, global_step + t)
            if mesh is None:
                return step(c, batch, key)
            batch = placement.constrain(batch, placement.batch_sharding(mesh))
            new_c, out = step(c, batch, key)
            new_c = placement.constrain(new_c, carry_shardings(new_c, mesh, shard_params))
            return new_c, placement.constrain(out, placement.replicated(mesh))

        return jax.lax.scan(body, carry, jnp.arange(n_steps))

    return run


@functools.lru_cache(maxsize=32)
def make_eval_fn(
    eval_graphdef: nnx.GraphDef, loss_fn: Callable, *, batch_size: int, mesh: Mesh | None = None
) -> Callable:
    """Jitted ``evaluate(params, rest, data, key, n=None) -> mean loss`` in eval mode.

    Batches of ``batch_size`` in order (the last wraps around); each batch's loss is weighted
    by the number of examples it adds, so the result is the mean over the data set whenever
    ``loss_fn`` averages over the batch and the data divide evenly. ``n`` (static) is the
    number of examples when ``data`` has padding rows after them (see
    :func:`jaxstab.train.mesh.put_data`); with a ``mesh`` each batch is sharded over ``data``.
    """

    @functools.partial(jax.jit, static_argnames=("n",))
    def evaluate(params, rest, data, key, n=None):
        if n is None:
            n = next(iter(data.values())).shape[0]
        n_batches = batching.steps_per_epoch(n, batch_size)
        order = jnp.arange(n)

        def one(i):
            batch = batching.take(data, batching.batch_indices(order, i, batch_size))
            if mesh is not None:
                batch = placement.constrain(batch, placement.batch_sharding(mesh))
            model = nnx.merge(eval_graphdef, params, rest, copy=True)
            loss, _ = loss_fn(model, batch, jax.random.fold_in(key, i))
            weight = jnp.minimum(batch_size, n - i * batch_size)
            return loss * weight

        return jnp.sum(jax.lax.map(one, jnp.arange(n_batches))) / n

    return evaluate
