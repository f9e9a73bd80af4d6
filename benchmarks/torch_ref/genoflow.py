"""GenoFlow in PyTorch, written from the same description as ``jaxstab.models.genoflow``, under
the original's state-dict keys and with the original trainer's loop.

The modules are built in the original's order under its names (``encoder.fc.0`` ...,
``discriminator.net.6``, ``vector_field.gat.lin_l`` ...; the raw gene graph as the buffer
``vector_field.edge_index``), so a state dict of the original ``CausalGenoFlow`` of the same
sizes loads into :class:`GenoFlowModel` with ``strict=True`` and the shared converter
(:func:`torch_state_dict_to_nnx`, name map :func:`nnx_name`) puts the same weights on the Flax
port. The GATv2 layer is plain PyTorch with PyTorch Geometric's ``GATv2Conv`` semantics
(``torch_geometric`` is not needed here).

It reads the port's :class:`~jaxstab.models.genoflow.config.GenoFlowConfig` and implements
every choice in it the port's way: ``kl`` (``"safe"`` ½Σ(μ² + eᵛ − 1 − v); ``"clamp"`` the
original's clamps and zeroing), ``nb`` (``"safe"`` the plain NB log-likelihood; ``"original"``
the original's 1e-8 guards and zeroing), ``flow_time`` (``"global"`` / ``"interval"``, as
``GenoFlow.velocity``), ``theta_bounds``, ``beta``, ``lambda_adv``, ``disc_lr_scale`` and the
sizes. Beyond the model: OT pairing with POT (:func:`pair_time_points_pot`), trajectories
with torchdiffeq (:func:`simulate_trajectory_torch`) and the two training stages
(:func:`train_stage1`, :func:`train_stage2`).

Example:
  >>> import numpy as np
  >>> from flax import nnx
  >>> from jaxstab.models.genoflow.model import GenoFlow
  >>> graph = np.array([[0, 1, 2], [1, 2, 0]])
  >>> torch_model = GenoFlowModel(5, 2, graph, GenoFlowConfig.small())
  >>> model = GenoFlow(5, 2, graph, GenoFlowConfig.small(), rngs=nnx.Rngs(0))
  >>> model = torch_state_dict_to_nnx(torch_model.state_dict(), model)
  >>> weight = torch_model.encoder.fc[0].weight.detach().numpy()
  >>> bool((model.encoder.fc_0.kernel[...] == weight.T).all())
  True
  >>> nnx_name(("encoder", "fc_1", "var"))
  'encoder.fc.1.running_var'
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import ot
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn
from torchdiffeq import odeint

from benchmarks import convert
from benchmarks.torch_ref.guards import scan_gradients
from jaxstab.models.genoflow.config import GenoFlowConfig

__all__ = [
    "GUARDS",
    "CausalEncoder",
    "CorrectedGNNVectorField",
    "GATv2",
    "GenoFlowModel",
    "NBDecoder",
    "TissueDiscriminator",
    "add_self_loops",
    "flow_pairs_torch",
    "integrate_latent_torch",
    "kl_divergence",
    "nb_log_likelihood",
    "nnx_name",
    "optional_key",
    "pair_by_pot",
    "pair_time_points_pot",
    "simulate_trajectory_torch",
    "torch_state_dict_to_nnx",
    "train_stage1",
    "train_stage2",
]

NB_EPS = 1e-8  # the original NB loss's guard inside every log and log-gamma
KL_LOGVAR_MAX = 20.0  # the original KL's clamp on the log-variance
KL_MU_MAX = 100.0  # and on |mean|
SOFTMAX_EPS = 1e-16  # torch_geometric.utils.softmax adds it to each group's sum
STD_FLOOR = 1e-8  # the original's floor on the std before z-scoring (OT pairing)
# The loop guards of train_stage1 / train_stage2 (all on by default):
#   "skip_nonfinite": a non-finite loss skips its backward and step (the original's check);
#   "scan_gradients": guards.scan_gradients every ``check_every`` steps (per-parameter norms
#                     and isfinite, the original's TwoStageTrainer.check_gradients);
#   "clip": clip_grad_norm_ at ``clip`` (the port's grad_clip; the original does not clip).
GUARDS = ("skip_nonfinite", "scan_gradients", "clip")


def one_hot(condition: torch.Tensor, n_conditions: int) -> torch.Tensor:
    """Integer condition codes ``[n]`` as float32 one-hot rows ``[n, n_conditions]``."""
    return F.one_hot(torch.as_tensor(condition).long(), n_conditions).to(torch.float32)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


# ------------------------------------------------------------------------ modules
class CausalEncoder(nn.Module):
    """``[log1p x, one-hot c]`` → Linear, BatchNorm, LeakyReLU → Linear (half), BatchNorm,
    LeakyReLU → ``mu_head``, ``logvar_head``. Takes ``log1p(x)`` and integer codes."""

    def __init__(self, n_genes: int, n_conditions: int, config: GenoFlowConfig):
        super().__init__()
        c, h = config, config.hidden_encoder
        self.n_conditions = n_conditions
        bn = {"eps": c.bn_eps, "momentum": c.bn_momentum}
        self.fc = nn.Sequential(
            nn.Linear(n_genes + n_conditions, h),
            nn.BatchNorm1d(h, **bn),
            nn.LeakyReLU(c.leaky_slope),
            nn.Linear(h, h // 2),
            nn.BatchNorm1d(h // 2, **bn),
            nn.LeakyReLU(c.leaky_slope),
        )
        self.mu_head = nn.Linear(h // 2, c.latent_dim)
        self.logvar_head = nn.Linear(h // 2, c.latent_dim)

    def forward(
        self, x_log: torch.Tensor, condition: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(torch.cat([x_log, one_hot(condition, self.n_conditions).to(x_log)], dim=-1))
        return self.mu_head(h), self.logvar_head(h)


class NBDecoder(nn.Module):
    """``[z, one-hot c]`` → Linear, LeakyReLU → Linear, LeakyReLU → NB mean
    ``library · softmax(scale_head)``; dispersion ``θ = exp(px_r)`` per gene."""

    def __init__(self, n_genes: int, n_conditions: int, config: GenoFlowConfig):
        super().__init__()
        c, h = config, config.hidden_decoder
        self.n_conditions = n_conditions
        self.fc = nn.Sequential(
            nn.Linear(c.latent_dim + n_conditions, h),
            nn.LeakyReLU(c.leaky_slope),
            nn.Linear(h, h),
            nn.LeakyReLU(c.leaky_slope),
        )
        self.scale_head = nn.Linear(h, n_genes)
        self.px_r = nn.Parameter(torch.randn(n_genes))

    def forward(
        self, z: torch.Tensor, condition: torch.Tensor, library: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [n, G], theta [G])``; ``library`` ``[n]`` or a scalar."""
        h = self.fc(torch.cat([z, one_hot(condition, self.n_conditions).to(z)], dim=-1))
        scale = torch.softmax(self.scale_head(h), dim=-1)
        library = torch.as_tensor(library, dtype=scale.dtype, device=scale.device)
        return library.reshape(-1, 1) * scale, torch.exp(self.px_r)


