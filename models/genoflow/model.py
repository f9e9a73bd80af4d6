"""GenoFlow's modules: NB-VAE encoder and decoder, condition discriminator, gene-graph vector field.

Sub-module and parameter names follow the original's (``causal_genoflow.CausalGenoFlow``)
state dict, with ``fc_3`` for the original's ``fc.3`` (an ``nn.Sequential`` index), so one name
map converts a PyTorch checkpoint (``benchmarks/specs/genoflow.py``). Every Linear starts as
PyTorch's does (uniform ±1/√fan_in for weight and bias), so the two versions train alike from
their own initialisation.

Example:
  >>> import jax.numpy as jnp, numpy as np
  >>> from flax import nnx
  >>> from jaxstab.models.genoflow.config import GenoFlowConfig
  >>> graph = np.array([[0, 1, 2], [1, 2, 0]])
  >>> model = GenoFlow(3, 2, graph, GenoFlowConfig.small(), rngs=nnx.Rngs(0))
  >>> mu, logvar = model.encoder(jnp.ones((5, 3)), jnp.zeros(5, int))
  >>> mu.shape, model.vector_field(jnp.zeros(5), mu, jnp.zeros(5, int)).shape
  ((5, 4), (5, 4))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstab import numerics as jn
from jaxstab.models.genoflow.config import GenoFlowConfig

__all__ = [
    "CausalEncoder",
    "CorrectedGNNVectorField",
    "GATv2",
    "GenoFlow",
    "NBDecoder",
    "TissueDiscriminator",
    "with_self_loops",
]


def _torch_uniform(fan_in: int) -> nnx.initializers.Initializer:
    bound = 1.0 / np.sqrt(max(fan_in, 1))

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """``nn.Linear(n_in, n_out)`` with PyTorch's default initialisation."""
    init = _torch_uniform(n_in)
    return nnx.Linear(n_in, n_out, kernel_init=init, bias_init=init, rngs=rngs)


class BatchNorm1d(nnx.Module):
    """PyTorch's ``BatchNorm1d`` over ``[n, features]``: batch statistics in training (biased
    variance), running statistics in eval, and the running variance updated with the
    *unbiased* batch variance as PyTorch does.

    Written here because ``nnx.BatchNorm`` updates the running variance with the biased one,
    which leaves it n/(n − 1) too small (6.7 % at batch 16) and so changes every eval-mode
    output of a model trained either way. Parameters and statistics have ``nnx.BatchNorm``'s
    names (``scale``, ``bias``, ``mean``, ``var``); ``model.eval()`` / ``train()`` set
    ``use_running_average``.

    >>> bn = BatchNorm1d(2, momentum=0.1, eps=1e-5)
    >>> _ = bn(jnp.array([[0.0, 1.0], [2.0, 1.0]]))
    >>> bn.mean[...].tolist(), bn.var[...].tolist()  # unbiased variance of (0, 2) is 2
    ([0.10000000149011612, 0.10000000149011612], [1.100000023841858, 0.8999999761581421])
    """

    def __init__(self, n: int, *, momentum: float, eps: float):
        self.scale = nnx.Param(jnp.ones(n))
        self.bias = nnx.Param(jnp.zeros(n))
        self.mean = nnx.BatchStat(jnp.zeros(n))
        self.var = nnx.BatchStat(jnp.ones(n))
        self.momentum, self.eps = momentum, eps
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            n = x.shape[0]
            mean = jnp.mean(x, axis=0)
            var = jnp.mean(jnp.square(x - mean), axis=0)
            m = self.momentum
            unbiased = var * (n / max(n - 1, 1))
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


def _batch_norm(n: int, config: GenoFlowConfig, rngs: nnx.Rngs) -> BatchNorm1d:
    return BatchNorm1d(n, momentum=config.bn_momentum, eps=config.bn_eps)


def one_hot(condition: jax.Array, n_conditions: int) -> jax.Array:
    """Integer condition codes ``[n]`` as float one-hot rows ``[n, n_conditions]``.

    >>> one_hot(jnp.array([1, 0]), 3).tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """
    return jax.nn.one_hot(condition, n_conditions, dtype=jnp.float32)


