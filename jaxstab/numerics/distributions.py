"""Log-likelihoods and divergences written for extreme parameters."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from jaxstab.numerics._common import check_last_axis, promote
from jaxstab.numerics.elementary import safe_log

__all__ = ["gaussian_kl", "gaussian_nll_3d", "nb_log_prob", "zinb_log_prob"]

Axis = int | tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Gaussian KL
# ---------------------------------------------------------------------------------------------


def _exp_minus_linear(v: jax.Array) -> jax.Array:
    # e^v − 1 − v. Near 0 the subtraction cancels, so there use
    # v²/2 · (1 + v/3 + v²/12 + v³/60 + v⁴/360 + v⁵/2520 + v⁶/20160 + ...).
    # float32: series for |v| < 0.5 (truncation < 1e-7 relative), else exp(v) − 1 − v
    # (rounding < 1e-6 relative there; XLA's CPU expm1 is several times slower than exp).
    # float64: expm1(v) − v, with the 5-term series for |v| < 1e-3.
    if jnp.finfo(v.dtype).bits <= 32:
        switch, coefs = 0.5, (1 / 3, 1 / 12, 1 / 60, 1 / 360, 1 / 2520, 1 / 20160)
        far = lambda u: jnp.exp(u) - 1 - u
    else:
        switch, coefs = 1e-3, (1 / 3, 1 / 12, 1 / 60, 1 / 360)
        far = lambda u: jnp.expm1(u) - u
    small = jnp.abs(v) < switch
    vs = jnp.where(small, v, 0)
    poly = jnp.zeros_like(vs)
    for c in reversed(coefs):
        poly = vs * (c + poly)
    return jnp.where(small, 0.5 * vs * vs * (1 + poly), far(v))


@jax.custom_jvp
def _kl_var_term(logvar: jax.Array, limit: jax.Array) -> jax.Array:
    # (e^v − 1 − v) / 2 with v capped at limit in the exponential only.
    capped = jnp.minimum(logvar, limit)
    return 0.5 * (_exp_minus_linear(capped) + (capped - logvar))


@_kl_var_term.defjvp
def _kl_var_term_jvp(primals, tangents):
    logvar, limit = primals
    out = _kl_var_term(logvar, limit)
    # True slope (e^v - 1) / 2, saturating (never flipping sign) beyond the cap.
    return out, 0.5 * jnp.expm1(jnp.minimum(logvar, limit)) * tangents[0]


@jax.custom_jvp
def _half_square(mu: jax.Array, cap: jax.Array) -> jax.Array:
    return jnp.minimum(0.5 * mu * mu, cap)


@_half_square.defjvp
def _half_square_jvp(primals, tangents):
    mu, cap = primals
    return _half_square(mu, cap), mu * tangents[0]


def gaussian_kl(
    mu: jax.typing.ArrayLike, logvar: jax.typing.ArrayLike, axis: Axis = -1
) -> jax.Array:
    """``KL(N(mu, e^logvar) ‖ N(0, 1))`` summed over ``axis``.

    ``KL = ½ Σ (mu² + e^v − 1 − v)``, with ``e^v − 1 − v`` from its Taylor series near 0. Each
    term is capped so that the sum of the ``n`` terms along ``axis`` cannot overflow: ``v`` at
    ``log(max / 4n)`` and ``½ mu²`` at ``max / 4n`` (``max = finfo(dtype).max``). Below the
    caps — in float32, ``logvar`` up to about 85 and ``|mu|`` up to about 1e19 — the value is
    exact; beyond them the true KL is not representable and the result saturates near
    ``max / 4`` instead of becoming ``inf``. Gradients are the exact ``mu`` and
    ``½ (e^v − 1)`` (``custom_jvp``), saturated but never zeroed or flipped past the caps. In
    float64 ``logvar = ±100`` and ``mu = ±1e4`` are exact.

    Naive ``0.5 * sum(mu**2 + exp(v) - 1 - v)`` is ``inf`` at ``v = 100`` in float32 and loses
    all digits near ``v = 0``; the seed's ``clamp(v, max=20)`` and ``clamp(mu, ±100)`` silently
    change the value and zero the gradient beyond the clamp.

    >>> import jax, jax.numpy as jnp
    >>> float(gaussian_kl(jnp.array([1.0, 0.0]), jnp.zeros(2)))
    0.5
    >>> kl, g = jax.value_and_grad(gaussian_kl, argnums=1)(jnp.zeros(1), jnp.full(1, 100.0))
    >>> bool(jnp.isfinite(kl)), bool(g[0] > 0)
    (True, True)
    """
    dtype, (mu, logvar) = promote(mu, logvar)
    mu, logvar = jnp.broadcast_arrays(mu, logvar)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    n = max(1, math.prod(mu.shape[a] for a in axes))
    budget = float(jnp.finfo(dtype).max) / (4 * n)
    limit = jnp.asarray(np.log(budget), mu.dtype)
    terms = _half_square(mu, jnp.asarray(budget, mu.dtype)) + _kl_var_term(logvar, limit)
    return jnp.sum(terms, axis=axis).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Negative binomial and zero-inflated negative binomial
# ---------------------------------------------------------------------------------------------


def _softplus_pair(eta: jax.Array) -> tuple[jax.Array, jax.Array]:
    # (softplus(η), softplus(−η)) from one exp and one log1p, neither cancelling.
    shared = jnp.log1p(jnp.exp(-jnp.abs(eta)))
    return jnp.maximum(eta, 0) + shared, jnp.maximum(-eta, 0) + shared


@jax.custom_jvp
def _nb_mean_terms(x: jax.Array, mean: jax.Array, theta: jax.Array) -> jax.Array:
    # θ·log(θ/(θ+μ)) + x·log(μ/(θ+μ)) in logits form η = log μ − log θ:
    #   = −θ·softplus(η) − x·softplus(−η).
    # softplus never forms θ+μ, so θ = 1e-8 and θ = 1e8 keep their digits; log μ is floored
    # at log(tiny), which only matters for x > 0 at μ = 0 (probability exactly 0).
    sp_pos, sp_neg = _softplus_pair(safe_log(mean) - jnp.log(theta))
    return -theta * sp_pos - x * sp_neg


@_nb_mean_terms.defjvp
def _nb_mean_terms_jvp(primals, tangents):
    x, mean, theta = primals
    x_dot, mean_dot, theta_dot = tangents
    sp_pos, sp_neg = _softplus_pair(safe_log(mean) - jnp.log(theta))
    out = -theta * sp_pos - x * sp_neg
    p_mean = jnp.exp(-sp_neg)  # μ / (θ + μ) = sigmoid(η)
    p_theta = jnp.exp(-sp_pos)  # θ / (θ + μ)
    # ∂/∂μ = θ (x − μ) / (μ (θ + μ)) = (x / μ − 1) · θ/(θ+μ); at x = 0 this is −θ/(θ+μ) (−1 at
    # μ = 0). For x > 0 at μ = 0 the true slope is +inf; it saturates at finfo.max / 4.
    big = jnp.finfo(mean.dtype).max / 4  # still finite after a cast to bfloat16
    tiny = jnp.finfo(mean.dtype).tiny
    x_over_mean = jnp.minimum(x / jnp.maximum(mean, tiny), big)
    d_mean = (x_over_mean - 1) * p_theta
    # ∂/∂θ = −softplus(η) + μ/(θ+μ) − x/(θ+μ).
    d_theta = -sp_pos + p_mean - x / (theta + mean)
    out_dot = -sp_neg * x_dot + d_mean * mean_dot + d_theta * theta_dot
    return out, jnp.broadcast_to(out_dot, out.shape)


_STIRLING_FROM = 32.0


def _stirling_correction(z: jax.Array) -> jax.Array:
    # lgamma(z) − [(z − ½) log z − z + ½ log 2π], asymptotic series; for z ≥ 31 the first
    # omitted term is below 1e-16 relative.
    w = 1 / (z * z)
    return (1 / 12 - w * (1 / 360 - w * (1 / 1260 - w / 1680))) / z


def _lgamma_shift(z: jax.Array, d: jax.Array) -> jax.Array:
    # lgamma(z + d) − lgamma(z) for z ≥ 32, z + d ≥ 31, without subtracting two large numbers:
    # (z − ½)·log1p(d/z) + d·log(z + d) − d + correction(z + d) − correction(z).
    return (
        (z - 0.5) * jnp.log1p(d / z)
        + d * jnp.log(z + d)
        - d
        + (_stirling_correction(z + d) - _stirling_correction(z))
    )


def _gamma_ratio(x: jax.Array, theta: jax.Array) -> jax.Array:
    # lgamma(x+θ) − lgamma(θ) − lgamma(x+1). With z = max(θ, x+1), "other" the smaller one
    # and z + d = x + θ, this is [lgamma(z + d) − lgamma(z)] − lgamma(other). The bracket is
    # a difference of two large, close numbers once z is large (lgamma(1e8) ≈ 1.7e9 has an
    # ulp of 128 in float32), so for z ≥ 32 it comes from Stirling's series instead.
    theta_larger = theta >= x + 1
    z = jnp.where(theta_larger, theta, x + 1)
    other = jnp.where(theta_larger, x + 1, theta)
    d = jnp.where(theta_larger, x, theta - 1)
    large = z >= _STIRLING_FROM
    direct = gammaln(x + theta) - gammaln(jnp.where(large, 1, z))
    shifted = _lgamma_shift(jnp.where(large, z, _STIRLING_FROM), jnp.where(large, d, 0))
    return jnp.where(large, shifted, direct) - gammaln(other)


def _nb_count_terms(x: jax.Array, theta: jax.Array) -> jax.Array:
    # At x = 0 the ratio is exactly 0 (lgamma(1) is not exactly 0 in XLA) with slopes
    # ψ(θ) − ψ(1) in x and exactly 0 in θ (the two ψ(θ) ≈ −1/θ terms would cancel only to
    # rounding for tiny θ). The θ-stopped copy is the same computation in the forward pass,
    # so it costs nothing there.
    at_zero = _gamma_ratio(x, jax.lax.stop_gradient(theta))
    at_zero = at_zero - jax.lax.stop_gradient(at_zero)
    return jnp.where(x == 0, at_zero, _gamma_ratio(x, theta))


def nb_log_prob(
    x: jax.typing.ArrayLike, mean: jax.typing.ArrayLike, theta: jax.typing.ArrayLike
) -> jax.Array:
    """Log-pmf of the negative binomial with mean ``mean`` and inverse dispersion ``theta``.

    ``log p = lgamma(x+θ) − lgamma(θ) − lgamma(x+1) + θ·log(θ/(θ+μ)) + x·log(μ/(θ+μ))``,
    equal to ``scipy.stats.nbinom.logpmf(x, n=θ, p=θ/(θ+μ))``. The gamma part switches to a
    Stirling-series difference once ``max(θ, x+1) ≥ 32`` (where the lgamma difference cancels),
    and the rest is written in logits form with ``softplus``
    (``η = log μ − log θ``), so ``μ = 0``, ``θ = 1e-8`` and ``θ = 1e8`` stay finite and
    accurate. Gradients are analytic (``custom_jvp``): ``∂/∂μ = θ(x − μ) / (μ(θ+μ))``, which
    is ``−1`` at ``x = 0, μ = 0``. ``x`` is a (float) count; ``μ`` below the smallest normal
    number is treated as that number for ``x > 0``.

    The seed's ``θ·(log(θ+eps) − log(θ+μ+eps))`` with clamped inputs is biased, has zero
    gradient inside the clamps, and ``lgamma(x+θ) − lgamma(θ)`` cancels for large ``θ``.

    >>> import jax
    >>> round(float(nb_log_prob(0.0, 0.0, 1.0)), 4), float(jax.grad(nb_log_prob, 1)(0.0, 0.0, 1.0))
    (0.0, -1.0)
    """
    dtype, (x, mean, theta) = promote(x, mean, theta)
    return (_nb_count_terms(x, theta) + _nb_mean_terms(x, mean, theta)).astype(dtype)


def zinb_log_prob(
    x: jax.typing.ArrayLike,
    mean: jax.typing.ArrayLike,
    theta: jax.typing.ArrayLike,
    gate_logits: jax.typing.ArrayLike,
) -> jax.Array:
    """Log-pmf of the zero-inflated negative binomial (scVI parametrisation).

    With dropout probability ``π = sigmoid(gate_logits)`` (logit ``g``):
    ``log p(0) = log(π + (1 − π)·NB(0)) = logaddexp(g, log NB(0)) − softplus(g)`` and
    ``log p(x > 0) = −softplus(g) + log NB(x)``, where ``log NB(0) = θ·log(θ/(θ+μ))``.
    Everything stays in log space: naive ``log(π + (1 − π)·NB(0))`` is ``log 0`` when both
    terms underflow, and ``log(1 − π)`` is ``-inf`` once ``π`` rounds to 1.

    >>> import jax.numpy as jnp
    >>> round(float(zinb_log_prob(0.0, 0.0, 1.0, 0.0)), 4)
    0.0
    >>> round(float(zinb_log_prob(2.0, 1.0, 1.0, 0.0) - nb_log_prob(2.0, 1.0, 1.0)), 4)
    -0.6931
    """
    dtype, (x, mean, theta, gate) = promote(x, mean, theta, gate_logits)
    log_nb = nb_log_prob(x, mean, theta)
    log_nb_zero = _nb_mean_terms(jnp.zeros_like(x), mean, theta)
    log_gate_off = -jax.nn.softplus(gate)
    zero_case = jnp.logaddexp(gate, log_nb_zero) + log_gate_off
    return jnp.where(x == 0, zero_case, log_gate_off + log_nb).astype(dtype)


# ---------------------------------------------------------------------------------------------
# 3-D Gaussian NLL in factored form
# ---------------------------------------------------------------------------------------------

_LOG_2PI = math.log(2 * math.pi)


def gaussian_nll_3d(
    x: jax.typing.ArrayLike,
    mean: jax.typing.ArrayLike,
    scale_log: jax.typing.ArrayLike,
    rotation: jax.typing.ArrayLike,
) -> jax.Array:
    """Negative log-density of a 3-D Gaussian given by rotation and log-scales.

    Covariance ``Σ = R diag(e^{2s}) Rᵀ`` with ``R = rotation`` (``[..., 3, 3]``, orthogonal)
    and ``s = scale_log`` (``[..., 3]``). In factored form, with ``z = diag(e^{−s}) Rᵀ(x − μ)``:
    ``NLL = ½ (|z|² + 2 Σ s + 3 log 2π)``. The constant is included, so
    ``−gaussian_nll_3d`` equals ``scipy.stats.multivariate_normal.logpdf(x, μ, Σ)``; subtract
    ``1.5 · log 2π`` for the seed's ``½ (mahal² + log det)``.

    The log-determinant is exactly ``2 Σ s`` — no Cholesky, no ``eigh``, no inverse — so scales
    from ``e^-9`` to ``e^9`` and equal scales (degenerate eigenvalues, where ``eigh`` gradients
    are NaN) are fine. Naive ``inv(Σ)`` / ``logdet(Σ)`` lose ~``e^36`` in conditioning at those
    scales and turn NaN in float32.

    >>> import jax.numpy as jnp
    >>> nll = gaussian_nll_3d(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), jnp.eye(3))
    >>> round(float(nll), 4)
    2.7568
    """
    check_last_axis("x", x, 3)
    check_last_axis("mean", mean, 3)
    check_last_axis("scale_log", scale_log, 3)
    if jnp.ndim(rotation) < 2 or jnp.shape(rotation)[-2:] != (3, 3):
        raise ValueError(f"rotation: expected shape [..., 3, 3], got {tuple(jnp.shape(rotation))}")
    dtype, (x, mean, scale_log, rotation) = promote(x, mean, scale_log, rotation)
    local = jnp.einsum("...ji,...j->...i", rotation, x - mean)  # Rᵀ (x − μ)
    z = local * jnp.exp(-scale_log)
    nll = 0.5 * jnp.sum(z * z, axis=-1) + jnp.sum(scale_log, axis=-1) + 1.5 * _LOG_2PI
    return nll.astype(dtype)