class TissueDiscriminator(nn.Module):
    """z → Linear, LeakyReLU, Dropout → Linear, LeakyReLU, Dropout → condition logits.

    ``frozen=True`` runs the same layers on detached copies of the weights
    (``torch.func.functional_call``): the gradient reaches ``z`` but no weight.
    """

    def __init__(self, n_conditions: int, config: GenoFlowConfig):
        super().__init__()
        c, h = config, config.hidden_disc
        self.net = nn.Sequential(
            nn.Linear(c.latent_dim, h),
            nn.LeakyReLU(c.leaky_slope),
            nn.Dropout(c.disc_dropout),
            nn.Linear(h, h),
            nn.LeakyReLU(c.leaky_slope),
            nn.Dropout(c.disc_dropout),
            nn.Linear(h, n_conditions),
        )

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        if not frozen:
            return self.net(z)
        weights = {k: v.detach() for k, v in self.net.named_parameters()}
        return torch.func.functional_call(self.net, weights, (z,))


def add_self_loops(edge_index: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """``edge_index`` ``[2, E]`` (source, target) without its self loops, then one loop per
    node (PyTorch Geometric's ``remove_self_loops`` + ``add_self_loops``).

    >>> add_self_loops(torch.tensor([[0, 1], [1, 1]]), 2).tolist()
    [[0, 0, 1], [1, 0, 1]]
    """
    edge_index = torch.as_tensor(edge_index).long().reshape(2, -1)
    keep = edge_index[:, edge_index[0] != edge_index[1]]
    loops = torch.arange(n_nodes, device=edge_index.device).repeat(2, 1)
    return torch.cat([keep, loops], dim=1)


def _glorot_(t: torch.Tensor) -> None:
    # PyTorch Geometric's glorot: uniform ±sqrt(6 / (size(-2) + size(-1))).
    bound = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
    with torch.no_grad():
        t.uniform_(-bound, bound)


class GATv2(nn.Module):
    """GATv2 over a fixed graph with ``GATv2Conv``'s semantics (heads concatenated).

    For an edge j → i: ``e = aᵀ LeakyReLU(lin_l x_j + lin_r x_i)`` per head, softmax over the
    in-edges of i with the group maximum subtracted (detached) and 1e-16 added to the sum,
    dropout on the attention (training only), ``Σ_j α_ij lin_l x_j``, heads concatenated, plus
    ``bias``. :meth:`forward` adds the self loops itself. Initialised as ``GATv2Conv``: glorot
    weights and ``att``, ``Linear`` biases uniform ±1/√in, ``bias`` zero.
    """

    def __init__(self, n_in: int, n_out: int, heads: int, dropout: float, slope: float):
        super().__init__()
        self.heads, self.n_out, self.dropout, self.slope = heads, n_out, dropout, slope
        self.lin_l = nn.Linear(n_in, heads * n_out)
        self.lin_r = nn.Linear(n_in, heads * n_out)
        self.att = nn.Parameter(torch.empty(1, heads, n_out))
        self.bias = nn.Parameter(torch.zeros(heads * n_out))
        bound = 1.0 / math.sqrt(n_in)
        for lin in (self.lin_l, self.lin_r):
            _glorot_(lin.weight)
            nn.init.uniform_(lin.bias, -bound, bound)
        _glorot_(self.att)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        src, dst = add_self_loops(edge_index, n)
        x_l = self.lin_l(x).view(n, self.heads, self.n_out)
        x_r = self.lin_r(x).view(n, self.heads, self.n_out)
        e = F.leaky_relu(x_l[src] + x_r[dst], self.slope)
        logits = (e * self.att).sum(dim=-1)  # [E, heads]
        top = logits.new_full((n, self.heads), -math.inf)
        top = top.scatter_reduce(0, dst[:, None].expand_as(logits), logits.detach(), "amax",
                                 include_self=False)  # fmt: skip
        w = torch.exp(logits - top[dst])
        total = w.new_zeros(n, self.heads).index_add(0, dst, w) + SOFTMAX_EPS
        alpha = F.dropout(w / total[dst], p=self.dropout, training=self.training)
        out = x_l.new_zeros(n, self.heads, self.n_out).index_add(
            0, dst, alpha[..., None] * x_l[src]
        )
        return out.reshape(n, self.heads * self.n_out) + self.bias


class CorrectedGNNVectorField(nn.Module):
    """``v(t, z, c)``: gene embeddings → GATv2 → cross-attention from z onto the genes (scores
    scaled by 1/√(query size)) → MLP on ``[z, context, time embedding, condition embedding]``.

    ``edge_index`` is the raw gene graph (the original's buffer); the GATv2 adds the loops.
    """

    def __init__(self, n_genes: int, n_conditions: int, gene_graph: Any, config: GenoFlowConfig):
        super().__init__()
        c = config
        width = c.gene_dim * c.gat_heads
        self.n_conditions = n_conditions
        self.gene_embeddings = nn.Parameter(torch.empty(n_genes, c.gene_dim))
        nn.init.xavier_uniform_(self.gene_embeddings)
        self.gat = GATv2(c.gene_dim, c.gene_dim, c.gat_heads, c.gat_dropout, c.leaky_slope)
        self.query_proj = nn.Linear(c.latent_dim, width)
        self.time_mlp = nn.Sequential(
            nn.Linear(1, c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim)
        )
        self.cond_mlp = nn.Linear(n_conditions, c.cond_dim)
        self.final_mlp = nn.Sequential(
            nn.Linear(c.latent_dim + width + c.time_dim + c.cond_dim, c.hidden_flow),
            nn.SiLU(),
            nn.Dropout(c.flow_dropout),
            nn.Linear(c.hidden_flow, c.latent_dim),
        )
        edges = torch.as_tensor(np.asarray(gene_graph, np.int64)).reshape(2, -1)
        if edges.numel() and (edges.min() < 0 or edges.max() >= n_genes):
            raise ValueError(f"gene graph has a node index outside [0, {n_genes})")
        self.register_buffer("edge_index", edges)

    def gene_features(self) -> torch.Tensor:
        """GATv2 features of every gene ``[G, gene_dim · heads]``."""
        return self.gat(self.gene_embeddings, self.edge_index)

    def forward(self, t: torch.Tensor, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Velocity ``[n, latent]`` at times ``t`` (``[n]`` or a scalar)."""
        genes = self.gene_features()
        q = self.query_proj(z)
        scores = q @ genes.T / math.sqrt(q.shape[-1])
        context = torch.softmax(scores, dim=-1) @ genes
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0])[:, None]
        t_emb = self.time_mlp(t)
        c_emb = self.cond_mlp(one_hot(condition, self.n_conditions).to(z))
        return self.final_mlp(torch.cat([z, context, t_emb, c_emb], dim=-1))


# ------------------------------------------------------------------------ losses
def nb_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, kind: str
) -> torch.Tensor:
    """Per-entry NB log-likelihood: ``"safe"`` the plain lgamma form (``x·log μ`` as
    ``xlogy``, so 0 at ``x = μ = 0``) or ``"original"`` (1e-8 inside every log and log-gamma,
    a non-finite entry becomes 0).

    >>> x, m, t = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([5.0])
    >>> a, b = nb_log_likelihood(x, m, t, "safe"), nb_log_likelihood(x, m, t, "original")
    >>> bool((a - b).abs()[0] < 1e-5)
    True
    """
    if kind == "safe":
        log_tm = torch.log(theta + mean)
        return (
            torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1.0)
            + theta * (torch.log(theta) - log_tm)
            + torch.xlogy(x, mean)
            - x * log_tm
        )
    if kind != "original":
        raise ValueError(f"unknown nb {kind!r}")
    log_tm = torch.log(theta + mean + NB_EPS)
    log_p = (
        torch.lgamma(x + theta + NB_EPS)
        - torch.lgamma(theta + NB_EPS)
        - torch.lgamma(x + 1.0 + NB_EPS)
        + theta * (torch.log(theta + NB_EPS) - log_tm)
        + x * (torch.log(mean + NB_EPS) - log_tm)
    )
    return _finite_or_zero(log_p)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, kind: str) -> torch.Tensor:
    """The KL term of the loss (mean over cells of the sum over latent dimensions):
    ``"safe"`` ½Σ(μ² + eᵛ − 1 − v) (``expm1``), ``"clamp"`` the original's (``v ≤ 20``,
    ``|μ| ≤ 100``, a non-finite cell and a non-finite mean become 0).

    >>> float(kl_divergence(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), "safe"))
    0.5
    """
    if kind == "safe":
        return (0.5 * (mu.pow(2) + torch.expm1(logvar) - logvar).sum(dim=-1)).mean()
    if kind != "clamp":
        raise ValueError(f"unknown kl {kind!r}")
    lv = torch.clamp(logvar, max=KL_LOGVAR_MAX)
    m = torch.clamp(mu, -KL_MU_MAX, KL_MU_MAX)
    per_cell = _finite_or_zero(-0.5 * (1.0 + lv - m.pow(2) - lv.exp()).sum(dim=-1))
    return _finite_or_zero(per_cell.mean())


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# ------------------------------------------------------------------------ model
class GenoFlowModel(nn.Module):
    """The two-stage model: ``encoder``, ``decoder``, ``discriminator``, ``vector_field``.

    Args:
      n_genes, n_conditions: data sizes.
      gene_graph: ``[2, E]`` edges (source gene, target gene), stored raw as
        ``vector_field.edge_index``.
      config: a :class:`GenoFlowConfig` (default ``GenoFlowConfig.default()``); ``overrides``
        replace its fields.
      time_points: the data's time points, ascending (default ``(0, 1)``), for
        :meth:`flow_times`.
    """

    def __init__(
        self,
        n_genes: int,
        n_conditions: int,
        gene_graph: Any,
        config: GenoFlowConfig | None = None,
        time_points: Sequence[float] | None = None,
        **overrides: Any,
    ):
        super().__init__()
        c = (GenoFlowConfig.default() if config is None else config).replace(**overrides)
        self.config = c
        self.n_genes, self.n_conditions = n_genes, n_conditions
        times = (0.0, 1.0) if time_points is None else tuple(float(t) for t in time_points)
        if len(times) < 2 or any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError(f"time_points must be >= 2 ascending values, got {times}")
        self.time_points = times
        self.encoder = CausalEncoder(n_genes, n_conditions, c)
        self.decoder = NBDecoder(n_genes, n_conditions, c)
        self.vector_field = CorrectedGNNVectorField(n_genes, n_conditions, gene_graph, c)
        self.discriminator = TissueDiscriminator(n_conditions, c)

    def flow_times(self) -> tuple[float, ...]:
        """Flow time of each time point: normalised real times (``"global"``) or ``0, 1, ...``
        (``"interval"``), as ``GenoFlow.flow_times``."""
        t = self.time_points
        if self.config.flow_time == "interval":
            return tuple(float(k) for k in range(len(t)))
        return tuple((x - t[0]) / (t[-1] - t[0]) for x in t)

    def velocity(self, tau: Any, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The velocity at flow time ``tau``; with ``"interval"`` the vector field reads
        ``tau − k`` on ``(k, k + 1]``."""
        tau = torch.as_tensor(tau, dtype=z.dtype, device=z.device)
        if self.config.flow_time == "interval":
            tau = tau - torch.clamp(torch.ceil(tau) - 1, 0, len(self.time_points) - 2)
        return self.vector_field(tau, z, condition)

    def encode_mean(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Posterior mean of counts ``x`` (``log1p`` applied here)."""
        return self.encoder(torch.log1p(x), condition)[0]

    def vae_objective(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        library: torch.Tensor,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """The VAE's own loss ``recon + β·KL − λ·H(D_frozen(z))`` (the original's
        ``vae_forward``), its terms and the sample ``z``; ``eps`` defaults to fresh
        ``randn``."""
        c = self.config
        condition = torch.as_tensor(condition).long()
        mu, logvar = self.encoder(torch.log1p(x), condition)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + eps * torch.exp(0.5 * logvar)
        mean, theta = self.decoder(z, condition, library)
        theta = torch.clamp(theta, *c.theta_bounds)
        ll = nb_log_likelihood(x, mean, theta[None], c.nb)
        recon = -(ll.sum(-1) if c.recon == "gene_sum" else ll).mean()
        if c.nb == "original":
            recon = _finite_or_zero(recon)
        kl = kl_divergence(mu, logvar, c.kl)
        total = recon + c.beta * kl
        if c.lambda_adv:
            total = total - c.lambda_adv * _entropy(self.discriminator(z, frozen=True)).mean()
        return total, {"recon": recon, "kl": kl, "vae_total": total}, z

    def vae_terms(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        library: torch.Tensor,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage ``vae``'s loss as ``jaxstab.models.genoflow.losses.vae_terms``:
        ``recon + β·KL − λ·H(D_frozen(z)) + CE(D(z.detach()), c)``; aux ``recon``, ``kl``,
        ``vae_total``, ``disc_ce``."""
        total, aux, z = self.vae_objective(x, condition, library, eps)
        condition = torch.as_tensor(condition).long()
        disc_ce = F.cross_entropy(self.discriminator(z.detach()), condition)
        return total + disc_ce, {**aux, "disc_ce": disc_ce}

    def flow_terms(
        self,
        z0: torch.Tensor,
        z1: torch.Tensor,
        condition: torch.Tensor,
        tau0: torch.Tensor,
        tau1: torch.Tensor,
        t: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow matching on pairs as ``losses.flow_terms``: ``z_t = z0 + t (z1 − z0)`` at flow
        time ``tau0 + t (tau1 − tau0)``, target ``(z1 − z0) / (tau1 − tau0)``, mean squared
        error."""
        span = (tau1 - tau0)[:, None]
        z_t = z0 + t[:, None] * (z1 - z0)
        if self.config.flow_time == "interval":
            v = self.vector_field(t, z_t, condition)
        else:
            v = self.velocity(tau0 + t * (tau1 - tau0), z_t, condition)
        loss = ((v - (z1 - z0) / span) ** 2).mean()
        return loss, {"fm": loss}


# ------------------------------------------------------------------------ conversion
_INDEXED = re.compile(r"(.+)_(\d+)")
_LEAVES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def nnx_name(path: tuple) -> str:
    """The state-dict key of the Flax ``GenoFlow`` variable at ``path``.

    A module name ending in ``_<i>`` is the original's ``nn.Sequential`` index ``.<i>``; a
    Linear ``kernel`` and a BatchNorm ``scale`` are ``weight``, BatchNorm's ``mean`` and
    ``var`` are ``running_mean`` and ``running_var``.

    >>> nnx_name(("vector_field", "final_mlp_3", "kernel"))
    'vector_field.final_mlp.3.weight'
    >>> nnx_name(("vector_field", "gat", "lin_l", "bias"))
    'vector_field.gat.lin_l.bias'
    """
    parts = [str(p) for p in path]
    parts[-1] = _LEAVES.get(parts[-1], parts[-1])
    for i, p in enumerate(parts[:-1]):
        m = _INDEXED.fullmatch(p)
        if m:
            parts[i] = f"{m[1]}.{m[2]}"
    return ".".join(parts)


def optional_key(key: str) -> bool:
    """State-dict entries with no NNX counterpart: BatchNorm's ``num_batches_tracked`` and the
    raw graph ``vector_field.edge_index`` (the port holds the graph with its self loops; see
    :func:`torch_state_dict_to_nnx`).

    >>> optional_key("encoder.fc.1.num_batches_tracked"), optional_key("encoder.fc.1.weight")
    (True, False)
    """
    return key.endswith(".num_batches_tracked") or key == "vector_field.edge_index"


def _edge_set(edges: np.ndarray) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in np.asarray(edges).reshape(2, -1).T}


def torch_state_dict_to_nnx(state_dict: Mapping[str, Any], model: nnx.Module) -> nnx.Module:
    """Copies a :class:`GenoFlowModel` (or original ``CausalGenoFlow``) state dict onto the Flax
    ``GenoFlow`` ``model`` in place, BatchNorm running statistics included; returns ``model``.

    :func:`benchmarks.convert.state_dict_to_nnx` on the ``Param`` and ``BatchStat`` state with
    :func:`nnx_name`; every other key must map (``num_batches_tracked`` may go unused). The
    buffer ``vector_field.edge_index``, when present, must be the port's graph: its edges plus
    one loop per gene are the edge set of ``model.vector_field.edge_index`` (``ValueError``
    otherwise).
    """
    graph = state_dict.get("vector_field.edge_index")
    if graph is not None:
        from jaxstab.models.genoflow.model import with_self_loops

        raw = graph.detach().cpu().numpy() if hasattr(graph, "detach") else np.asarray(graph)
        ours = _edge_set(np.asarray(model.vector_field.edge_index[...]))
        if _edge_set(with_self_loops(raw, model.n_genes)) != ours:
            raise ValueError("vector_field.edge_index: not the port's gene graph")
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.update(model, convert.state_dict_to_nnx(state_dict, state, nnx_name, optional=optional_key))
    return model


# ------------------------------------------------------------------------ OT pairing
def _zscore(x: np.ndarray, ddof: int) -> np.ndarray:
    n = x.shape[0]
    if n <= ddof:
        return np.zeros_like(x)
    std = np.maximum(x.std(axis=0, ddof=ddof), STD_FLOOR)
    return (x - x.mean(axis=0)) / std


def pair_by_pot(
    source: np.ndarray,
    target: np.ndarray,
    *,
    epsilon: float = 0.01,
    cost: str = "euclidean",
    zscore: bool = True,
    ddof: int = 1,
    num_iter_max: int = 20_000,
    stop_thr: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray]:
    """``(plan [n, m], target index [n])``: POT's log-domain Sinkhorn between the two sets
    (uniform weights, ``ot.dist`` cost, absolute ``epsilon``), each z-scored per dimension
    with ``ddof`` (std floored at 1e-8, the original's), and the row argmax of the plan.

    >>> x = np.array([[0.0, 0.7], [1.0, 0.7], [3.0, 0.7]])
    >>> plan, tgt = pair_by_pot(x, x[::-1] + 0.1, epsilon=0.001)
    >>> tgt.tolist(), round(float(plan.sum()), 4)
    ([2, 1, 0], 1.0)
    """
    a, b = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if zscore:
        a, b = _zscore(a, ddof), _zscore(b, ddof)
    if cost not in ("euclidean", "sqeuclidean"):
        raise ValueError(f"cost must be 'euclidean' or 'sqeuclidean', got {cost!r}")
    m = ot.dist(a, b, metric=cost)
    plan = ot.sinkhorn(ot.unif(len(a)), ot.unif(len(b)), m, epsilon, method="sinkhorn_log",
                       numItermax=num_iter_max, stopThr=stop_thr, warn=False)  # fmt: skip
    return plan, np.argmax(plan, axis=1).astype(np.int32)


def pair_time_points_pot(
    latent: np.ndarray,
    time: np.ndarray,
    n_time_points: int,
    epsilon: float = 0.01,
    cost: str = "euclidean",
    ddof: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(source_index, target_index, interval)`` as ``pairing.pair_time_points``: each cell of
    time ``k < last`` paired with its :func:`pair_by_pot` partner at ``k + 1`` (global row
    indices, intervals in order, rows in order within each)."""
    latent, time = np.asarray(latent), np.asarray(time)
    rows = [np.flatnonzero(time == k) for k in range(n_time_points)]
    for k, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"time point {k} has no cells")
    out: tuple[list, list, list] = ([], [], [])
    for k in range(n_time_points - 1):
        a, b = rows[k], rows[k + 1]
        _, tgt = pair_by_pot(latent[a], latent[b], epsilon=epsilon, cost=cost, ddof=ddof)
        for part, value in zip(out, (a, b[tgt], np.full(a.size, k)), strict=True):
            part.append(value)
    return tuple(np.concatenate(v).astype(np.int32) for v in out)


def _encode_means(model: GenoFlowModel, x: Any, condition: Any) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        z = model.encode_mean(
            torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(condition))
        )
    model.train(was_training)
    return z


