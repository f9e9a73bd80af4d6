"""CFM-VC networks in Flax NNX: VAE encoder/decoder, context encoder and flow field.

Sub-module names follow the PyTorch original (``encoder.fc1``, ``decoder.mean_out``,
``context_encoder.pert_mlp_layers``, ``flow.basis_head`` ...), so a PyTorch state dict maps
onto ``nnx.state(model, nnx.Param)`` (see ``benchmarks/torch_ref/cfmvc.py``).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = CFMVC(50, 2, 3, 4, rngs=nnx.Rngs(0))
  >>> codes = jnp.zeros(5, int)
  >>> context, alpha = model.context_encoder(jnp.zeros((5, 4)), codes, codes)
  >>> float(jnp.abs(alpha).max())  # the control perturbation has no effect, exactly
  0.0
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstab import numerics

EMB_DIM = 8  # batch and cell-type embedding sizes of the original
TIME_DIM = 16  # flow time embedding size
SPATIAL_OUT = 16  # spatial MLP width
LOGVAR_BOUND = 10.0  # |logvar| bound of the encoder
LOG_MEAN_BOUND = 20.0  # |log NB mean| bound of the decoder

_xavier = nnx.initializers.xavier_uniform()
_emb_init = nnx.initializers.normal(0.02)


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=use_bias, kernel_init=_xavier, rngs=rngs)


class EncoderOutput(NamedTuple):
    """Posterior parameters of the intrinsic (``int``) and technical (``tech``) latents."""

    int_mean: jax.Array
    int_logvar: jax.Array
    tech_mean: jax.Array
    tech_logvar: jax.Array


class EncoderVAE(nnx.Module):
    """[log1p(counts), batch emb, cell-type emb] → 256 → 256 → (mean, logvar) of z_int, z_tech.

    ``logvar`` goes through :func:`jaxstab.numerics.soft_clip` to ``±10``: smooth, with a
    non-zero gradient everywhere (the original's ``clamp`` has zero gradient outside).
    """

    def __init__(
        self,
        n_genes: int,
        n_batches: int,
        n_cell_types: int,
        *,
        dim_int: int = 32,
        dim_tech: int = 8,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        rngs: nnx.Rngs,
    ):
        self.batch_emb = nnx.Embed(n_batches, EMB_DIM, embedding_init=_emb_init, rngs=rngs)
        self.ct_emb = nnx.Embed(n_cell_types, EMB_DIM, embedding_init=_emb_init, rngs=rngs)
        self.fc1 = _linear(n_genes + 2 * EMB_DIM, hidden_dim, rngs)
        self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
        self.fc2 = _linear(hidden_dim, hidden_dim, rngs)
        self.dropout2 = nnx.Dropout(dropout, rngs=rngs)
        self.z_int_mean = _linear(hidden_dim, dim_int, rngs)
        self.z_int_logvar = _linear(hidden_dim, dim_int, rngs)
        self.z_tech_mean = _linear(hidden_dim, dim_tech, rngs)
        self.z_tech_logvar = _linear(hidden_dim, dim_tech, rngs)

    def __call__(
        self,
        x: jax.Array,
        batch: jax.Array,
        cell_type: jax.Array,
        *,
        deterministic: bool | None = None,
    ) -> EncoderOutput:
        h = jnp.concatenate([jnp.log1p(x), self.batch_emb(batch), self.ct_emb(cell_type)], -1)
        h = self.dropout1(nnx.relu(self.fc1(h)), deterministic=deterministic)
        h = self.dropout2(nnx.relu(self.fc2(h)), deterministic=deterministic)
        bound = lambda v: numerics.soft_clip(v, -LOGVAR_BOUND, LOGVAR_BOUND)
        return EncoderOutput(
            self.z_int_mean(h),
            bound(self.z_int_logvar(h)),
            self.z_tech_mean(h),
            bound(self.z_tech_logvar(h)),
        )


class DecoderNB(nnx.Module):
    """[z_int, z_tech] → 256 → 256 → negative-binomial mean and per-gene dispersion.

    The network output is soft-clipped to ``±20`` and is the log-mean, as in the original;
    with ``use_library_size`` it is instead the logits of ``mean = softmax(logits) · library``.
    ``theta = exp(log_theta)``.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        dim_int: int = 32,
        dim_tech: int = 8,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        use_library_size: bool = False,
        rngs: nnx.Rngs,
    ):
        self.use_library_size = use_library_size
        self.fc1 = _linear(dim_int + dim_tech, hidden_dim, rngs)
        self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
        self.fc2 = _linear(hidden_dim, hidden_dim, rngs)
        self.dropout2 = nnx.Dropout(dropout, rngs=rngs)
        self.mean_out = _linear(hidden_dim, n_genes, rngs)
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
        h = jnp.concatenate([z_int, z_tech], -1)
        h = self.dropout1(nnx.relu(self.fc1(h)), deterministic=deterministic)
        h = self.dropout2(nnx.relu(self.fc2(h)), deterministic=deterministic)
        log_mean = numerics.soft_clip(self.mean_out(h), -LOG_MEAN_BOUND, LOG_MEAN_BOUND)
        if self.use_library_size:
            if library is None:
                raise ValueError("library is required when use_library_size=True")
            # The bound acts on the logits, so the means still sum to the library size.
            log_mean = jax.nn.log_softmax(log_mean, -1) + numerics.safe_log(library)[..., None]
        return jnp.exp(log_mean), jnp.exp(self.log_theta[...])


