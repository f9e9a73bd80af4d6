"""The E3 GNN pocket encoder in PyTorch (e3nn), written from the same description as
``jaxstab.models.e3gnn``, with the training loop and guards of the original's training script.

It reads the same :class:`~jaxstab.models.e3gnn.config.E3GNNConfig` as the Flax port and
implements every choice in it: ``norm`` (``"equivariant"`` / ``"original"`` LayerNorm),
``weight_param`` (``"raw"`` / ``"exp_clamp"`` / ``"bounded"`` / ``"fixed"`` branch weights),
``use_layer_norm``, ``use_multi_hop``, ``use_nonbonded``, ``use_gate``, ``avg_num_neighbors``,
``dropout`` and every size. Modules are PyTorch e3nn's own (``o3.Linear``,
``o3.FullyConnectedTensorProduct``, ``e3nn.nn.Gate``), built in the original's order under the
original's names, so a state dict of :class:`E3GNNTorch` loads (``strict=True``) into the
original ``RNAPocketEncoderV2`` of the same sizes and back; at ``E3GNNConfig.original()`` the
two compute the same function.

Input is one flat graph in PyTorch Geometric's batching convention (:func:`batch_to_graph`
builds it from the padded per-molecule arrays of the data loader); nothing here needs
``torch_geometric``.

Example:
  >>> arrays = chain_arrays(3, 6, seed=0)
  >>> graph = batch_to_graph(arrays)
  >>> graph["x"].shape, graph["num_graphs"]
  (torch.Size([16, 3]), 3)
  >>> model = E3GNNTorch(E3GNNConfig.small()).eval()
  >>> model(graph).shape
  torch.Size([3, 1536])
  >>> {k: round(float(w), 3) for k, w in model.branch_weights().items()}
  {'angle': 0.333, 'dihedral': 0.333, 'nonbonded': 0.333}
  >>> out = train(model, arrays, epochs=1, batch_size=2, seed=0)
  >>> len(out["loss"]), out["first_nonfinite_step"]
  (2, None)
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn import Gate
from torch import nn

from benchmarks.torch_ref.guards import scan_gradients
from jaxstab.models.e3gnn.config import E3GNNConfig

__all__ = [
    "BRANCHES",
    "GRAPH_KEYS",
    "BesselBasis",
    "E3GNNTorch",
    "IrrepsLayerNorm",
    "MessageLayer",
    "PathBranch",
    "batch_to_graph",
    "bounded_positive",
    "chain_arrays",
    "cos_mse_loss",
    "cosine_loss",
    "infonce_loss",
    "loss",
    "mse_loss",
    "polynomial_cutoff",
    "train",
]

SH_IRREPS = "0e+1o+2e"
BRANCHES = ("angle", "dihedral", "nonbonded")
MIN_DISTANCE = 1e-6  # the original's floor on |r_ij| before dividing by it (message)
BESSEL_MIN_DISTANCE = 1e-8  # the original's floor inside BesselBasis
SOFTMAX_EPS = 1e-16  # torch_geometric.utils.softmax adds it to each group's sum
GRAPH_KEYS = ("x", "pos", "edge_index", "edge_attr", "triple_index", "triple_attr",
              "quadra_index", "quadra_attr", "nonbonded_edge_index", "nonbonded_edge_attr",
              "batch")  # fmt: skip


# --------------------------------------------------------------------------- data
def _edges(
    arrays: Mapping[str, np.ndarray], prefix: str, new_index: np.ndarray, n_slots: int
) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows of ``{prefix}_index`` (global node ids, ``[k, rows]``) and ``_attr``."""
    index = np.asarray(arrays[f"{prefix}_index"]).astype(np.int64)
    attr = np.asarray(arrays[f"{prefix}_attr"], np.float32)
    mask = np.asarray(arrays[f"{prefix}_mask"]).astype(bool)
    n, rows, _ = index.shape
    local = index[mask]  # [e, k]
    if local.size and (local.min() < 0 or local.max() >= n_slots):
        raise ValueError(f"{prefix}_index has an atom index outside [0, {n_slots})")
    molecule = np.broadcast_to(np.arange(n)[:, None], (n, rows))[mask]
    flat = new_index[molecule[:, None] * n_slots + local]  # [e, k]
    if (flat < 0).any():
        raise ValueError(f"a valid {prefix} row refers to a padded atom")
    return np.ascontiguousarray(flat.T), attr[mask].reshape(-1, attr.shape[-1])


