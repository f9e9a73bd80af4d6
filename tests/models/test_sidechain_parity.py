"""The Flax side-chain model against its PyTorch version: one state dict, real chains, the same
design mask, the same outputs, loss terms and gradients.

Weights are the PyTorch model's initial ones plus ``0.1 · N(0, 1)`` on every parameter, so the
zero-initialised heads and updates are live and every leaf of the conversion matters. At
``0.2`` the trunk is ill-conditioned enough that PyTorch's own float32 gradients differ from
its float64 ones by ~1e-3 (a property of that point, not of either implementation); the
float64 case below shows the two functions agree to rounding. The JAX side compiles with
the suite's cheap XLA pipeline (tests/conftest.py), which changes no operation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks.convert import nnx_to_state_dict, state_dict_to_nnx, torch_grads
from benchmarks.specs.sidechain_names import name_map
from benchmarks.torch_ref import sidechain as ts
from jaxstab.models.sidechain import (
    SideChainConfig,
    SideChainModel,
    center_crop,
    default_data,
    design_mask,
    loss_terms,
)
from jaxstab.models.sidechain.losses import TERMS

L = 20
PRESETS = {
    "small": SideChainConfig.small(),
    "original": SideChainConfig.small(SideChainConfig.original()),
}
ALL_OPTIONS = SideChainConfig.small().replace(
    use_esm=True, per_atom_gaussians=True, log_scale_clip="soft", atom_weights="exp",
    n_blocks=1, seq_layers=2, seq_head_layers=2,
)  # fmt: skip


def _np(a) -> np.ndarray:
    return np.asarray(a.detach() if hasattr(a, "detach") else a, np.float64)


def rel_err(a, b, floor: float = 1e-30) -> float:
    a, b = _np(a), _np(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    """Two real chains, central 20 residues; the second one's last 4 slots padded (their
    atoms left as garbage) so every mask is exercised."""
    arrays = {k: v[:2] for k, v in default_data("val").arrays.items()}
    out = {k: np.array(v) for k, v in center_crop(arrays, L).items()}
    out["residue_mask"][1, L - 4 :] = 0
    out["atom14_pos"][1, L - 4 :] += 3.0
    out["design_mask"] = np.asarray(design_mask(jax.random.key(1), out["residue_mask"], 0.5, 1.0))
    rng = np.random.default_rng(0)
    c = ALL_OPTIONS
    out["esm_single"] = rng.normal(size=(2, L, c.esm_single_dim)).astype(np.float32)
    out["esm_pair"] = rng.normal(size=(2, L, L, c.esm_pair_dim)).astype(np.float32)
    return out


def _torch_model(config: SideChainConfig, amp: float = 0.1) -> ts.SideChainTorch:
    torch.manual_seed(0)
    model = ts.SideChainTorch(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amp * torch.randn(p.shape, generator=gen))
    return model


def _nnx_model(torch_model: ts.SideChainTorch, dtype=np.float32) -> SideChainModel:
    # Built abstractly (no initialisers run) and filled from the state dict, strictly.
    abstract = nnx.eval_shape(lambda: SideChainModel(torch_model.config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    state = state_dict_to_nnx(torch_model.state_dict(), abstract, name_map)
    if dtype != np.float32:
        state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, dtype)), state)
    return nnx.merge(graphdef, state)


def _jax_run(model: SideChainModel, batch: dict[str, np.ndarray]) -> dict:
    graphdef, params = nnx.split(model, nnx.Param)
    dtype = jax.tree.leaves(params)[0].dtype
    jb = {k: jnp.asarray(v, dtype) if v.dtype == np.float32 else jnp.asarray(v)
          for k, v in batch.items()}  # fmt: skip

    def f(params, jb):
        m = nnx.merge(graphdef, params)
        out = m(jb)
        loss, metrics = loss_terms(out, jb, m.config)
        return loss, (out["atom14_pos"], out["aatype_logits"], metrics)

    step = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(params, jb).compile()
    (loss, (pos, logits, metrics)), grads = step(params, jb)
    return {"loss": loss, "atom14_pos": pos, "aatype_logits": logits, "metrics": metrics,
            "gradients": nnx_to_state_dict(grads, name_map)}  # fmt: skip


def _torch_run(model: ts.SideChainTorch, batch: dict[str, np.ndarray], dtype=torch.float32):
    tb = ts.batch_to_tensors(batch, dtype)
    model.zero_grad()
    out = model(tb)
    loss, metrics = ts.loss_terms(out, tb, model.config)
    loss.backward()
    return {"loss": loss, "atom14_pos": out["atom14_pos"], "aatype_logits": out["aatype_logits"],
            "metrics": metrics, "gradients": torch_grads(model)}  # fmt: skip


def _errors(ours: dict, theirs: dict) -> tuple[dict[str, float], dict[str, float]]:
    values = {k: rel_err(ours[k], theirs[k]) for k in ("atom14_pos", "aatype_logits", "loss")}
    for name in TERMS:
        values[name] = rel_err(ours["metrics"][name], theirs["metrics"][name])
    assert set(ours["gradients"]) == set(theirs["gradients"])
    # Relative to each tensor's largest entry, floored at 1e-4 of the largest gradient of all:
    # the IGA's geo_bias and linear_b bias shift every logit of a head's row alike, so their
    # gradient is 0 in exact arithmetic and both sides hold rounding noise.
    scale = max(np.max(np.abs(_np(g))) for g in theirs["gradients"].values())
    grads = {k: rel_err(ours["gradients"][k], theirs["gradients"][k], 1e-4 * scale)
             for k in theirs["gradients"]}  # fmt: skip
    return values, grads


@pytest.fixture(scope="module", params=sorted(PRESETS))
def results(request, batch):
    torch_model = _torch_model(PRESETS[request.param])
    model = _nnx_model(torch_model)
    return _jax_run(model, batch), _torch_run(torch_model, batch)


def test_outputs_and_every_loss_term_match(results, batch):
    ours, theirs = results
    assert batch["design_mask"].sum() > 10 and (~batch["design_mask"]).sum() > 5
    values, _ = _errors(ours, theirs)
    bad = {k: v for k, v in values.items() if not v < 1e-4}
    assert not bad, bad
    assert all(float(theirs["metrics"][k].detach()) > 0 for k in ("mse", "pair", "offset", "ce"))


def test_every_gradient_matches(results):
    ours, theirs = results
    _, grads = _errors(ours, theirs)
    bad = {k: v for k, v in grads.items() if not v < 1e-3}
    assert not bad, bad
    # geo_bias and linear_b's bias shift a head's logits alike: both sides hold rounding zeros
    scale = max(np.max(np.abs(g)) for g in theirs["gradients"].values())
    for key, g in theirs["gradients"].items():
        if key.endswith(("geo_bias", "linear_b.bias")):
            assert max(np.abs(g).max(), np.abs(ours["gradients"][key]).max()) < 1e-5 * scale
    # the zero-initialised heads and updates do get gradient (the comparison is not of zeros)
    for key in ("trunk.Gau_update_1.linear.weight", "logits_head.projection.weight",
                "trunk.iga_0.geo_scale", "aatype_embedding.weight"):  # fmt: skip
        if key in theirs["gradients"]:
            assert np.abs(theirs["gradients"][key]).max() > 0, key


def test_float64_every_option_agrees_to_rounding(batch):
    """ESM inputs, per-atom Gaussians, the soft log-scale clip, exponential atom weights,
    one block with 2 transformer layers, 2 sequence-head blocks, in float64 on both sides."""
    torch_model = _torch_model(ALL_OPTIONS, amp=0.2).double()
    with jax.enable_x64(True):
        model = _nnx_model(torch_model, np.float64)
        # nnx.Embed computes in its ``dtype`` (float32 by default) whatever the parameter's
        model.aatype_embedding.dtype = jnp.float64
        ours = _jax_run(model, batch)
    theirs = _torch_run(torch_model, batch, torch.float64)
    assert theirs["loss"].dtype == torch.float64 and ours["loss"].dtype == np.float64
    values, grads = _errors(ours, theirs)
    bad = {k: v for k, v in values.items() if not v < 1e-10}
    assert not bad, bad
    bad = {k: v for k, v in grads.items() if not v < 1e-8}
    assert not bad, bad


def test_name_map_covers_every_parameter_one_to_one():
    for config in (*PRESETS.values(), ALL_OPTIONS):
        torch_model = ts.SideChainTorch(config)
        model = nnx.eval_shape(lambda c=config: SideChainModel(c, rngs=nnx.Rngs(0)))
        paths = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        keys = [name_map(p) for p in paths]
        assert len(set(keys)) == len(keys)
        assert (
            set(keys)
            == set(torch_model.state_dict())
            == {k for k, _ in torch_model.named_parameters()}
        )


def test_conversion_is_strict():
    torch_model = ts.SideChainTorch(PRESETS["small"])
    model = nnx.eval_shape(lambda: SideChainModel(PRESETS["small"], rngs=nnx.Rngs(0)))
    sd = torch_model.state_dict()
    state = state_dict_to_nnx(sd, model, name_map)
    kernel = state["trunk"]["seq_tfmr_0"][0]["self_attn"]["in_proj"]["kernel"].get_value()
    np.testing.assert_array_equal(
        kernel, sd["trunk.seq_tfmr_0.layers.0.self_attn.in_proj_weight"].numpy().T
    )
    with pytest.raises(KeyError, match="no NNX parameter"):
        state_dict_to_nnx({**sd, "stray.weight": torch.zeros(1)}, model, name_map)
    missing = {k: v for k, v in sd.items() if k != "trunk.iga_1.geo_scale"}
    with pytest.raises(KeyError, match="geo_scale"):
        state_dict_to_nnx(missing, model, name_map)
