"""CFM-VC networks in Flax NNX: VAE encoder/decoder, context encoder and flow field.

Sub-module names follow the PyTorch original (``encoder.fc1``, ``decoder.mean_out``,
``context_encoder.pert_mlp_layers``, ``flow.basis_head`` ...), so a PyTorch state dict maps
onto ``nnx.state(model, nnx.Param)`` (see ``benchmarks/torch_ref/cfmvc.py``). Every size and
every choice that differs from the original is a field of
:class:`~jaxstab.models.cfmvc.CFMVCConfig`; ``CFMVCConfig.original()`` computes the original's
function.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = CFMVC(50, 2, 3, 4, CFMVCConfig.small(), rngs=nnx.Rngs(0))
  >>> codes = jnp.zeros(5, int)
  >>> context, alpha = model.context_encoder(jnp.zeros((5, 4)), codes, codes)
  >>> float(jnp.abs(alpha).max())  # the control perturbation has no effect, exactly
  0.0
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstab import numerics
from jaxstab.models.cfmvc.config import BOUND_MODES, CFMVCConfig

EMB_DIM = 8  # batch and cell-type embedding sizes of the original
TIME_DIM = 16  # flow time embedding size
SPATIAL_OUT = 16  # spatial MLP width

_xavier = nnx.initializers.xavier_uniform()
_emb_init = nnx.initializers.normal(0.02)


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=use_bias, kernel_init=_xavier, rngs=rngs)


def bound(x: jax.Array, limit: float, mode: str) -> jax.Array:
    """``x`` bounded to ``±limit`` as ``mode`` says (see :data:`BOUND_MODES`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([-30.0, 3.0, 30.0])
      >>> bound(x, 20.0, "straight_through").tolist(), bound(x, 20.0, "soft")[1].item()
      ([-20.0, 3.0, 20.0], 3.0)
      >>> jax.grad(lambda v: bound(v, 20.0, "clip").sum())(x).tolist()
      [0.0, 1.0, 0.0]
    """
    if mode == "soft":
        return numerics.soft_clip(x, -limit, limit)
    if mode == "straight_through":
        return numerics.straight_through_clip(x, -limit, limit)
    if mode == "clip":
        return jnp.clip(x, -limit, limit)
    if mode == "none":
        return x
    raise ValueError(f"bound mode must be one of {BOUND_MODES}, got {mode!r}")


class EncoderOutput(NamedTuple):
    """Posterior parameters of the intrinsic (``int``) and technical (``tech``) latents."""

    int_mean: jax.Array
    int_logvar: jax.Array
    tech_mean: jax.Array
    tech_logvar: jax.Array


class EncoderVAE(nnx.Module):
    """[counts, batch emb, cell-type emb] → 256 → 256 → (mean, logvar) of z_int, z_tech.

    ``config.input_transform``: ``"log1p"`` of the counts or ``"none"`` (raw counts, the
    original). ``logvar`` is bounded to ``±config.logvar_limit`` by ``config.logvar_bound``.
    """

    def __init__(
        self, n_genes: int, n_batches: int, n_cell_types: int, config: CFMVCConfig, *,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        c = config
        self.config = c
        self.batch_emb = nnx.Embed(n_batches, EMB_DIM, embedding_init=_emb_init, rngs=rngs)
        self.ct_emb = nnx.Embed(n_cell_types, EMB_DIM, embedding_init=_emb_init, rngs=rngs)
        self.fc1 = _linear(n_genes + 2 * EMB_DIM, c.hidden_vae, rngs)
        self.dropout1 = nnx.Dropout(c.dropout, rngs=rngs)
        self.fc2 = _linear(c.hidden_vae, c.hidden_vae, rngs)
        self.dropout2 = nnx.Dropout(c.dropout, rngs=rngs)
        self.z_int_mean = _linear(c.hidden_vae, c.dim_int, rngs)
        self.z_int_logvar = _linear(c.hidden_vae, c.dim_int, rngs)
        self.z_tech_mean = _linear(c.hidden_vae, c.dim_tech, rngs)
        self.z_tech_logvar = _linear(c.hidden_vae, c.dim_tech, rngs)

    def __call__(
        self,
        x: jax.Array,
        batch: jax.Array,
        cell_type: jax.Array,
        *,
        deterministic: bool | None = None,
    ) -> EncoderOutput:
        c = self.config
        x_in = jnp.log1p(x) if c.input_transform == "log1p" else x
        h = jnp.concatenate([x_in, self.batch_emb(batch), self.ct_emb(cell_type)], -1)
        h = self.dropout1(nnx.relu(self.fc1(h)), deterministic=deterministic)
        h = self.dropout2(nnx.relu(self.fc2(h)), deterministic=deterministic)
        return EncoderOutput(
            self.z_int_mean(h),
            bound(self.z_int_logvar(h), c.logvar_limit, c.logvar_bound),
            self.z_tech_mean(h),
            bound(self.z_tech_logvar(h), c.logvar_limit, c.logvar_bound),
        )


class DecoderNB(nnx.Module):
    """[z_int, z_tech] → 256 → 256 → negative-binomial mean and per-gene dispersion.

    The network output is the log-mean, bounded to ``±config.log_mean_limit`` by
    ``config.mean_bound``; with ``config.use_library_size`` it is instead the logits of
    ``mean = softmax(logits) · library``. ``theta = exp(log_theta)`` with ``log_theta``
    bounded to ``±config.log_theta_limit`` by ``config.theta_bound``.
    """

    def __init__(self, n_genes: int, config: CFMVCConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.use_library_size = c.use_library_size
        self.fc1 = _linear(c.dim_int + c.dim_tech, c.hidden_vae, rngs)
        self.dropout1 = nnx.Dropout(c.dropout, rngs=rngs)
        self.fc2 = _linear(c.hidden_vae, c.hidden_vae, rngs)
        self.dropout2 = nnx.Dropout(c.dropout, rngs=rngs)
        self.mean_out = _linear(c.hidden_vae, n_genes, rngs)
        self.log_theta = nnx.Param(jnp.zeros((n_genes,), jnp.float32))

    def __call__(
        self,
        z_int: jax.Array,
        z_tech: jax.Array,
        library: jax.Array | None = None,
        *,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns ``(mean [B, G], theta [G])``."""
        c = self.config
        h = jnp.concatenate([z_int, z_tech], -1)
        h = self.dropout1(nnx.relu(self.fc1(h)), deterministic=deterministic)
        h = self.dropout2(nnx.relu(self.fc2(h)), deterministic=deterministic)
        log_mean = bound(self.mean_out(h), c.log_mean_limit, c.mean_bound)
        if self.use_library_size:
            if library is None:
                raise ValueError("library is required when use_library_size=True")
            # The bound acts on the logits, so the means still sum to the library size.
            log_mean = jax.nn.log_softmax(log_mean, -1) + numerics.safe_log(library)[..., None]
        log_theta = bound(self.log_theta[...], c.log_theta_limit, c.theta_bound)
        return jnp.exp(log_mean), jnp.exp(log_theta)


def encode_perturbation(p: jax.Array, config: CFMVCConfig) -> jax.Array:
    """The perturbation input of the context encoder from the data's one-hot ``p [B, P]``.

    ``control_encoding="zero"``: ``p`` itself (the control is the zero row).
    ``"column"``: the original's encoding, ``P + 1`` columns with the control's own column
    ``1 - sum(p)`` inserted at ``config.control_column``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.models.cfmvc.config import CFMVCConfig
      >>> cfg = CFMVCConfig(control_encoding="column", control_column=1)
      >>> encode_perturbation(jnp.array([[0.0, 0.0], [1.0, 0.0]]), cfg).tolist()
      [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """
    if config.control_encoding == "zero":
        return p
    k = config.control_column
    control = 1.0 - jnp.sum(p, -1, keepdims=True)
    return jnp.concatenate([p[..., :k], control, p[..., k:]], -1)


class ContextEncoder(nnx.Module):
    """Covariate context and the perturbation code ``alpha``.

    ``context = [batch emb, cell-type emb(, spatial MLP 2→16→16)]``.
    ``alpha = MLP([q, g · ct emb])`` with a bias-free ReLU MLP ``→ 64 → 64 → 64``, where ``q``
    is :func:`encode_perturbation` of ``p``. With ``config.alpha_gating`` the gate is
    ``g = max_k |p_k|``, otherwise ``g = 1`` (the original). The original fed ``[q, ct emb]``
    to its bias-free MLP and claimed ``alpha(control) = 0``; that is false there, since the
    cell-type embedding alone drives the MLP (and its control has a one-hot column of its
    own). With the zero control row and the gate the whole input is zero for the control, and
    a bias-free ReLU MLP maps 0 to exactly 0; for one-hot ``p`` the gate is 1 and the
    cell-type interaction is kept.
    """

    def __init__(
        self,
        n_batches: int,
        n_cell_types: int,
        n_perturbations: int,
        config: CFMVCConfig,
        *,
        spatial_dim: int | None = None,
        rngs: nnx.Rngs,
    ):
        c = config
        width = n_perturbations + (1 if c.control_encoding == "column" else 0)
        if c.control_encoding == "column" and c.control_column > n_perturbations:
            raise ValueError(
                f"control_column {c.control_column} is out of range [0, {n_perturbations}]"
            )
        self.config = c
        self.spatial_dim = spatial_dim
        self.batch_emb = nnx.Embed(n_batches, EMB_DIM, embedding_init=_emb_init, rngs=rngs)
        self.ct_emb = nnx.Embed(n_cell_types, EMB_DIM, embedding_init=_emb_init, rngs=rngs)
        if spatial_dim is not None:
            self.spatial_mlp = nnx.Sequential(
                _linear(spatial_dim, SPATIAL_OUT, rngs),
                nnx.relu,
                _linear(SPATIAL_OUT, SPATIAL_OUT, rngs),
                nnx.relu,
            )
        dims = [width + EMB_DIM, c.hidden_ctx, c.hidden_ctx, c.hidden_ctx]
        self.pert_mlp_layers = nnx.List(
            [_linear(a, b, rngs, use_bias=False) for a, b in itertools.pairwise(dims)]
        )
        self.context_dim = 2 * EMB_DIM + (SPATIAL_OUT if spatial_dim is not None else 0)
        self.alpha_dim = c.hidden_ctx

    def __call__(
        self,
        p: jax.Array,
        batch: jax.Array,
        cell_type: jax.Array,
        spatial: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns ``(context [B, context_dim], alpha [B, alpha_dim])`` for the data's ``p``."""
        ct_e = self.ct_emb(cell_type)
        parts = [self.batch_emb(batch), ct_e]
        if self.spatial_dim is not None:
            if spatial is None:
                raise ValueError(f"spatial coordinates [B, {self.spatial_dim}] are required")
            parts.append(self.spatial_mlp(spatial))
        if self.config.alpha_gating:
            ct_e = jnp.max(jnp.abs(p), axis=-1, keepdims=True) * ct_e
        h = jnp.concatenate([encode_perturbation(p, self.config), ct_e], -1)
        last = len(self.pert_mlp_layers) - 1
        for i, layer in enumerate(self.pert_mlp_layers):
            h = layer(h)
            if i < last:
                h = nnx.relu(h)
        return jnp.concatenate(parts, -1), h


class FlowField(nnx.Module):
    """Velocity ``v(z_t, t | context, alpha) = base(h) + Σ_j (W alpha)_j · basis_j(h)``.

    ``h = trunk([z_t, time_mlp(t), context])`` (two SiLU layers), ``W = alpha_head``
    (bias-free, so ``alpha = 0`` leaves only the base field).
    """

    def __init__(
        self,
        dim_int: int,
        context_dim: int,
        alpha_dim: int,
        *,
        hidden_dim: int,
        n_basis: int,
        rngs: nnx.Rngs,
    ):
        self.dim_int = dim_int
        self.n_basis = n_basis
        self.time_mlp = nnx.Sequential(
            _linear(1, TIME_DIM, rngs), nnx.silu, _linear(TIME_DIM, TIME_DIM, rngs)
        )
        self.trunk = nnx.Sequential(
            _linear(dim_int + TIME_DIM + context_dim, hidden_dim, rngs),
            nnx.silu,
            _linear(hidden_dim, hidden_dim, rngs),
            nnx.silu,
        )
        self.base_head = _linear(hidden_dim, dim_int, rngs)
        self.basis_head = _linear(hidden_dim, n_basis * dim_int, rngs)
        self.alpha_head = _linear(alpha_dim, n_basis, rngs, use_bias=False)

    def __call__(
        self, z_t: jax.Array, t: jax.Array, context: jax.Array, alpha: jax.Array
    ) -> jax.Array:
        h = self.trunk(jnp.concatenate([z_t, self.time_mlp(t[..., None]), context], -1))
        basis = self.basis_head(h).reshape(*h.shape[:-1], self.n_basis, self.dim_int)
        coeff = self.alpha_head(alpha)
        return self.base_head(h) + jnp.einsum("...j,...jd->...d", coeff, basis)


class CFMVC(nnx.Module):
    """CFM-VC 2.x: an NB-VAE latent space plus a perturbation-conditioned flow on z_int.

    Args:
      n_genes, n_batches, n_cell_types: data sizes.
      n_perturbations: width of the data's perturbation one-hot (the control is the zero
        row there; ``config.control_encoding="column"`` adds its own column inside).
      config: a :class:`~jaxstab.models.cfmvc.CFMVCConfig` (default: ``CFMVCConfig.default()``).
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training) streams.
      spatial_dim: size of ``obsm["spatial"]`` rows, or ``None`` for no spatial input.
      **overrides: config fields to replace (``CFMVC(..., dim_int=8)``).

    Example:
      >>> from flax import nnx
      >>> model = CFMVC(100, 2, 3, 5, rngs=nnx.Rngs(0))
      >>> model.encoder.z_int_mean.kernel.shape, model.flow.alpha_head.kernel.shape
      ((256, 32), (64, 16))
    """

    def __init__(
        self,
        n_genes: int,
        n_batches: int,
        n_cell_types: int,
        n_perturbations: int,
        config: CFMVCConfig | None = None,
        *,
        rngs: nnx.Rngs,
        spatial_dim: int | None = None,
        **overrides: Any,
    ):
        c = (CFMVCConfig.default() if config is None else config).replace(**overrides)
        self.config = c
        self.n_genes = n_genes
        self.n_perturbations = n_perturbations
        self.dim_int = c.dim_int
        self.dim_tech = c.dim_tech
        self.spatial_dim = spatial_dim
        self.use_library_size = c.use_library_size
        self.lambda_dist = float(c.lambda_dist)
        self.encoder = EncoderVAE(n_genes, n_batches, n_cell_types, c, rngs=rngs)
        self.decoder = DecoderNB(n_genes, c, rngs=rngs)
        self.context_encoder = ContextEncoder(
            n_batches, n_cell_types, n_perturbations, c, spatial_dim=spatial_dim, rngs=rngs
        )
        self.flow = FlowField(
            c.dim_int,
            self.context_encoder.context_dim,
            self.context_encoder.alpha_dim,
            hidden_dim=c.hidden_flow,
            n_basis=c.n_basis,
            rngs=rngs,
        )

    def velocity(
        self,
        z_t: jax.Array,
        t: jax.Array,
        p: jax.Array,
        batch: jax.Array,
        cell_type: jax.Array,
        spatial: jax.Array | None = None,
    ) -> jax.Array:
        """Flow velocity at ``(z_t, t)`` for perturbation ``p`` in the given context."""
        context, alpha = self.context_encoder(p, batch, cell_type, spatial)
        return self.flow(z_t, t, context, alpha)
