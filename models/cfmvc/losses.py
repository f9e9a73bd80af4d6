"""CFM-VC losses: the NB-VAE objective (stage 1), flow matching (stage 2) and their sum (3).

Every ``*_loss(model, batch, key)`` has the ``jaxstab.train.fit`` signature and returns
``(scalar loss, {term: scalar})``. The ``*_terms`` functions take the noise explicitly, so a
comparison with another implementation can fix it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from models.cfmvc.model import CFMVC
  >>> model = CFMVC(20, 2, 2, 3, rngs=nnx.Rngs(0))
  >>> batch = {"x": jnp.ones((4, 20)), "p": jnp.eye(4, 3), "batch": jnp.zeros(4, int),
  ...          "cell_type": jnp.zeros(4, int)}
  >>> loss, aux = vae_loss(model, batch, jax.random.key(0))
  >>> sorted(aux)
  ['kl', 'nll']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxstab import numerics
from models.cfmvc.model import CFMVC

Batch = Mapping[str, jax.Array]
MMD_BANDWIDTHS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def _library(model: CFMVC, x: jax.Array) -> jax.Array | None:
    return jnp.sum(x, -1) if model.use_library_size else None


def vae_terms(
    model: CFMVC,
    batch: Batch,
    eps_int: jax.Array,
    eps_tech: jax.Array,
    *,
    beta: float = 1.0,
    deterministic: bool | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative ELBO with the reparameterisation noise given: ``nll + beta · kl``.

    ``nll`` is the NB negative log-likelihood summed over genes, ``kl`` the Gaussian KL of
    z_int and z_tech summed over dimensions; both are averaged over cells. Zero noise gives
    the loss at the posterior means.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = CFMVC(10, 1, 1, 2, rngs=nnx.Rngs(0))
      >>> b = {"x": jnp.ones((3, 10)), "batch": jnp.zeros(3, int), "cell_type": jnp.zeros(3, int)}
      >>> loss, aux = vae_terms(model, b, jnp.zeros((3, 32)), jnp.zeros((3, 8)), deterministic=True)
      >>> bool(jnp.isclose(loss, aux["nll"] + aux["kl"]))
      True
    """
    x = batch["x"]
    enc = model.encoder(x, batch["batch"], batch["cell_type"], deterministic=deterministic)
    z_int = enc.int_mean + eps_int * jnp.exp(0.5 * enc.int_logvar)
    z_tech = enc.tech_mean + eps_tech * jnp.exp(0.5 * enc.tech_logvar)
    mean, theta = model.decoder(z_int, z_tech, _library(model, x), deterministic=deterministic)
    nll = -jnp.mean(jnp.sum(numerics.nb_log_prob(x, mean, theta), -1))
    kl = jnp.mean(
        numerics.gaussian_kl(enc.int_mean, enc.int_logvar, axis=-1)
        + numerics.gaussian_kl(enc.tech_mean, enc.tech_logvar, axis=-1)
    )
    return nll + beta * kl, {"nll": nll, "kl": kl}


