"""GenoFlow's losses: the adversarial NB-VAE step (stage ``vae``) and flow matching on OT pairs.

Stage ``vae`` is one jitted step for the VAE and its discriminator together. The encoder's
adversarial term reads the discriminator with its weights stopped
(``TissueDiscriminator(..., frozen=True)``) and the discriminator's cross-entropy reads the
stopped latent, so one gradient trains each side on its own objective; the optimizer
(:func:`jaxstab.models.genoflow.train.optimizer`) runs the discriminator at
``disc_lr_scale`` × the learning rate. The original alternates two optimizers in Python,
updating the discriminator first.

Example:
  >>> import jax, numpy as np
  >>> from flax import nnx
  >>> from jaxstab.models.genoflow.config import GenoFlowConfig
  >>> from jaxstab.models.genoflow.model import GenoFlow
  >>> model = GenoFlow(6, 2, np.zeros((2, 0), int), GenoFlowConfig.small(), rngs=nnx.Rngs(0))
  >>> batch = {"x": np.ones((4, 6), np.float32), "condition": np.array([0, 1, 0, 1]),
  ...          "library": np.full(4, 6.0, np.float32)}
  >>> loss, aux = vae_loss(model, batch, jax.random.key(0))
  >>> sorted(aux)
  ['disc_ce', 'kl', 'recon', 'vae_total']
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxstab import numerics as jn
from jaxstab.models.genoflow.model import GenoFlow

__all__ = ["flow_loss", "flow_terms", "kl_original", "nb_log_likelihood", "vae_loss", "vae_terms"]

_EPS = 1e-8  # the original NB loss's guard inside every log and log-gamma


def _finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def nb_log_likelihood(x: jax.Array, mean: jax.Array, theta: jax.Array, kind: str) -> jax.Array:
    """Per-entry NB log-likelihood: ``"safe"`` (:func:`jaxstab.numerics.nb_log_prob`) or the
    original's ``"original"`` formula (1e-8 inside each log and log-gamma; a non-finite entry
    becomes 0).

    >>> import jax.numpy as jnp
    >>> a = nb_log_likelihood(jnp.array([3.0]), jnp.array([2.0]), jnp.array([5.0]), "safe")
    >>> b = nb_log_likelihood(jnp.array([3.0]), jnp.array([2.0]), jnp.array([5.0]), "original")
    >>> bool(abs(a - b)[0] < 1e-5)
    True
    """
    if kind == "safe":
        return jn.nb_log_prob(x, mean, theta)
    lg = jax.lax.lgamma
    log_theta_mu = jnp.log(theta + mean + _EPS)
    term1 = lg(x + theta + _EPS) - lg(theta + _EPS) - lg(x + 1.0 + _EPS)
    term2 = theta * (jnp.log(theta + _EPS) - log_theta_mu)
    term3 = x * (jnp.log(mean + _EPS) - log_theta_mu)
    return _finite_or_zero(term1 + term2 + term3)


def kl_original(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """The original's KL per cell: log-variance clamped at 20, mean at ±100 (gradient 0
    beyond), a non-finite value replaced by 0.

    >>> import jax.numpy as jnp
    >>> float(kl_original(jnp.array([[1.0, 0.0]]), jnp.zeros((1, 2)))[0])
    0.5
    """
    lv = jnp.minimum(logvar, 20.0)
    m = jnp.clip(mu, -100.0, 100.0)
    return _finite_or_zero(-0.5 * jnp.sum(1.0 + lv - m**2 - jnp.exp(lv), axis=-1))


def _entropy(logits: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def vae_terms(
    model: GenoFlow, batch: Mapping[str, jax.Array], eps: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage ``vae``'s loss for reparameterisation noise ``eps`` ``[n, latent]``.

    ``loss = recon + β·KL − λ·H(D(z)) + CE(D(stop_gradient(z)), c)``; ``aux``: ``recon``,
    ``kl``, ``vae_total`` (the original's VAE loss: the first three terms; the entropy term is
    ``vae_total − recon − β·KL``) and ``disc_ce``.
    """
    c = model.config
    x, cond, lib = batch["x"], batch["condition"], batch["library"]
    mu, logvar = model.encoder(jnp.log1p(x), cond)
    z = mu + eps * jnp.exp(0.5 * logvar)
    mean, theta = model.decoder(z, cond, lib)
    theta = jnp.clip(theta, *c.theta_bounds)
    ll = nb_log_likelihood(x, mean, theta[None], c.nb)
    recon = -jnp.mean(jnp.sum(ll, axis=-1) if c.recon == "gene_sum" else ll)
    if c.nb == "original":
        recon = _finite_or_zero(recon)
    if c.kl == "safe":
        kl = jnp.mean(jn.gaussian_kl(mu, logvar, axis=-1))
    else:
        kl = _finite_or_zero(jnp.mean(kl_original(mu, logvar)))
    total = recon + c.beta * kl
    if c.lambda_adv:
        total = total - c.lambda_adv * jnp.mean(_entropy(model.discriminator(z, frozen=True)))
    logits = model.discriminator(jax.lax.stop_gradient(z))
    logp = jax.nn.log_softmax(logits, axis=-1)
    disc_ce = -jnp.mean(jnp.take_along_axis(logp, cond[:, None].astype(jnp.int32), axis=-1))
    aux = {"recon": recon, "kl": kl, "vae_total": total, "disc_ce": disc_ce}
    return total + disc_ce, aux


def vae_loss(
    model: GenoFlow, batch: Mapping[str, jax.Array], key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`vae_terms` with fresh standard-normal noise from ``key`` (the entry's loss)."""
    eps = jax.random.normal(key, (batch["x"].shape[0], model.config.latent_dim))
    return vae_terms(model, batch, eps)


def flow_terms(
    model: GenoFlow, batch: Mapping[str, jax.Array], t: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow matching on OT pairs at interpolation times ``t`` ``[n]`` in [0, 1].

    ``batch``: ``z0``, ``z1`` (latent means of a cell and its OT partner at the next time
    point), ``condition`` (the source cell's), ``tau0``, ``tau1`` (their flow times,
    :meth:`GenoFlow.flow_times`). ``z_t = (1 − t) z0 + t z1`` at flow time
    ``tau0 + t (tau1 − tau0)`` with target velocity ``(z1 − z0) / (tau1 − tau0)``; with
    ``flow_time="interval"`` ``tau1 − tau0 = 1`` and the target is the original's
    ``z1 − z0``. Loss: the mean squared error over cells and dimensions.
    """
    z0, z1 = batch["z0"], batch["z1"]
    tau0, tau1 = batch["tau0"], batch["tau1"]
    span = (tau1 - tau0)[:, None]
    z_t = z0 + t[:, None] * (z1 - z0)
    target = (z1 - z0) / span
    if model.config.flow_time == "interval":  # the field reads t itself, as the original's
        v = model.vector_field(t, z_t, batch["condition"])
    else:
        v = model.velocity(tau0 + t * (tau1 - tau0), z_t, batch["condition"])
    loss = jnp.mean((v - target) ** 2)
    return loss, {"fm": loss}


def flow_loss(
    model: GenoFlow, batch: Mapping[str, jax.Array], key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`flow_terms` at uniform times drawn from ``key`` (stage ``flow``'s loss)."""
    t = jax.random.uniform(key, (batch["z0"].shape[0],))
    return flow_terms(model, batch, t)