class ContextEncoder(nnx.Module):
    """Covariate context and the perturbation code ``alpha``.

    ``context = [batch emb, cell-type emb(, spatial MLP 2→16→16)]``.
    ``alpha = MLP([p, g · ct emb])`` with a bias-free ReLU MLP ``→ 64 → 64 → 64`` and the
    gate ``g = max_k |p_k|``. The original fed ``[p, ct emb]`` to its bias-free MLP and
    claimed ``alpha(p = 0) = 0``; that is false there, since the cell-type embedding alone
    drives the MLP. Gating the embedding by the perturbation's magnitude makes the whole input
    zero for the control, and a bias-free ReLU MLP maps 0 to exactly 0; for one-hot ``p`` the
    gate is 1 and the cell-type interaction is kept.
    """

    def __init__(
        self,
        n_batches: int,
        n_cell_types: int,
        n_perturbations: int,
        *,
        spatial_dim: int | None = None,
        hidden_dim: int = 64,
        rngs: nnx.Rngs,
    ):
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
        dims = [n_perturbations + EMB_DIM, hidden_dim, hidden_dim, hidden_dim]
        self.pert_mlp_layers = nnx.List(
            [_linear(a, b, rngs, use_bias=False) for a, b in itertools.pairwise(dims)]
        )
        self.context_dim = 2 * EMB_DIM + (SPATIAL_OUT if spatial_dim is not None else 0)
        self.alpha_dim = hidden_dim

    def __call__(
        self,
        p: jax.Array,
        batch: jax.Array,
        cell_type: jax.Array,
        spatial: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns ``(context [B, context_dim], alpha [B, alpha_dim])``."""
        ct_e = self.ct_emb(cell_type)
        parts = [self.batch_emb(batch), ct_e]
        if self.spatial_dim is not None:
            if spatial is None:
                raise ValueError(f"spatial coordinates [B, {self.spatial_dim}] are required")
            parts.append(self.spatial_mlp(spatial))
        gate = jnp.max(jnp.abs(p), axis=-1, keepdims=True)
        h = jnp.concatenate([p, gate * ct_e], -1)
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
        hidden_dim: int = 128,
        n_basis: int = 16,
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
      n_perturbations: width of the perturbation one-hot (the control is the zero vector).
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training) streams.
      dim_int, dim_tech: latent sizes (32, 8). hidden_vae, hidden_ctx, hidden_flow: widths
        (256, 64, 128). n_basis: number of basis fields (16). dropout: VAE dropout (0.1).
      spatial_dim: size of ``obsm["spatial"]`` rows, or ``None`` for no spatial input.
      use_library_size: scale the decoder mean by the observed library size (off, as in the
        original).
      lambda_dist: weight of the MMD term of the flow loss (see ``losses.flow_terms``).

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
        *,
        rngs: nnx.Rngs,
        dim_int: int = 32,
        dim_tech: int = 8,
        hidden_vae: int = 256,
        hidden_ctx: int = 64,
        hidden_flow: int = 128,
        n_basis: int = 16,
        dropout: float = 0.1,
        spatial_dim: int | None = None,
        use_library_size: bool = False,
        lambda_dist: float = 0.0,
    ):
        self.n_genes = n_genes
        self.n_perturbations = n_perturbations
        self.dim_int = dim_int
        self.dim_tech = dim_tech
        self.spatial_dim = spatial_dim
        self.use_library_size = use_library_size
        self.lambda_dist = float(lambda_dist)
        self.encoder = EncoderVAE(
            n_genes,
            n_batches,
            n_cell_types,
            dim_int=dim_int,
            dim_tech=dim_tech,
            hidden_dim=hidden_vae,
            dropout=dropout,
            rngs=rngs,
        )
        self.decoder = DecoderNB(
            n_genes,
            dim_int=dim_int,
            dim_tech=dim_tech,
            hidden_dim=hidden_vae,
            dropout=dropout,
            use_library_size=use_library_size,
            rngs=rngs,
        )
        self.context_encoder = ContextEncoder(
            n_batches,
            n_cell_types,
            n_perturbations,
            spatial_dim=spatial_dim,
            hidden_dim=hidden_ctx,
            rngs=rngs,
        )
        self.flow = FlowField(
            dim_int,
            self.context_encoder.context_dim,
            self.context_encoder.alpha_dim,
            hidden_dim=hidden_flow,
            n_basis=n_basis,
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
