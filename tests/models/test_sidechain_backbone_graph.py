"""The original side-chain model's backbone feature graph: the Flax port
(:mod:`jaxstab.models.sidechain.backbone_graph`) against its PyTorch version
(:mod:`benchmarks.torch_ref.sidechain_graph`) on real chains in the original's input form
(each residue's N, CA, C, O in its own frame), padding and chain breaks included; finiteness on
degenerate inputs; rigid-motion invariance on global coordinates; one feature against numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks.torch_ref import sidechain_graph as tg
from jaxstab.models.sidechain.backbone_graph import (
    EDGE_DIMS,
    BackboneGraph,
    edge_distances_chain,
    node_internal_coords,
)
from jaxstab.models.sidechain.crop import center_crop
from jaxstab.models.sidechain.data import default_data
from jaxstab.models.sidechain.rigid import Rigid

L, C_S, C_Z = 20, 16, 8
LINEARS = [("node_linears", 0), *(("edge_linears", i) for i in range(len(EDGE_DIMS)))]


def rel_err(a, b) -> float:
    a, b = (np.asarray(v.detach() if hasattr(v, "detach") else v, np.float64) for v in (a, b))
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def chains() -> dict[str, np.ndarray]:
    """Two real chains, central 20 residues. Example 0 is split into chains 1 and 2 after
    residue 12; example 1's last 4 residues are padding (chain 0, all atoms zero)."""
    arrays = {k: v[:2] for k, v in default_data("val").arrays.items()}
    crop = {k: np.array(v) for k, v in center_crop(arrays, L).items()}
    pos = crop["atom14_pos"][..., :4, :].astype(np.float64)
    chain = crop["residue_mask"].astype(np.int64)
    chain[0, 12:] = 2
    chain[1, L - 4 :] = 0
    frames = Rigid.from_three_points(*(jnp.asarray(pos[..., k, :]) for k in range(3)))
    local = np.array(frames.expand().invert_apply(jnp.asarray(pos)), np.float64)
    local[chain == 0] = 0.0
    pos[chain == 0] = 0.0
    return {"local": local, "global": pos, "chain": chain}


def _torch_graph() -> tg.BackboneGraph:
    torch.manual_seed(0)
    return tg.BackboneGraph(C_S, C_Z)


def _nnx_graph(torch_graph: tg.BackboneGraph, dtype=np.float32) -> BackboneGraph:
    # Built abstractly (no initialiser runs), then filled from the state dict: kernel = W^T.
    abstract = nnx.eval_shape(lambda: BackboneGraph(C_S, C_Z, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    sd = {k: v.detach().numpy().astype(dtype) for k, v in torch_graph.state_dict().items()}
    pure = {
        name: {i: {"kernel": jnp.asarray(sd[f"{name}.{i}.weight"].T),
                   "bias": jnp.asarray(sd[f"{name}.{i}.bias"])} for n, i in LINEARS if n == name}
        for name in ("node_linears", "edge_linears")
    }  # fmt: skip
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _cotangents(dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, L, C_S)).astype(dtype), rng.normal(size=(2, L, L, C_Z)).astype(dtype)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, params, x, chain, w_node, w_edge):
    # <node, w_node> + <edge, w_edge> and its gradient w.r.t. the weights and the atoms.
    def f(params, x):
        node, edge = nnx.merge(graphdef, params)(x, chain)
        return jnp.sum(node * w_node) + jnp.sum(edge * w_edge), (node, edge)

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)


def _jax_run(model: BackboneGraph, x: np.ndarray, chain: np.ndarray) -> dict[str, np.ndarray]:
    graphdef, params = nnx.split(model)
    (_, (node, edge)), (g_params, g_x) = _step(graphdef, params, x, chain, *_cotangents(x.dtype))
    pure = nnx.to_pure_dict(g_params)
    out = {"node": node, "edge": edge, "x": g_x}
    for name, i in LINEARS:
        out[f"{name}.{i}.weight"] = np.asarray(pure[name][i]["kernel"]).T
        out[f"{name}.{i}.bias"] = pure[name][i]["bias"]
    return out


def _torch_run(graph: tg.BackboneGraph, x: np.ndarray, chain: np.ndarray) -> dict:
    graph.zero_grad()
    xt = torch.tensor(x, requires_grad=True)
    node, edge = graph(xt, torch.tensor(chain))
    w_node, w_edge = (torch.tensor(w) for w in _cotangents(x.dtype))
    (torch.sum(node * w_node) + torch.sum(edge * w_edge)).backward()
    out = {"node": node, "edge": edge, "x": xt.grad}
    out.update({k: p.grad for k, p in graph.named_parameters()})
    return out


def _errors(ours: dict, theirs: dict) -> dict[str, float]:
    assert set(ours) == set(theirs)
    return {k: rel_err(ours[k], theirs[k]) for k in theirs}


def test_float32_matches_torch(chains):
    graph = _torch_graph()
    assert sorted(graph.state_dict()) == sorted(
        f"{n}.{i}.{p}" for n, i in LINEARS for p in ("weight", "bias")
    )
    x = chains["local"].astype(np.float32)
    ours = _jax_run(_nnx_graph(graph), x, chains["chain"])
    theirs = _torch_run(graph, x, chains["chain"])
    assert ours["node"].dtype == jnp.float32 and ours["x"].dtype == jnp.float32
    err = _errors(ours, theirs)
    assert max(err["node"], err["edge"]) < 1e-5, err
    assert max(err.values()) < 1e-4, err