class CausalEncoder(nnx.Module):
    """``[log1p x, one-hot c]`` → 512 → 256 (BatchNorm, LeakyReLU) → mean, log-variance.

    The caller applies ``log1p`` (the original's ``vae_forward`` does); ``condition`` is the
    integer code.
    """

    def __init__(self, n_genes: int, n_conditions: int, config: GenoFlowConfig, *, rngs: nnx.Rngs):
        h = config.hidden_encoder
        self.n_conditions = n_conditions
        self.slope = config.leaky_slope
        self.fc_0 = _linear(n_genes + n_conditions, h, rngs)
        self.fc_1 = _batch_norm(h, config, rngs)
        self.fc_3 = _linear(h, h // 2, rngs)
        self.fc_4 = _batch_norm(h // 2, config, rngs)
        self.mu_head = _linear(h // 2, config.latent_dim, rngs)
        self.logvar_head = _linear(h // 2, config.latent_dim, rngs)

    def __call__(self, x_log: jax.Array, condition: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jnp.concatenate([x_log, one_hot(condition, self.n_conditions)], axis=-1)
        h = nnx.leaky_relu(self.fc_1(self.fc_0(h)), self.slope)
        h = nnx.leaky_relu(self.fc_4(self.fc_3(h)), self.slope)
        return self.mu_head(h), self.logvar_head(h)


class NBDecoder(nnx.Module):
    """``[z, one-hot c]`` → 512 → 512 (LeakyReLU) → NB mean ``library · softmax(·)``; per-gene
    dispersion ``θ = exp(px_r)`` (``px_r`` starts standard normal, as the original's)."""

    def __init__(self, n_genes: int, n_conditions: int, config: GenoFlowConfig, *, rngs: nnx.Rngs):
        h = config.hidden_decoder
        self.n_conditions = n_conditions
        self.slope = config.leaky_slope
        self.fc_0 = _linear(config.latent_dim + n_conditions, h, rngs)
        self.fc_2 = _linear(h, h, rngs)
        self.scale_head = _linear(h, n_genes, rngs)
        self.px_r = nnx.Param(jax.random.normal(rngs.params(), (n_genes,)))

    def __call__(
        self, z: jax.Array, condition: jax.Array, library: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """``(mean [n, G], theta [G])``; ``library`` ``[n]`` or a scalar."""
        h = jnp.concatenate([z, one_hot(condition, self.n_conditions)], axis=-1)
        h = nnx.leaky_relu(self.fc_0(h), self.slope)
        h = nnx.leaky_relu(self.fc_2(h), self.slope)
        scale = jax.nn.softmax(self.scale_head(h), axis=-1)
        library = jnp.asarray(library, scale.dtype)
        return jnp.reshape(library, (-1, 1)) * scale, jnp.exp(self.px_r[...])


def _frozen_linear(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    kernel = jax.lax.stop_gradient(layer.kernel[...])
    return x @ kernel + jax.lax.stop_gradient(layer.bias[...])


class TissueDiscriminator(nnx.Module):
    """z → 128 → 128 (LeakyReLU, dropout 0.2) → condition logits.

    ``frozen=True`` stops the gradient at every weight (not at ``z``): the encoder's
    adversarial term then reaches the encoder only, inside the same jitted step in which the
    discriminator's own cross-entropy trains the discriminator.
    """

    def __init__(self, n_conditions: int, config: GenoFlowConfig, *, rngs: nnx.Rngs):
        h = config.hidden_disc
        self.slope = config.leaky_slope
        self.net_0 = _linear(config.latent_dim, h, rngs)
        self.drop_2 = nnx.Dropout(config.disc_dropout, rngs=rngs)
        self.net_3 = _linear(h, h, rngs)
        self.drop_5 = nnx.Dropout(config.disc_dropout, rngs=rngs)
        self.net_6 = _linear(h, n_conditions, rngs)

    def __call__(self, z: jax.Array, *, frozen: bool = False) -> jax.Array:
        apply = _frozen_linear if frozen else (lambda layer, x: layer(x))
        h = self.drop_2(nnx.leaky_relu(apply(self.net_0, z), self.slope))
        h = self.drop_5(nnx.leaky_relu(apply(self.net_3, h), self.slope))
        return apply(self.net_6, h)


class GraphIndex(nnx.Variable):
    """A gene graph's edge index ``[2, E]`` (int32): model state that never trains."""


def with_self_loops(edges: np.ndarray, n_nodes: int) -> np.ndarray:
    """``edges`` ``[2, E]`` (source, target) without its self loops, plus one loop per node.

    GATv2 attends over a node's in-edges and its own loop (PyTorch Geometric's
    ``add_self_loops=True``), so every node has at least one edge.

    >>> with_self_loops(np.array([[0, 1], [1, 1]]), 2).tolist()
    [[0, 0, 1], [1, 0, 1]]
    """
    edges = np.asarray(edges, dtype=np.int64).reshape(2, -1)
    if edges.size and (edges.min() < 0 or edges.max() >= n_nodes):
        raise ValueError(f"gene graph has a node index outside [0, {n_nodes})")
    keep = edges[:, edges[0] != edges[1]]
    loops = np.tile(np.arange(n_nodes), (2, 1))
    return np.concatenate([keep, loops], axis=1).astype(np.int32)


def segment_softmax(logits: jax.Array, segments: jax.Array, n_segments: int) -> jax.Array:
    """Softmax of ``logits [E, ...]`` within each group of equal ``segments [E]``.

    >>> p = segment_softmax(jnp.array([0.0, 0.0, 5.0]), jnp.array([0, 0, 1]), 2)
    >>> p.tolist()
    [0.5, 0.5, 1.0]
    """
    top = jax.ops.segment_max(logits, segments, n_segments)
    e = jnp.exp(logits - jax.lax.stop_gradient(top)[segments])
    total = jax.ops.segment_sum(e, segments, n_segments)
    return e / total[segments]


class GATv2(nnx.Module):
    """GATv2 attention over a fixed graph (PyTorch Geometric's ``GATv2Conv``, concatenated heads).

    For an edge j → i: ``e = aᵀ LeakyReLU(W_l x_j + W_r x_i)`` per head, softmax over the
    in-edges of i (self loop included), dropout on the attention, output
    ``Σ_j α_ij W_l x_j`` with heads concatenated, plus a bias. Written here because no
    maintained JAX library has GATv2 with PyTorch Geometric's layout (jraph's GAT is v1).
    """

    def __init__(
        self, n_in: int, n_out: int, heads: int, dropout: float, *, rngs: nnx.Rngs, slope: float
    ):
        glorot = nnx.initializers.glorot_uniform()
        self.heads, self.n_out, self.slope = heads, n_out, slope
        kw = {"kernel_init": glorot, "bias_init": nnx.initializers.zeros_init(), "rngs": rngs}
        self.lin_l = nnx.Linear(n_in, heads * n_out, **kw)
        self.lin_r = nnx.Linear(n_in, heads * n_out, **kw)
        bound = np.sqrt(6.0 / (heads + n_out))  # PyG's glorot on [1, heads, out]
        self.att = nnx.Param(jax.random.uniform(rngs.params(), (1, heads, n_out), minval=-bound,
                                                maxval=bound))  # fmt: skip
        self.bias = nnx.Param(jnp.zeros(heads * n_out))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, edges: jax.Array) -> jax.Array:
        n = x.shape[0]
        src, dst = edges[0], edges[1]
        x_l = self.lin_l(x).reshape(n, self.heads, self.n_out)
        x_r = self.lin_r(x).reshape(n, self.heads, self.n_out)
        e = nnx.leaky_relu(x_l[src] + x_r[dst], self.slope)
        logits = jnp.sum(e * self.att[...], axis=-1)  # [E, heads]
        alpha = self.dropout(segment_softmax(logits, dst, n))
        out = jax.ops.segment_sum(alpha[..., None] * x_l[src], dst, n)
        return out.reshape(n, self.heads * self.n_out) + self.bias[...]


class CorrectedGNNVectorField(nnx.Module):
    """``v(t, z, c)``: gene embeddings → GATv2 → cross-attention from z → MLP.

    Keys and values are the GATv2 features of the genes (``gene_dim · heads`` each); the
    query is a projection of z; the scores are scaled by 1/√(query feature size)
    (:func:`jaxstab.numerics.dot_product_attention`). The MLP reads
    ``[z, context, time embedding, condition embedding]``.
    """

    def __init__(
        self,
        n_genes: int,
        n_conditions: int,
        edges: np.ndarray,
        config: GenoFlowConfig,
        *,
        rngs: nnx.Rngs,
    ):
        c = config
        width = c.gene_dim * c.gat_heads
        self.n_conditions = n_conditions
        self.gene_embeddings = nnx.Param(
            nnx.initializers.glorot_uniform()(rngs.params(), (n_genes, c.gene_dim))
        )
        self.edge_index = GraphIndex(jnp.asarray(with_self_loops(edges, n_genes)))
        self.gat = GATv2(c.gene_dim, c.gene_dim, c.gat_heads, c.gat_dropout, rngs=rngs,
                         slope=c.leaky_slope)  # fmt: skip
        self.query_proj = _linear(c.latent_dim, width, rngs)
        self.time_mlp_0 = _linear(1, c.time_dim, rngs)
        self.time_mlp_2 = _linear(c.time_dim, c.time_dim, rngs)
        self.cond_mlp = _linear(n_conditions, c.cond_dim, rngs)
        self.final_mlp_0 = _linear(c.latent_dim + width + c.time_dim + c.cond_dim, c.hidden_flow,
                                   rngs)  # fmt: skip
        self.drop_2 = nnx.Dropout(c.flow_dropout, rngs=rngs)
        self.final_mlp_3 = _linear(c.hidden_flow, c.latent_dim, rngs)

    def gene_features(self) -> jax.Array:
        """The GATv2 features of every gene ``[G, gene_dim · heads]`` (independent of the cells)."""
        return self.gat(self.gene_embeddings[...], self.edge_index[...])

    def __call__(self, t: jax.Array, z: jax.Array, condition: jax.Array) -> jax.Array:
        """Velocity ``[n, latent]`` at times ``t`` (``[n]`` or a scalar) of cells ``z``."""
        genes = self.gene_features()
        q = self.query_proj(z)
        context = jn.dot_product_attention(q[None, :, None], genes[None, :, None],
                                           genes[None, :, None])[0, :, 0]  # fmt: skip
        t = jnp.broadcast_to(jnp.asarray(t, z.dtype), z.shape[:1])[:, None]
        t_emb = self.time_mlp_2(nnx.silu(self.time_mlp_0(t)))
        c_emb = self.cond_mlp(one_hot(condition, self.n_conditions))
        h = nnx.silu(self.final_mlp_0(jnp.concatenate([z, context, t_emb, c_emb], axis=-1)))
        return self.final_mlp_3(self.drop_2(h))


class GenoFlow(nnx.Module):
    """The two-stage model: ``encoder``, ``decoder``, ``discriminator`` and ``vector_field``,
    the original's top-level groups.

    Args:
      n_genes, n_conditions: data sizes.
      gene_graph: ``[2, E]`` edges (source gene, target gene) of the vector field's GATv2.
      config: a :class:`~jaxstab.models.genoflow.GenoFlowConfig`.
      conditions: the condition labels in code order (what :func:`simulate_trajectory`
        accepts besides codes); default ``"0"``, ``"1"``, ...
      time_points: the data's time points (ascending); the flow's time of time point k is
        ``(t_k − t_0) / (t_last − t_0)`` (``flow_time="global"``).
    """

    def __init__(
        self,
        n_genes: int,
        n_conditions: int,
        gene_graph: np.ndarray,
        config: GenoFlowConfig,
        *,
        rngs: nnx.Rngs,
        conditions: Sequence[str] | None = None,
        time_points: Sequence[float] | None = None,
    ):
        if n_genes < 1 or n_conditions < 1:
            raise ValueError(
                f"n_genes and n_conditions must be >= 1, got {n_genes}, {n_conditions}"
            )
        self.config = config
        self.n_genes, self.n_conditions = n_genes, n_conditions
        names = [str(i) for i in range(n_conditions)] if conditions is None else conditions
        if len(names) != n_conditions:
            raise ValueError(f"{len(names)} condition labels for {n_conditions} conditions")
        self.conditions = tuple(str(c) for c in names)
        times = (0.0, 1.0) if time_points is None else tuple(float(t) for t in time_points)
        if len(times) < 2 or any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError(f"time_points must be >= 2 ascending values, got {times}")
        self.time_points = times
        self.encoder = CausalEncoder(n_genes, n_conditions, config, rngs=rngs)
        self.decoder = NBDecoder(n_genes, n_conditions, config, rngs=rngs)
        self.discriminator = TissueDiscriminator(n_conditions, config, rngs=rngs)
        self.vector_field = CorrectedGNNVectorField(n_genes, n_conditions, gene_graph, config,
                                                    rngs=rngs)  # fmt: skip

    def flow_times(self) -> tuple[float, ...]:
        """The flow's time of each time point: normalised real times (``"global"``) or the
        interval index ``0, 1, 2, ...`` (``"interval"``: each interval is one unit of flow time).

        >>> import numpy as np
        >>> from jaxstab.models.genoflow.config import GenoFlowConfig
        >>> m = GenoFlow(2, 1, np.zeros((2, 0), int), GenoFlowConfig.small(),
        ...              rngs=nnx.Rngs(0), time_points=[0, 1, 4])
        >>> m.flow_times()
        (0.0, 0.25, 1.0)
        """
        t = self.time_points
        if self.config.flow_time == "interval":
            return tuple(float(k) for k in range(len(t)))
        return tuple((x - t[0]) / (t[-1] - t[0]) for x in t)

    def velocity(self, tau: jax.Array, z: jax.Array, condition: jax.Array) -> jax.Array:
        """The flow's velocity at flow time ``tau`` (see :meth:`flow_times`).

        With ``flow_time="interval"`` the vector field reads the time within the current
        interval, ``tau − k`` on ``(k, k + 1]`` (the original's ``t`` in [0, 1], its end
        included: a trajectory over [0, 1] ends reading ``t = 1`` as the original's does).
        """
        tau = jnp.asarray(tau, z.dtype)
        if self.config.flow_time == "interval":
            tau = tau - jnp.clip(jnp.ceil(tau) - 1, 0, len(self.time_points) - 2)
        return self.vector_field(tau, z, condition)

    def encode_mean(self, x: jax.Array, condition: jax.Array) -> jax.Array:
        """The posterior mean of counts ``x`` (``log1p`` applied here)."""
        return self.encoder(jnp.log1p(x), condition)[0]
