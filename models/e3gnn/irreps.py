"""Equivariant building blocks of the E3 GNN on flat ``[n, irreps.dim]`` arrays.

Features are plain arrays in e3nn's ``mul_ir`` layout (each block ``mul x (2l + 1)``, instance
major), so that weights laid out as PyTorch e3nn lays them out copy over one to one:

- :class:`IrrepsLinear`: e3nn's ``o3.Linear`` (one weight matrix per pair of blocks of the same
  irrep, flat weight vector, each path scaled by ``1 / sqrt(fan_in)``);
- :func:`fc_tensor_product`: e3nn's ``FullyConnectedTensorProduct(..., shared_weights=False)``
  with one weight vector per edge (the radial MLP's output), paths in e3nn's order;
- :func:`gate`, :func:`layer_norm`, :func:`bessel_basis`, :func:`polynomial_cutoff`.

Spherical harmonics and Clebsch–Gordan coefficients come from e3nn-jax (same real basis and
sign convention as PyTorch e3nn). e3nn-jax's own ``tensor_product`` + ``Linear`` would compute
the same function, but with its parameters in a different order and split; this file keeps
PyTorch e3nn's flat layout so a state dict converts without a permutation table.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> lin = IrrepsLinear("4x0e+2x1o", "3x0e+1x1o", rngs=nnx.Rngs(0))
  >>> lin(jnp.ones((5, 10))).shape, lin.weight.shape
  ((5, 6), (14,))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "GATE_CST",
    "SILU_CST",
    "IrrepsLinear",
    "TPPath",
    "before_gate_irreps",
    "bessel_basis",
    "blocks",
    "fc_tensor_product",
    "gate",
    "invariants",
    "layer_norm",
    "polynomial_cutoff",
    "tp_paths",
]

# Second-moment normalisation constants of PyTorch e3nn's ``Gate`` (``normalize2mom``: the
# activation is divided by sqrt(E[act(z)^2]), z ~ N(0, 1), as e3nn computes it). e3nn-jax
# integrates the same moment by quadrature and gets slightly different digits; these are the
# original's.
SILU_CST = 1.6791767923989418
GATE_CST = 1.8467055342154763


class Block(NamedTuple):
    """One ``mul x (2l + 1)`` block of an irreps: where it sits in the flat array."""

    mul: int
    l: int  # noqa: E741
    parity: int
    start: int

    @property
    def dim(self) -> int:
        return self.mul * (2 * self.l + 1)

    def take(self, x: jax.Array) -> jax.Array:
        """This block of ``x [..., dim]`` as ``[..., mul, 2l + 1]``."""
        part = x[..., self.start : self.start + self.dim]
        return part.reshape(*x.shape[:-1], self.mul, 2 * self.l + 1)


def blocks(irreps: str | e3nn.Irreps) -> list[Block]:
    """The blocks of ``irreps`` in order (no simplification).

    >>> [(b.mul, b.l, b.start) for b in blocks("8x0e+4x1o+2x2e")]
    [(8, 0, 0), (4, 1, 8), (2, 2, 20)]
    """
    out, start = [], 0
    for mul, ir in e3nn.Irreps(irreps):
        out.append(Block(mul, ir.l, ir.p, start))
        start += mul * ir.dim
    return out


def _join(parts: Sequence[jax.Array], lead: tuple[int, ...]) -> jax.Array:
    return jnp.concatenate([p.reshape(*lead, -1) for p in parts], axis=-1)


class IrrepsLinear(nnx.Module):
    """Equivariant linear map ``irreps_in → irreps_out`` (PyTorch e3nn ``o3.Linear``).

    One ``[mul_in, mul_out]`` matrix per pair of blocks with the same irrep, in e3nn's order
    (input block major), flattened into ``weight``; weights start ``N(0, 1)`` and each path is
    scaled by ``1 / sqrt(fan_in)`` (the summed ``mul_in`` of the paths into that output block).
    Output blocks no input reaches are zero.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> lin = IrrepsLinear("2x0e", "2x0e+1x1o", rngs=nnx.Rngs(0))
    >>> lin(jnp.ones((1, 2)))[0, 2:].tolist()
    [0.0, 0.0, 0.0]
    """

    def __init__(self, irreps_in: str, irreps_out: str, *, rngs: nnx.Rngs):
        self.irreps_in, self.irreps_out = str(irreps_in), str(irreps_out)
        ins, outs = blocks(irreps_in), blocks(irreps_out)
        paths = [
            (i, o)
            for i, bi in enumerate(ins)
            for o, bo in enumerate(outs)
            if (bi.l, bi.parity) == (bo.l, bo.parity)
        ]
        fan_in = {o: sum(ins[i].mul for i, oo in paths if oo == o) for _, o in paths}
        self._paths = tuple((i, o, 1.0 / math.sqrt(fan_in[o])) for i, o in paths)
        self._ins, self._outs = tuple(ins), tuple(outs)
        numel = sum(ins[i].mul * outs[o].mul for i, o in paths)
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (numel,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        outs = [jnp.zeros((*lead, b.mul, 2 * b.l + 1), x.dtype) for b in self._outs]
        offset = 0
        w = self.weight[...]
        for i, o, alpha in self._paths:
            bi, bo = self._ins[i], self._outs[o]
            n = bi.mul * bo.mul
            mat = w[offset : offset + n].reshape(bi.mul, bo.mul)
            offset += n
            outs[o] = outs[o] + alpha * jnp.einsum("...ui,uw->...wi", bi.take(x), mat)
        return _join(outs, lead)


class TPPath(NamedTuple):
    """One path ``(block i1) x (block i2) → (block i_out)`` of a fully connected product."""

    i1: int
    i2: int
    i_out: int
    weight: float  # sqrt(dim_out / fan_in), e3nn's "component" + "element" normalisation


def tp_paths(irreps1: str, irreps2: str, irreps_out: str) -> list[TPPath]:
    """The paths of e3nn's ``FullyConnectedTensorProduct`` in its order (i1, i2, i_out).

    >>> [p[:3] for p in tp_paths("1x1o", "1x0e+1x1o", "1x0e+1x1o")]
    [(0, 0, 1), (0, 1, 0)]
    """
    b1, b2, bo = blocks(irreps1), blocks(irreps2), blocks(irreps_out)
    raw = []
    for i1, x in enumerate(b1):
        for i2, y in enumerate(b2):
            for io, z in enumerate(bo):
                if abs(x.l - y.l) <= z.l <= x.l + y.l and x.parity * y.parity == z.parity:
                    raw.append((i1, i2, io))
    fan = {io: sum(b1[a].mul * b2[b].mul for a, b, c in raw if c == io) for _, _, io in raw}
    return [TPPath(a, b, c, math.sqrt((2 * bo[c].l + 1) / fan[c])) for a, b, c in raw]


def tp_weight_numel(irreps1: str, irreps2: str, irreps_out: str) -> int:
    """Weights per edge of :func:`fc_tensor_product` (e3nn's ``tp.weight_numel``)."""
    b1, b2, bo = blocks(irreps1), blocks(irreps2), blocks(irreps_out)
    return sum(b1[p.i1].mul * b2[p.i2].mul * bo[p.i_out].mul for p in tp_paths(
        irreps1, irreps2, irreps_out))  # fmt: skip


def fc_tensor_product(
    x1: jax.Array, x2: jax.Array, weights: jax.Array, irreps1: str, irreps2: str, irreps_out: str
) -> jax.Array:
    """Fully connected tensor product with its own weights per row (``[E, weight_numel]``).

    ``out[e, w, k] = Σ_path c_path Σ_{u,v} W[e, u, v, w] Σ_{i,j} C[i, j, k] x1[e, u, i]
    x2[e, v, j]``, with ``C`` the e3nn Clebsch–Gordan coefficients (unit Frobenius norm) and
    ``c_path`` = :attr:`TPPath.weight`. Weights are laid out path after path, each
    ``[mul1, mul2, mul_out]`` row-major: PyTorch e3nn's layout.

    >>> import jax.numpy as jnp
    >>> w = jnp.ones((2, tp_weight_numel("1x0e", "1x0e", "1x0e")))
    >>> fc_tensor_product(jnp.full((2, 1), 2.0), jnp.full((2, 1), 3.0), w,
    ...                   "1x0e", "1x0e", "1x0e").tolist()
    [[6.0], [6.0]]
    """
    b1, b2, bo = blocks(irreps1), blocks(irreps2), blocks(irreps_out)
    lead = x1.shape[:-1]
    # Per output block, the paths' CG products are stacked along the input multiplicity and
    # their weight slices likewise, so each block is one batched matmul (fewer, larger ops:
    # a third of the compile time of one matmul per path on CPU).
    pairs: dict[int, list[jax.Array]] = {io: [] for io in range(len(bo))}
    mats: dict[int, list[jax.Array]] = {io: [] for io in range(len(bo))}
    offset = 0
    for p in tp_paths(irreps1, irreps2, irreps_out):
        u, v, z = b1[p.i1], b2[p.i2], bo[p.i_out]
        n = u.mul * v.mul * z.mul
        w = weights[..., offset : offset + n].reshape(*lead, u.mul * v.mul, z.mul)
        offset += n
        cg = np.asarray(e3nn.clebsch_gordan(u.l, v.l, z.l)) * p.weight
        outer = u.take(x1)[..., :, None, :, None] * v.take(x2)[..., None, :, None, :]
        outer = outer.reshape(*lead, u.mul * v.mul, cg.shape[0] * cg.shape[1])
        pairs[p.i_out].append(outer @ jnp.asarray(cg.reshape(-1, cg.shape[2]), x1.dtype))
        mats[p.i_out].append(w)
    outs = []
    for io, b in enumerate(bo):
        if not pairs[io]:
            outs.append(jnp.zeros((*lead, b.mul, 2 * b.l + 1), x1.dtype))
            continue
        pair = jnp.concatenate(pairs[io], axis=-2)  # [..., fan_in, 2l + 1]
        mat = jnp.concatenate(mats[io], axis=-2)  # [..., fan_in, mul_out]
        outs.append(jnp.einsum("...uk,...uw->...wk", pair, mat))
    return _join(outs, lead)


def before_gate_irreps(hidden: str, use_gate: bool) -> str:
    """What a message layer produces before its gate: e3nn ``Gate.irreps_in``.

    Scalars, then one gate scalar per gated (l > 0) instance, then the gated blocks,
    simplified; ``hidden`` itself without a gate.

    >>> before_gate_irreps("32x0e+16x1o+8x2e", True)
    '56x0e+16x1o+8x2e'
    """
    if not use_gate:
        return hidden
    bs = blocks(hidden)
    n_scalar = sum(b.mul for b in bs if b.l == 0)
    n_gates = sum(b.mul for b in bs if b.l > 0)
    if n_gates == 0:
        return hidden
    gated = [f"{b.mul}x{e3nn.Irrep(b.l, b.parity)}" for b in bs if b.l > 0]
    return str(e3nn.Irreps("+".join([f"{n_scalar + n_gates}x0e", *gated])).simplify())


def gate(x: jax.Array, hidden: str) -> jax.Array:
    """e3nn's ``Gate``: ``x`` in :func:`before_gate_irreps` → ``hidden``.

    Scalars → ``SILU_CST · silu``; instance ``u`` of the gated blocks (in order) times
    ``GATE_CST · sigmoid(gate u)``.

    >>> import jax.numpy as jnp
    >>> gate(jnp.zeros((1, 1 + 1 + 3)), "1x0e+1x1o").shape
    (1, 4)
    """
    bs = blocks(hidden)
    n_scalar = sum(b.mul for b in bs if b.l == 0)
    gated = [b for b in bs if b.l > 0]
    n_gates = sum(b.mul for b in gated)
    if n_gates == 0:
        return x
    lead = x.shape[:-1]
    scalars = SILU_CST * jax.nn.silu(x[..., :n_scalar])
    gates = GATE_CST * jax.nn.sigmoid(x[..., n_scalar : n_scalar + n_gates])
    parts, g, start = [scalars], 0, n_scalar + n_gates
    for b in gated:
        shifted = Block(b.mul, b.l, b.parity, start)
        parts.append(shifted.take(x) * gates[..., g : g + b.mul, None])
        g += b.mul
        start += b.dim
    return _join(parts, lead)


def layer_norm(
    x: jax.Array, hidden: str, weight: jax.Array, bias: jax.Array, *, kind: str, eps: float
) -> jax.Array:
    """LayerNorm of a hidden feature: scalars together (affine), l > 0 blocks by ``kind``.

    Scalars: mean and biased variance over every scalar channel, then ``· weight + bias``.
    ``kind="equivariant"``: each l > 0 block divided by ``sqrt(mean(x²) + eps)`` over all of its
    ``mul · (2l + 1)`` components (commutes with rotations). ``kind="original"``: each single
    l > 0 instance centred by its own component mean and divided by
    ``sqrt(var + eps)`` of its ``2l + 1`` components (the original's; not equivariant).

    >>> import jax.numpy as jnp
    >>> y = layer_norm(jnp.arange(7.0)[None], "4x0e+1x1o", jnp.ones(4), jnp.zeros(4),
    ...                kind="equivariant", eps=0.0)
    >>> [round(float(v), 3) for v in y[0]]
    [-1.342, -0.447, 0.447, 1.342, 0.79, 0.987, 1.184]
    """
    bs = blocks(hidden)
    lead = x.shape[:-1]
    parts = []
    scalar = [b.take(x)[..., 0] for b in bs if b.l == 0]
    s = jnp.concatenate(scalar, axis=-1)
    mean = jnp.mean(s, -1, keepdims=True)
    var = jnp.mean(jnp.square(s - mean), -1, keepdims=True)
    s = (s - mean) / jnp.sqrt(var + eps) * weight + bias
    offset = 0
    for b in bs:
        if b.l == 0:
            parts.append(s[..., offset : offset + b.mul])
            offset += b.mul
            continue
        v = b.take(x)
        if kind == "original":
            mu = jnp.mean(v, -1, keepdims=True)
            var_v = jnp.mean(jnp.square(v - mu), -1, keepdims=True)
            v = (v - mu) / jnp.sqrt(var_v + eps)
        else:
            v = v / jnp.sqrt(jnp.mean(jnp.square(v), (-1, -2), keepdims=True) + eps)
        parts.append(v)
    return _join(parts, lead)


def invariants(x: jax.Array, hidden: str) -> jax.Array:
    """Rotation invariants: every scalar, then the norm of each l > 0 instance, block order.

    Norms via :func:`jaxstab.numerics.safe_norm` (gradient 0, not NaN, at a zero vector).

    >>> import jax.numpy as jnp
    >>> invariants(jnp.array([[2.0, 3.0, 4.0, 0.0]]), "1x0e+1x1o").tolist()
    [[2.0, 5.0]]
    """
    from jaxstab.numerics import safe_norm

    bs = blocks(hidden)
    parts = [b.take(x)[..., 0] for b in bs if b.l == 0]
    parts += [safe_norm(b.take(x), axis=-1) for b in bs if b.l > 0]
    return jnp.concatenate(parts, axis=-1)


def bessel_basis(d: jax.Array, num: int, r_max: float) -> jax.Array:
    """``sqrt(2 / r_max) · sin(n π d / r_max) / d`` for ``n = 1..num`` (``d`` floored at 1e-8).

    >>> import jax.numpy as jnp
    >>> bessel_basis(jnp.array([1.0]), 2, 6.0).shape
    (1, 2)
    """
    freq = jnp.asarray(np.linspace(1.0, num, num) * np.pi, d.dtype)
    d = jnp.maximum(d, 1e-8)[..., None]
    return math.sqrt(2.0 / r_max) * jnp.sin(freq * d / r_max) / d


def polynomial_cutoff(d: jax.Array, r_max: float, p: float) -> jax.Array:
    """Smooth cutoff ``1 − (p+1)(p+2)/2 u^p + p(p+2) u^(p+1) − p(p+1)/2 u^(p+2)``, 0 for
    ``u = d / r_max ≥ 1``.

    >>> import jax.numpy as jnp
    >>> polynomial_cutoff(jnp.array([0.0, 6.0, 7.0]), 6.0, 6).tolist()
    [1.0, 0.0, 0.0]
    """
    u = d / r_max
    out = (
        1.0
        - (p + 1.0) * (p + 2.0) / 2.0 * u**p
        + p * (p + 2.0) * u ** (p + 1.0)
        - p * (p + 1.0) / 2.0 * u ** (p + 2.0)
    )
    return jnp.where(u < 1.0, out, 0.0)
