"""The side-chain feature encoder in PyTorch, written from the description of
:mod:`jaxstab.models.sidechain.sidechain_encoder` (the original model's ``sidechain_head``).

Module names and ``nn.Sequential`` indices are the original's, so the state-dict keys are the
original ``SideAtomsFeatureHead``'s (``num_classes=0``): ``branchA_in.0.weight`` (Conv1d
``[hidden, 3, 1]``), ``branchA_blocks.<i>.{gn,conv1,conv2}.*``, ``branchB_in.0.*``
(LayerNorm), ``branchB_in.1.*`` (Linear), ``branchB_blocks.<i>.net.{0,3}.*``,
``branchB_blocks.<i>.norm.*``, ``fuse_in.*``, ``fuse_blocks.<i>.*``. The dropout slots are
``nn.Identity`` (eval mode); convolutions run channels-first, ``[n, C, A]``, as PyTorch's.
The Flax port's NNX paths map to these keys by
:func:`benchmarks.specs.sidechain_names.name_map`, with a Conv1d weight ``[out, in, k]``
stored ``[k, in, out]`` by NNX.

Example:
  >>> import torch
  >>> head = SideAtomsFeatureHead(8)
  >>> head(torch.ones(2, 5, 10, 3), torch.ones(2, 5, 10)).shape
  torch.Size([2, 5, 8])
  >>> sd = head.state_dict()
  >>> len(sd), tuple(sd["branchA_in.0.weight"].shape), "branchB_blocks.3.net.3.bias" in sd
  (80, (8, 3, 1), True)
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "POOL_EPS",
    "Conv1dResBlock",
    "MLPResBlock",
    "SideAtomsFeatureHead",
    "lecun_linear",
    "masked_avg_pool_1d",
]

POOL_EPS = 1e-8
_TRUNC_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]


def lecun_linear(n_in: int, n_out: int) -> nn.Linear:
    """A ``Linear`` with OpenFold's default init: bias 0, weights from a normal truncated
    at ±2σ, σ chosen so the variance is 1/n_in (σ = 0.1 / 0.8796 → bound 0.227 at n_in 100).

    >>> layer = lecun_linear(100, 1000)
    >>> w, b = layer.weight.detach(), layer.bias.detach()
    >>> float(b.abs().sum()), round(float(w.var()) * 100, 1), round(float(w.abs().max()), 2)
    (0.0, 1.0, 0.23)
    """
    layer = nn.Linear(n_in, n_out)
    std = math.sqrt(1.0 / n_in) / _TRUNC_STD
    with torch.no_grad():
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        layer.bias.zero_()
    return layer


def masked_avg_pool_1d(x: torch.Tensor, mask: torch.Tensor, eps: float = POOL_EPS) -> torch.Tensor:
    """``Σ x·m / max(Σ m, eps)`` over the last axis of ``x [n, C, A]``, ``mask [n, 1, A]``.

    >>> x = torch.tensor([[[1.0, 3.0, 100.0]]])
    >>> masked_avg_pool_1d(x, torch.tensor([[[1.0, 1.0, 0.0]]])).tolist()
    [[2.0]]
    """
    return (x * mask).sum(-1) / mask.sum(-1).clamp_min(eps)


class Conv1dResBlock(nn.Module):
    """``x + conv2(silu(conv1(gn(x))))``: GroupNorm with one group, two Conv1d (kernel 3,
    padding 1), PyTorch's default init.

    >>> Conv1dResBlock(4)(torch.ones(2, 4, 10)).shape
    torch.Size([2, 4, 10])
    """

    def __init__(self, ch: int, kernel: int = 3) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(1, ch)
        self.conv1 = nn.Conv1d(ch, ch, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(ch, ch, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [n, ch, A]`` → the same shape."""
        return x + self.conv2(nn.functional.silu(self.conv1(self.gn(x))))


class MLPResBlock(nn.Module):
    """``norm(x + net(x))``, ``net`` = Linear, SiLU, (dropout slot), Linear, (dropout slot),
    OpenFold's default init for both Linears.

    >>> MLPResBlock(4, 16)(torch.ones(2, 4)).shape
    torch.Size([2, 4])
    """

    def __init__(self, c: int, c_mid: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            lecun_linear(c, c_mid), nn.SiLU(), nn.Identity(), lecun_linear(c_mid, c),
            nn.Identity(),
        )  # fmt: skip
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``norm(x + net(x))``."""
        return self.norm(x + self.net(x))


class SideAtomsFeatureHead(nn.Module):
    """Side-chain atoms ``[b, L, A, 3]`` and their pool mask ``[b, L, A]`` → features
    ``[b, L, hidden]`` (the original's ``feat`` output in eval mode; no logits)."""

    def __init__(
        self,
        hidden: int,
        n_atoms: int = 10,
        conv_blocks: int = 4,
        mlp_blocks: int = 4,
        fuse_blocks: int = 4,
    ) -> None:
        super().__init__()
        self.hidden, self.n_atoms = hidden, n_atoms
        self.branchA_in = nn.Sequential(nn.Conv1d(3, hidden, 1), nn.SiLU())
        self.branchA_blocks = nn.ModuleList(Conv1dResBlock(hidden) for _ in range(conv_blocks))
        flat = 3 * n_atoms
        self.branchB_in = nn.Sequential(nn.LayerNorm(flat), nn.Linear(flat, hidden), nn.SiLU())
        self.branchB_blocks = nn.ModuleList(
            MLPResBlock(hidden, 4 * hidden) for _ in range(mlp_blocks)
        )
        self.fuse_in = nn.Linear(2 * hidden, hidden)
        self.fuse_blocks = nn.ModuleList(
            MLPResBlock(hidden, 4 * hidden) for _ in range(fuse_blocks)
        )

    def branch_a(self, x: torch.Tensor, atom_mask: torch.Tensor) -> torch.Tensor:
        """Conv stack over the atoms (channels first), masked mean → ``[b, L, hidden]``."""
        b, n, a, _ = x.shape
        h = self.branchA_in(x.reshape(b * n, a, 3).transpose(1, 2))
        for block in self.branchA_blocks:
            h = block(h)
        m = atom_mask.reshape(b * n, 1, a).to(h.dtype)
        return masked_avg_pool_1d(h, m).reshape(b, n, self.hidden)

    def branch_b(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened coordinates through the residual MLP → ``[b, L, hidden]``."""
        h = self.branchB_in(x.reshape(*x.shape[:-2], -1))
        for block in self.branchB_blocks:
            h = block(h)
        return h

    def forward(self, x: torch.Tensor, atom_mask: torch.Tensor) -> torch.Tensor:
        """``x [b, L, A, 3]``, ``atom_mask [b, L, A]`` → ``[b, L, hidden]``."""
        h = self.fuse_in(torch.cat([self.branch_a(x, atom_mask), self.branch_b(x)], dim=-1))
        for block in self.fuse_blocks:
            h = block(h)
        return h
