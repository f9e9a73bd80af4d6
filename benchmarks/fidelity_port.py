"""The port's side of ``benchmarks.fidelity_cfmvc``: data, noise and ``jaxstab.models.cfmvc``.

- :func:`make_inputs`, :func:`make_noise`: the simulated data (with the original's encoding of
  the perturbation next to the port's) and every random draw, fixed;
- :func:`as_dtype`: those arrays in float64 for the float64 comparison;
- :func:`build_port`, :func:`port_variant`: a port ``CFMVC`` with given weights, in float32 or
  float64 (call under ``jax.enable_x64(True)`` for float64), and the same weights at other
  bounds;
- :func:`port_quantities`, :func:`port_vae_gradients`, :func:`clamp_activity`: what is
  compared, with gradients keyed by state-dict names
  (``benchmarks.torch_ref.cfmvc.nnx_name``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

N_PERTURBATIONS, N_BATCHES, N_CELL_TYPES = 3, 2, 3
PERT_NAMES = ("BRCA1", "MYC", "TP53")  # simulate's pert_0, pert_1, pert_2
CONTROL_NAME = "NTC"
LIMITS = {"logvar": 10.0, "log_mean": 20.0, "log_theta": 10.0}
FLOAT_INPUTS = ("x", "p", "p_original")


def make_inputs(n_cells: int = 64, n_genes: int = 200, seed: int = 0) -> dict[str, Any]:
    """Simulated counts read by the port's ``load_anndata``, plus the original's encoding.

    Returns ``{"adata", "x", "p", "batch", "cell_type", "p_original", "control_column",
    "labels", "meta"}``: ``p`` has the control as the zero row (the port's input),
    ``p_original`` the control's own column at its rank among the sorted labels.
    """
    from jaxstab.models.cfmvc import load_anndata, simulate

    adata = simulate(n_cells, n_genes, N_PERTURBATIONS, N_BATCHES, N_CELL_TYPES, seed=seed)
    names = {"control": CONTROL_NAME, **{f"pert_{k}": n for k, n in enumerate(PERT_NAMES)}}
    for key in ("perturbation", "batch", "cell_type"):  # plain strings, as read from a file
        adata.obs[key] = adata.obs[key].astype(str)
    adata.obs["perturbation"] = adata.obs["perturbation"].map(names)
    data = load_anndata(adata)
    labels = sorted(set(adata.obs["perturbation"]))
    codes = np.array([labels.index(v) for v in adata.obs["perturbation"]])
    arrays = data.arrays
    return {
        "adata": adata,
        "x": arrays["x"],
        "p": arrays["p"],
        "batch": arrays["batch"],
        "cell_type": arrays["cell_type"],
        "p_original": np.eye(len(labels), dtype=np.float32)[codes],
        "control_column": labels.index(CONTROL_NAME),
        "labels": labels,
        "meta": data.meta,
    }


def make_noise(n_cells: int, dim_int: int, dim_tech: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every random draw of the comparison, fixed: stage-1 ``eps_int``/``eps_tech``, stage-2
    ``eps`` (target sample), ``z0``, ``t``; a ``z_t``, ``t_v`` for the velocity; ``z0_gen``."""
    rng = np.random.default_rng(1000 + seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    return {
        "eps_int": normal(n_cells, dim_int),
        "eps_tech": normal(n_cells, dim_tech),
        "eps": normal(n_cells, dim_int),
        "z0": normal(n_cells, dim_int),
        "t": rng.uniform(size=n_cells).astype(np.float32),
        "z_t": normal(n_cells, dim_int),
        "t_v": rng.uniform(size=n_cells).astype(np.float32),
        "z0_gen": normal(n_cells, dim_int),
    }


def as_dtype(arrays: Mapping[str, Any], dtype: Any, keys: Any = None) -> dict[str, Any]:
    """``arrays`` with the floating NumPy arrays among ``keys`` (default: all) cast to
    ``dtype`` (the values are the float32 ones, exactly); the rest as they are."""
    out = dict(arrays)
    for key, value in arrays.items():
        chosen = keys is None or key in keys
        if chosen and isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            out[key] = value.astype(dtype)
    return out


def named_grads(grads: Any) -> dict[str, np.ndarray]:
    """NNX gradients → ``{state-dict name: array}`` in PyTorch's layout."""
    from benchmarks.convert import nnx_to_state_dict
    from benchmarks.torch_ref.cfmvc import nnx_name

    return nnx_to_state_dict(grads, nnx_name)


@functools.cache
def _jitted() -> dict[str, Any]:
    """The port's jitted computations, built once (retraced per dtype)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxstab import numerics
    from jaxstab.models.cfmvc.losses import flow_terms, nb_log_prob_eps, vae_terms

    def quantities(model, jb, n):
        enc = model.encoder(jb["x"], jb["batch"], jb["cell_type"])
        z_int = enc.int_mean + n["eps_int"] * jnp.exp(0.5 * enc.int_logvar)
        z_tech = enc.tech_mean + n["eps_tech"] * jnp.exp(0.5 * enc.tech_logvar)
        mean, theta = model.decoder(z_int, z_tech)
        nb = nb_log_prob_eps if model.config.nb_likelihood == "eps" else numerics.nb_log_prob
        ctx, alpha = model.context_encoder(jb["p"], jb["batch"], jb["cell_type"])
        out = {
            "encoder.int_mean": enc.int_mean,
            "encoder.int_logvar": enc.int_logvar,
            "encoder.tech_mean": enc.tech_mean,
            "encoder.tech_logvar": enc.tech_logvar,
            "encoder.z_int_sample": z_int,
            "encoder.z_tech_sample": z_tech,
            "kl_int": numerics.gaussian_kl(enc.int_mean, enc.int_logvar, axis=-1),
            "kl_tech": numerics.gaussian_kl(enc.tech_mean, enc.tech_logvar, axis=-1),
            "decoder.mean": mean,
            "decoder.theta": theta,
            "nb_log_likelihood": jnp.sum(nb(jb["x"], mean, theta), -1),
            "context": ctx,
            "alpha": alpha,
            "velocity": model.flow(n["z_t"], n["t_v"], ctx, alpha),
        }
        out["stage1_vae_loss"], vae_g = nnx.value_and_grad(
            lambda m: vae_terms(m, jb, n["eps_int"], n["eps_tech"])[0]
        )(model)
        out["stage2_flow_loss"], flow_g = nnx.value_and_grad(
            lambda m: flow_terms(m, jb, n["z0"], n["t"], n["eps"])[0]
        )(model)
        return out, vae_g, flow_g

    def vae(model, jb, eps_int, eps_tech):
        return nnx.value_and_grad(lambda m: vae_terms(m, jb, eps_int, eps_tech)[0])(model)

    return {"quantities": nnx.jit(quantities), "vae": nnx.jit(vae)}


def _batch(inputs: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    import jax.numpy as jnp

    return {k: jnp.asarray(inputs[k]) for k in keys}


def port_quantities(
    model: Any, inputs: Mapping[str, Any], noise: Mapping[str, np.ndarray], n_steps: int
) -> dict[str, Any]:
    """Every quantity of the port ``model`` (eval mode) with the given noise."""
    import jax

    from jaxstab.models.cfmvc.generate import generate_expression
    from jaxstab.models.cfmvc.model import encode_perturbation

    jb = _batch(inputs, ("x", "p", "batch", "cell_type"))
    n = _batch(noise, tuple(noise))
    values, vae_g, flow_g = _jitted()["quantities"](model, jb, n)
    gen = generate_expression(
        model, jb["p"], jb["batch"], jb["cell_type"], n_steps=n_steps,
        key=jax.random.key(0), z0=n["z0_gen"],
    )  # fmt: skip
    out: dict[str, Any] = {k: np.asarray(v) for k, v in values.items()}
    out["generate.z_int"], out["generate.expression"] = map(np.asarray, (gen.z_int, gen.expression))
    out["p_encoded"] = np.asarray(encode_perturbation(jb["p"], model.config))
    out["vae_grads"] = named_grads(vae_g)
    flow_named = named_grads(flow_g)
    out["flow_grads"] = {
        k: g for k, g in flow_named.items() if not k.startswith(("encoder.", "decoder."))
    }
    out["flow_encoder_grad_max"] = max(
        float(np.abs(g).max()) for k, g in flow_named.items() if k.startswith("encoder.")
    )
    return out


def port_vae_gradients(
    model: Any, inputs: Mapping[str, Any], noise: Mapping[str, np.ndarray]
) -> tuple[float, dict[str, np.ndarray]]:
    """The port's stage-1 loss and gradients (by state-dict name) with the given noise."""
    jb = _batch(inputs, ("x", "batch", "cell_type"))
    n = _batch(noise, ("eps_int", "eps_tech"))
    loss, grads = _jitted()["vae"](model, jb, n["eps_int"], n["eps_tech"])
    return float(loss), named_grads(grads)


def clamp_activity(
    unbounded: Any, inputs: Mapping[str, Any], noise: Mapping[str, np.ndarray], gen_z: np.ndarray
) -> dict[str, int]:
    """Entries beyond the original's clamp limits, from a port model with every bound
    ``"none"`` (same weights): logvars, decoder log-means (stage 1 and generation),
    ``log_theta``."""
    import jax.numpy as jnp

    jb = _batch(inputs, ("x", "batch", "cell_type"))
    enc = unbounded.encoder(jb["x"], jb["batch"], jb["cell_type"])
    lim = LIMITS
    lv_i = np.clip(np.asarray(enc.int_logvar), -lim["logvar"], lim["logvar"])
    lv_t = np.clip(np.asarray(enc.tech_logvar), -lim["logvar"], lim["logvar"])
    z_int = np.asarray(enc.int_mean) + noise["eps_int"] * np.exp(0.5 * lv_i)
    z_tech = np.asarray(enc.tech_mean) + noise["eps_tech"] * np.exp(0.5 * lv_t)
    log_mean = np.log(np.asarray(unbounded.decoder(jnp.asarray(z_int), jnp.asarray(z_tech))[0]))
    no_tech = jnp.zeros((gen_z.shape[0], unbounded.dim_tech), gen_z.dtype)
    log_mean_gen = np.log(np.asarray(unbounded.decoder(jnp.asarray(gen_z), no_tech)[0]))
    log_theta = np.asarray(unbounded.decoder.log_theta[...])
    count = lambda a, limit: int(np.sum(np.abs(np.asarray(a, np.float64)) > limit))
    return {
        "int_logvar": count(enc.int_logvar, lim["logvar"]),
        "tech_logvar": count(enc.tech_logvar, lim["logvar"]),
        "log_mean": count(log_mean, lim["log_mean"]),
        "log_mean_generation": count(log_mean_gen, lim["log_mean"]),
        "log_theta": count(log_theta, lim["log_theta"]),
    }


def _abstract_port(config: Any, meta: Mapping[str, Any]) -> Any:
    from flax import nnx

    from jaxstab.models.cfmvc import CFMVC

    dims = (meta["n_genes"], meta["n_batches"], meta["n_cell_types"], meta["n_perturbations"])
    return nnx.eval_shape(lambda: CFMVC(*dims, config, rngs=nnx.Rngs(0)))


def set_embed_dtype(model: Any, dtype: Any) -> Any:
    """Sets the computation ``dtype`` of every ``nnx.Embed`` in ``model`` (in place).

    ``jaxstab.models.cfmvc.model`` builds its embeddings (encoder and context encoder
    ``batch_emb``, ``ct_emb``) with ``nnx.Embed``'s default ``dtype``, float32 in this Flax:
    float64 embeddings are looked up in float32, so their gradients are float32-rounded. The
    float64 comparison computes them in float64; float32 runs are unchanged."""
    from flax import nnx

    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Embed):
            module.dtype = dtype
    return model


def build_port(
    config: Any, state_dict: Mapping[str, Any], inputs: Mapping[str, Any], dtype: Any = None
) -> Any:
    """A port ``CFMVC`` (eval mode) at ``config`` with the weights of ``state_dict``; every
    floating leaf in ``dtype`` (default float32; float64 needs ``jax.enable_x64``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.torch_ref.cfmvc import torch_state_dict_to_nnx

    dtype = jnp.dtype(np.float32 if dtype is None else dtype)
    if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        raise RuntimeError("a float64 port needs jax.enable_x64(True)")
    # Built abstractly (no initialisers to compile), given placeholders of ``dtype`` (which the
    # converter keeps), then the weights.
    model = _abstract_port(config, inputs["meta"])

    def placeholder(leaf: Any) -> Any:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            key = jax.random.key(0)
            return jax.random.split(key, leaf.shape) if leaf.shape else key
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        return jnp.zeros(leaf.shape, dtype if floating else leaf.dtype)

    nnx.update(model, jax.tree.map(placeholder, nnx.state(model)))
    torch_state_dict_to_nnx(state_dict, model)
    set_embed_dtype(model, dtype)
    model.eval()
    return model


def port_variant(model: Any, inputs: Mapping[str, Any], **changes: Any) -> Any:
    """``model``'s weights (and dtype) in a port at ``model.config.replace(**changes)``."""
    from flax import nnx

    graphdef, _ = nnx.split(_abstract_port(model.config.replace(**changes), inputs["meta"]))
    variant = nnx.merge(graphdef, nnx.state(model))
    set_embed_dtype(variant, model.encoder.batch_emb.dtype)
    variant.eval()
    return variant