def batch_to_graph(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """One flat graph (PyTorch Geometric's batching) from padded per-molecule arrays.

    ``arrays``: the loader's ``x``, ``pos`` ``[n, A, 3]``, ``atom_mask`` ``[n, A]``,
    ``bond_index`` ``[n, B, 2]`` (src, dst), ``bond_attr``, ``bond_mask``; ``angle_*``
    (``[n, T, 3]``: i, j, k with j the centre), ``torsion_*`` (``[n, Q, 4]``), ``nb_*``
    (``[n, P, 2]``). Padded atoms and rows (mask False) are dropped; molecule ``m``'s atoms get
    the global ids after those of molecules ``0 .. m-1``.

    Returns float32 ``x``, ``pos`` ``[N, 3]``; long ``edge_index`` ``[2, E]`` (row 0 the
    source, row 1 the destination), ``edge_attr`` ``[E, 2]``, ``triple_index`` ``[3, T]``,
    ``triple_attr``, ``quadra_index`` ``[4, Q]``, ``quadra_attr``, ``nonbonded_edge_index``
    ``[2, P]``, ``nonbonded_edge_attr`` (the loader's columns only; the model appends the
    distance), ``batch`` ``[N]`` and ``num_graphs``. A valid row naming a padded atom raises
    ``ValueError``.

    >>> g = batch_to_graph(chain_arrays(2, 4, seed=1))
    >>> g["batch"].tolist(), g["edge_index"][:, -2:].tolist()
    ([0, 0, 0, 0, 1, 1, 1, 1], [[6, 7], [5, 6]])
    """
    atom_mask = np.asarray(arrays["atom_mask"]).astype(bool)
    n, n_slots = atom_mask.shape
    flat_mask = atom_mask.reshape(-1)
    new_index = np.where(flat_mask, np.cumsum(flat_mask) - 1, -1)
    molecule = np.broadcast_to(np.arange(n)[:, None], atom_mask.shape)[atom_mask]
    graph: dict[str, Any] = {
        "x": torch.as_tensor(np.asarray(arrays["x"], np.float32)[atom_mask]),
        "pos": torch.as_tensor(np.asarray(arrays["pos"], np.float32)[atom_mask]),
        "batch": torch.as_tensor(molecule.astype(np.int64)),
        "num_graphs": int(n),
    }
    for prefix, index_key, attr_key in (
        ("bond", "edge_index", "edge_attr"),
        ("angle", "triple_index", "triple_attr"),
        ("torsion", "quadra_index", "quadra_attr"),
        ("nb", "nonbonded_edge_index", "nonbonded_edge_attr"),
    ):
        if f"{prefix}_index" not in arrays:
            continue
        index, attr = _edges(arrays, prefix, new_index, n_slots)
        graph[index_key] = torch.as_tensor(index)
        graph[attr_key] = torch.as_tensor(attr)
    return graph


def chain_arrays(
    n_molecules: int, n_atoms: int, *, seed: int = 0, output_dim: int = 1536
) -> dict[str, np.ndarray]:
    """Synthetic padded arrays in the loader's layout: chains of 3 (or fewer) .. ``n_atoms`` atoms.

    Bonds in both directions, angles ``(a, a+1, a+2)``, torsions ``(a, .., a+3)``, non-bonded
    pairs ``|a - b| >= 3`` in both directions; positions a random walk of 1.5 Å steps; random
    features, attributes and unit-norm targets. Padded rows carry garbage indices (they must be
    dropped by their masks).

    >>> a = chain_arrays(2, 5, seed=0)
    >>> a["x"].shape, a["bond_index"].shape, a["torsion_index"].shape
    ((2, 5, 3), (2, 8, 2), (2, 2, 4))
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(min(3, n_atoms), n_atoms + 1, size=n_molecules)
    sizes[0] = n_atoms
    b_rows, t_rows, q_rows = 2 * (n_atoms - 1), max(n_atoms - 2, 1), max(n_atoms - 3, 1)
    p_rows = max(2 * sum(1 for a, b in itertools.combinations(range(n_atoms), 2) if b - a >= 3), 1)
    out: dict[str, np.ndarray] = {
        "x": rng.normal(size=(n_molecules, n_atoms, 3)).astype(np.float32),
        "pos": np.zeros((n_molecules, n_atoms, 3), np.float32),
        "atom_mask": np.zeros((n_molecules, n_atoms), bool),
        "target": rng.normal(size=(n_molecules, output_dim)).astype(np.float32),
    }
    out["target"] /= np.linalg.norm(out["target"], axis=-1, keepdims=True)
    shapes = {"bond": (b_rows, 2, 2), "angle": (t_rows, 3, 2), "torsion": (q_rows, 4, 3),
              "nb": (p_rows, 2, 2)}  # fmt: skip
    for name, (rows, k, d) in shapes.items():
        out[f"{name}_index"] = rng.integers(0, n_atoms, size=(n_molecules, rows, k)).astype(
            np.int32
        )
        out[f"{name}_attr"] = rng.uniform(0.1, 1.0, size=(n_molecules, rows, d)).astype(np.float32)
        out[f"{name}_mask"] = np.zeros((n_molecules, rows), bool)
    for m, size in enumerate(int(s) for s in sizes):
        steps = rng.normal(size=(size, 3))
        steps *= 1.5 / np.linalg.norm(steps, axis=-1, keepdims=True)
        out["pos"][m, :size] = np.cumsum(steps, axis=0)
        out["x"][m, size:] = 0.0
        out["atom_mask"][m, :size] = True
        rows = {
            "bond": [(a, a + 1) for a in range(size - 1)] + [(a + 1, a) for a in range(size - 1)],
            "angle": [(a, a + 1, a + 2) for a in range(size - 2)],
            "torsion": [(a, a + 1, a + 2, a + 3) for a in range(size - 3)],
            "nb": [p for a, b in itertools.combinations(range(size), 2) if b - a >= 3
                   for p in ((a, b), (b, a))],
        }  # fmt: skip
        for name, idx in rows.items():
            if idx:
                out[f"{name}_index"][m, : len(idx)] = np.asarray(idx, np.int32)
                out[f"{name}_mask"][m, : len(idx)] = True
    return out


# ------------------------------------------------------------------ building blocks
def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear, SiLU, Linear, SiLU, ..., Linear (parameters at indices 0, 2, 4, ...)."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        if k:
            layers.append(nn.SiLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _scalar_dim(irreps: o3.Irreps) -> int:
    return sum(mul for mul, ir in irreps if ir.l == 0)


def _blocks(irreps: o3.Irreps) -> list[tuple[int, int, int]]:
    """``(start, mul, l)`` of each block of ``irreps`` (e3nn's mul_ir layout)."""
    out, start = [], 0
    for mul, ir in irreps:
        out.append((start, mul, ir.l))
        start += mul * ir.dim
    return out


class BesselBasis(nn.Module):
    """``sqrt(2 / r_max) · sin(f_n d / r_max) / d``, ``f_n = n π`` (buffer ``frequencies``),
    ``d`` floored at 1e-8; ``d`` ``[E, 1]`` or ``[E]`` → ``[E, num_basis]``.

    >>> BesselBasis(6.0, 4)(torch.tensor([1.0])).shape
    torch.Size([1, 4])
    """

    def __init__(self, r_max: float, num_basis: int):
        super().__init__()
        self.r_max = float(r_max)
        self.register_buffer("frequencies", torch.linspace(1.0, num_basis, num_basis) * math.pi)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        d = d.unsqueeze(-1) if d.dim() == 1 else d
        d = torch.clamp(d, min=BESSEL_MIN_DISTANCE)
        return math.sqrt(2.0 / self.r_max) * torch.sin(self.frequencies * d / self.r_max) / d


def polynomial_cutoff(d: torch.Tensor, r_max: float, p: float) -> torch.Tensor:
    """``1 − (p+1)(p+2)/2 u^p + p(p+2) u^(p+1) − p(p+1)/2 u^(p+2)``, ``u = d / r_max``; 0 for
    ``u ≥ 1``.

    >>> polynomial_cutoff(torch.tensor([0.0, 6.0, 7.0]), 6.0, 6).tolist()
    [1.0, 0.0, 0.0]
    """
    p = float(p)
    u = d / r_max
    out = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * u**p + p * (p + 2.0) * u ** (p + 1.0)
           - p * (p + 1.0) / 2.0 * u ** (p + 2.0))  # fmt: skip
    return torch.where(u < 1.0, out, torch.zeros_like(out))


class IrrepsLayerNorm(nn.Module):
    """LayerNorm of a hidden feature (module ``layer_norm``; ``weight``, ``bias`` over the
    scalars).

    Scalars: mean and biased variance over every scalar channel, normalised, ``· weight +
    bias``. ``kind="equivariant"``: each l > 0 block divided by ``sqrt(mean(x²) + eps)`` over
    its ``mul · (2l + 1)`` components (commutes with rotations). ``kind="original"``: each l > 0
    instance centred by its own component mean and divided by ``sqrt(var + eps)`` of its
    ``2l + 1`` components (the original's ``EquivariantLayerNorm``; not equivariant).

    >>> ln = IrrepsLayerNorm("4x0e+1x1o", kind="equivariant", eps=0.0)
    >>> [round(v, 3) for v in ln(torch.arange(7.0)[None])[0].tolist()]
    [-1.342, -0.447, 0.447, 1.342, 0.79, 0.987, 1.184]
    """

    def __init__(self, irreps: str | o3.Irreps, *, kind: str, eps: float):
        super().__init__()
        if kind not in ("equivariant", "original"):
            raise ValueError(f"unknown norm {kind!r}")
        self.irreps = o3.Irreps(irreps)
        self.kind, self.eps = kind, float(eps)
        self.blocks = tuple(_blocks(self.irreps))  # plain ints: forward never reads Irreps
        n = _scalar_dim(self.irreps)
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        blocks = self.blocks
        s = torch.cat([x[..., a : a + mul] for a, mul, deg in blocks if deg == 0], dim=-1)
        mean = s.mean(-1, keepdim=True)
        var = s.var(-1, keepdim=True, unbiased=False)
        s = (s - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias
        parts, offset = [], 0
        for a, mul, deg in blocks:
            if deg == 0:
                parts.append(s[..., offset : offset + mul])
                offset += mul
                continue
            v = x[..., a : a + mul * (2 * deg + 1)].reshape(*lead, mul, 2 * deg + 1)
            if self.kind == "original":
                mu = v.mean(-1, keepdim=True)
                var_v = v.var(-1, keepdim=True, unbiased=False)
                v = (v - mu) / torch.sqrt(var_v + self.eps)
            else:
                v = v / torch.sqrt(v.square().mean((-1, -2), keepdim=True) + self.eps)
            parts.append(v.reshape(*lead, mul * (2 * deg + 1)))
        return torch.cat(parts, dim=-1)


class MessageLayer(nn.Module):
    """The original's ``E3GNNMessagePassingLayer`` (bonded: self-connection and residual;
    non-bonded: neither, the edge length appended to the attributes).

    Edge ``j → i`` (``edge_index[0] = j``, ``[1] = i``): ``r = pos_i − pos_j``,
    ``d = max(|r|, 1e-6)``, ``Y = sh("0e+1o+2e", r / d)`` (component normalisation),
    ``W = radial_mlp([bessel(d) · cutoff(d), attr (, d)])``, message ``tp(linear_in(h)_j, Y;
    W)`` summed at ``i`` (÷ ``sqrt(avg_num_neighbors)`` if set); ``+ self_connection(h)``;
    ``nonlinearity`` (e3nn ``Gate``, when ``use_gate`` and there are l > 0 channels);
    ``+ h`` (bonded); ``layer_norm`` (``use_layer_norm``).
    """

    def __init__(
        self, config: E3GNNConfig, attr_dim: int, *, self_connection: bool, with_distance: bool
    ):
        super().__init__()
        c = config
        self.config, self.with_distance = c, with_distance
        hidden = o3.Irreps(c.hidden_irreps)
        scalars = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l > 0])
        self.nonlinearity: Gate | None = None
        before = hidden
        if c.use_gate and gated.num_irreps > 0:
            self.nonlinearity = Gate(
                scalars,
                [F.silu for _ in scalars],
                o3.Irreps([(mul, "0e") for mul, _ in gated]),
                [torch.sigmoid for _ in gated],
                gated,
            )
            before = self.nonlinearity.irreps_in
        self.irreps_before_gate = before
        self.linear_in = o3.Linear(hidden, hidden)
        self.tp = o3.FullyConnectedTensorProduct(
            hidden, SH_IRREPS, before, shared_weights=False, internal_weights=False
        )
        self.bessel_basis = BesselBasis(c.r_max, c.num_radial)
        n_in = c.num_radial + attr_dim + int(with_distance)
        self.radial_mlp = _mlp((n_in, c.radial_hidden, c.radial_hidden, self.tp.weight_numel))
        self.self_connection = o3.Linear(hidden, before) if self_connection else None
        self.layer_norm = (
            IrrepsLayerNorm(hidden, kind=c.norm, eps=c.norm_eps) if c.use_layer_norm else None
        )

    def forward(
        self, h: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor, attr: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        src, dst = edge_index[0], edge_index[1]
        rel = pos[dst] - pos[src]
        d = torch.clamp(torch.linalg.norm(rel, dim=-1, keepdim=True), min=MIN_DISTANCE)
        sh = o3.spherical_harmonics(SH_IRREPS, rel / d, normalize=True, normalization="component")
        rbf = self.bessel_basis(d) * polynomial_cutoff(d, c.r_max, c.cutoff_p)
        radial = [rbf, attr.to(rbf.dtype)] + ([d] if self.with_distance else [])
        weights = self.radial_mlp(torch.cat(radial, dim=-1))
        x = self.linear_in(h)
        msg = self.tp(x[src], sh, weights)
        out = msg.new_zeros(h.shape[0], msg.shape[-1]).index_add(0, dst, msg)
        if c.avg_num_neighbors is not None:
            out = out / math.sqrt(c.avg_num_neighbors)
        if self.self_connection is not None:
            out = self.self_connection(h) + out
        if self.nonlinearity is not None:
            out = self.nonlinearity(out)
        if self.self_connection is not None:  # the bonded layer: residual
            out = h + out
        if self.layer_norm is not None:
            out = self.layer_norm(out)
        return out


def _segment_mean(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    total = values.new_zeros(n, values.shape[-1]).index_add(0, index, values)
    count = values.new_zeros(n).index_add(0, index, values.new_ones(index.shape[0]))
    return total / count.clamp(min=1.0)[:, None]


class PathBranch(nn.Module):
    """Angle (``(i, j, k)``, mean onto ``j``) or dihedral (``(i, j, k, l)``, mean onto ``j``
    and onto ``k``, averaged) branch: ``{mlp_name}`` of ``[s_i, s_last, attr]`` (``s`` the
    first ``n_scalars`` channels), then ``output_projection`` (``o3.Linear`` scalars →
    hidden). Atoms on no path get 0; no paths at all gives zeros.
    """

    def __init__(self, config: E3GNNConfig, mlp_name: str, attr_dim: int):
        super().__init__()
        hidden = o3.Irreps(config.hidden_irreps)
        self.n = _scalar_dim(hidden)
        self.dim = hidden.dim
        self.mlp_name = mlp_name
        h = config.branch_hidden
        self.add_module(mlp_name, _mlp((2 * self.n + attr_dim, h, h, self.n)))
        self.output_projection = o3.Linear(o3.Irreps(f"{self.n}x0e"), hidden)

    def forward(self, x: torch.Tensor, index: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        if index.shape[1] == 0:
            return x.new_zeros(x.shape[0], self.dim)
        s = x[:, : self.n]
        mlp = getattr(self, self.mlp_name)
        msg = mlp(torch.cat([s[index[0]], s[index[-1]], attr.to(s.dtype)], dim=-1))
        centres = index[1:-1]
        agg = sum(_segment_mean(msg, centre, x.shape[0]) for centre in centres)
        return self.output_projection(agg / centres.shape[0])


class _BoundedPositive(torch.autograd.Function):
    """``low + (high − low) · sigmoid(raw)`` with slope ``(high − low) e^{−|r|} /
    (1 + e^{−|r|})²`` (no cancellation: nonzero at ``raw = ±50`` in float32)."""

    @staticmethod
    def forward(ctx: Any, raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(raw)
        ctx.width = high - low
        return low + (high - low) * torch.sigmoid(raw)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (raw,) = ctx.saved_tensors
        e = torch.exp(-raw.abs())
        return grad * ctx.width * e / ((1.0 + e) * (1.0 + e)), None, None


def bounded_positive(raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Torch version of ``jaxstab.numerics.bounded_positive`` (same value and slope).

    >>> r = torch.tensor(50.0, requires_grad=True)
    >>> bounded_positive(r, 0.1, 10.0).backward()
    >>> bool(r.grad > 0)
    True
    """
    if not low < high:
        raise ValueError(f"bounded_positive needs low < high, got {low}, {high}")
    return _BoundedPositive.apply(raw, float(low), float(high))


class _InputEmbedding(nn.Module):
    def __init__(self, config: E3GNNConfig, input_dim: int):
        super().__init__()
        hidden = o3.Irreps(config.hidden_irreps)
        n, h = _scalar_dim(hidden), config.embed_hidden
        self.feature_mlp = nn.Sequential(
            nn.Linear(input_dim, h), nn.SiLU(), nn.LayerNorm(h),
            nn.Linear(h, h), nn.SiLU(), nn.LayerNorm(h),
            nn.Linear(h, n),
        )  # fmt: skip
        self.irreps_projection = o3.Linear(o3.Irreps(f"{n}x0e"), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.irreps_projection(self.feature_mlp(x))


# ------------------------------------------------------------------------ model
class E3GNNTorch(nn.Module):
    """The E3 GNN pocket encoder (the original's ``RNAPocketEncoderV2``, attention pooling).

    ``forward(graph)`` takes a :func:`batch_to_graph` dict (missing ``triple_*`` /
    ``quadra_*`` / ``nonbonded_*`` keys skip that branch, as the original's ``hasattr``) and
    returns ``[num_graphs, output_dim]``:

    1. ``input_embedding``: ``feature_mlp`` (Linear, SiLU, LayerNorm, Linear, SiLU, LayerNorm,
       Linear → scalars) and ``irreps_projection`` (``o3.Linear`` scalars → hidden);
    2. per layer ``h ← bonded(h) + w_a · angle(h) + w_d · dihedral(h) + w_nb · nonbonded(h)``
       (:class:`MessageLayer`, :class:`PathBranch`), then dropout (training only) on the
       scalar channels;
    3. invariants ``t`` = scalars, the norm of every l = 1 instance, then of every l = 2
       instance; attention pooling (``pooling_mlp`` logits, softmax per molecule,
       ``Σ softmax · t``); ``output_projection`` (Linear, LayerNorm).

    Branch weights: parameters ``angle_weight``, ``dihedral_weight``, ``nonbonded_weight``
    (0-d) hold the *raw* value; :meth:`branch_weights` gives the effective ones by
    ``config.weight_param`` (``"raw"``: raw; ``"exp_clamp"``: ``exp(clamp(raw, −L, L))``;
    ``"bounded"``: :func:`bounded_positive` onto ``(e^−L, e^L)``; ``"fixed"``: the same names
    registered as *buffers* holding ``weight_init``, so the state-dict keys stay the same but
    nothing is trained). Raw values start where the effective weight is ``weight_init``.
    """

    def __init__(
        self,
        config: E3GNNConfig | None = None,
        *,
        input_dim: int = 3,
        bond_attr_dim: int = 2,
        angle_attr_dim: int = 2,
        torsion_attr_dim: int = 3,
        nb_attr_dim: int = 2,
    ):
        super().__init__()
        c = self.config = E3GNNConfig.default() if config is None else config
        hidden = self.hidden_irreps = o3.Irreps(c.hidden_irreps)
        if len(hidden) == 0 or hidden[0].ir.l != 0:
            raise ValueError(f"hidden_irreps must start with scalars, got {c.hidden_irreps!r}")
        if any(ir.l > 2 for _, ir in hidden):
            raise ValueError(f"hidden_irreps with l > 2 are not read out: {c.hidden_irreps!r}")
        for name in self.branch_names():
            if c.weight_param == "fixed":
                self.register_buffer(f"{name}_weight", torch.tensor(float(c.weight_init)))
            else:
                setattr(self, f"{name}_weight", nn.Parameter(torch.tensor(self._raw_init())))
        self.input_embedding = _InputEmbedding(c, input_dim)
        layers = range(c.num_layers)
        self.bonded_mp_layers = nn.ModuleList(
            [MessageLayer(c, bond_attr_dim, self_connection=True, with_distance=False)
             for _ in layers]
        )  # fmt: skip
        if c.use_multi_hop:
            self.angle_mp_layers = nn.ModuleList(
                [PathBranch(c, "angle_mlp", angle_attr_dim) for _ in layers]
            )
            self.dihedral_mp_layers = nn.ModuleList(
                [PathBranch(c, "dihedral_mlp", torsion_attr_dim) for _ in layers]
            )
        if c.use_nonbonded:
            self.nonbonded_mp_layers = nn.ModuleList(
                [MessageLayer(c, nb_attr_dim, self_connection=False, with_distance=True)
                 for _ in layers]
            )  # fmt: skip
        blocks = _blocks(hidden)
        self._scalar_slices = [(a, a + mul) for a, mul, deg in blocks if deg == 0]
        self._vector_blocks = [(a, mul, deg) for want in (1, 2) for a, mul, deg in blocks
                               if deg == want]  # fmt: skip
        self.invariant_dim = _scalar_dim(hidden) + sum(m for _, m, _ in self._vector_blocks)
        p, drop = c.pooling_hidden, c.dropout
        self.pooling_mlp = nn.Sequential(
            nn.Linear(self.invariant_dim, p), nn.SiLU(),
            nn.Dropout(drop) if drop > 0 else nn.Identity(),
            nn.Linear(p, p), nn.SiLU(),
            nn.Dropout(drop) if drop > 0 else nn.Identity(),
            nn.Linear(p, 1),
        )  # fmt: skip
        self.output_projection = nn.Sequential(
            nn.Linear(self.invariant_dim, c.output_dim), nn.LayerNorm(c.output_dim)
        )

    # ---------------------------------------------------------- branch weights
    def branch_names(self) -> tuple[str, ...]:
        """The weighted branches of this config (``angle``, ``dihedral``, ``nonbonded``)."""
        c = self.config
        return tuple(
            b for b in BRANCHES if (c.use_nonbonded if b == "nonbonded" else c.use_multi_hop)
        )

    def _limits(self) -> tuple[float, float]:
        limit = float(self.config.weight_log_limit)
        return math.exp(-limit), math.exp(limit)

    def _raw_init(self) -> float:
        c = self.config
        if c.weight_param == "exp_clamp":
            return math.log(c.weight_init)
        if c.weight_param == "bounded":
            low, high = self._limits()
            return math.log(c.weight_init - low) - math.log(high - c.weight_init)
        return float(c.weight_init)

    def branch_weights(self) -> dict[str, torch.Tensor]:
        """Effective weight of each branch by ``config.weight_param`` (see the class doc)."""
        c = self.config
        out = {}
        for name in self.branch_names():
            raw = getattr(self, f"{name}_weight")
            if c.weight_param == "exp_clamp":
                limit = float(c.weight_log_limit)
                out[name] = torch.exp(torch.clamp(raw, -limit, limit))
            elif c.weight_param == "bounded":
                out[name] = bounded_positive(raw, *self._limits())
            else:  # "raw" (the parameter itself) and "fixed" (the buffer)
                out[name] = raw
        return out

    # ------------------------------------------------------------------ forward
    def invariants(self, h: torch.Tensor) -> torch.Tensor:
        """``[N, invariant_dim]``: the scalars, then the norm of each l = 1, then each l = 2
        instance (the original's ``extract_invariant_features``)."""
        parts = [h[:, a:b] for a, b in self._scalar_slices]
        for a, mul, deg in self._vector_blocks:
            v = h[:, a : a + mul * (2 * deg + 1)].reshape(h.shape[0], mul, 2 * deg + 1)
            parts.append(torch.linalg.norm(v, dim=-1))
        return torch.cat(parts, dim=-1)

    def _dropout_scalars(self, h: torch.Tensor) -> torch.Tensor:
        scalars = torch.cat([h[:, a:b] for a, b in self._scalar_slices], dim=-1)
        dropped = F.dropout(scalars, p=self.config.dropout, training=True)
        parts, prev, offset = [], 0, 0
        for a, b in self._scalar_slices:
            parts += [h[:, prev:a], dropped[:, offset : offset + b - a]]
            prev, offset = b, offset + b - a
        parts.append(h[:, prev:])
        return torch.cat(parts, dim=-1)

    def forward(self, graph: Mapping[str, Any]) -> torch.Tensor:
        c = self.config
        x, pos = graph["x"], graph["pos"]
        batch = graph.get("batch")
        if batch is None:
            batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        num_graphs = graph.get("num_graphs")
        num_graphs = int(batch.max()) + 1 if num_graphs is None else int(num_graphs)
        w = self.branch_weights()
        h = self.input_embedding(x)
        for i in range(c.num_layers):
            h_new = self.bonded_mp_layers[i](h, pos, graph["edge_index"], graph["edge_attr"])
            if c.use_multi_hop and "triple_index" in graph:
                h_new = h_new + w["angle"] * self.angle_mp_layers[i](
                    h, graph["triple_index"], graph["triple_attr"]
                )
            if c.use_multi_hop and "quadra_index" in graph:
                h_new = h_new + w["dihedral"] * self.dihedral_mp_layers[i](
                    h, graph["quadra_index"], graph["quadra_attr"]
                )
            if c.use_nonbonded and "nonbonded_edge_index" in graph:
                h_new = h_new + w["nonbonded"] * self.nonbonded_mp_layers[i](
                    h, pos, graph["nonbonded_edge_index"], graph["nonbonded_edge_attr"]
                )
            h = h_new
            if c.dropout > 0 and self.training:
                h = self._dropout_scalars(h)
        t = self.invariants(h)
        logits = self.pooling_mlp(t)  # [N, 1]
        group_max = logits.new_full((num_graphs, 1), -torch.inf).scatter_reduce(
            0, batch[:, None], logits.detach(), reduce="amax", include_self=False
        )
        e = torch.exp(logits - group_max[batch])
        total = e.new_zeros(num_graphs, 1).index_add(0, batch, e) + SOFTMAX_EPS
        attn = e / total[batch]
        pooled = t.new_zeros(num_graphs, t.shape[-1]).index_add(0, batch, t * attn)
        return self.output_projection(pooled)


# ------------------------------------------------------------------------ losses
def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 − cos(pred, target)`` over rows (``F.cosine_similarity``, eps 1e-8)."""
    return (1.0 - F.cosine_similarity(pred, target, dim=1)).mean()


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every entry (``F.mse_loss``)."""
    return F.mse_loss(pred, target)


def cos_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, cos_weight: float = 0.7, mse_weight: float = 0.3
) -> torch.Tensor:
    """``cos_weight · cosine_loss + mse_weight · mse_loss`` (the original's ``cosine_mse``)."""
    return cos_weight * cosine_loss(pred, target) + mse_weight * mse_loss(pred, target)


def infonce_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy of ``normalize(pred) @ normalize(target)ᵀ / τ`` with
    the diagonal as labels, both directions, averaged."""
    logits = F.normalize(pred, dim=1) @ F.normalize(target, dim=1).T / temperature
    labels = torch.arange(pred.shape[0], device=pred.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def loss(model: E3GNNTorch, graph: Mapping[str, Any], target: torch.Tensor) -> torch.Tensor:
    """``model.config.loss`` of ``model(graph)`` against ``target`` ``[num_graphs, D]``."""
    c = model.config
    pred = model(graph)
    target = target.to(pred.dtype)
    if c.loss == "cosine":
        return cosine_loss(pred, target)
    if c.loss == "mse":
        return mse_loss(pred, target)
    if c.loss == "cos_mse":
        return cos_mse_loss(pred, target, c.cos_weight, c.mse_weight)
    if c.loss == "infonce":
        return infonce_loss(pred, target, c.temperature)
    raise ValueError(f"unknown loss {c.loss!r}")


# ---------------------------------------------------------------------- training
def _to(graph: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in graph.items()}


def train(
    model: E3GNNTorch,
    arrays: Mapping[str, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    compile: bool = False,
    lr: float | None = None,
    weight_decay: float | None = None,
    clip: float | None = None,
    check_every: int = 10,
    on_nonfinite: str = "skip",
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Trains ``model`` on the padded ``arrays`` (with ``target``) as the original's script.

    AdamW at ``lr`` / ``weight_decay`` (the config's unless given); each epoch one
    ``torch.randperm`` of the molecules from ``torch.Generator().manual_seed(seed)``, cut into
    ``ceil(n / batch_size)`` batches, the last one wrapping around to the start (the rule of
    ``jaxstab.train.fit``; ``torch.manual_seed(seed)`` seeds dropout). Per step: loss,
    ``zero_grad``, ``backward``; every ``check_every`` steps (step 0 included) the original's
    gradient monitor, one ``p.grad.norm().item()`` per parameter (its total norm is recorded
    and the names of parameters whose gradient norm is not finite); then
    ``clip_grad_norm_(…, clip)`` (``clip=None``: ``config.grad_clip``; 0: no clipping, where
    the original would fall back to a loss-dependent 1.0–2.0); then the AdamW step.

    A non-finite loss: its step is recorded (``first_nonfinite_step``, ``nonfinite_steps``).
    The original's script has *no* such check (it backpropagates and steps, so a NaN loss
    makes every parameter NaN through the clip coefficient); ``on_nonfinite="skip"`` (default)
    skips the step (``zero_grad``, no backward, no optimizer step), ``"step"`` does what the
    original does. ``compile=True`` runs forward + loss through ``torch.compile(...,
    dynamic=True)`` (graph sizes change from batch to batch); the first epoch's time includes
    the compilation (minutes on CPU), and dropout masks then come from Inductor's RNG, not
    eager's, so losses differ from an eager run with the same seed.

    Batches are converted with :func:`batch_to_graph` outside the timed part:
    ``epoch_seconds`` covers forward, backward, the monitor, clip and the step. Returns
    ``{"loss": [float per step, NaN included], "epoch_seconds", "first_nonfinite_step",
    "nonfinite_steps", "nonfinite_params": ["name@step", ...], "grad_norms": [(step, total
    norm before clipping), ...]}``.
    """
    if on_nonfinite not in ("skip", "step"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'step', got {on_nonfinite!r}")
    c = model.config
    clip = c.grad_clip if clip is None else clip
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    dtype = next(model.parameters()).dtype
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=c.lr if lr is None else lr,
        weight_decay=c.weight_decay if weight_decay is None else weight_decay,
    )

    def step_loss(graph: Mapping[str, Any], target: torch.Tensor) -> torch.Tensor:
        return loss(model, graph, target)

    loss_fn: Callable[..., torch.Tensor] = (
        torch.compile(step_loss, dynamic=True) if compile else step_loss
    )
    inputs = {k: v for k, v in arrays.items() if k != "target"}
    targets = np.asarray(arrays["target"], np.float32)
    n = len(targets)
    steps = math.ceil(n / batch_size)
    history: dict[str, Any] = {"loss": [], "epoch_seconds": [], "first_nonfinite_step": None,
                               "nonfinite_steps": [], "nonfinite_params": [],
                               "grad_norms": []}  # fmt: skip
    global_step = 0
    for _ in range(epochs):
        seconds = 0.0
        perm = np.resize(torch.randperm(n, generator=gen).numpy(), steps * batch_size)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            graph = batch_to_graph({k: np.asarray(v)[idx] for k, v in inputs.items()})
            graph = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                     for k, v in _to(graph, device).items()}  # fmt: skip
            target = torch.as_tensor(targets[idx], dtype=dtype, device=device)
            start = time.perf_counter()
            value = loss_fn(graph, target)
            finite = bool(torch.isfinite(value))
            history["loss"].append(float(value.detach()))
            if not finite:
                history["nonfinite_steps"].append(global_step)
                if history["first_nonfinite_step"] is None:
                    history["first_nonfinite_step"] = global_step
            if not finite and on_nonfinite == "skip":
                opt.zero_grad(set_to_none=True)
            else:
                opt.zero_grad(set_to_none=True)
                value.backward()
                if check_every and global_step % check_every == 0:
                    scan_gradients(model, global_step, history)
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, max_norm=clip)
                opt.step()
            seconds += time.perf_counter() - start
            global_step += 1
        history["epoch_seconds"].append(seconds)
    return history
