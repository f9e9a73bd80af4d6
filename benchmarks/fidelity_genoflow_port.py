"""The port's side of ``benchmarks.fidelity_genoflow``: inputs, noise, the port and its quantities.

- :func:`make_inputs`, :func:`make_noise`: the simulated cells and the noise both sides get;
- :func:`build_port`: a ``GenoFlow`` at a config with an original-layout state dict
  (parameters and BatchNorm running statistics), in float32 or float64;
- :func:`port_quantities` (values and gradients, one jitted program), :func:`port_pairing`,
  :func:`port_trajectory`: the port's quantities, NumPy out, gradients by the original's
  state-dict names.

Example:
  >>> marginal_error(np.full((2, 2), 0.25))
  0.0
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

# XLA's backend optimisation off for the jitted programs (a test's setting: compiles about
# twice as fast, runs slower; the values agree to rounding).
FAST_COMPILE = False


def _jitted() -> Any:
    """The jitted :func:`_quantities`, made once per ``FAST_COMPILE`` setting (so that it
    compiles once per model structure, shapes and dtype)."""
    return _make_jitted(FAST_COMPILE)


@functools.cache
def _make_jitted(fast: bool) -> Any:
    import jax

    options = {"xla_backend_optimization_level": 0} if fast else None
    return jax.jit(_quantities, static_argnums=0, compiler_options=options)


# ---------------------------------------------------------------------------- inputs
def make_inputs(
    n_cells_per_time: int = 64, n_genes: int = 200, seed: int = 0, n_time_points: int = 3
) -> dict[str, Any]:
    """The simulated cells (``load_anndata``): ``x``, ``condition``, ``time``, ``library`` and
    ``meta``, the labels of ``obs["condition"]``."""
    from jaxstab.models.genoflow import load_anndata, simulate

    adata = simulate(
        n_cells_per_time, n_genes, n_time_points=n_time_points, n_conditions=2, seed=seed
    )
    data = load_anndata(adata)
    out = {k: np.asarray(v) for k, v in data.arrays.items()}
    return {**out, "meta": data.meta, "labels": np.asarray(adata.obs["condition"], str)}


def make_noise(n_cells: int, latent: int, seed: int, n_flow: int = 64) -> dict[str, np.ndarray]:
    """``eps`` (reparameterisation), flow pairs ``z0``, ``z1``, times ``t`` and a velocity
    point ``z_v``, ``t_v`` (float32)."""
    rng = np.random.default_rng(1000 + seed)
    f = np.float32
    return {
        "eps": rng.normal(size=(n_cells, latent)).astype(f),
        "z0": rng.normal(size=(n_flow, latent)).astype(f),
        "z1": rng.normal(size=(n_flow, latent)).astype(f),
        "t": rng.uniform(size=n_flow).astype(f),
        "z_v": rng.normal(size=(n_flow, latent)).astype(f),
        "t_v": rng.uniform(size=n_flow).astype(f),
    }


def as_dtype(arrays: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """The floating NumPy arrays of ``arrays`` cast to ``dtype`` (the rest as they are)."""
    return {
        k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
        for k, v in arrays.items()
    }


# ---------------------------------------------------------------------------- the port
def build_port(
    config: Any,
    state_dict: Mapping[str, Any],
    meta: Mapping[str, Any],
    dtype: Any = np.float32,
    time_points: Any = None,
) -> Any:
    """A port ``GenoFlow`` (eval mode) with the weights and running statistics of
    ``state_dict``, every floating leaf in ``dtype`` (float64 needs ``jax.enable_x64``);
    ``time_points`` default the data's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.torch_ref.genoflow import torch_state_dict_to_nnx
    from jaxstab.models.genoflow import GenoFlow
    from jaxstab.models.genoflow.model import with_self_loops

    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        raise RuntimeError("a float64 port needs jax.enable_x64(True)")
    graph, n = np.asarray(meta["gene_graph"]), meta["n_genes"]
    times = meta["time_points"] if time_points is None else time_points
    model = nnx.eval_shape(
        lambda: GenoFlow(
            n,
            meta["n_conditions"],
            graph,
            config,
            rngs=nnx.Rngs(0),
            conditions=meta["conditions"],
            time_points=times,
        )
    )

    def placeholder(leaf: Any) -> Any:  # built abstractly: no initialiser is compiled
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            key = jax.random.key(0)
            return jax.random.split(key, leaf.shape) if leaf.shape else key
        if jnp.issubdtype(leaf.dtype, jnp.floating):  # NumPy: nothing to compile
            return np.zeros(leaf.shape, dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    nnx.update(model, jax.tree.map(placeholder, nnx.state(model)))
    model.vector_field.edge_index.set_value(jnp.asarray(with_self_loops(graph, n)))
    torch_state_dict_to_nnx(state_dict, model)
    model.eval()
    return model


def _values(m: Any, a: Mapping[str, Any]) -> dict[str, Any]:
    import jax.numpy as jnp

    mu, lv = m.encoder(jnp.log1p(a["x"]), a["condition"])
    z = mu + a["eps"] * jnp.exp(0.5 * lv)
    mean, theta = m.decoder(z, a["condition"], a["library"])
    ones = jnp.ones_like(a["t_v"])
    return {
        "mu": mu,
        "logvar": lv,
        "z": z,
        "mean": mean,
        "theta": theta,
        "mean_o": m.decoder(a["z_o"], a["condition"], a["library"])[0],
        "genes": m.vector_field.gene_features(),
        "v": m.vector_field(a["t_v"], a["z_v"], a["c_v"]),
        "v1": m.vector_field(ones, a["z_v"], a["c_v"]),
        "v1_velocity": m.velocity(ones, a["z_v"], a["c_v"]),
    }


def _vae_jacobian(graphdef: Any, params: Any, rest: Any, batch: Any, eps: Any) -> Any:
    """d[vae_total, disc_ce] / d params (one forward, two backward passes), the aux terms and
    the BatchNorm statistics after the pass."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxstab.models.genoflow import vae_terms

    def f(p: Any) -> Any:
        m = nnx.merge(graphdef, p, rest, copy=True)
        _, aux = vae_terms(m, batch, eps)
        return jnp.stack([aux["vae_total"], aux["disc_ce"]]), (aux, nnx.state(m, nnx.BatchStat))

    return jax.jacrev(f, has_aux=True)(params)


def _flow(graphdef: Any, params: Any, rest: Any, batch: Mapping[str, Any], t: Any) -> Any:
    import jax
    from flax import nnx

    from jaxstab.models.genoflow import flow_terms

    def loss(p: Any) -> Any:
        return flow_terms(nnx.merge(graphdef, p, rest, copy=True), batch, t)[0]

    return jax.value_and_grad(loss)(params)


def _quantities(graphdefs: tuple, params: Any, rests: tuple, a: Mapping[str, Any]) -> tuple:
    """Everything the comparison reads from the port, in one program: the forward values
    (eval mode), the VAE Jacobians in eval and train mode, the flow loss and gradients."""
    import jax.numpy as jnp
    from flax import nnx

    (g_eval, g_train), (r_eval, r_train) = graphdefs, rests
    values = _values(nnx.merge(g_eval, params, r_eval, copy=True), a)
    batch = {k: a[k] for k in ("x", "condition", "library")}
    vae = tuple(
        _vae_jacobian(g, params, r, batch, a["eps"])
        for g, r in ((g_eval, r_eval), (g_train, r_train))
    )
    z0 = a["z0"]
    flow_batch = {
        "z0": z0,
        "z1": a["z1"],
        "condition": a["c_v"],
        "tau0": jnp.zeros(len(z0), z0.dtype),
        "tau1": jnp.ones(len(z0), z0.dtype),
    }
    return values, vae, _flow(g_eval, params, r_eval, flow_batch, a["t"])


def without_dropout(port: Any) -> Any:
    """A copy of ``port`` with every dropout rate 0 (discriminator, GATv2, vector field)."""
    from flax import nnx

    m = nnx.clone(port)
    for _, module in nnx.iter_modules(m):
        if isinstance(module, nnx.Dropout):
            module.rate = 0.0
    return m


def _vae_result(jac: Any, aux: Any, stats: Any) -> dict[str, Any]:
    import jax

    from benchmarks.convert import nnx_to_state_dict
    from benchmarks.torch_ref.genoflow import nnx_name

    jac = jax.tree.map(np.asarray, jac)
    g_vae, g_disc = (
        nnx_to_state_dict(jax.tree.map(lambda g, i=i: g[i], jac), nnx_name) for i in (0, 1)
    )
    groups = ("encoder.", "decoder.")
    out = {k: float(aux[k]) for k in ("vae_total", "recon", "kl", "disc_ce")}
    out |= {
        "vae_grads": {k: g for k, g in g_vae.items() if k.startswith(groups)},
        "disc_grads": {k: g for k, g in g_disc.items() if k.startswith("discriminator.")},
        "vae_total_disc_grad_max": max(
            float(np.abs(g).max()) for k, g in g_vae.items() if k.startswith("discriminator.")
        ),
        "disc_ce_vae_grad_max": max(
            float(np.abs(g).max()) for k, g in g_disc.items() if k.startswith(groups)
        ),
    }
    if stats is not None:
        out["batch_stats"] = nnx_to_state_dict(stats, nnx_name)
    return out


def port_quantities(port: Any, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """The port's quantities, one jitted program, from ``arrays``: ``x``, ``condition``,
    ``library``, ``eps``, the original's sample ``z_o``; ``t_v``, ``z_v``, ``c_v`` (the
    velocity point and the flow batch's conditions); ``z0``, ``z1``, ``t`` (the flow batch).

    Returns ``{"values", "vae", "flow"}``. ``values``: encoder ``mu``, ``logvar``, the sample
    ``z``, the decoder's ``mean`` and ``theta`` on it and ``mean_o`` on ``z_o``, the GATv2
    gene features, the vector field at ``(t_v, z_v, c_v)`` and at ``t = 1`` (``v1``),
    ``GenoFlow.velocity`` at ``tau = 1`` (``v1_velocity``). ``vae``: ``{"eval", "train"}``
    (train mode: BatchNorm batch statistics, every dropout rate 0), each ``vae_total``,
    recon, KL, ``disc_ce``, the gradients of ``vae_total`` (encoder, decoder) and of
    ``disc_ce`` (discriminator), the largest of each on the other's weights (the port's total
    loss, their sum, must split: 0 and 0) and, in train mode, the running statistics after
    the pass. ``flow``: ``flow_terms`` with ``tau0 = 0``, ``tau1 = 1`` and its vector-field
    gradients.
    """
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.convert import nnx_to_state_dict
    from benchmarks.torch_ref.genoflow import nnx_name

    eval_model, train_model = nnx.clone(port), without_dropout(port)
    eval_model.eval()
    train_model.train()
    g_eval, params, r_eval = nnx.split(eval_model, nnx.Param, ...)
    g_train, _, r_train = nnx.split(train_model, nnx.Param, ...)
    a = {k: jnp.asarray(v) for k, v in arrays.items()}
    values, vae, (loss, g) = _jitted()((g_eval, g_train), params, (r_eval, r_train), a)
    (jac_e, (aux_e, _)), (jac_t, (aux_t, stats)) = vae
    return {
        "values": {k: np.asarray(v) for k, v in values.items()},
        "vae": {"eval": _vae_result(jac_e, aux_e, None), "train": _vae_result(jac_t, aux_t, stats)},
        "flow": (float(loss), nnx_to_state_dict(g, nnx_name, groups=("vector_field",))),
    }


def marginal_error(plan: Any) -> float:
    """``max_i |Σ_j P_ij - 1/n| + max_j |Σ_i P_ij - 1/m|`` in float64 (``pair_by_ot``'s
    measure; a cell weighs ``1/n``), NaN for a plan with a non-finite entry."""
    plan = np.asarray(plan, np.float64)
    if not np.all(np.isfinite(plan)):
        return float("nan")
    n, m = plan.shape
    return float(np.max(np.abs(plan.sum(1) - 1 / n)) + np.max(np.abs(plan.sum(0) - 1 / m)))


def port_pairing(za: Any, zb: Any, epsilon: float) -> dict[str, Any]:
    """``pair_by_ot(za, zb, epsilon=epsilon, cost="euclidean", ddof=1)`` (the config's
    ``ot_*`` of ``original()``): plan, pairing, its convergence and iterations."""
    from jaxstab.models.genoflow import pair_by_ot

    p = pair_by_ot(za, zb, epsilon=epsilon, cost="euclidean", ddof=1)
    return {
        "plan": np.asarray(p.plan, np.float64),
        "target": np.asarray(p.target),
        "converged": bool(p.converged),
        "iterations": int(p.n_iterations),
        "marginal_error_port": float(p.marginal_error),
    }


def port_trajectory(
    port: Any,
    z0: Any,
    codes: Any,
    times: Any,
    library: float,
    rtol: float | None = None,
    atol: float | None = None,
) -> dict[str, Any]:
    """``integrate_latent`` from ``z0`` over ``times`` (adaptive Dopri5, the config's
    tolerances unless given) and the decoder's means at ``library`` (as
    ``simulate_trajectory`` decodes): latent ``[T, n, L]``, expression, accepted steps."""
    import jax.numpy as jnp

    from jaxstab.models.genoflow.trajectory import integrate_latent

    codes = jnp.asarray(codes)
    z, steps = integrate_latent(
        port, jnp.asarray(z0), codes, jnp.asarray(times), rtol=rtol, atol=atol
    )
    t, n, k = z.shape
    mean, _ = port.decoder(z.reshape(t * n, k), jnp.tile(codes, t), library)
    return {
        "latent": np.asarray(z),
        "expression": np.asarray(mean).reshape(t, n, -1),
        "steps": int(steps),
    }
