"""The Flax port against the PyTorch e3nn version: same weights, real molecules, same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks.specs import e3gnn as spec_mod
from benchmarks.torch_ref import e3gnn as tref

SPEC = spec_mod.SPEC


def _np(a) -> np.ndarray:
    return np.asarray(a.detach() if hasattr(a, "detach") else a, np.float64)


def rel_err(a, b, floor: float = 1e-30) -> float:
    a, b = _np(a), _np(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))


@pytest.fixture(scope="module", params=["default", "original"])
def outputs(request):
    preset = request.param
    torch_model = SPEC.build_torch("small", preset, 0)
    # Non-zero biases, LayerNorm affines and branch weights away from their start, so every
    # leaf of the conversion matters.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or name.endswith("_weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    torch_model.eval()
    model, _ = SPEC.build_jax("small", preset, 0)
    nnx.update(model, SPEC.convert(torch_model.state_dict(), model))
    model.eval()
    inputs = SPEC.inputs("small", 0)
    return SPEC.outputs_jax(model, inputs), SPEC.outputs_torch(torch_model, inputs), inputs


def test_embeddings_match_on_real_molecules(outputs):
    ours, theirs, inputs = outputs
    assert inputs["x"].shape[0] == 4 and inputs["atom_mask"].sum() > 40  # EGFR molecules
    assert rel_err(ours["embedding"], theirs["embedding"]) < 1e-4
    assert rel_err(ours["loss"], theirs["loss"]) < 1e-4


def test_every_gradient_matches(outputs):
    ours, theirs, _ = outputs
    assert set(ours["gradients"]) == set(theirs["gradients"])
    # Relative to each tensor's largest entry, floored at 1e-4 of the largest gradient of all:
    # the pooling MLP's last bias has gradient 0 in exact arithmetic (softmax ignores a
    # shift), so both sides hold rounding noise there.
    scale = max(np.max(np.abs(_np(g))) for g in theirs["gradients"].values())
    worst = {k: rel_err(ours["gradients"][k], theirs["gradients"][k], 1e-4 * scale)
             for k in ours["gradients"]}  # fmt: skip
    bad = {k: v for k, v in worst.items() if not v < 1e-3}
    assert not bad, bad
    # The branch weights get gradient on both sides (the comparison is not of zeros).
    assert abs(float(theirs["gradients"]["angle_weight"])) > 0


def test_converter_computes_frequencies_and_rejects_strays():
    torch_model = SPEC.build_torch("small", "default", 0)
    model, _ = SPEC.build_jax("small", "default", 0)
    sd = torch_model.state_dict()
    assert any(k.endswith("bessel_basis.frequencies") for k in sd)
    SPEC.convert(sd, model)  # buffers the port computes are accepted...
    with pytest.raises(KeyError, match="no NNX parameter"):
        SPEC.convert({**sd, "stray.weight": torch.zeros(1)}, model)  # ...no other extra key
    missing = {k: v for k, v in sd.items() if k != "angle_weight"}
    with pytest.raises(KeyError, match="angle_weight"):
        SPEC.convert(missing, model)


def test_name_map_covers_every_parameter_one_to_one():
    torch_model = SPEC.build_torch("small", "original", 0)
    model, _ = SPEC.build_jax("small", "original", 0)
    keys = {spec_mod.name_map(tuple(p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert keys == {k for k, _ in torch_model.named_parameters()}
    assert isinstance(torch_model, tref.E3GNNTorch)
