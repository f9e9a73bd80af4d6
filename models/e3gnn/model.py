"""The E3 GNN pocket encoder (SPEC §6 A) in Flax NNX on e3nn-jax.

Data flow, one call on a padded batch of molecules (the arrays of :func:`load_sdf`):

1. ``input_embedding``: per-atom features (charge, Z, mass) → MLP → 32 scalars → equivariant
   projection onto ``hidden_irreps`` (``32x0e+16x1o+8x2e``; the l > 0 part starts at 0);
2. ``num_layers`` times: ``h ← bonded(h) + w_a · angle(h) + w_d · dihedral(h) + w_nb ·
   nonbonded(h)``, then dropout on the scalar channels. The bonded and non-bonded layers are
   :class:`MessageLayer` (spherical harmonics of the bond direction ⊗ neighbour feature, weights
   from a radial MLP of Bessel features × cutoff and the force-field terms, gate, LayerNorm);
   the angle and dihedral branches are :class:`PathBranch` (an MLP of the end atoms' scalars
   and the force-field terms, averaged onto the centre atoms);
3. readout: the 56 invariants (scalars and the norm of each l > 0 instance), attention
   pooling over each molecule's atoms, Linear → ``output_dim``, LayerNorm.

Every distance and direction is computed here from ``batch["pos"]``, so rotating, reflecting
or translating the molecule leaves the embedding unchanged (with ``norm="equivariant"``).
Padded atoms and edges (mask False) take no part: their messages are multiplied by 0 and
their directions replaced by a fixed unit vector before any square root.

Module and parameter names follow the original's ``state_dict`` (``bonded_mp_layers[0]
.radial_mlp``, ``angle_weight`` ...) so one name map converts the original's and the PyTorch
version's weights.

Example:
  >>> import jax
  >>> from flax import nnx
  >>> from jaxstab.models.e3gnn.config import E3GNNConfig
  >>> from jaxstab.models.e3gnn.data import load_sdf, egfr_path
  >>> data = load_sdf(egfr_path())
  >>> model = E3PocketEncoder(E3GNNConfig.small(), rngs=nnx.Rngs(0))
  >>> batch = {k: v[:2] for k, v in data.arrays.items()}
  >>> model(batch).shape
  (2, 1536)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstab.models.e3gnn import irreps as ir
from jaxstab.models.e3gnn.config import E3GNNConfig
from jaxstab.numerics import bounded_positive, bounded_positive_inverse, safe_norm

__all__ = ["BRANCHES", "E3PocketEncoder", "MessageLayer", "PathBranch", "embed"]

SH_IRREPS = "0e+1o+2e"
BRANCHES = ("angle", "dihedral", "nonbonded")
LAYER_LISTS = ("bonded", "angle", "dihedral", "nonbonded")  # the *_mp_layers lists
MIN_DISTANCE = 1e-6  # the original's floor on a bond length before dividing by it
TORCH_LN_EPS = 1e-5  # nn.LayerNorm's default eps in the original (NNX's default is 1e-6)


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, rngs=rngs)


def _mlp(sizes: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Sequential:
    """Linear, SiLU, Linear, SiLU, ..., Linear (the original's ``nn.Sequential`` indices)."""
    layers: list[Any] = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        if k:
            layers.append(nnx.silu)
        layers.append(_linear(a, b, rngs))
    return nnx.Sequential(*layers)


def _n_scalars(hidden: str) -> int:
    return sum(b.mul for b in ir.blocks(hidden) if b.l == 0)


class Edges:
    """Flat edge lists of a padded batch: global node indices, attributes and a 0/1 mask."""

    def __init__(self, index: jax.Array, attr: jax.Array, mask: jax.Array, n_atoms: int):
        b = index.shape[0]
        offsets = (jnp.arange(b, dtype=index.dtype) * n_atoms)[:, None, None]
        self.index = (index + offsets).reshape(-1, index.shape[-1])
        self.attr = attr.reshape(self.index.shape[0], -1)
        self.mask = mask.reshape(-1).astype(attr.dtype)


def _segment_mean(values: jax.Array, mask: jax.Array, seg: jax.Array, n: int) -> jax.Array:
    total = jax.ops.segment_sum(values * mask[:, None], seg, n)
    count = jax.ops.segment_sum(mask, seg, n)
    return total / jnp.maximum(count, 1.0)[:, None]


class MessageLayer(nnx.Module):
    """One equivariant message-passing layer (the original's ``E3GNNMessagePassingLayer``).

    For an edge ``j → i``: ``W_e = radial_mlp([bessel(d) · cutoff(d), attr])`` and message
    ``TP(linear_in(h)_j, Y(r̂_ij); W_e)``, summed at ``i`` (divided by
    ``sqrt(avg_num_neighbors)`` if set); plus ``self_connection(h)`` (bonded), gate, plus the
    residual ``h`` (bonded), then LayerNorm (``use_layer_norm``). With ``with_distance`` the
    edge length is appended to ``attr`` (the non-bonded layer's third term).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> cfg = E3GNNConfig.small()
    >>> layer = MessageLayer(cfg, attr_dim=2, self_connection=True, rngs=nnx.Rngs(0))
    >>> edges = Edges(jnp.array([[[0, 1], [1, 0]]]), jnp.ones((1, 2, 2)), jnp.ones((1, 2)), 2)
    >>> pos = jnp.array([[0.0, 0, 0], [1.2, 0, 0]])
    >>> layer(jnp.ones((2, 30)), pos, edges).shape
    (2, 30)
    """

    def __init__(
        self,
        config: E3GNNConfig,
        *,
        attr_dim: int,
        self_connection: bool,
        with_distance: bool = False,
        rngs: nnx.Rngs,
    ):
        c = config
        self.hidden = c.hidden_irreps
        self.before_gate = ir.before_gate_irreps(c.hidden_irreps, c.use_gate)
        self.config = c
        self.with_distance = with_distance
        self.linear_in = ir.IrrepsLinear(self.hidden, self.hidden, rngs=rngs)
        numel = ir.tp_weight_numel(self.hidden, SH_IRREPS, self.before_gate)
        n_in = c.num_radial + attr_dim + int(with_distance)
        self.radial_mlp = _mlp((n_in, c.radial_hidden, c.radial_hidden, numel), rngs)
        self.self_connection = (
            ir.IrrepsLinear(self.hidden, self.before_gate, rngs=rngs) if self_connection else None
        )
        if c.use_layer_norm:
            n = _n_scalars(self.hidden)
            self.layer_norm = nnx.Dict(
                weight=nnx.Param(jnp.ones((n,))), bias=nnx.Param(jnp.zeros((n,)))
            )
        else:
            self.layer_norm = None

    def __call__(self, h: jax.Array, pos: jax.Array, edges: Edges) -> jax.Array:
        c = self.config
        src, dst = edges.index[:, 0], edges.index[:, 1]
        rel = pos[dst] - pos[src]
        valid = edges.mask[:, None] > 0
        rel = jnp.where(valid, rel, jnp.array([1.0, 0.0, 0.0], rel.dtype))
        dist = jnp.maximum(safe_norm(rel, axis=-1), MIN_DISTANCE)
        sh = e3nn.spherical_harmonics(
            SH_IRREPS, rel / dist[:, None], normalize=True, normalization="component"
        ).array
        rbf = ir.bessel_basis(dist, c.num_radial, c.r_max)
        rbf = rbf * ir.polynomial_cutoff(dist, c.r_max, float(c.cutoff_p))[:, None]
        attr = [rbf, edges.attr] + ([dist[:, None]] if self.with_distance else [])
        weights = self.radial_mlp(jnp.concatenate(attr, axis=-1))
        x = self.linear_in(h)
        msg = ir.fc_tensor_product(x[src], sh, weights, self.hidden, SH_IRREPS, self.before_gate)
        out = jax.ops.segment_sum(msg * edges.mask[:, None], dst, h.shape[0])
        if c.avg_num_neighbors is not None:
            out = out / math.sqrt(c.avg_num_neighbors)
        if self.self_connection is not None:
            out = self.self_connection(h) + out
        out = ir.gate(out, self.hidden) if c.use_gate else out
        if self.self_connection is not None:  # the bonded layer; the residual goes with it
            out = h + out
        if self.layer_norm is not None:
            out = ir.layer_norm(
                out,
                self.hidden,
                self.layer_norm["weight"][...],
                self.layer_norm["bias"][...],
                kind=c.norm,
                eps=c.norm_eps,
            )
        return out


class PathBranch(nnx.Module):
    """Angle (3 atoms) or dihedral (4 atoms) branch: an MLP of the end atoms' scalars and the
    path's force-field terms, averaged onto the centre atom(s), projected onto the irreps.

    Angle ``(i, j, k)``: mean onto ``j``. Dihedral ``(i, j, k, l)``: mean onto ``j`` and onto
    ``k``, then their average. Atoms on no path get 0.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> branch = PathBranch(E3GNNConfig.small(), "angle_mlp", attr_dim=2, rngs=nnx.Rngs(0))
    >>> paths = Edges(jnp.array([[[0, 1, 2]]]), jnp.ones((1, 1, 2)), jnp.ones((1, 1)), 3)
    >>> out = branch(jnp.ones((3, 30)), paths)
    >>> out.shape, float(abs(out[0]).sum())
    ((3, 30), 0.0)
    """

    def __init__(self, config: E3GNNConfig, mlp_name: str, *, attr_dim: int, rngs: nnx.Rngs):
        self.hidden = config.hidden_irreps
        n = _n_scalars(self.hidden)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, _mlp((2 * n + attr_dim, config.branch_hidden,
                                      config.branch_hidden, n), rngs))  # fmt: skip
        self.output_projection = ir.IrrepsLinear(f"{n}x0e", self.hidden, rngs=rngs)

    def __call__(self, h: jax.Array, paths: Edges) -> jax.Array:
        n = _n_scalars(self.hidden)
        s = h[:, :n]
        idx = paths.index
        msg = getattr(self, self.mlp_name)(
            jnp.concatenate([s[idx[:, 0]], s[idx[:, -1]], paths.attr], axis=-1)
        )
        centres = idx[:, 1:-1]
        agg = sum(_segment_mean(msg, paths.mask, centres[:, c], h.shape[0])
                  for c in range(centres.shape[1]))  # fmt: skip
        return self.output_projection(agg / centres.shape[1])


