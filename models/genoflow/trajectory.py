"""Cell trajectories: encode count rows, integrate the learned flow with diffrax, decode.

Example:
  >>> import numpy as np
  >>> from flax import nnx
  >>> from jaxstab.models.genoflow.config import GenoFlowConfig
  >>> from jaxstab.models.genoflow.model import GenoFlow
  >>> model = GenoFlow(5, 2, np.zeros((2, 0), int), GenoFlowConfig.small(), rngs=nnx.Rngs(0),
  ...                  conditions=["ctrl", "drug"])
  >>> out = simulate_trajectory(model, np.ones((3, 5)), "drug", n_save=4)
  >>> out.latent.shape, out.expression.shape, out.times.shape
  ((4, 3, 4), (4, 3, 5), (4,))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstab.models.genoflow.model import GenoFlow

__all__ = ["Trajectory", "condition_codes", "integrate_latent", "simulate_trajectory"]


class Trajectory(NamedTuple):
    """Output of :func:`simulate_trajectory`."""

    latent: jax.Array  # [n_save, n_cells, latent_dim]
    expression: jax.Array  # [n_save, n_cells, n_genes]: decoded NB means
    times: jax.Array  # [n_save]: flow times of the saved states
    n_steps: jax.Array  # accepted Dopri5 steps


def condition_codes(model: GenoFlow, condition: object, n_cells: int) -> np.ndarray:
    """``condition`` (one code or label, or one per cell) as int32 codes ``[n_cells]``.

    Labels are those of ``model.conditions``; an unknown label or a code outside
    ``[0, n_conditions)`` is a ``ValueError`` naming it (never a silent skip).

    >>> from flax import nnx
    >>> from jaxstab.models.genoflow.config import GenoFlowConfig
    >>> m = GenoFlow(2, 2, np.zeros((2, 0), int), GenoFlowConfig.small(), rngs=nnx.Rngs(0),
    ...              conditions=["a", "b"])
    >>> condition_codes(m, ["b", "a"], 2).tolist(), condition_codes(m, 1, 3).tolist()
    ([1, 0], [1, 1, 1])
    """
    values = np.atleast_1d(np.asarray(condition, dtype=object))
    if values.shape[0] == 1:
        values = np.repeat(values, n_cells)
    if values.ndim != 1 or values.shape[0] != n_cells:
        raise ValueError(f"condition: expected one value or {n_cells}, got shape {values.shape}")
    codes = np.empty(n_cells, np.int32)
    index = {name: i for i, name in enumerate(model.conditions)}
    for i, v in enumerate(values):
        if isinstance(v, str):
            if v not in index:
                raise ValueError(
                    f"condition of cell {i}: unknown label {v!r}; labels: {list(model.conditions)}"
                )
            codes[i] = index[v]
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            if not 0 <= int(v) < model.n_conditions:
                raise ValueError(
                    f"condition of cell {i}: code {int(v)} out of range [0, {model.n_conditions})"
                )
            codes[i] = int(v)
        else:
            raise ValueError(
                f"condition of cell {i}: expected a label or an integer code, got {v!r}"
            )
    return codes


def integrate_latent(
    model: GenoFlow,
    z0: jax.Array,
    condition: jax.Array,
    times: jax.Array,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 4096,
) -> tuple[jax.Array, jax.Array]:
    """Solves ``dz/dτ = v(τ, z, c)`` from ``z0`` at ``times[0]`` with adaptive Dopri5 and
    returns ``(z at every time [len(times), n, latent], accepted steps)``. With
    ``flow_time="interval"`` the inner time points are jump times of the solver (the field's
    time restarts there).

    ``model`` should be in eval mode (dropout off). Differentiable (diffrax's checkpointed
    adjoint).
    """
    c = model.config
    graphdef, state = nnx.split(model)
    controller = diffrax.PIDController(
        rtol=c.rtol if rtol is None else rtol, atol=c.atol if atol is None else atol
    )
    if c.flow_time == "interval" and len(model.time_points) > 2:
        # The field's time input restarts at 0 at every inner time point: tell the solver, so
        # that no adaptive step straddles the jump.
        inner = jnp.arange(1, len(model.time_points) - 1, dtype=jnp.float32)
        controller = diffrax.ClipStepSizeController(controller, jump_ts=inner)

    def field(tau: jax.Array, z: jax.Array, args: object) -> jax.Array:
        return nnx.merge(graphdef, state).velocity(tau, z, condition)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Dopri5(),
        t0=times[0],
        t1=times[-1],
        dt0=None,
        y0=z0,
        saveat=diffrax.SaveAt(ts=times),
        stepsize_controller=controller,
        max_steps=max_steps,
    )
    return sol.ys, sol.stats["num_accepted_steps"]


def simulate_trajectory(
    model: GenoFlow,
    x0: jax.typing.ArrayLike,
    condition: object,
    *,
    n_save: int = 100,
    with_grad: bool = False,
    t_span: Sequence[float] | None = None,
    library_size: float | None = None,
) -> Trajectory:
    """Trajectories of the cells with counts ``x0`` ``[n_cells, n_genes]`` under ``condition``.

    The cells are encoded to their posterior means, integrated with diffrax ``Dopri5``
    (adaptive steps, the config's ``rtol`` / ``atol``) over ``t_span`` (flow times, default
    the first to the last time point, :meth:`GenoFlow.flow_times`), saved at ``n_save``
    evenly spaced times and decoded to NB means at ``library_size`` (default the config's
    1e4). ``condition``: integer codes (the loader's order) or labels of
    ``model.conditions``, one for all cells or one per cell. ``with_grad=False`` stops the
    gradient at the outputs (inference); ``True`` keeps it (fine-tuning through the
    trajectory).
    """
    x0 = jnp.asarray(x0, jnp.float32)
    if x0.ndim != 2 or x0.shape[1] != model.n_genes:
        raise ValueError(f"x0: expected [n_cells, {model.n_genes}], got shape {x0.shape}")
    if n_save < 2:
        raise ValueError(f"n_save must be >= 2, got {n_save}")
    codes = jnp.asarray(condition_codes(model, condition, x0.shape[0]))
    flow_times = model.flow_times()
    t0, t1 = (flow_times[0], flow_times[-1]) if t_span is None else map(float, t_span)
    if not t1 > t0:
        raise ValueError(f"t_span must be increasing, got ({t0}, {t1})")
    lib = model.config.library_size if library_size is None else float(library_size)
    model = nnx.merge(*nnx.split(model))  # a view of the same arrays, so `eval()` stays local
    model.eval()
    times = jnp.linspace(t0, t1, n_save)
    z0 = model.encode_mean(x0, codes)
    latent, n_steps = integrate_latent(model, z0, codes, times)
    n, k = x0.shape[0], latent.shape[-1]
    flat = latent.reshape(n_save * n, k)
    mean, _ = model.decoder(flat, jnp.tile(codes, n_save), lib)
    expression = mean.reshape(n_save, n, model.n_genes)
    if not with_grad:
        latent, expression = jax.lax.stop_gradient((latent, expression))
    return Trajectory(latent, expression, times, n_steps)