def test_float64_matches_torch(chains):
    graph = _torch_graph().double()
    with jax.enable_x64(True):
        ours = _jax_run(_nnx_graph(graph, np.float64), chains["local"], chains["chain"])
        assert ours["edge"].dtype == jnp.float64 and ours["x"].dtype == jnp.float64
    theirs = _torch_run(graph, chains["local"], chains["chain"])
    err = _errors(ours, theirs)
    assert max(err.values()) < 1e-10, err


def test_padding_and_degenerate_atoms_stay_finite(chains):
    """Padded residues (all atoms zero) after real ones, a fully padded example, a real
    residue with every atom at the origin and exactly collinear N-CA-C (the cosine rounds to
    -1 in float32, where a plain arccos has an infinite slope)."""
    x, chain = chains["local"].astype(np.float32).copy(), chains["chain"].copy()
    x[0, 3] = 0.0
    x[0, 5, :3] = [[1e3, 0, 0], [0, 0, 0], [-1e3, 0, 0]]
    chain[0, L - 3 :], x[0, L - 3 :] = 0, 0.0
    chain[1], x[1] = 0, 0.0
    graph = _torch_graph()
    ours = _jax_run(_nnx_graph(graph), x, chain)
    for value in ours.values():
        assert bool(jnp.all(jnp.isfinite(value)))
    pad = chain == 0
    assert not np.any(np.asarray(ours["node"])[pad])
    assert not np.any(np.asarray(ours["edge"])[pad[:, :, None] | pad[:, None, :]])
    assert not np.any(np.asarray(ours["x"])[pad])  # padded atoms get no gradient
    theirs = _torch_run(graph, x, chain)
    for value in theirs.values():
        assert bool(torch.isfinite(value).all())
    err = _errors(ours, theirs)
    assert max(err.values()) < 1e-4, err


def test_invariant_to_rigid_motions_of_global_coordinates(chains):
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = q * np.sign(np.linalg.det(q))
    moved = chains["global"] @ rot.T + rng.normal(size=3) * 30.0
    moved[chains["chain"] == 0] = 0.0
    model = _nnx_graph(_torch_graph())
    before = _jax_run(model, chains["global"].astype(np.float32), chains["chain"])
    after = _jax_run(model, moved.astype(np.float32), chains["chain"])
    for key in ("node", "edge"):
        assert rel_err(after[key], before[key]) < 1e-4, key


def test_features_against_numpy(chains):
    x, chain = chains["global"], chains["chain"]
    with jax.enable_x64(True):
        node = np.asarray(jax.jit(node_internal_coords)(x, chain))
        edge = np.asarray(edge_distances_chain(jnp.asarray(chain), jnp.float64))
    real = chain > 0
    n_ca = np.sqrt(np.sum((x[..., 0, :] - x[..., 1, :]) ** 2, -1) + 1e-3)
    np.testing.assert_allclose(node[..., 16], np.where(real, np.log(n_ca + 0.01), 0.0), 1e-12)
    # C(i)-N(i+1): within a chain only, log(0.01) at a chain's end, 0 on padding.
    c_n = np.sqrt(np.sum((x[:, :-1, 2] - x[:, 1:, 0]) ** 2, -1) + 1e-3)
    bonded = np.pad(real[:, :-1] & (chain[:, :-1] == chain[:, 1:]), ((0, 0), (0, 1)))
    want = np.where(bonded, np.log(np.pad(c_n, ((0, 0), (0, 1))) + 0.01), np.log(0.01))
    np.testing.assert_allclose(node[..., 18], np.where(real, want, 0.0), 1e-12)
    i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    same = chain[:, :, None] == chain[:, None, :]
    want = np.stack([~same, same * np.log(np.abs(j - i) + 1.0), same * np.sign(j - i)], -1)
    np.testing.assert_allclose(edge, want.astype(np.float64), 0, 1e-15)


def test_planar_dihedrals_read_zero_and_others_keep_their_sign(chains):
    """In local frames φ, ψ, ω are planar: sin 0 and cos θ (near 1: a dihedral near 0 that
    the smoothing keeps off 0) wherever defined. On global coordinates sin ψ has the sign of
    the textbook dihedral and cos ψ its value up to the smoothing (numpy)."""
    chain = chains["chain"]
    with jax.enable_x64(True):
        local = np.asarray(jax.jit(node_internal_coords)(chains["local"], chain))
        glob = np.asarray(jax.jit(node_internal_coords)(chains["global"], chain))
    real = chain > 0
    defined = real & np.pad(real[:, 1:] & (chain[:, 1:] == chain[:, :-1]), ((0, 0), (0, 1)))
    for k in (1, 2):  # ψ, ω: defined where residue r + 1 is on the same chain
        assert np.all(local[..., 8 + k][defined] == 0.0)
        assert np.all((local[..., k][defined] > 0.99) & (local[..., k][defined] < 1.0))
    x = chains["global"]

    def dihedral(a, b, c, d):  # IUPAC, unsmoothed
        b1, b2, b3 = b - a, c - b, d - c
        n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
        y = np.sum(np.cross(n1, n2) * b2 / np.linalg.norm(b2, axis=-1, keepdims=True), -1)
        return np.arctan2(y, np.sum(n1 * n2, -1))

    ok = defined[:, :-1]
    psi = dihedral(*(x[:, :-1, k][ok] for k in range(3)), x[:, 1:, 0][ok])
    np.testing.assert_array_equal(np.sign(glob[:, :-1, 9][ok]), np.sign(np.sin(psi)))
    np.testing.assert_allclose(glob[:, :-1, 1][ok], np.cos(psi), atol=0.01)