class E3PocketEncoder(nnx.Module):
    """E(3)-invariant molecule (pocket) encoder → ``output_dim`` embedding (see module doc).

    Args:
      config: an :class:`E3GNNConfig` (default: ``E3GNNConfig.default()``); ``changes`` are
        applied to it field by field (``E3PocketEncoder(rngs=r, num_layers=2)``).
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` when training with dropout).
      input_dim, bond_attr_dim, angle_attr_dim, torsion_attr_dim, nb_attr_dim: column counts
        of the data's ``x``, ``bond_attr``, ``angle_attr``, ``torsion_attr``, ``nb_attr``.

    ``__call__(batch)`` takes the padded arrays (``x``, ``pos``, ``atom_mask``, ``bond_*``,
    ``angle_*``, ``torsion_*``, ``nb_*``) of ``b`` molecules and returns ``[b, output_dim]``.
    """

    def __init__(
        self,
        config: E3GNNConfig | None = None,
        *,
        rngs: nnx.Rngs,
        input_dim: int = 3,
        bond_attr_dim: int = 2,
        angle_attr_dim: int = 2,
        torsion_attr_dim: int = 3,
        nb_attr_dim: int = 2,
        **changes: Any,
    ):
        c = (E3GNNConfig.default() if config is None else config).replace(**changes)
        self.config = c
        n = _n_scalars(c.hidden_irreps)
        if n == 0 or ir.blocks(c.hidden_irreps)[0].l != 0:
            raise ValueError(
                f"E3 GNN config hidden_irreps must start with scalars, got {c.hidden_irreps!r}"
            )
        self.input_embedding = nnx.Dict(
            feature_mlp=nnx.Sequential(
                _linear(input_dim, c.embed_hidden, rngs),
                nnx.silu,
                nnx.LayerNorm(c.embed_hidden, epsilon=TORCH_LN_EPS, rngs=rngs),
                _linear(c.embed_hidden, c.embed_hidden, rngs),
                nnx.silu,
                nnx.LayerNorm(c.embed_hidden, epsilon=TORCH_LN_EPS, rngs=rngs),
                _linear(c.embed_hidden, n, rngs),
            ),
            irreps_projection=ir.IrrepsLinear(f"{n}x0e", c.hidden_irreps, rngs=rngs),
        )
        layers = range(c.num_layers)
        self.bonded_mp_layers = nnx.List(
            [MessageLayer(c, attr_dim=bond_attr_dim, self_connection=True, rngs=rngs)
             for _ in layers]
        )  # fmt: skip
        if c.use_multi_hop:
            self.angle_mp_layers = nnx.List(
                [PathBranch(c, "angle_mlp", attr_dim=angle_attr_dim, rngs=rngs) for _ in layers]
            )
            self.dihedral_mp_layers = nnx.List(
                [PathBranch(c, "dihedral_mlp", attr_dim=torsion_attr_dim, rngs=rngs)
                 for _ in layers]
            )  # fmt: skip
        if c.use_nonbonded:
            self.nonbonded_mp_layers = nnx.List(
                [MessageLayer(c, attr_dim=nb_attr_dim, self_connection=False,
                              with_distance=True, rngs=rngs) for _ in layers]
            )  # fmt: skip
        for name in self.branch_names():
            if c.weight_param != "fixed":
                setattr(self, f"{name}_weight", nnx.Param(jnp.asarray(self._raw_init())))
        self.dropout = nnx.Dropout(c.dropout, rngs=rngs)
        n_inv = ir.invariants(jnp.zeros((1, e3nn.Irreps(c.hidden_irreps).dim)),
                              c.hidden_irreps).shape[-1]  # fmt: skip
        h = c.pooling_hidden
        self.pooling_mlp = nnx.Sequential(
            _linear(n_inv, h, rngs),
            nnx.silu,
            nnx.Dropout(c.dropout, rngs=rngs),
            _linear(h, h, rngs),
            nnx.silu,
            nnx.Dropout(c.dropout, rngs=rngs),
            _linear(h, 1, rngs),
        )
        self.output_projection = nnx.Sequential(
            _linear(n_inv, c.output_dim, rngs),
            nnx.LayerNorm(c.output_dim, epsilon=TORCH_LN_EPS, rngs=rngs),
        )

    # ------------------------------------------------------------- branch weights
    def branch_names(self) -> tuple[str, ...]:
        """The weighted branches this config has (``angle``, ``dihedral``, ``nonbonded``)."""
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
            return float(bounded_positive_inverse(c.weight_init, *self._limits()))
        return float(c.weight_init)

    def branch_weight(self, name: str) -> jax.Array:
        """The effective weight of branch ``name`` by ``config.weight_param``.

        >>> from flax import nnx
        >>> m = E3PocketEncoder(E3GNNConfig.small(), rngs=nnx.Rngs(0))
        >>> round(float(m.branch_weight("angle")), 3)
        0.333
        """
        c = self.config
        if c.weight_param == "fixed":
            return jnp.asarray(c.weight_init, jnp.float32)
        raw = getattr(self, f"{name}_weight")[...]
        if c.weight_param == "exp_clamp":
            limit = c.weight_log_limit
            return jnp.exp(jnp.clip(raw, -limit, limit))
        if c.weight_param == "bounded":
            return bounded_positive(raw, *self._limits())
        return raw

    # ------------------------------------------------------------------- forward
    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        c = self.config
        x = jnp.asarray(batch["x"])
        b, n_atoms = x.shape[:2]
        n = b * n_atoms
        pos = jnp.asarray(batch["pos"], x.dtype).reshape(n, 3)
        atom_mask = jnp.asarray(batch["atom_mask"]).reshape(b, n_atoms)

        def edges(name: str) -> Edges:
            return Edges(jnp.asarray(batch[f"{name}_index"]), jnp.asarray(batch[f"{name}_attr"],
                         x.dtype), jnp.asarray(batch[f"{name}_mask"]), n_atoms)  # fmt: skip

        emb = self.input_embedding
        h = emb["irreps_projection"](emb["feature_mlp"](x.reshape(n, -1)))
        n_s = _n_scalars(c.hidden_irreps)
        # Dropout on the scalar channels as a mask per layer, drawn here (scaled by
        # 1 / keep; all ones in eval mode) so the layer loop below needs no random state.
        keep = self.dropout(jnp.ones((c.num_layers, n, n_s), h.dtype))
        graphs = {"bond": edges("bond")}
        if c.use_multi_hop:
            graphs |= {"angle": edges("angle"), "torsion": edges("torsion")}
        if c.use_nonbonded:
            graphs["nb"] = edges("nb")
        weights = {name: self.branch_weight(name) for name in self.branch_names()}
        stacks = {name: getattr(self, f"{name}_mp_layers") for name in LAYER_LISTS
                  if hasattr(self, f"{name}_mp_layers")}  # fmt: skip
        graphdefs = {name: nnx.graphdef(layers[0]) for name, layers in stacks.items()}
        states = {name: jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                     *[nnx.state(layer) for layer in layers])
                  for name, layers in stacks.items()}  # fmt: skip

        def layer(h: jax.Array, xs: tuple[dict[str, Any], jax.Array]) -> tuple[jax.Array, None]:
            state, mask = xs
            block = {name: nnx.merge(graphdefs[name], state[name]) for name in state}
            h_new = block["bonded"](h, pos, graphs["bond"])
            if c.use_multi_hop:
                h_new = h_new + weights["angle"] * block["angle"](h, graphs["angle"])
                h_new = h_new + weights["dihedral"] * block["dihedral"](h, graphs["torsion"])
            if c.use_nonbonded:
                h_new = h_new + weights["nonbonded"] * block["nonbonded"](h, pos, graphs["nb"])
            h_new = jnp.concatenate([h_new[:, :n_s] * mask, h_new[:, n_s:]], axis=-1)
            return h_new, None

        # One compiled layer body for all num_layers (the layers' parameters stacked inside
        # the step; each layer keeps its own parameters, and the state-dict names).
        h, _ = jax.lax.scan(layer, h, (states, keep))
        t = ir.invariants(h, c.hidden_irreps)
        logits = self.pooling_mlp(t)[:, 0].reshape(b, n_atoms)
        logits = jnp.where(atom_mask, logits, jnp.finfo(logits.dtype).min)
        attn = jax.nn.softmax(logits, axis=-1) * atom_mask
        pooled = jnp.einsum("ba,bad->bd", attn, t.reshape(b, n_atoms, -1))
        return self.output_projection(pooled)


