"""The side-chain model's backbone feature graph in PyTorch, written from the description of
:mod:`jaxstab.models.sidechain.backbone_graph` (the original model's ``feature_graph``).

``BackboneGraph(c_s, c_z)(x [b, L, 4, 3], chain [b, L])`` → ``node [b, L, c_s]``,
``edge [b, L, L, c_z]``: internal-coordinate node features (20) and 2-mer atom distances
(1344), 2-mer atom directions in residue i's frame (192) and chain separation (3) on every
residue pair, each through its own ``nn.Linear``, summed and masked. As in the port, a
dihedral whose sign term is within ``PLANAR_TOL`` of 0 gives cos θ and sin 0, and ``arccos``
has slope 0 at ±1 (the port's module docstring says why). The module registers no buffers
(the RBF centres are built in the input's dtype), so its state dict is
``node_linears.0.{weight,bias}`` and ``edge_linears.{0,1,2}.{weight,bias}``.

Example:
  >>> import torch
  >>> graph = BackboneGraph(8, 4)
  >>> node, edge = graph(torch.ones(2, 5, 4, 3), torch.ones(2, 5, dtype=torch.long))
  >>> tuple(node.shape), tuple(edge.shape), sorted(graph.state_dict())[:2]
  ((2, 5, 8), (2, 5, 5, 4), ['edge_linears.0.bias', 'edge_linears.0.weight'])
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "EDGE_DIMS",
    "NODE_DIMS",
    "BackboneGraph",
    "edge_distances_2mer",
    "edge_distances_chain",
    "edge_orientations_2mer",
    "node_internal_coords",
]

IC_EPS = 1e-3
LOG_EPS = 0.01
DIST_EPS = 1e-3
ORIENT_EPS = 0.1
PLANAR_TOL = 1e-4  # |sign term| of a dihedral at most this: planar, its sine reads 0
RBF = (0.0, 20.0, 20)
NODE_DIMS = (20,)
EDGE_DIMS = (64 * (RBF[2] + 1), 3 * 64, 3)


def _normed(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps)


def _arccos(c: torch.Tensor) -> torch.Tensor:
    # acos of the clamped cosine, derivative 0 at ±1 (double where).
    c = c.clamp(-1.0, 1.0)
    inner = ~(c.abs() >= 1)
    edge = torch.where(c > 0, torch.zeros_like(c), torch.full_like(c, math.pi))
    return torch.where(inner, torch.acos(torch.where(inner, c, torch.zeros_like(c))), edge)


def _length(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(((b - a) ** 2).sum(-1) + IC_EPS)


def _angle_complement(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return math.pi - _arccos((_normed(a - b, IC_EPS) * _normed(c - b, IC_EPS)).sum(-1))


def _dihedral(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # |dihedral| and its sign, 0 within PLANAR_TOL of planar.
    u1, u2, u3 = _normed(b - a, IC_EPS), _normed(c - b, IC_EPS), _normed(d - c, IC_EPS)
    n1 = _normed(torch.cross(u1, u2, dim=-1), IC_EPS)
    n2 = _normed(torch.cross(u2, u3, dim=-1), IC_EPS)
    side = (u1 * n2).sum(-1)
    sign = torch.where(side.abs() <= PLANAR_TOL, torch.zeros_like(side), torch.sign(side))
    return _arccos((n1 * n2).sum(-1)), sign


def _next(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)


def _prev(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)


def node_internal_coords(x: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """``[b, L, 20]``: cos (8), sin (8) of 4 dihedrals and 4 angle complements, 4 log lengths.

    >>> x = torch.tensor([[1.46, 0, 0], [0, 0, 0], [-0.55, 1.42, 0], [-1.7, 1.9, 0]])
    >>> h = node_internal_coords(x.expand(1, 3, 4, 3), torch.tensor([[1, 1, 0]]))
    >>> tuple(h.shape), round(float(h[0, 0, 16].exp() - 0.01), 3), bool((h[0, 2] == 0).all())
    ((1, 3, 20), 1.46, True)
    """
    c = torch.where(chain > 0, chain, torch.zeros_like(chain))
    m = (chain > 0).to(x.dtype)
    n, ca, cc, o = x.unbind(-2)
    n1, ca1, c0 = _next(n), _next(ca), _prev(cc)
    nxt = (c == _next(c)).to(x.dtype) * m
    prv = (c == _prev(c)).to(x.dtype) * m
    quads = ((c0, n, ca, cc), (n, ca, cc, n1), (ca, cc, n1, ca1), (n1, ca, cc, o))
    theta, sign = (torch.stack(t, -1) for t in zip(*(_dihedral(*q) for q in quads), strict=True))
    ang = torch.stack(
        [_angle_complement(n, ca, cc), _angle_complement(ca, cc, n1),
         _angle_complement(cc, n1, ca1), _angle_complement(ca, cc, o)], -1,
    )  # fmt: skip
    lng = torch.stack([_length(n, ca), _length(ca, cc), _length(cc, n1), _length(cc, o)], -1)
    theta = theta * torch.stack([prv, nxt, nxt, nxt], -1)
    ang = ang * torch.stack([m, nxt, nxt, m], -1)
    lng = lng * torch.stack([m, m, nxt, m], -1)
    cos = torch.cat([torch.cos(theta), torch.cos(ang)], -1)
    sin = torch.cat([sign * torch.sin(theta), torch.sin(ang)], -1)
    h = torch.cat([cos, sin, torch.log(lng + LOG_EPS)], -1)
    return m[..., None] * h


def _pairs(x: torch.Tensor) -> torch.Tensor:
    # [b, L, A, 3] -> [b, L, L, 2A, 3]: atoms of residue i then of residue j.
    b, n, a, _ = x.shape
    return torch.cat([x[:, :, None].expand(b, n, n, a, 3), x[:, None].expand(b, n, n, a, 3)], -2)


def _pair_mask(chain: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = (chain > 0).to(dtype)
    return m[:, :, None, None] * m[:, None, :, None]


def edge_distances_2mer(x: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """``[b, L, L, 1344]``: the 64 atom-atom distances as 20 RBFs each, then their logs.

    >>> h = edge_distances_2mer(torch.zeros(1, 2, 4, 3), torch.ones(1, 2, dtype=torch.long))
    >>> tuple(h.shape), round(float(h[0, 0, 1, 0]), 4)
    ((1, 2, 2, 1344), 0.9991)
    """
    p = _pairs(x)
    diff = p[..., None, :, :] - p[..., :, None, :]
    d = torch.sqrt((diff * diff).sum(-1) + DIST_EPS).flatten(-2)
    lo, hi, count = RBF
    centres = torch.linspace(lo, hi, count, dtype=x.dtype, device=x.device)
    rbf = torch.exp(-(((d[..., None] - centres) / ((hi - lo) / (count - 1))) ** 2))
    return _pair_mask(chain, x.dtype) * torch.cat([rbf.flatten(-2), torch.log(d + LOG_EPS)], -1)


def edge_orientations_2mer(x: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """``[b, L, L, 192]``: the 64 smoothed atom-atom unit vectors in residue i's frame.

    >>> h = edge_orientations_2mer(torch.randn(1, 3, 4, 3), torch.ones(1, 3, dtype=torch.long))
    >>> tuple(h.shape), float(h[0, 1, 2, :3].abs().sum())  # an atom to itself: zero
    ((1, 3, 3, 192), 0.0)
    """
    p = _pairs(x)
    u = _normed(p[..., None, :, :] - p[..., :, None, :], ORIENT_EPS)
    n, ca, cc, _ = x.unbind(-2)
    e1 = _normed(n - ca, ORIENT_EPS)
    e2 = _normed(torch.cross(e1, _normed(cc - ca, ORIENT_EPS), dim=-1), ORIENT_EPS)
    e3 = _normed(torch.cross(e1, e2, dim=-1), ORIENT_EPS)
    local = torch.einsum("bijpqx,bixy->bijpqy", u, torch.stack([e1, e2, e3], -1))
    return _pair_mask(chain, x.dtype) * local.flatten(-3)


def edge_distances_chain(chain: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[b, L, L, 3]``: other chain (0/1), then ``log(|j-i|+1)`` and ``sign(j-i)`` if not.

    >>> edge_distances_chain(torch.tensor([[1, 1, 2]]), torch.float64)[0, 1].tolist()
    [[0.0, 0.6931471805599453, -1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    """
    other = (chain[:, :, None] != chain[:, None, :]).to(dtype)
    idx = torch.arange(chain.shape[1], device=chain.device)
    sep = (idx[None, :] - idx[:, None]).to(dtype)[None]
    same = 1.0 - other
    return torch.stack([other, same * torch.log(sep.abs() + 1.0), same * torch.sign(sep)], -1)


class BackboneGraph(nn.Module):
    """``node_linears`` (one ``Linear(20, c_s)``), ``edge_linears`` (``Linear(1344, c_z)``,
    ``Linear(192, c_z)``, ``Linear(3, c_z)``); outputs are zero on padded residues/pairs."""

    def __init__(self, c_s: int, c_z: int) -> None:
        super().__init__()
        self.node_linears = nn.ModuleList([nn.Linear(d, c_s) for d in NODE_DIMS])
        self.edge_linears = nn.ModuleList([nn.Linear(d, c_z) for d in EDGE_DIMS])

    def forward(self, x: torch.Tensor, chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = (chain > 0).to(x.dtype)
        node = self.node_linears[0](node_internal_coords(x, chain))
        feats = (edge_distances_2mer(x, chain), edge_orientations_2mer(x, chain),
                 edge_distances_chain(chain, x.dtype))  # fmt: skip
        edge = sum(lin(f) for lin, f in zip(self.edge_linears, feats, strict=True))
        return m[..., None] * node, _pair_mask(chain, x.dtype) * edge
