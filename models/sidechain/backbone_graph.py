"""The original side-chain model's backbone feature graph (its ``feature_graph``): Chroma's
``ProteinFeatureGraph`` on the full residue graph, with no message passing.

``BackboneGraph(c_s, c_z)(x, chain)`` takes ``x [b, L, 4, 3]`` (N, CA, C, O in Å; the
original feeds each residue's atoms in that residue's own local frame) and ``chain [b, L]``
(>= 1 for a real residue, 0 for padding) and returns ``node [b, L, c_s]`` and
``edge [b, L, L, c_z]``. One linear map per feature type, summed, then masked:

* node ``internal_coords`` (20): cos and sin of the 4 dihedrals (φ, ψ, ω and the O dihedral
  N(i+1)-CA-C-O; a planar one has sine 0, see below) and of the 4 bond-angle complements (π
  minus the angle at CA, C, N(i+1) and of CA-C-O), then ``log(length + 0.01)`` of N-CA, CA-C,
  C-N(i+1), C-O. Terms that span a chain break, a chain end or padding are zeroed before
  cos/sin/log (so they read 1, 0 and ``log 0.01``), and padded residues are zero.
* edge ``distances_2mer`` (1344): the 64 distances between the 8 atoms of residues i and j,
  each as 20 Gaussians (centres 0…20 Å, width 20/19) and as ``log(d + 0.01)``.
* edge ``orientations_2mer`` (192): the 64 directions between those atoms in residue i's
  frame (N-CA along the first axis).
* edge ``distances_chain`` (3): different chain, ``log(|i-j| + 1)`` and ``sign(j-i)`` when
  on the same chain.

Every distance and normalisation is smoothed as in the original: ``sqrt(|v|^2 + eps)`` with
eps 1e-3 (internal coordinates, atom distances) and 0.1 (orientations), so zero vectors
(padded residues at the origin, coincident atoms) already have finite values and gradients.

Where the port differs from the original:

* Planar dihedrals. The original's dihedral is ``D = sign(s) * θ``, ``θ = arccos(cos)``,
  with the sign term ``s = u_ab · n_bcd`` and ``sign(0) = 0``; the features are cos D, sin D.
  Because of the smoothing θ is not 0 or π at planarity, so sin D jumps between ±sin θ
  (about ±0.05-0.09) as ``s`` crosses 0, and at ``s = 0`` exactly cos D is 1 (even for a
  trans bond, whose cos θ is about -1). In the original's input form (every residue in its
  own frame: CA at the origin, N on the x axis, C in the xz-plane) the four atoms of φ, ψ
  and ω are coplanar, exactly so in exact arithmetic, so ``s`` is rounding noise (|s| ~ 1e-17
  to 1e-6) and the original returns at random +θ, -θ or 0 (on real chains about half ± for φ
  and ψ, a third each for ω), depending on how the frames were rounded and on the device.
  The port treats ``|s| <= PLANAR_TOL`` (1e-4) as planar: its features are cos θ (the value
  on both sides of the jump) and sin 0 (the mean of the two sides), the same on every device
  and dtype. Where ``|s| > 1e-4`` they are the original's; in the band only the sine differs
  (by at most sin θ), and the cosine only where the original's ``s`` is exactly 0.
* ``arccos`` of the clamped cosine (bond angles, dihedrals) has gradient 0 at ±1 and beyond,
  where the original's ``acos`` has an infinite derivative (NaN once multiplied by a mask),
  e.g. for exactly collinear N-CA-C far apart. The smoothing keeps |cos| < 1 for ordinary
  geometry, so this is a guard; the values are the same.
* The RBF centres are built in the input's dtype: in float64 the original, whose centres
  are a float32 buffer, differs from the exact ones by ~1e-7 relative (float32: identical).
* The chain feature is computed in the input's dtype; the original's is always float32 (so
  in float64 its linear map fails on mixed dtypes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "EDGE_DIMS",
    "NODE_DIMS",
    "BackboneGraph",
    "edge_distances_2mer",
    "edge_distances_chain",
    "edge_orientations_2mer",
    "node_internal_coords",
]

IC_EPS = 1e-3  # smoothing of the internal coordinates' lengths and unit vectors
LOG_EPS = 0.01  # log(length + LOG_EPS) for bond lengths and atom distances
DIST_EPS = 1e-3  # smoothing of the 2-mer atom distances
ORIENT_EPS = 0.1  # smoothing of the orientation feature's unit vectors and frame
PLANAR_TOL = 1e-4  # a dihedral whose sign term is this close to 0 is planar: sin 0
RBF = (0.0, 20.0, 20)  # Gaussian centres: min, max, count (width = spacing)
NODE_DIMS = (20,)
EDGE_DIMS = (64 * (RBF[2] + 1), 3 * 64, 3)


def _normed(v: jax.Array, eps: float) -> jax.Array:
    return v / jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + eps)


def _arccos(c: jax.Array) -> jax.Array:
    # arccos(clip(c, -1, 1)); the derivative is 0 (not ∞) at ±1, NaN stays NaN.
    c = jnp.clip(c, -1.0, 1.0)
    inner = ~(jnp.abs(c) >= 1)
    edge = jnp.where(c > 0, jnp.zeros_like(c), jnp.full_like(c, math.pi))
    return jnp.where(inner, jnp.arccos(jnp.where(inner, c, jnp.zeros_like(c))), edge)


def _length(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum((b - a) ** 2, axis=-1) + IC_EPS)


def _angle_complement(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    cos = jnp.sum(_normed(a - b, IC_EPS) * _normed(c - b, IC_EPS), axis=-1)
    return math.pi - _arccos(cos)


def _dihedral(
    a: jax.Array, b: jax.Array, c: jax.Array, d: jax.Array
) -> tuple[jax.Array, jax.Array]:
    # |dihedral| in [0, π] and its sign (0 when the four points are planar to PLANAR_TOL).
    u_ab, u_bc, u_cd = (_normed(q - p, IC_EPS) for p, q in ((a, b), (b, c), (c, d)))
    n_abc = _normed(jnp.cross(u_ab, u_bc), IC_EPS)
    n_bcd = _normed(jnp.cross(u_bc, u_cd), IC_EPS)
    side = jnp.sum(u_ab * n_bcd, axis=-1)
    sign = jnp.where(jnp.abs(side) <= PLANAR_TOL, jnp.zeros_like(side), jnp.sign(side))
    return _arccos(jnp.sum(n_abc * n_bcd, axis=-1)), sign


def _shift(v: jax.Array, step: int) -> jax.Array:
    # v[:, r + step] along the residue axis, zero-filled past either end.
    pad = jnp.zeros_like(v[:, : abs(step)])
    return jnp.concatenate([v[:, step:], pad] if step > 0 else [pad, v[:, :step]], axis=1)


# Per residue r, atoms 0-3 are N, CA, C, O of r; 4, 5 are N, CA of r + 1; 6 is C of r - 1.
_DIHEDRALS = ((6, 0, 1, 2), (0, 1, 2, 4), (1, 2, 4, 5), (4, 1, 2, 3))  # φ, ψ, ω, O
_ANGLES = ((0, 1, 2), (1, 2, 4), (2, 4, 5), (1, 2, 3))  # at CA, C, N(r+1); CA-C-O
_LENGTHS = ((0, 1), (1, 2), (2, 4), (2, 3))  # N-CA, CA-C, C-N(r+1), C-O


def _pick(atoms: jax.Array, table: tuple[tuple[int, ...], ...]) -> list[jax.Array]:
    # One [b, L, len(table), 3] array per column of ``table`` (static slices, no gather).
    return [jnp.stack([atoms[..., k, :] for k in col], axis=-2) for col in zip(*table, strict=True)]


def node_internal_coords(x: jax.Array, chain: jax.Array) -> jax.Array:
    """Internal-coordinate node features ``[b, L, 20]`` (cos, sin of 8 angles; 4 log lengths).

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[[1.46, 0, 0], [0, 0, 0], [-0.55, 1.42, 0], [-1.7, 1.9, 0]]] * 3)
    >>> h = jax.jit(node_internal_coords)(x[None], jnp.array([[1, 1, 0]]))
    >>> h.shape, round(float(jnp.exp(h[0, 0, 16]) - 0.01), 3), h[0, 2].tolist() == [0.0] * 20
    ((1, 3, 20), 1.46, True)
    """
    real = chain > 0
    c = jnp.where(real, chain, 0)
    m = real.astype(x.dtype)
    atoms = jnp.concatenate([x, _shift(x[..., :2, :], 1), _shift(x[..., 2:3, :], -1)], axis=-2)
    same_next = (c == _shift(c, 1)).astype(x.dtype) * m
    same_prev = (c == _shift(c, -1)).astype(x.dtype) * m
    pick = _pick(atoms, _DIHEDRALS)
    theta, sign = _dihedral(*pick)
    theta = theta * jnp.stack([same_prev, same_next, same_next, same_next], -1)
    pick = _pick(atoms, _ANGLES)
    angles = _angle_complement(*pick) * jnp.stack([m, same_next, same_next, m], -1)
    pick = _pick(atoms, _LENGTHS)
    lengths = _length(*pick) * jnp.stack([m, m, same_next, m], -1)
    cos = jnp.concatenate([jnp.cos(theta), jnp.cos(angles)], axis=-1)
    sin = jnp.concatenate([sign * jnp.sin(theta), jnp.sin(angles)], axis=-1)
    h = jnp.concatenate([cos, sin, jnp.log(lengths + LOG_EPS)], axis=-1)
    return m[..., None] * h


def _pair_atoms(x: jax.Array) -> jax.Array:
    # [b, L, A, 3] -> [b, L, L, 2A, 3]: residue i's atoms, then residue j's.
    b, n, a, _ = x.shape
    x_i = jnp.broadcast_to(x[:, :, None], (b, n, n, a, 3))
    x_j = jnp.broadcast_to(x[:, None, :], (b, n, n, a, 3))
    return jnp.concatenate([x_i, x_j], axis=-2)


def _pair_mask(chain: jax.Array, dtype: jnp.dtype) -> jax.Array:
    m = (chain > 0).astype(dtype)
    return m[:, :, None] * m[:, None, :]


def edge_distances_2mer(x: jax.Array, chain: jax.Array) -> jax.Array:
    """Atom-distance edge features ``[b, L, L, 1344]``: 64 distances x 20 RBF, then 64 logs.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.zeros((1, 2, 4, 3)).at[0, 1].add(3.0)
    >>> h = jax.jit(edge_distances_2mer)(x, jnp.ones((1, 2), int))
    >>> h.shape, round(float(jnp.exp(h[0, 0, 1, 1280 + 4]) - 0.01), 3)
    ((1, 2, 2, 1344), 5.196)
    """
    x_ij = _pair_atoms(x)
    diff = x_ij[..., None, :, :] - x_ij[..., :, None, :]
    d = jnp.sqrt(jnp.sum(diff * diff, axis=-1) + DIST_EPS).reshape(*x_ij.shape[:3], -1)
    lo, hi, count = RBF
    centres = jnp.linspace(lo, hi, count, dtype=x.dtype)
    rbf = jnp.exp(-(((d[..., None] - centres) / ((hi - lo) / (count - 1))) ** 2))
    h = jnp.concatenate([rbf.reshape(*d.shape[:3], -1), jnp.log(d + LOG_EPS)], axis=-1)
    return _pair_mask(chain, x.dtype)[..., None] * h


def edge_orientations_2mer(x: jax.Array, chain: jax.Array) -> jax.Array:
    """Atom-direction edge features ``[b, L, L, 192]``, in residue i's (N, CA, C) frame.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[1.46, 0, 0], [0, 0, 0], [-0.55, 1.42, 0], [-1.7, 1.9, 0]])
    >>> chain = jnp.ones((1, 2), int)
    >>> h = jax.jit(edge_orientations_2mer)(jnp.stack([x, x + 5.0])[None], chain)
    >>> h.shape, [round(float(v), 3) for v in h[0, 0, 0, 3:6]]  # N -> CA, smoothed twice
    ((1, 2, 2, 192), [-0.955, 0.0, 0.0])
    """
    x_ij = _pair_atoms(x)
    u = _normed(x_ij[..., None, :, :] - x_ij[..., :, None, :], ORIENT_EPS)
    n, ca, cc = x[..., 0, :], x[..., 1, :], x[..., 2, :]
    e1 = _normed(n - ca, ORIENT_EPS)
    e2 = _normed(jnp.cross(e1, _normed(cc - ca, ORIENT_EPS)), ORIENT_EPS)
    e3 = _normed(jnp.cross(e1, e2), ORIENT_EPS)
    frame = jnp.stack([e1, e2, e3], axis=-1)  # [b, L, 3 (xyz), 3 (axis)]
    local = jnp.einsum("bijpqx,bixy->bijpqy", u, frame)
    return _pair_mask(chain, x.dtype)[..., None] * local.reshape(*local.shape[:3], -1)


def edge_distances_chain(chain: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
    """Sequence-separation edge features ``[b, L, L, 3]``: other chain, log(|i-j|+1), sign.

    >>> import jax, jax.numpy as jnp
    >>> chain_features = jax.jit(edge_distances_chain, static_argnums=1)
    >>> h = chain_features(jnp.array([[1, 1, 2]]), jnp.float32)
    >>> h[0, 0, 1].tolist(), h[0, 0, 2].tolist()
    ([0.0, 0.6931471824645996, 1.0], [1.0, 0.0, 0.0])
    """
    other = (chain[:, :, None] != chain[:, None, :]).astype(dtype)
    idx = jnp.arange(chain.shape[1])
    sep = (idx[None, :] - idx[:, None]).astype(dtype)[None]
    same = 1.0 - other
    return jnp.stack([other, same * jnp.log(jnp.abs(sep) + 1.0), same * jnp.sign(sep)], -1)


def _torch_linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    # PyTorch's default Linear init: kernel and bias uniform in ±1/sqrt(n_in).
    bound = 1.0 / math.sqrt(n_in)

    def bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    return nnx.Linear(n_in, n_out, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


class BackboneGraph(nnx.Module):
    """Node and edge embeddings of a backbone: one linear map per feature type, summed, masked.

    ``node_linears[0]`` maps the 20 internal-coordinate features to ``c_s``;
    ``edge_linears[0..2]`` map the 2-mer distances (1344), 2-mer orientations (192) and chain
    distances (3) to ``c_z``. Padded residues' nodes and every edge touching one are zero.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> graph = BackboneGraph(8, 4, rngs=nnx.Rngs(0))
    >>> x, chain = jnp.ones((2, 5, 4, 3)), jnp.ones((2, 5), int)
    >>> node, edge = nnx.jit(BackboneGraph.__call__)(graph, x, chain)
    >>> node.shape, edge.shape
    ((2, 5, 8), (2, 5, 5, 4))
    """

    def __init__(self, c_s: int, c_z: int, *, rngs: nnx.Rngs) -> None:
        self.node_linears = nnx.List([_torch_linear(d, c_s, rngs) for d in NODE_DIMS])
        self.edge_linears = nnx.List([_torch_linear(d, c_z, rngs) for d in EDGE_DIMS])

    def __call__(self, x: jax.Array, chain: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [b, L, 4, 3]`` (N, CA, C, O), ``chain [b, L]`` int -> node, edge embeddings."""
        x = jnp.asarray(x)
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        x = x.astype(dtype)
        m = (chain > 0).astype(dtype)
        node = self.node_linears[0](node_internal_coords(x, chain))
        feats = (
            edge_distances_2mer(x, chain),
            edge_orientations_2mer(x, chain),
            edge_distances_chain(chain, dtype),
        )
        edge = sum(lin(f) for lin, f in zip(self.edge_linears, feats, strict=True))
        return m[..., None] * node, (m[:, :, None] * m[:, None, :])[..., None] * edge