def flow_pairs_torch(
    model: GenoFlowModel, arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Stage 2's data as ``train.flow_pairs``: latent means (eval mode), POT pairs, flow times
    (``z0``, ``z1``, ``condition``, ``tau0``, ``tau1``, ``source``, ``target``)."""
    c = model.config
    latent = _encode_means(model, arrays["x"], arrays["condition"]).numpy()
    src, tgt, k = pair_time_points_pot(
        latent, np.asarray(arrays["time"]), len(model.time_points),
        epsilon=c.ot_epsilon, cost=c.ot_cost, ddof=c.ot_ddof,
    )  # fmt: skip
    tau = np.asarray(model.flow_times(), np.float32)
    return {"z0": latent[src], "z1": latent[tgt],
            "condition": np.asarray(arrays["condition"])[src].astype(np.int32),
            "tau0": tau[k], "tau1": tau[k + 1], "source": src, "target": tgt}  # fmt: skip


# ------------------------------------------------------------------------ trajectories
def integrate_latent_torch(
    model: GenoFlowModel,
    z0: torch.Tensor,
    condition: torch.Tensor,
    times: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> torch.Tensor:
    """``dz/dτ = model.velocity(τ, z, c)`` from ``z0`` at ``times[0]`` with torchdiffeq's
    ``dopri5`` (the original's ``ODEIntegrator``): z at every time ``[len(times), n, latent]``.
    ``model`` should be in eval mode.

    With ``flow_time="interval"`` the vector field's time input jumps from 1 back to 0 at every
    interior time point ``τ = 1, 2, ...``; those are passed as ``jump_t``, so no step straddles
    a jump (without them the adaptive steps cross it and the global error grows from about
    1e-6 to about 1e-3 relative at rtol 1e-5).
    """
    c = model.config
    condition = torch.as_tensor(condition).long()
    times = torch.as_tensor(times, dtype=z0.dtype)

    def field(tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return model.velocity(tau, z, condition)

    options = {}
    if c.flow_time == "interval":
        lo, hi = float(times.min()), float(times.max())
        jumps = [float(k) for k in range(1, len(model.time_points) - 1) if lo < k < hi]
        if jumps:
            options["jump_t"] = torch.tensor(jumps, dtype=times.dtype)
    return odeint(field, z0, times, method="dopri5", options=options or None,
                  rtol=c.rtol if rtol is None else rtol,
                  atol=c.atol if atol is None else atol)  # fmt: skip


def simulate_trajectory_torch(
    model: GenoFlowModel,
    x0: Any,
    condition: Any,
    n_save: int = 100,
    rtol: float | None = None,
    atol: float | None = None,
    library_size: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latent [n_save, n, L], expression [n_save, n, G], times [n_save])`` as
    ``trajectory.simulate_trajectory``: counts ``x0`` encoded to their means (eval mode),
    integrated over the flow times of the first to the last time point
    (:func:`integrate_latent_torch`), decoded at ``library_size`` (default the config's).
    ``condition``: one code or one per cell. No gradients."""
    x0 = torch.as_tensor(np.asarray(x0, np.float32))
    n = x0.shape[0]
    codes = torch.as_tensor(np.broadcast_to(np.asarray(condition), (n,)).copy()).long()
    ft = model.flow_times()
    times = torch.linspace(ft[0], ft[-1], n_save)
    lib = model.config.library_size if library_size is None else float(library_size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        z0 = model.encode_mean(x0, codes)
        latent = integrate_latent_torch(model, z0, codes, times, rtol=rtol, atol=atol)
        mean, _ = model.decoder(latent.reshape(n_save * n, -1), codes.repeat(n_save), lib)
    model.train(was_training)
    return latent, mean.reshape(n_save, n, -1), times


# ------------------------------------------------------------------------ training
def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    # One permutation per epoch, the last batch wrapping to the start (jaxstab.train.fit's rule).
    steps = math.ceil(n / batch_size)
    perm = torch.randperm(n, generator=gen)
    perm = perm.repeat(math.ceil(steps * batch_size / n))[: steps * batch_size]
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _history() -> dict[str, Any]:
    return {"loss": [], "epoch_seconds": [], "nonfinite_steps": [], "nonfinite_params": [],
            "grad_norms": []}  # fmt: skip


def _check_guards(guards: Collection[str]) -> set[str]:
    unknown = set(guards) - set(GUARDS)
    if unknown:
        raise ValueError(f"unknown guards {sorted(unknown)}; guards: {', '.join(GUARDS)}")
    return set(guards)


def _guarded_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    scan: nn.Module,
    *,
    guards: set[str],
    step: int,
    check_every: int,
    clip: float,
    history: dict[str, Any],
) -> bool:
    """zero_grad, backward, the guards, step. Returns whether the loss was finite."""
    finite = bool(torch.isfinite(loss))
    opt.zero_grad(set_to_none=True)
    if not finite and "skip_nonfinite" in guards:
        return False
    loss.backward()
    if "scan_gradients" in guards and check_every and step % check_every == 0:
        scan_gradients(scan, step, history)
    if "clip" in guards and clip:
        torch.nn.utils.clip_grad_norm_(params, max_norm=clip)
    opt.step()
    return finite


def train_stage1(
    model: GenoFlowModel,
    arrays: Mapping[str, np.ndarray],
    *,
    epochs: int,
    batch_size: int | None = None,
    lr: float | None = None,
    clip: float | None = None,
    seed: int = 0,
    compile: bool = False,
    guards: Collection[str] = GUARDS,
    check_every: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """Stage 1 (the VAE and its discriminator) as the original's ``phase1_train``.

    Per batch: (1) the discriminator step: the encoder under ``no_grad`` (train mode, so
    BatchNorm's running statistics move, as in the original) gives a fresh sample ``z``, the
    discriminator's cross-entropy on it is stepped by its own Adam(W) at
    ``lr · disc_lr_scale``; (2) the VAE step: :meth:`GenoFlowModel.vae_objective` (fresh noise,
    the discriminator read with frozen weights), stepped by the encoder + decoder's Adam(W)
    at ``lr``. Both take ``config.weight_decay`` (0: the original's Adam). ``guards``: see
    :data:`GUARDS` (the original has only ``"skip_nonfinite"``); ``clip`` defaults to
    ``config.grad_clip``, ``lr`` and ``batch_size`` to the config's.

    Batches: one ``torch.randperm`` per epoch from ``torch.Generator().manual_seed(seed)``, the
    last batch wrapping around (``jaxstab.train.fit``'s rule; ``torch.manual_seed(seed)``
    seeds noise and dropout). Returns ``{"loss": [VAE loss + discriminator cross-entropy per
    step, the port's stage loss], "vae_loss", "disc_loss", "epoch_seconds",
    "nonfinite_steps", "nonfinite_params", "grad_norms"}`` (the scans: one entry per
    optimizer at each checked step, discriminator first).
    """
    c = model.config
    guards = _check_guards(guards)
    batch_size = c.batch_size if batch_size is None else batch_size
    lr = c.lr if lr is None else lr
    clip = c.grad_clip if clip is None else clip
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    x = torch.as_tensor(np.asarray(arrays["x"], np.float32), device=device)
    cond = torch.as_tensor(np.asarray(arrays["condition"]), device=device).long()
    lib = torch.as_tensor(np.asarray(arrays["library"], np.float32), device=device)
    vae_params = [*model.encoder.parameters(), *model.decoder.parameters()]
    disc_params = list(model.discriminator.parameters())
    opt_vae = torch.optim.AdamW(vae_params, lr=lr, weight_decay=c.weight_decay)
    opt_disc = torch.optim.AdamW(disc_params, lr=lr * c.disc_lr_scale, weight_decay=c.weight_decay)

    def disc_loss(xb: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mu, logvar = model.encoder(torch.log1p(xb), cb)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return F.cross_entropy(model.discriminator(z), cb)

    def vae_loss(xb: torch.Tensor, cb: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return model.vae_objective(xb, cb, lb)[0]

    # Gradient scans name parameters by their full state-dict keys, one scan per optimizer.
    scan_disc = nn.ModuleDict({"discriminator": model.discriminator})
    scan_vae = nn.ModuleDict({"encoder": model.encoder, "decoder": model.decoder})
    disc_fn: Callable[..., torch.Tensor] = torch.compile(disc_loss) if compile else disc_loss
    vae_fn: Callable[..., torch.Tensor] = torch.compile(vae_loss) if compile else vae_loss
    history = {**_history(), "vae_loss": [], "disc_loss": []}
    kw = {"guards": guards, "check_every": check_every, "clip": clip, "history": history}
    step = 0
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in _batches(x.shape[0], batch_size, gen):
            idx = idx.to(device)
            xb, cb, lb = x[idx], cond[idx], lib[idx]
            d = disc_fn(xb, cb)
            ok_d = _guarded_step(d, opt_disc, disc_params, scan_disc, step=step, **kw)
            v = vae_fn(xb, cb, lb)
            ok_v = _guarded_step(v, opt_vae, vae_params, scan_vae, step=step, **kw)
            if not (ok_d and ok_v):
                history["nonfinite_steps"].append(step)
            history["disc_loss"].append(float(d.detach()))
            history["vae_loss"].append(float(v.detach()))
            history["loss"].append(history["vae_loss"][-1] + history["disc_loss"][-1])
            step += 1
        history["epoch_seconds"].append(time.perf_counter() - start)
    return history


def train_stage2(
    model: GenoFlowModel,
    pairs: Mapping[str, np.ndarray],
    *,
    epochs: int,
    batch_size: int | None = None,
    lr: float | None = None,
    clip: float | None = None,
    seed: int = 0,
    compile: bool = False,
    guards: Collection[str] = GUARDS,
    check_every: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """Stage 2 (the vector field on OT pairs) as the original's ``phase2_train``.

    ``pairs``: :func:`flow_pairs_torch`'s arrays (``z0``, ``z1``, ``condition``, ``tau0``,
    ``tau1``). Per batch: uniform times from the generator, :meth:`GenoFlowModel.flow_terms`
    in train mode (dropout on), the vector field's Adam(W) at ``lr``; batches, ``guards`` and
    the returned history as :func:`train_stage1` (``loss``: the flow-matching loss per step).
    """
    c = model.config
    guards = _check_guards(guards)
    batch_size = c.batch_size if batch_size is None else batch_size
    lr = c.lr if lr is None else lr
    clip = c.grad_clip if clip is None else clip
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    data = {k: torch.as_tensor(np.asarray(pairs[k]), device=device)
            for k in ("z0", "z1", "condition", "tau0", "tau1")}  # fmt: skip
    data["condition"] = data["condition"].long()
    params = list(model.vector_field.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=c.weight_decay)

    def flow_loss(b: Mapping[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return model.flow_terms(b["z0"], b["z1"], b["condition"], b["tau0"], b["tau1"], t)[0]

    loss_fn: Callable[..., torch.Tensor] = torch.compile(flow_loss) if compile else flow_loss
    scan = nn.ModuleDict({"vector_field": model.vector_field})
    history = _history()
    kw = {"guards": guards, "check_every": check_every, "clip": clip, "history": history}
    step = 0
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in _batches(data["z0"].shape[0], batch_size, gen):
            batch = {k: v[idx.to(device)] for k, v in data.items()}
            t = torch.rand(idx.shape[0], generator=gen).to(device)
            loss = loss_fn(batch, t)
            if not _guarded_step(loss, opt, params, scan, step=step, **kw):
                history["nonfinite_steps"].append(step)
            history["loss"].append(float(loss.detach()))
            step += 1
        history["epoch_seconds"].append(time.perf_counter() - start)
    return history