def vae_loss(
    model: CFMVC, batch: Batch, key: jax.Array, *, beta: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-1 loss: :func:`vae_terms` with fresh standard-normal noise from ``key``."""
    k_int, k_tech = jax.random.split(key)
    n = batch["x"].shape[0]
    eps_int = jax.random.normal(k_int, (n, model.dim_int))
    eps_tech = jax.random.normal(k_tech, (n, model.dim_tech))
    return vae_terms(model, batch, eps_int, eps_tech, beta=beta)


def mmd_rbf(x: jax.Array, y: jax.Array, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> jax.Array:
    """Biased (V-statistic) squared MMD between samples ``x [n, d]`` and ``y [m, d]``.

    Kernel: the sum over ``s`` in ``bandwidths`` of ``exp(-|a - b|² / (2 s² d))``; dividing by
    ``d`` keeps the scales meaningful for unit-variance latents of any size. Written out here
    because none of the project's dependencies ships a differentiable sample MMD.

    Example:
      >>> import jax
      >>> x = jax.random.normal(jax.random.key(0), (64, 4))
      >>> float(mmd_rbf(x, x))
      0.0
    """
    xy = jnp.concatenate([x, y], 0)
    sq = jnp.sum(xy * xy, -1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * xy @ xy.T, 0.0)
    scale = 2.0 * x.shape[-1] * jnp.asarray(bandwidths, xy.dtype) ** 2
    k = jnp.sum(jnp.exp(-d2[..., None] / scale), -1)
    n = x.shape[0]
    value = jnp.mean(k[:n, :n]) + jnp.mean(k[n:, n:]) - 2.0 * jnp.mean(k[:n, n:])
    return jnp.maximum(value, 0.0)


def flow_terms(
    model: CFMVC, batch: Batch, z0: jax.Array, t: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Conditional flow matching from noise ``z0`` to the encoder mean, at times ``t``.

    The target ``z1 = stop_gradient(encoder mean of z_int)`` (encoder without dropout),
    ``z_t = (1 - t) z0 + t z1`` and the loss is ``mean((v(z_t, t) - (z1 - z0))²)``.

    With ``model.lambda_dist > 0`` the term ``lambda_dist · MMD²(ẑ1, z1)`` is added, where
    ``ẑ1 = z_t + (1 - t) v`` is the flow's one-step estimate of the endpoint. The gradient
    reaches the flow and context parameters through ``v``. The original's ``lambda_dist``
    term was computed from the detached target alone (a standardised-``z1`` statistic), so it
    had no gradient and did nothing; this one does.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = CFMVC(10, 1, 1, 2, rngs=nnx.Rngs(0), lambda_dist=0.1)
      >>> b = {"x": jnp.ones((4, 10)), "p": jnp.eye(4, 2), "batch": jnp.zeros(4, int),
      ...      "cell_type": jnp.zeros(4, int)}
      >>> loss, aux = flow_terms(model, b, jnp.zeros((4, 32)), jnp.full(4, 0.5))
      >>> sorted(aux)
      ['dist', 'fm']
    """
    enc = model.encoder(batch["x"], batch["batch"], batch["cell_type"], deterministic=True)
    z1 = jax.lax.stop_gradient(enc.int_mean)
    tc = t[:, None]
    z_t = (1.0 - tc) * z0 + tc * z1
    v = model.velocity(z_t, t, batch["p"], batch["batch"], batch["cell_type"], batch.get("spatial"))
    fm = jnp.mean((v - (z1 - z0)) ** 2)
    dist = jnp.zeros((), fm.dtype)
    if model.lambda_dist > 0.0:  # static: the MMD is only traced when it is used
        dist = mmd_rbf(z_t + (1.0 - tc) * v, z1)
    return fm + model.lambda_dist * dist, {"fm": fm, "dist": dist}


def _flow_noise(model: CFMVC, batch: Batch, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    k_z, k_t = jax.random.split(key)
    n = batch["x"].shape[0]
    return jax.random.normal(k_z, (n, model.dim_int)), jax.random.uniform(k_t, (n,))


def flow_loss(model: CFMVC, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-2 loss: :func:`flow_terms` with ``z0 ~ N(0, I)`` and ``t ~ U(0, 1)`` from ``key``."""
    z0, t = _flow_noise(model, batch, key)
    return flow_terms(model, batch, z0, t)


def joint_loss(
    model: CFMVC, batch: Batch, key: jax.Array, *, beta: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-3 loss: VAE loss + flow loss (the flow target stays stop-gradient)."""
    k_vae, k_flow = jax.random.split(key)
    vae, vae_aux = vae_loss(model, batch, k_vae, beta=beta)
    flow, flow_aux = flow_loss(model, batch, k_flow)
    return vae + flow, {**vae_aux, **flow_aux}
