"""The PyTorch E3 GNN (``benchmarks/torch_ref/e3gnn.py``): data conversion, symmetry, branch
weights, losses, the original's state-dict layout and the training loop.

Where the original's code is at hand (the git mirror of ``SleepingLei/RNA-3E-FFI`` and an
importable ``torch_geometric``), its ``RNAPocketEncoderV2`` is extracted into a temporary
folder and compared with: same keys in the same order, the same initial weights from the same
seed, and the same outputs after a strict state-dict load. Without it, the keys are compared with
the list written here.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.torch_ref import e3gnn as te
from jaxstab.models.e3gnn.config import E3GNNConfig

MIRROR = Path("/work/.mirror/SleepingLei+RNA-3E-FFI/repo")
ORIGINAL_FILES = ("models/e3_gnn_encoder_v2.py", "models/layers/__init__.py",
                  "models/layers/radial_basis.py", "models/layers/normalization.py",
                  "models/layers/message_passing.py")  # fmt: skip
SMALL = E3GNNConfig.small()
ONE = E3GNNConfig.small().replace(num_layers=1, dropout=0.0)
TINY = ONE.replace(hidden_irreps="2x0e+1x1o")  # cheap to build: for the branch-weight tests


@pytest.fixture(scope="module", autouse=True)
def _fast_e3nn_codegen():
    """Skips e3nn's einsum-order optimisation while building modules (most of their build
    time); it changes the contraction order only, not the function."""
    import e3nn

    saved = e3nn.get_optimization_defaults()
    e3nn.set_optimization_defaults(optimize_einsums=False)
    yield
    e3nn.set_optimization_defaults(**saved)


def _graph(arrays, dtype=torch.float32):
    g = te.batch_to_graph(arrays)
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in g.items()}  # fmt: skip


@pytest.fixture(scope="module")
def arrays():
    return te.chain_arrays(4, 7, seed=3)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return te.E3GNNTorch(SMALL).eval()


# ------------------------------------------------------------------ data
def _padded():
    """3 molecules of 4, 2 and 5 atoms in 6 slots; padded rows hold garbage indices."""
    n, a = 3, 6
    sizes = [4, 2, 5]
    rng = np.random.default_rng(0)
    arr = {
        "x": rng.normal(size=(n, a, 3)).astype(np.float32),
        "pos": rng.normal(size=(n, a, 3)).astype(np.float32),
        "atom_mask": np.array([[i < s for i in range(a)] for s in sizes]),
    }
    bonds = [[(0, 1), (1, 0), (2, 3)], [(1, 0)], [(0, 4), (3, 2)]]
    angles = [[(0, 1, 2)], [], [(0, 1, 2), (2, 3, 4)]]
    torsions = [[(0, 1, 2, 3)], [], [(4, 3, 2, 1)]]
    nbs = [[(0, 3)], [], [(0, 4), (4, 0)]]
    for name, rows, k, d in (("bond", bonds, 2, 2), ("angle", angles, 3, 2),
                             ("torsion", torsions, 4, 3), ("nb", nbs, 2, 2)):  # fmt: skip
        width = 4
        index = np.full((n, width, k), 5, np.int32)  # slot 5: a padded atom in every molecule
        attr = rng.normal(size=(n, width, d)).astype(np.float32)
        mask = np.zeros((n, width), bool)
        for m, r in enumerate(rows):
            if r:
                index[m, : len(r)] = r
                mask[m, : len(r)] = True
        arr[f"{name}_index"], arr[f"{name}_attr"], arr[f"{name}_mask"] = index, attr, mask
    return arr, sizes, (bonds, angles, torsions, nbs)


def test_batch_to_graph_offsets_and_drops_padding():
    arr, sizes, (bonds, angles, torsions, nbs) = _padded()
    g = te.batch_to_graph(arr)
    offsets = [0, 4, 6]
    assert g["num_graphs"] == 3
    assert g["batch"].tolist() == [0] * 4 + [1] * 2 + [2] * 5
    assert g["batch"].dtype == torch.long and g["edge_index"].dtype == torch.long
    assert g["x"].dtype == torch.float32 and g["x"].shape == (11, 3)
    np.testing.assert_array_equal(g["x"].numpy(), np.concatenate(
        [arr["x"][m, :s] for m, s in enumerate(sizes)]))  # fmt: skip
    np.testing.assert_array_equal(g["pos"].numpy()[4:6], arr["pos"][1, :2])
    for key, rows, prefix in (("edge_index", bonds, "bond"), ("triple_index", angles, "angle"),
                              ("quadra_index", torsions, "torsion"),
                              ("nonbonded_edge_index", nbs, "nb")):  # fmt: skip
        want = [[i + offsets[m] for i in r] for m, rs in enumerate(rows) for r in rs]
        assert g[key].T.tolist() == want, key
        attr_key = {"edge_index": "edge_attr", "triple_index": "triple_attr",
                    "quadra_index": "quadra_attr",
                    "nonbonded_edge_index": "nonbonded_edge_attr"}[key]  # fmt: skip
        np.testing.assert_array_equal(g[attr_key].numpy(), arr[f"{prefix}_attr"][
            arr[f"{prefix}_mask"]])  # fmt: skip
    assert g["nonbonded_edge_attr"].shape == (3, 2)  # the loader's columns; no distance yet
    bad = {k: v.copy() for k, v in arr.items()}
    bad["bond_mask"][1, 1] = True  # a valid row (1, 5): slot 5 is padding in molecule 1
    with pytest.raises(ValueError, match="padded atom"):
        te.batch_to_graph(bad)


# --------------------------------------------------------------- model
def test_output_shape_and_empty_branches(small_model, arrays):
    out = small_model(_graph(arrays))
    assert out.shape == (4, 1536) and torch.isfinite(out).all()
    # Two-atom molecules: no angles, torsions or non-bonded pairs at all → zero branches.
    two = te.chain_arrays(3, 2, seed=0)
    g = _graph(two)
    assert g["triple_index"].shape == (3, 0) and g["nonbonded_edge_index"].shape == (2, 0)
    assert small_model(g).shape == (3, 1536)
    branch = small_model.angle_mp_layers[0]
    zero = branch(torch.randn(5, 30), torch.zeros(3, 0, dtype=torch.long), torch.zeros(0, 2))
    assert zero.shape == (5, 30) and not zero.any()


def _orthogonal(seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return torch.as_tensor(q)


def _rotated_difference(model, arrays, seed):
    g = _graph(arrays, torch.float64)
    q, shift = _orthogonal(seed), torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    g2 = dict(g, pos=g["pos"] @ q.T + shift)
    with torch.no_grad():
        a, b = model(g), model(g2)
    return float((a - b).norm() / a.norm())


def test_equivariant_norm_is_invariant_original_is_not(arrays):
    torch.manual_seed(1)
    eq = te.E3GNNTorch(ONE.replace(norm="equivariant")).double().eval()
    orig = te.E3GNNTorch(ONE.replace(norm="original")).double().eval()
    orig.load_state_dict(eq.state_dict())  # same weights; only the l > 0 LayerNorm differs
    # The l > 0 channels the LayerNorm sees are not zero (the first TP fills them).
    g = _graph(arrays, torch.float64)
    layer = eq.bonded_mp_layers[0]
    with torch.no_grad():
        h = eq.input_embedding(g["x"])
        h1 = layer(h, g["pos"], g["edge_index"], g["edge_attr"])
    assert h1[:, 8:].abs().mean() > 1e-2
    for seed in (0, 1):
        assert _rotated_difference(eq, arrays, seed) < 1e-4
        assert _rotated_difference(orig, arrays, seed) > 1e-3


def test_layer_norm_formulas():
    x = torch.randn(5, 30, dtype=torch.float64)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    for kind in ("equivariant", "original"):
        ln = te.IrrepsLayerNorm("8x0e+4x1o+2x2e", kind=kind, eps=1e-5).double()
        ln.weight.data, ln.bias.data = w, b
        y = ln(x)
        s = x[:, :8]
        want_s = (s - s.mean(1, keepdim=True)) / torch.sqrt(
            s.var(1, unbiased=False, keepdim=True) + 1e-5
        ) * w + b
        torch.testing.assert_close(y[:, :8], want_s)
        for start, mul, dim in ((8, 4, 3), (20, 2, 5)):
            v = x[:, start : start + mul * dim].reshape(5, mul, dim)
            if kind == "original":
                want = (v - v.mean(-1, keepdim=True)) / torch.sqrt(
                    v.var(-1, unbiased=False, keepdim=True) + 1e-5
                )
            else:
                want = v / torch.sqrt((v**2).mean((1, 2), keepdim=True) + 1e-5)
            torch.testing.assert_close(y[:, start : start + mul * dim], want.reshape(5, -1))


def test_flags_remove_modules_and_avg_neighbors_scales():
    c = ONE.replace(use_gate=False, use_layer_norm=False, use_multi_hop=False,
                    use_nonbonded=False)  # fmt: skip
    m = te.E3GNNTorch(c).eval()
    keys = list(m.state_dict())
    assert not [k for k in keys if "nonlinearity" in k or "layer_norm" in k]
    assert not [k for k in keys if k.split(".")[0] in ("angle_mp_layers", "dihedral_mp_layers",
                                                      "nonbonded_mp_layers")]  # fmt: skip
    assert not [k for k in keys if k.endswith("_weight") and "." not in k]
    assert str(m.bonded_mp_layers[0].tp.irreps_out) == "8x0e+4x1o+2x2e"
    assert m(_graph(te.chain_arrays(2, 5, seed=0))).shape == (2, 1536)
    # The non-bonded layer without gate / norm is linear in its messages: sqrt(4) = 2.
    layer = te.MessageLayer(c, 2, self_connection=False, with_distance=True)
    scaled = te.MessageLayer(c.replace(avg_num_neighbors=4.0), 2, self_connection=False,
                             with_distance=True)  # fmt: skip
    scaled.load_state_dict(layer.state_dict())
    g = _graph(te.chain_arrays(1, 6, seed=2))
    h = torch.randn(6, 30)
    args = (h, g["pos"], g["nonbonded_edge_index"], g["nonbonded_edge_attr"])
    with torch.no_grad():
        torch.testing.assert_close(scaled(*args), layer(*args) / 2.0)


def test_message_direction_and_radial_input():
    """Edge src 0 → dst 1: node 1 receives ``tp(linear_in(h)_0, Y(pos_1 − pos_0), W)`` with
    ``W = radial_mlp([bessel(d) · cutoff(d), attr, d])``; node 0 receives nothing."""
    c = ONE.replace(use_gate=False, use_layer_norm=False)
    layer = te.MessageLayer(c, 2, self_connection=False, with_distance=True)
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.6, -1.2, 0.9]])
    index, attr = torch.tensor([[0], [1]]), torch.tensor([[0.3, 0.7]])
    h = torch.randn(2, 30)
    from e3nn import o3

    rel = pos[1] - pos[0]
    d = rel.norm().reshape(1, 1)
    sh = o3.spherical_harmonics("0e+1o+2e", (rel / rel.norm())[None], normalize=True,
                                normalization="component")  # fmt: skip
    rbf = math.sqrt(2 / 6.0) * torch.sin(torch.arange(1, 5) * math.pi * d / 6.0) / d
    u = d / 6.0
    cut = 1 - 28 * u**6 + 48 * u**7 - 21 * u**8
    with torch.no_grad():
        w = layer.radial_mlp(torch.cat([rbf * cut, attr, d], -1))
        want = layer.tp(layer.linear_in(h)[:1], sh, w)
        out = layer(h, pos, index, attr)
    torch.testing.assert_close(out[1:], want)
    assert not out[0].any()


def test_dropout_touches_scalar_channels_only(small_model):
    h = torch.ones(50, 30)
    out = small_model._dropout_scalars(h)
    assert torch.equal(out[:, 8:], h[:, 8:])
    values = sorted(round(v, 5) for v in out[:, :8].unique().tolist())
    assert values == [0.0, round(1 / 0.9, 5)]


# ------------------------------------------------------------ branch weights
def _weights_model(param, **changes):
    return te.E3GNNTorch(TINY.replace(weight_param=param, **changes))


def test_weight_param_raw():
    m = _weights_model("raw")
    assert float(m.angle_weight.detach()) == pytest.approx(0.333)
    m.angle_weight.data.fill_(-0.4)
    w = m.branch_weights()["angle"]
    w.backward()
    assert w.item() == pytest.approx(-0.4) and m.angle_weight.grad.item() == 1.0


def test_weight_param_exp_clamp():
    m = _weights_model("exp_clamp", weight_log_limit=5.0)
    assert m.branch_weights()["dihedral"].item() == pytest.approx(0.333, rel=1e-6)
    assert m.dihedral_weight.item() == pytest.approx(math.log(0.333), rel=1e-6)
    for raw, value, slope in ((1.0, math.e, math.e), (6.0, math.exp(5.0), 0.0),
                              (-7.0, math.exp(-5.0), 0.0)):  # fmt: skip
        m.dihedral_weight.data.fill_(raw)
        m.dihedral_weight.grad = None
        w = m.branch_weights()["dihedral"]
        w.backward()
        assert w.item() == pytest.approx(value, rel=1e-6)
        assert float(m.dihedral_weight.grad) == pytest.approx(slope, rel=1e-6)
    assert float(m.dihedral_weight.grad) == 0.0  # exactly 0 beyond the limit


def test_weight_param_bounded():
    m = _weights_model("bounded", weight_log_limit=5.0)
    low, high = math.exp(-5.0), math.exp(5.0)
    assert m.branch_weights()["nonbonded"].item() == pytest.approx(0.333, rel=1e-5)
    assert m.nonbonded_weight.item() == pytest.approx(
        math.log(0.333 - low) - math.log(high - 0.333), rel=1e-6
    )
    m.nonbonded_weight.data.fill_(0.7)
    w = m.branch_weights()["nonbonded"]
    w.backward()
    sig = 1 / (1 + math.exp(-0.7))
    assert w.item() == pytest.approx(low + (high - low) * sig, rel=1e-6)
    assert float(m.nonbonded_weight.grad) == pytest.approx((high - low) * sig * (1 - sig),
                                                           rel=1e-5)  # fmt: skip
    for raw in (50.0, -50.0):
        m.nonbonded_weight.data.fill_(raw)
        m.nonbonded_weight.grad = None
        m.branch_weights()["nonbonded"].backward()
        assert 0.0 < float(m.nonbonded_weight.grad) < 1e-18
    # Plain autograd through sigmoid rounds the slope to 0 there; the custom backward does not.
    r = torch.tensor(50.0, requires_grad=True)
    (low + (high - low) * torch.sigmoid(r)).backward()
    assert float(r.grad) == 0.0


def test_weight_param_fixed_is_a_buffer():
    m = _weights_model("fixed", weight_init=0.25)
    names = dict(m.named_parameters())
    assert not {"angle_weight", "dihedral_weight", "nonbonded_weight"} & set(names)
    assert {"angle_weight", "dihedral_weight", "nonbonded_weight"} <= set(m.state_dict())
    w = m.branch_weights()
    assert all(float(v) == 0.25 and not v.requires_grad for v in w.values())


def test_forward_uses_the_effective_weight(arrays):
    torch.manual_seed(2)
    bounded = te.E3GNNTorch(TINY.replace(weight_param="bounded")).eval()
    bounded.angle_weight.data.fill_(-1.0)
    raw = te.E3GNNTorch(TINY.replace(weight_param="raw")).eval()
    state = bounded.state_dict()
    state.update({f"{k}_weight": v.detach() for k, v in bounded.branch_weights().items()})
    raw.load_state_dict(state)
    g = _graph(arrays)
    with torch.no_grad():
        torch.testing.assert_close(raw(g), bounded(g))
        raw.angle_weight.data.fill_(0.0)
        assert (raw(g) - bounded(g)).abs().max() > 1e-4


# -------------------------------------------------------------------- losses
def test_losses_match_their_formulas(small_model, arrays):
    torch.manual_seed(3)
    p, t = torch.randn(6, 20, dtype=torch.float64), torch.randn(6, 20, dtype=torch.float64)
    cos = 1 - (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1))
    mse = ((p - t) ** 2).mean()
    torch.testing.assert_close(te.cosine_loss(p, t), cos.mean())
    torch.testing.assert_close(te.mse_loss(p, t), mse)
    torch.testing.assert_close(te.cos_mse_loss(p, t, 0.6, 0.4), 0.6 * cos.mean() + 0.4 * mse)
    logits = (p / p.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T / 0.1
    p2t = torch.logsumexp(logits, 1) - logits.diag()
    t2p = torch.logsumexp(logits, 0) - logits.diag()
    torch.testing.assert_close(te.infonce_loss(p, t, 0.1), 0.5 * (p2t.mean() + t2p.mean()))
    g, target = _graph(arrays), torch.as_tensor(arrays["target"])
    with torch.no_grad():
        pred = small_model(g)
        for name, want in (("cosine", te.cosine_loss(pred, target)),
                           ("mse", te.mse_loss(pred, target)),
                           ("cos_mse", 0.7 * te.cosine_loss(pred, target)
                            + 0.3 * te.mse_loss(pred, target)),
                           ("infonce", te.infonce_loss(pred, target, 0.07))):  # fmt: skip
            small_model.config = SMALL.replace(loss=name)
            torch.testing.assert_close(te.loss(small_model, g, target), want)
    small_model.config = SMALL


# --------------------------------------------------------- original's layout
def _expected_keys(n_layers: int) -> list[str]:
    """Keys of ``E3GNNConfig.small()`` (layers 0 .. n-1) without e3nn's internal buffers
    (``output_mask``, Wigner-3j constants) and its empty placeholders (``bias`` of an
    ``o3.Linear`` without biases, the TP's and the gate's ``weight`` of size 0)."""
    lin = [f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    keys = ["angle_weight", "dihedral_weight", "nonbonded_weight"]
    keys += [f"input_embedding.feature_mlp.{i}.{p}" for i in (0, 2, 3, 5, 6)
             for p in ("weight", "bias")]  # fmt: skip
    keys += ["input_embedding.irreps_projection.weight"]

    def mp(prefix: str, sc: bool) -> list[str]:
        out = []
        for i in range(n_layers):
            out += [f"{prefix}.{i}.linear_in.weight", f"{prefix}.{i}.bessel_basis.frequencies"]
            out += [f"{prefix}.{i}.radial_mlp.{k}" for k in lin]
            out += [f"{prefix}.{i}.self_connection.weight"] if sc else []
            out += [f"{prefix}.{i}.layer_norm.weight", f"{prefix}.{i}.layer_norm.bias"]
        return out

    keys += mp("bonded_mp_layers", True)
    for branch in ("angle", "dihedral"):
        for i in range(n_layers):
            keys += [f"{branch}_mp_layers.{i}.{branch}_mlp.{k}" for k in lin]
            keys += [f"{branch}_mp_layers.{i}.output_projection.weight"]
    keys += mp("nonbonded_mp_layers", False)
    keys += [f"pooling_mlp.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    keys += [f"output_projection.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
    return keys


def _meaningful(state) -> list[str]:
    return [k for k, v in state.items()
            if v.numel() > 0 and "output_mask" not in k and "_w3j_" not in k]  # fmt: skip


def test_state_dict_keys_match_the_list(small_model):
    assert _meaningful(small_model.state_dict()) == _expected_keys(2)
    assert len(_expected_keys(2)) == 94


def _load_original(tmp: Path):
    """``RNAPocketEncoderV2`` extracted from the mirror into ``tmp``, or None."""
    if not MIRROR.is_dir():
        return None
    try:
        importlib.import_module("torch_geometric")
    except ImportError:
        return None
    pkg = tmp / "rna3e_original"
    for name in ORIGINAL_FILES:
        text = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:{name}"], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
        target = pkg / Path(name).relative_to("models")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp))
    try:
        module = importlib.import_module("rna3e_original.e3_gnn_encoder_v2")
    finally:
        sys.path.remove(str(tmp))
    assert module._has_improved_layers  # else it silently drops the gate and the LayerNorm
    return module.RNAPocketEncoderV2


@pytest.fixture(scope="module")
def original_class(tmp_path_factory):
    return _load_original(tmp_path_factory.mktemp("original"))


def _build_original(cls, c: E3GNNConfig):
    return cls(input_dim=3, feature_hidden_dim=c.embed_hidden, hidden_irreps=c.hidden_irreps,
               output_dim=c.output_dim, num_layers=c.num_layers, num_radial_basis=c.num_radial,
               radial_hidden_dim=c.radial_hidden, pooling_hidden_dim=c.pooling_hidden,
               r_max=c.r_max, avg_num_neighbors=c.avg_num_neighbors, use_gate=c.use_gate,
               use_layer_norm=c.use_layer_norm, use_multi_hop=c.use_multi_hop,
               use_nonbonded=c.use_nonbonded, dropout=c.dropout)  # fmt: skip


def _original_data(graph):
    """The original reads attributes; its non-bonded attributes carry the distance."""
    src, dst = graph["nonbonded_edge_index"]
    d = (graph["pos"][dst] - graph["pos"][src]).norm(dim=-1, keepdim=True)
    data = types.SimpleNamespace(**{k: v for k, v in graph.items() if k != "num_graphs"})
    data.nonbonded_edge_attr = torch.cat([graph["nonbonded_edge_attr"], d], dim=-1)
    return data


def test_state_dict_keys_match_the_original(original_class, small_model):
    if original_class is None:  # no mirror or no torch_geometric: the written list instead
        assert _meaningful(small_model.state_dict()) == _expected_keys(2)
        return
    # The original hard-codes its angle / dihedral MLP width at 64; keys do not depend on it.
    original = _build_original(original_class, SMALL)
    assert list(original.state_dict()) == list(small_model.state_dict())


@pytest.mark.parametrize(
    "changes",
    [{}, {"use_gate": False, "use_layer_norm": False, "avg_num_neighbors": 4.0}],
    ids=["original", "no-gate-no-norm-avg4"],
)
def test_same_function_as_the_original(original_class, arrays, changes):
    c = E3GNNConfig.small(E3GNNConfig.original()).replace(
        num_layers=1, branch_hidden=64, output_dim=24, **changes
    )
    torch.manual_seed(0)
    ours = te.E3GNNTorch(c)
    if original_class is None:  # no mirror or no torch_geometric: the written list instead
        want = [k for k in _expected_keys(1) if c.use_layer_norm or "layer_norm" not in k]
        assert _meaningful(ours.state_dict()) == want
        return
    torch.manual_seed(0)
    original = _build_original(original_class, c)
    theirs = original.state_dict()
    # Same modules built in the same order: the same seed gives the same initial weights.
    assert all(torch.equal(theirs[k], v) for k, v in ours.state_dict().items())
    for p in ours.parameters():  # move off the initial values; load strictly into the original
        p.data.add_(0.05 * torch.randn_like(p))
    original.load_state_dict(ours.state_dict(), strict=True)
    g = _graph(arrays)
    data = _original_data(g)
    ours.eval(), original.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(g), original(data), atol=2e-5, rtol=1e-4)
        # Layer by layer too: the output is E(3)-invariant, so it cannot see, e.g., the sign
        # convention of r_ij (flipping every edge vector is a reflection); the l = 1 features can.
        h = torch.randn(g["x"].shape[0], 30)
        for name, index, attr, orig_attr in (
            ("bonded_mp_layers", "edge_index", g["edge_attr"], g["edge_attr"]),
            ("nonbonded_mp_layers", "nonbonded_edge_index", g["nonbonded_edge_attr"],
             data.nonbonded_edge_attr),
        ):  # fmt: skip
            a = getattr(ours, name)[0](h, g["pos"], g[index], attr)
            b = getattr(original, name)[0](h, g["pos"], g[index], orig_attr)
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        for name, index, attr in (
            ("angle_mp_layers", "triple_index", "triple_attr"),
            ("dihedral_mp_layers", "quadra_index", "quadra_attr"),
        ):
            a = getattr(ours, name)[0](h, g[index], g[attr])
            b = getattr(original, name)[0](h, g[index], g[attr])
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    ours.train(), original.train()  # dropout 0.1 draws in the same order
    torch.manual_seed(7)
    a = ours(g)
    torch.manual_seed(7)
    torch.testing.assert_close(a, original(data), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------- training
def test_train_runs_and_returns_finite_losses():
    arr = te.chain_arrays(5, 5, seed=4)
    torch.manual_seed(0)
    model = te.E3GNNTorch(ONE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = te.train(model, arr, epochs=2, batch_size=2, seed=0, check_every=2, lr=1e-3)
    assert len(out["loss"]) == 6 and all(math.isfinite(v) for v in out["loss"])
    assert len(out["epoch_seconds"]) == 2 and out["first_nonfinite_step"] is None
    assert out["nonfinite_params"] == [] and [s for s, _ in out["grad_norms"]] == [0, 2, 4]
    assert not torch.equal(before["angle_weight"], model.state_dict()["angle_weight"])


@pytest.mark.parametrize("policy", ["skip", "step"])
def test_train_records_a_nan_loss(policy):
    arr = te.chain_arrays(6, 5, seed=5)
    arr["x"] = arr["x"].copy()
    arr["x"][2, 0, 0] = np.nan
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1)).tolist()
    step = perm.index(2) // 2
    torch.manual_seed(0)
    model = te.E3GNNTorch(ONE)
    out = te.train(model, arr, epochs=1, batch_size=2, seed=1, check_every=1,
                   on_nonfinite=policy)  # fmt: skip
    assert out["first_nonfinite_step"] == step and out["nonfinite_steps"][0] == step
    assert math.isnan(out["loss"][step])
    assert all(math.isfinite(v) for i, v in enumerate(out["loss"]) if i < step)
    params_finite = all(torch.isfinite(p).all() for p in model.parameters())
    if policy == "skip":
        assert params_finite and out["nonfinite_params"] == []
        assert out["nonfinite_steps"] == [step]  # the other batches stay finite
    else:  # the original's behaviour: NaN gradients, clipped to NaN, stepped into the weights
        assert not params_finite
        assert f"input_embedding.feature_mlp.0.weight@{step}" in out["nonfinite_params"]
