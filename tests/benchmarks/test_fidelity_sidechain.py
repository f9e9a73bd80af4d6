"""The side-chain fidelity benchmark's comparison, name map, import and reporting, without the
original's code.

CI has no checkout of the original (JoreyYan/pu), so the reference side is the project's own
PyTorch version (``benchmarks/torch_ref/sidechain.py``, ``SideChainTorch``, whose state-dict
keys are the port's names: :func:`benchmarks.specs.sidechain_names.name_map`) behind the
interface of ``benchmarks.fidelity_sidechain.OriginalSide``, at tiny
``SideChainConfig.small(SideChainConfig.original())`` widths (one block; its Chroma backbone
graph and Conv1d side-chain encoder included) on 12-residue windows of two validation chains
(one padded). A changed weight, a wrong name map and a wrong Conv1d layout must be detected.
The original's own name-map rules, its import (from a folder and from a bare clone) and its
config mapping are checked on small stand-ins.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from benchmarks import fidelity_sidechain as fs
from benchmarks import run as runner
from benchmarks.specs.sidechain_names import name_map as port_names
from benchmarks.torch_ref import sidechain as tref
from benchmarks.torch_ref.sidechain_data import batch_to_tensors
from jaxstab.models.sidechain import SideChainConfig

N_RES, SHORT = 12, 8
TINY = {
    "c_s": 16,
    "c_z": 8,
    "n_heads": 2,
    "c_hidden": 4,
    "seq_heads": 2,
    "edge_feat_dim": 4,
    "c_pos_emb": 8,
    "c_timestep_emb": 4,
    "sidechain_hidden": 8,
    "n_v_points": 2,
    "n_blocks": 1,
}


class TorchRefSide:
    """``SideChainTorch`` behind ``OriginalSide``'s interface (its frames come from the
    positions, so ``rot``/``trans`` are unused)."""

    def __init__(self, model, dtype=torch.float32):
        self.model, self.dtype = model, dtype

    def as_float64(self):
        import copy

        return TorchRefSide(copy.deepcopy(self.model).double(), torch.float64)

    def _t(self, a, dtype=None):
        a = np.asarray(a)
        if dtype is None and np.issubdtype(a.dtype, np.floating):
            dtype = self.dtype
        return torch.tensor(a, dtype=dtype)

    def inputs(self, arrays, design, rot, trans):
        batch = batch_to_tensors(
            {k: v for k, v in arrays.items() if k != "design_mask"}, self.dtype
        )
        batch["design_mask"] = torch.tensor(np.asarray(design))
        return batch

    def forward(self, batch):
        return self.model(batch)

    def outputs(self, out):
        return {
            "local": out["sidechain_local"],
            "global": out["atom14_pos"][..., 4:14, :],
            "logits": out["aatype_logits"],
            "gaussian": self.gaussian(out["gaussian"]),
        }

    @staticmethod
    def gaussian(g):
        return {
            "rotation": g.rigid.rotation,
            "translation": g.rigid.translation,
            "local_mean": g.local_mean,
            "scaling_log": g.scaling_log,
        }

    @staticmethod
    def feature_graph(out):
        return out[0], out[1]

    @staticmethod
    def sidechain_features(out):
        return out


@pytest.fixture(scope="module")
def setup():
    config = SideChainConfig.small(SideChainConfig.original()).replace(**TINY)
    torch.manual_seed(0)
    model = tref.SideChainTorch(config)
    fs.perturb(model, 0)
    model.eval()
    return model, config, fs.make_inputs(N_RES, SHORT)


def _compare(setup, float64=False, state=None, names=port_names):
    model, config, arrays = setup
    ref = TorchRefSide(model)
    ref = ref.as_float64() if float64 else ref
    sd = ref.model.state_dict() if state is None else state
    return fs.compare(ref, sd, config, arrays, float64=float64, names=names)


@pytest.fixture(scope="module")
def result(setup):
    return _compare(setup)


def test_inputs_have_padding_and_a_fixed_design(setup):
    arrays = setup[2]
    assert arrays["residue_mask"].shape == (2, N_RES)
    assert arrays["residue_mask"].sum(1).tolist() == [N_RES, SHORT]
    assert not arrays["atom14_pos"][1, SHORT:].any()
    np.testing.assert_array_equal(arrays["design_mask"][0], np.arange(N_RES) % 2 == 0)
    assert not arrays["design_mask"][1, SHORT:].any()


def test_stand_in_matches_the_port(setup, result):
    errors = result["max_relative_error"]
    assert result["ok"], {k: v for k, v in errors.items() if v > fs.TOLERANCE}
    assert not result["nonfinite"] and not result["not_compared"]
    assert result["state_dict_keys_not_copied"] == []
    for row in (
        "block 0 iga (its inputs)",
        "block 0 seq_tfmr (its inputs)",
        "block 0 Gau_update (its inputs)",
        "feature_graph edge",
        "sidechain_head",
        "block 0 gaussian",
        "logits",
        "pred_atoms global Å (designed)",
        "gradients (worst tensor)",
    ):
        assert row in errors, row
    assert any(v > 0 for v in errors.values())  # two implementations, not one
    n_params = len(list(setup[0].named_parameters()))
    assert result["n_parameters_compared"] == n_params - 2  # the two 0-by-symmetry biases
    noise = result["zero_by_symmetry_relative_to_largest_gradient"]
    assert sorted(noise) == ["trunk.iga_0.geo_bias", "trunk.iga_0.linear_b.bias"]
    assert all(v["ours"] < 1e-5 and v["original"] < 1e-5 for v in noise.values())


@pytest.mark.slow  # ~1 min of float64 compilation; float32 above, plumbing below
def test_float64_agrees_with_the_stand_in(setup):
    r = _compare(setup, float64=True)
    assert r["dtype"] == "float64" and r["tolerance"] == fs.FLOAT64_TOLERANCE
    assert r["ok"], {k: v for k, v in r["max_relative_error"].items() if v > 1e-9}


def test_float64_plumbing(setup):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxstab.models.sidechain import SideChainModel

    model, config, arrays = setup
    with jax.enable_x64(True):
        rot, trans = fs.port_frames(arrays, jnp.float64)
        port = nnx.eval_shape(lambda: SideChainModel(config, rngs=nnx.Rngs(0)))
        params = nnx.state(port, nnx.Param)
        nnx.update(port, jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float64), params))
        sd = TorchRefSide(model).as_float64().model.state_dict()
        assert fs.to_port(sd, port, port_names) == []
        dtypes = {str(v.dtype) for v in jax.tree.leaves(nnx.state(port, nnx.Param))}
    assert rot.dtype == trans.dtype == np.float64 and dtypes == {"float64"}
    rtr = np.einsum("...ji,...jk->...ik", rot, rot)
    np.testing.assert_allclose(rtr, np.broadcast_to(np.eye(3), rtr.shape), atol=1e-12)


def test_a_perturbed_weight_is_flagged(setup, tmp_path):
    model = setup[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["trunk.iga_0.linear_q_gaussian.bias"] += 0.5  # the port gets a different weight
    bad = _compare(setup, state=state)
    within = bad["within_tolerance"]
    assert not bad["ok"]
    for row in (
        "block 0 iga (its inputs)",
        "block 0 node embedding",
        "logits",
        "pred_atoms local Å (designed)",
        "gradients (worst tensor)",
    ):
        assert not within[row], row
    for row in (
        "node_feature_net (its inputs)",
        "fused node embedding",
        "fused edge embedding",
        "input gaussian scaling_log",
        "block 0 Gau_update (its inputs)",
        "logits_head (its inputs)",
        "atom_head u (its inputs)",
    ):
        assert within[row], row
    result = {
        "original": "stand-in",
        "original_commit": "0" * 40,
        "stand_ins": {},
        "torch": torch.__version__,
        "jax": "x",
        "device": runner.device_name(),
        "device_kind": "cpu",
        "all_ok": False,
        "sizes": {
            "small": {"config": "tiny", "data": "two chains", "float32": bad, "float64": bad}
        },
    }
    md = fs.to_markdown(result)
    assert "| block 0 iga (its inputs) | **" in md and "NO |" in md and "0" * 40 in md
    assert "| block 0 Gau_update (its inputs) | " in md
    json_path, md_path = runner.write_results("fidelity_sidechain", result, md, tmp_path)
    assert json.loads(json_path.read_text())["sizes"]["small"]["float32"]["ok"] is False
    assert md_path.read_text() == md


def test_a_wrong_name_map_is_flagged(setup):
    def swapped(path):  # query and key projections of block 0 exchanged
        key = port_names(path)
        for a, b in (("linear_q.", "linear_k."), ("linear_k.", "linear_q.")):
            if key.startswith(f"trunk.iga_0.{a}"):
                return key.replace(a, b)
        return key

    bad = _compare(setup, names=swapped)
    assert not bad["within_tolerance"]["block 0 iga (its inputs)"]
    assert bad["within_tolerance"]["fused node embedding"]
    assert bad["within_tolerance"]["block 0 seq_tfmr (its inputs)"]
    assert not bad["ok"]


def test_original_name_map_rules():
    assert fs.name_map(("logits_head", "mlp", "layers", 4, "net", "layers", 2, "bias")) == (
        "logits_head.mlp.4.net.3.bias"
    )
    assert fs.name_map(("sidechain_head", "fuse_blocks", 1, "net", "layers", 3, "kernel")) == (
        "sidechain_head.fuse_blocks.1.net.3.weight"
    )
    assert fs.name_map(("feature_graph", "node_linears", 0, "kernel")) == (
        "feature_graph.feature_graph.node_linears.0.weight"
    )
    assert fs.name_map(("trunk", "iga_3", "geo_scale")) == "trunk.iga_3.geo_scale"
    assert fs.name_map(("edge_feature_net", "edge_embedder", "layers", 5, "scale")) == (
        "edge_feature_net.edge_embedder.5.weight"
    )


def test_conv1d_weights_are_transposed_both_ways():
    import jax.numpy as jnp
    from flax import nnx

    class Head(nnx.Module):
        def __init__(self):
            self.branchA_in = nnx.Sequential(nnx.Conv(3, 5, 3, padding=1, rngs=nnx.Rngs(0)))
            self.fuse_in = nnx.Linear(5, 2, rngs=nnx.Rngs(0))

        def __call__(self, x):  # x [n, A, 3] channels last
            return self.fuse_in(self.branchA_in(x))

    torch.manual_seed(0)
    conv, lin = torch.nn.Conv1d(3, 5, 3, padding=1), torch.nn.Linear(5, 2)
    sd = {f"branchA_in.0.{k}": v for k, v in conv.state_dict().items()}
    sd |= {f"fuse_in.{k}": v for k, v in lin.state_dict().items()}
    head = Head()
    assert fs.to_port(sd, head, fs.name_map) == []
    x = np.random.default_rng(0).normal(size=(4, 10, 3)).astype(np.float32)
    theirs = lin(conv(torch.tensor(x).transpose(1, 2)).transpose(1, 2)).detach().numpy()
    np.testing.assert_allclose(np.asarray(head(jnp.asarray(x))), theirs, atol=1e-5)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x))))(head)
    back = fs.grads_to_state_dict(grads, head, fs.name_map)
    (lin(conv(torch.tensor(x).transpose(1, 2)).transpose(1, 2))).sum().backward()
    np.testing.assert_allclose(back["branchA_in.0.weight"], conv.weight.grad.numpy(), atol=1e-4)
    assert back["branchA_in.0.weight"].shape == (5, 3, 3)
    with pytest.raises(KeyError, match="no NNX parameter"):
        fs.to_port({**sd, "extra.weight": torch.zeros(1)}, Head(), fs.name_map)
    assert fs.to_port(
        {**sd, "extra.weight": torch.zeros(1)}, Head(), fs.name_map, optional=["extra.weight"]
    ) == ["extra.weight"]


def test_intercept_records_replaces_and_restores():
    import jax.numpy as jnp
    from flax import nnx

    from jaxstab.models.sidechain.layers import MLPResBlock, StructureModuleTransition

    class Two(nnx.Module):
        def __init__(self):
            self.head = MLPResBlock(4, rngs=nnx.Rngs(0))
            self.trunk = nnx.Dict(t_0=StructureModuleTransition(4, rngs=nnx.Rngs(1)))

    model = Two()
    before = MLPResBlock.__dict__["__call__"]
    x = jnp.ones((1, 3, 4))
    with fs.intercept(model, ["head"], {"trunk.t_0": jnp.zeros(2)}) as calls:
        model.head(x)
        assert model.trunk["t_0"](x).shape == (2,)
        MLPResBlock(4, rngs=nnx.Rngs(2))(x)  # another instance: not recorded
    assert MLPResBlock.__dict__["__call__"] is before
    assert "__call__" in StructureModuleTransition.__dict__
    assert list(calls) == ["head"] and calls["head"][1].shape == (1, 3, 4)
    with pytest.raises(KeyError, match="no sub-modules"), fs.intercept(model, ["nope"]):
        pass


def _fake_original(root):
    files = {
        "models/flow_model.py": "from data.helper import VALUE\nclass SideAtomsIGAModel:\n"
        "    value = VALUE\n",
        "data/helper.py": "VALUE = 42\n",
        "openfold/utils/rigid_utils.py": "KIND = 'rigid'\n",
        "chroma/__init__.py": "",
        "chroma/layers/structure/backbone.py": "KIND = 'frames'\n",
        "configs/SH.yaml": "model: {}\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("bare", [False, True], ids=["folder", "bare-clone"])
def test_import_original_from_a_folder_or_a_bare_clone(tmp_path, bare):
    src = tmp_path / "pu"
    _fake_original(src)
    path, commit = src, None
    if bare:
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(src)]
        subprocess.run(["git", "init", "-q", str(src)], check=True)
        subprocess.run([*git, "add", "."], check=True)
        subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        path = tmp_path / "pu.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(src), str(path)], check=True)
    else:
        (src / "COMMIT").write_text("e2a56a3e607b894321126787773a0b24747a8a0f\n")
        commit = "e2a56a3e607b894321126787773a0b24747a8a0f"
    assert fs.commit_of(path) == commit
    with fs.import_original(path) as mods:
        assert mods["flow_model"].SideAtomsIGAModel.value == 42
        assert mods["backbone"].KIND == "frames" and mods["rigid_utils"].KIND == "rigid"
        assert (mods["root"] / "configs" / "SH.yaml").is_file()
        assert "torch_scatter" in sys.modules or "torch_scatter" not in mods["stand_ins"]
    assert not [m for m in sys.modules if m.split(".")[0] in fs.TOP_LEVEL]
    assert all(name not in sys.modules for name in mods["stand_ins"])


def test_stand_in_modules_raise_when_used():
    mod = fs._stand_in("torch_scatter", "no wheel")
    fn = mod.scatter_add  # importable by name ...
    with pytest.raises(RuntimeError, match="stand-in"):
        fn(1)  # ... but not usable


def test_original_model_config_maps_the_widths(tmp_path):
    yaml = tmp_path / "SH.yaml"
    yaml.write_text(
        textwrap.dedent("""\
        model:
          use_esm: False
          node_embed_size: 384
          edge_embed_size: 128
          node_features: {c_s: "${model.node_embed_size}", c_pos_emb: 128, c_timestep_emb: 128}
          edge_features: {c_s: "${model.node_embed_size}", c_p: "${model.edge_embed_size}",
                          feat_dim: 64, num_bins: 22}
          ipa: {c_s: "${model.node_embed_size}", c_z: "${model.edge_embed_size}", c_hidden: 16,
                no_heads: 8, no_qk_points: 8, no_v_points: 12, seq_tfmr_num_heads: 4,
                seq_tfmr_num_layers: 2, num_blocks: 6}
          sidechain_atoms: {hidden: "${model.node_embed_size}"}
        """)
    )
    config = fs.compare_config(SideChainConfig.original(), small=True)
    assert (config.c_z, config.seq_head_layers) == (128, 3)
    m = fs.original_model_config(config, yaml)
    assert (m.node_embed_size, m.ipa.c_s, m.edge_features.c_p, m.ipa.num_blocks) == (32, 32, 128, 2)
    assert (m.ipa.no_qk_points, m.node_features.c_timestep_emb, m.sidechain_atoms.hidden) == (
        config.n_qk_gaussians,
        config.c_timestep_emb,
        config.sidechain_hidden,
    )
    with pytest.raises(ValueError, match="c_z"):
        fs.original_model_config(config.replace(c_z=16), yaml)
    with pytest.raises(ValueError, match="gaussian_atoms"):
        fs.original_model_config(config.replace(gaussian_atoms="sidechain"), yaml)
