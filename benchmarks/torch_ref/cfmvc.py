"""CFM-VC in PyTorch, written from the same description as ``jaxstab.models.cfmvc``, with the guards
of the seed-002 version: ``eps``-protected NB log-likelihood with non-finite terms replaced by
``-1e6``, ``clip_grad_norm_`` and a per-parameter ``isfinite`` scan of the gradients every
``nan_check_interval`` batches.

It reads the same :class:`~jaxstab.models.cfmvc.config.CFMVCConfig` as the Flax port and implements
every choice in it (input transform, the three bounds, flow target, control encoding, alpha
gating), so parity is checked for ``CFMVCConfig.default()`` and ``CFMVCConfig.original()``.
:func:`torch_state_dict_to_nnx` copies weights onto the Flax model (the shared converter
:mod:`benchmarks.convert` with CFM-VC's name map :func:`nnx_name`).

Example:
  >>> import torch
  >>> from flax import nnx
  >>> from jaxstab.models.cfmvc import CFMVC, CFMVCConfig
  >>> torch_model = CFMVCModel(20, 2, 3, 4, CFMVCConfig.small())
  >>> model = CFMVC(20, 2, 3, 4, CFMVCConfig.small(), rngs=nnx.Rngs(0))
  >>> model = torch_state_dict_to_nnx(torch_model.state_dict(), model)
  >>> weight = torch_model.encoder.fc1.weight.detach().numpy()
  >>> bool((model.encoder.fc1.kernel[...] == weight.T).all())
  True
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from benchmarks import convert
from jaxstab.models.cfmvc.config import CFMVCConfig

EMB_DIM = 8
TIME_DIM = 16
SPATIAL_OUT = 16
EPS = 1e-8


def soft_clip(x: torch.Tensor, low: float, high: float, knee: float = 0.5) -> torch.Tensor:
    """Torch version of ``jaxstab.numerics.soft_clip`` (same formula)."""
    mid, half = 0.5 * (low + high), 0.5 * (high - low)
    z = (x - mid) / half
    a = z.abs()
    u = (a - knee) / (1.0 - knee)
    outer = mid + half * torch.sign(z) * (knee + (1.0 - knee) * u * torch.rsqrt(1.0 + u * u))
    return torch.where(a <= knee, x, outer)


class _StraightThroughClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, limit):
        return torch.clamp(x, -limit, limit)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def bound(x: torch.Tensor, limit: float, mode: str) -> torch.Tensor:
    """Torch version of ``jaxstab.models.cfmvc.model.bound``."""
    if mode == "soft":
        return soft_clip(x, -limit, limit)
    if mode == "straight_through":
        return _StraightThroughClamp.apply(x, limit)
    if mode == "clip":
        return torch.clamp(x, -limit, limit)
    if mode == "none":
        return x
    raise ValueError(f"unknown bound mode {mode!r}")


def _init_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)


class EncoderVAE(nn.Module):
    def __init__(self, n_genes, n_batch, n_ct, config: CFMVCConfig):
        super().__init__()
        c = self.config = config
        self.batch_emb = nn.Embedding(n_batch, EMB_DIM)
        self.ct_emb = nn.Embedding(n_ct, EMB_DIM)
        self.fc1 = nn.Linear(n_genes + 2 * EMB_DIM, c.hidden_vae)
        self.dropout1 = nn.Dropout(c.dropout)
        self.fc2 = nn.Linear(c.hidden_vae, c.hidden_vae)
        self.dropout2 = nn.Dropout(c.dropout)
        self.z_int_mean = nn.Linear(c.hidden_vae, c.dim_int)
        self.z_int_logvar = nn.Linear(c.hidden_vae, c.dim_int)
        self.z_tech_mean = nn.Linear(c.hidden_vae, c.dim_tech)
        self.z_tech_logvar = nn.Linear(c.hidden_vae, c.dim_tech)
        _init_linear(self)

    def forward(self, x, batch_idx, ct_idx):
        c = self.config
        x_in = torch.log1p(x) if c.input_transform == "log1p" else x
        h = torch.cat([x_in, self.batch_emb(batch_idx), self.ct_emb(ct_idx)], -1)
        h = self.dropout1(F.relu(self.fc1(h)))
        h = self.dropout2(F.relu(self.fc2(h)))
        return (
            self.z_int_mean(h),
            bound(self.z_int_logvar(h), c.logvar_limit, c.logvar_bound),
            self.z_tech_mean(h),
            bound(self.z_tech_logvar(h), c.logvar_limit, c.logvar_bound),
        )


class DecoderVAE(nn.Module):
    def __init__(self, n_genes, config: CFMVCConfig):
        super().__init__()
        c = self.config = config
        self.fc1 = nn.Linear(c.dim_int + c.dim_tech, c.hidden_vae)
        self.dropout1 = nn.Dropout(c.dropout)
        self.fc2 = nn.Linear(c.hidden_vae, c.hidden_vae)
        self.dropout2 = nn.Dropout(c.dropout)
        self.mean_out = nn.Linear(c.hidden_vae, n_genes)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
        _init_linear(self)

    def forward(self, z_int, z_tech):
        c = self.config
        h = torch.cat([z_int, z_tech], -1)
        h = self.dropout1(F.relu(self.fc1(h)))
        h = self.dropout2(F.relu(self.fc2(h)))
        mean = torch.exp(bound(self.mean_out(h), c.log_mean_limit, c.mean_bound))
        return mean, torch.exp(bound(self.log_theta, c.log_theta_limit, c.theta_bound))


def nb_log_likelihood(x, mean, theta, eps=EPS, exact=False):
    """Per-cell NB log-likelihood with the seed's eps guards; non-finite terms → -1e6.

    ``exact=True`` drops the guards (``nb_likelihood="exact"``; plain logs and lgamma)."""
    if exact:
        theta = theta.unsqueeze(0)
        log_tm = torch.log(theta + mean)
        log_p = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
                 + theta * (torch.log(theta) - log_tm)
                 + x * (torch.log(mean) - log_tm))  # fmt: skip
        return log_p.sum(-1)
    mean = torch.clamp(mean, min=eps)
    theta = torch.clamp(theta, min=eps).unsqueeze(0)
    log_theta_mean = torch.log(theta + mean + eps)
    log_p = (
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
        + theta * (torch.log(theta + eps) - log_theta_mean)
        + x * (torch.log(mean + eps) - log_theta_mean)
    )
    log_p = torch.where(torch.isfinite(log_p), log_p, torch.full_like(log_p, -1e6))
    return log_p.sum(-1)


def encode_perturbation(p: torch.Tensor, config: CFMVCConfig) -> torch.Tensor:
    """Torch version of ``jaxstab.models.cfmvc.model.encode_perturbation``."""
    if config.control_encoding == "zero":
        return p
    k = config.control_column
    control = 1.0 - p.sum(-1, keepdim=True)
    return torch.cat([p[:, :k], control, p[:, k:]], -1)


class ContextEncoder(nn.Module):
    def __init__(self, n_batch, n_ct, p_dim, config: CFMVCConfig, spatial_dim=None):
        super().__init__()
        c = self.config = config
        self.spatial_dim = spatial_dim
        self.batch_emb = nn.Embedding(n_batch, EMB_DIM)
        self.ct_emb = nn.Embedding(n_ct, EMB_DIM)
        if spatial_dim is not None:
            self.spatial_mlp = nn.Sequential(
                nn.Linear(spatial_dim, SPATIAL_OUT),
                nn.ReLU(),
                nn.Linear(SPATIAL_OUT, SPATIAL_OUT),
                nn.ReLU(),
            )
        width = p_dim + (1 if c.control_encoding == "column" else 0)
        dims = [width + EMB_DIM, c.hidden_ctx, c.hidden_ctx, c.hidden_ctx]
        self.pert_mlp_layers = nn.ModuleList(
            [nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(dims)]
        )
        self.context_dim = 2 * EMB_DIM + (SPATIAL_OUT if spatial_dim is not None else 0)
        self.alpha_dim = c.hidden_ctx
        _init_linear(self)

    def forward(self, p, batch_idx, ct_idx, spatial=None):
        ct_e = self.ct_emb(ct_idx)
        parts = [self.batch_emb(batch_idx), ct_e]
        if self.spatial_dim is not None:
            parts.append(self.spatial_mlp(spatial))
        if self.config.alpha_gating:  # control (p = 0) → zero input → alpha = 0
            ct_e = p.abs().amax(-1, keepdim=True) * ct_e
        h = torch.cat([encode_perturbation(p, self.config), ct_e], -1)
        for i, layer in enumerate(self.pert_mlp_layers):
            h = layer(h)
            if i < len(self.pert_mlp_layers) - 1:
                h = F.relu(h)
        return torch.cat(parts, -1), h


class FlowField(nn.Module):
    def __init__(self, dim_int, context_dim, alpha_dim, hidden, n_basis):
        super().__init__()
        self.dim_int, self.n_basis = dim_int, n_basis
        self.time_mlp = nn.Sequential(
            nn.Linear(1, TIME_DIM), nn.SiLU(), nn.Linear(TIME_DIM, TIME_DIM)
        )
        self.trunk = nn.Sequential(
            nn.Linear(dim_int + TIME_DIM + context_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
        )
        self.base_head = nn.Linear(hidden, dim_int)
        self.basis_head = nn.Linear(hidden, n_basis * dim_int)
        self.alpha_head = nn.Linear(alpha_dim, n_basis, bias=False)
        _init_linear(self)

    def forward(self, z_t, t, context, alpha):
        h = self.trunk(torch.cat([z_t, self.time_mlp(t.unsqueeze(-1)), context], -1))
        basis = self.basis_head(h).view(h.shape[0], self.n_basis, self.dim_int)
        coeff = self.alpha_head(alpha).unsqueeze(-1)
        return self.base_head(h) + (coeff * basis).sum(1)


class CFMVCModel(nn.Module):
    """The full model: ``encoder``, ``decoder``, ``context_encoder``, ``flow``.

    ``config`` defaults to ``CFMVCConfig.default()``; ``overrides`` replace its fields.
    """

    def __init__(self, n_genes, n_batch, n_ct, n_perts, config: CFMVCConfig | None = None, *,
                 spatial_dim=None, **overrides):  # fmt: skip
        super().__init__()
        c = (CFMVCConfig.default() if config is None else config).replace(**overrides)
        self.config = c
        self.dim_int, self.dim_tech = c.dim_int, c.dim_tech
        self.encoder = EncoderVAE(n_genes, n_batch, n_ct, c)
        self.decoder = DecoderVAE(n_genes, c)
        self.context_encoder = ContextEncoder(n_batch, n_ct, n_perts, c, spatial_dim)
        self.flow = FlowField(c.dim_int, self.context_encoder.context_dim,
                              self.context_encoder.alpha_dim, c.hidden_flow, c.n_basis)  # fmt: skip

    def vae_forward(self, x, batch_idx, ct_idx, eps_int=None, eps_tech=None, beta=None):
        """Returns ``(loss, nll, kl)``; the noise defaults to fresh ``randn``."""
        beta = self.config.beta if beta is None else beta
        mu_i, lv_i, mu_t, lv_t = self.encoder(x, batch_idx, ct_idx)
        eps_int = torch.randn_like(mu_i) if eps_int is None else eps_int
        eps_tech = torch.randn_like(mu_t) if eps_tech is None else eps_tech
        mean, theta = self.decoder(mu_i + eps_int * torch.exp(0.5 * lv_i),
                                   mu_t + eps_tech * torch.exp(0.5 * lv_t))  # fmt: skip
        exact = self.config.nb_likelihood == "exact"
        nll = -nb_log_likelihood(x, mean, theta, exact=exact).mean()
        kl = (-0.5 * (1.0 + lv_i - mu_i.pow(2) - lv_i.exp()).sum(-1)
              - 0.5 * (1.0 + lv_t - mu_t.pow(2) - lv_t.exp()).sum(-1)).mean()  # fmt: skip
        return nll + beta * kl, nll, kl

    def flow_step(self, x, p, batch_idx, ct_idx, z0, t, spatial=None, eps=None):
        """Flow-matching loss to the detached target (``config.flow_target``); ``(loss, v)``.

        ``"mean"``: the encoder mean with the encoder in eval mode; ``"sample"``: the posterior
        sample ``mean + eps · exp(logvar / 2)`` with the encoder in its current mode.
        """
        with torch.no_grad():
            if self.config.flow_target == "sample":
                mu, lv = self.encoder(x, batch_idx, ct_idx)[:2]
                z1 = mu + eps * torch.exp(0.5 * lv)
            else:
                was_training = self.encoder.training
                self.encoder.eval()
                z1 = self.encoder(x, batch_idx, ct_idx)[0]
                self.encoder.train(was_training)
        z1 = z1.detach()
        z_t = (1.0 - t).unsqueeze(-1) * z0 + t.unsqueeze(-1) * z1
        context, alpha = self.context_encoder(p, batch_idx, ct_idx, spatial)
        v = self.flow(z_t, t, context, alpha)
        return ((v - (z1 - z0)) ** 2).mean(), v


def nnx_name(path: tuple) -> str:
    """The state-dict key of the Flax ``CFMVC`` parameter at ``path`` (CFM-VC's name map).

    Names map one to one, ``nnx.Sequential``'s ``layers`` level dropped; a Linear ``kernel``
    and an Embedding ``embedding`` are PyTorch's ``weight``.

    >>> nnx_name(("context_encoder", "spatial_mlp", "layers", 2, "kernel"))
    'context_encoder.spatial_mlp.2.weight'
    """
    names = [str(k) for k in path if k != "layers"]
    if path[-1] in ("kernel", "embedding"):
        names[-1] = "weight"
    return ".".join(names)


def torch_state_dict_to_nnx(state_dict: Mapping[str, torch.Tensor], model: nnx.Module):
    """Copies a :class:`CFMVCModel` state dict onto the Flax ``CFMVC`` ``model`` (in place).

    :func:`benchmarks.convert.load_state_dict` with :func:`nnx_name`: a Linear ``weight``
    ``[out, in]`` becomes ``kernel [in, out]``, an Embedding ``weight`` becomes
    ``embedding``. Raises ``KeyError`` / ``ValueError`` for a missing, extra or mis-shaped
    entry. Returns ``model``.
    """
    return convert.load_state_dict(state_dict, model, nnx_name)


def torch_grads_to_nnx(torch_model: nn.Module, model: nnx.Module) -> dict:
    """The ``.grad`` of every ``torch_model`` parameter (0 where None), mapped onto the NNX
    parameter paths of ``model`` by :func:`torch_state_dict_to_nnx`: ``{path: Param}``.
    ``model`` itself is not changed."""
    grads = convert.state_dict_to_nnx(convert.torch_grads(torch_model), model, nnx_name)
    return dict(nnx.to_flat_state(grads))


def _check_grads(model: nn.Module, step: int) -> list[str]:
    """The seed's per-parameter finiteness scan (one host sync per parameter)."""
    bad = []
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.all(torch.isfinite(param.grad)):
            bad.append(f"{name}@{step}")
    return bad


def train_stage1(
    model: CFMVCModel,
    arrays: Mapping[str, np.ndarray],
    *,
    epochs: int,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    clip: float | None = None,
    nan_check_interval: int = 10,
    seed: int = 0,
    compile: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Stage-1 VAE training as in the seed: AdamW, clip, periodic NaN scan.

    Batches follow the same rule as ``jaxstab.train.fit`` (a permutation per epoch, the last
    batch wrapping around). Returns ``{"loss": [...], "epoch_seconds": [...], "nan": [...]}``.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    x = torch.as_tensor(arrays["x"], device=device)
    b = torch.as_tensor(arrays["batch"], dtype=torch.long, device=device)
    c = torch.as_tensor(arrays["cell_type"], dtype=torch.long, device=device)
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss_fn = torch.compile(model.vae_forward) if compile else model.vae_forward
    n = x.shape[0]
    steps = math.ceil(n / batch_size)
    history: dict[str, Any] = {"loss": [], "epoch_seconds": [], "nan": []}
    global_step = 0
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(device)
        perm = torch.cat([perm, perm[: steps * batch_size - n]])
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss, _, _ = loss_fn(x[idx], b[idx], c[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=clip)
            if global_step % nan_check_interval == 0:
                if not torch.isfinite(loss):
                    history["nan"].append(global_step)
                    break
                history["nan"].extend(_check_grads(model, global_step))
            opt.step()
            history["loss"].append(float(loss.detach()))
            global_step += 1
        history["epoch_seconds"].append(time.perf_counter() - start)
    return history