# Arrays the model reads (the data set also holds ``target``, ``n_atoms``).
MODEL_INPUTS = ("x", "pos", "atom_mask", "bond_index", "bond_attr", "bond_mask",
                "angle_index", "angle_attr", "angle_mask", "torsion_index", "torsion_attr",
                "torsion_mask", "nb_index", "nb_attr", "nb_mask")  # fmt: skip


def embed(model: E3PocketEncoder, dataset: Any, batch_size: int = 32) -> np.ndarray:
    """Embeddings of every molecule of ``dataset`` (a ``Dataset`` or its arrays), eval mode.

    Returns ``[n_molecules, output_dim]`` float32 NumPy; one jitted forward per batch of
    ``batch_size`` (the last batch padded by repeating its first row, then cut off). The
    model is left in eval mode.

    >>> from flax import nnx
    >>> from jaxstab.models.e3gnn.data import default_data
    >>> data = default_data()
    >>> model = E3PocketEncoder(E3GNNConfig.small(), rngs=nnx.Rngs(0))
    >>> embed(model, {k: v[:5] for k, v in data.arrays.items()}, batch_size=4).shape
    (5, 1536)
    """
    arrays = getattr(dataset, "arrays", dataset)
    arrays = {k: np.asarray(arrays[k]) for k in MODEL_INPUTS}
    total = len(arrays["x"])
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        return nnx.merge(graphdef, state)(batch)

    out = []
    for start in range(0, total, batch_size):
        idx = np.arange(start, start + batch_size)
        idx = np.where(idx < total, idx, start)
        batch = {k: v[idx] for k, v in arrays.items()}
        out.append(np.asarray(forward(state, batch))[: min(batch_size, total - start)])
    return np.concatenate(out, axis=0).astype(np.float32)
