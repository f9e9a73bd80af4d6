"""The E3 GNN encoder on real molecules: invariance, padding, branch weights, embed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.spatial.transform import Rotation

from jaxstab.models.e3gnn import E3GNNConfig, E3PocketEncoder, default_data, embed
from jaxstab.models.e3gnn.model import MODEL_INPUTS

N = 4


@nnx.jit
def forward(model, batch):
    return model(batch)


@pytest.fixture(scope="module")
def batch():
    data = default_data()
    return {k: np.asarray(v[:N]) for k, v in data.arrays.items()}


def _model(config: E3GNNConfig, seed: int = 0) -> E3PocketEncoder:
    model = E3PocketEncoder(config, rngs=nnx.Rngs(seed))
    model.eval()
    return model


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _moved(batch, matrix, shift):
    out = dict(batch)
    out["pos"] = (batch["pos"] @ matrix.T + shift).astype(np.float32)
    return out


def test_embedding_is_invariant_to_rotations_reflections_and_translations(batch):
    """The default preset (full widths, equivariant LayerNorm): 1e-4 relative in float32."""
    model = _model(E3GNNConfig.default())
    ref = forward(model, batch)
    rng = np.random.default_rng(0)
    for k in range(2):
        matrix = Rotation.random(random_state=k).as_matrix()
        if k % 2:
            matrix = -matrix  # a rotation times the inversion: an improper transformation
        moved = forward(model, _moved(batch, matrix, rng.normal(scale=10.0, size=3)))
        assert rel(moved, ref) < 1e-4


def test_original_layer_norm_is_not_rotation_invariant(batch):
    """The original's per-component LayerNorm depends on the frame; the port's does not."""
    matrix = Rotation.random(random_state=3).as_matrix()
    errs = {}
    for norm in ("original", "equivariant"):
        model = _model(E3GNNConfig.small().replace(norm=norm))
        errs[norm] = rel(forward(model, _moved(batch, matrix, 0.0)), forward(model, batch))
    assert errs["equivariant"] < 1e-5
    assert errs["original"] > 1e-3


def test_geometry_comes_from_pos(batch):
    """Stretching the molecules changes the embedding: distances are computed from pos."""
    model = _model(E3GNNConfig.small())
    assert rel(forward(model, _moved(batch, 1.2 * np.eye(3), 0.0)), forward(model, batch)) > 1e-3


def test_padding_and_batch_neighbours_do_not_change_an_embedding(batch):
    model = _model(E3GNNConfig.small())
    ref = np.asarray(forward(model, batch))
    # Molecule 2 alone, with more padded atoms and edge slots (zeros, mask False): its row.
    alone = {}
    for k, v in batch.items():
        v = v[2:3]
        if k in MODEL_INPUTS and v.ndim >= 2:
            v = np.pad(v, [(0, 0), (0, 5)] + [(0, 0)] * (v.ndim - 2))
        alone[k] = v
    np.testing.assert_allclose(forward(model, alone)[0], ref[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("raw", [-50.0, 50.0])
def test_bounded_branch_weights_stay_positive_with_gradient_at_extremes(raw):
    model = _model(E3GNNConfig.small())
    for name in ("angle", "dihedral", "nonbonded"):
        getattr(model, f"{name}_weight")[...] = jnp.asarray(raw)
        grad = nnx.grad(lambda m, n=name: m.branch_weight(n))(model)
        assert float(model.branch_weight(name)) > 0
        assert float(getattr(grad, f"{name}_weight")[...]) > 0


def test_exp_clamp_weights_lose_their_gradient_past_the_limit():
    """The seed's ``exp(clamp(raw, -5, 5))``: gradient exactly 0 once |raw| > 5."""
    model = _model(E3GNNConfig.small().replace(weight_param="exp_clamp"))
    assert float(model.branch_weight("angle")) == pytest.approx(0.333, rel=1e-6)
    for raw, expect_zero in ((4.9, False), (5.1, True), (-5.1, True)):
        model.angle_weight[...] = jnp.asarray(raw)
        grad = nnx.grad(lambda m: m.branch_weight("angle"))(model)
        assert (float(grad.angle_weight[...]) == 0.0) is expect_zero


def test_raw_and_fixed_weights():
    raw = _model(E3GNNConfig.small().replace(weight_param="raw"))
    raw.angle_weight[...] = jnp.asarray(-0.5)
    assert float(raw.branch_weight("angle")) == -0.5  # the original: may turn negative
    fixed = _model(E3GNNConfig.small().replace(weight_param="fixed"))
    params = nnx.state(fixed, nnx.Param)
    assert "angle_weight" not in params
    assert float(fixed.branch_weight("angle")) == pytest.approx(0.333)


def test_flags_remove_their_branches(batch):
    config = E3GNNConfig.small().replace(use_multi_hop=False, use_nonbonded=False)
    model = _model(config)
    names = {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "angle_mp_layers" not in names and "nonbonded_mp_layers" not in names
    assert model.branch_names() == ()
    assert np.isfinite(forward(model, batch)).all()
    no_gate = _model(E3GNNConfig.small().replace(use_gate=False, use_layer_norm=False))
    assert no_gate.bonded_mp_layers[0].layer_norm is None
    assert np.isfinite(forward(no_gate, batch)).all()


def test_dropout_only_in_train_mode(batch):
    model = E3PocketEncoder(E3GNNConfig.small(), rngs=nnx.Rngs(0))  # dropout 0.1
    model.eval()
    a, b = forward(model, batch), forward(model, batch)
    np.testing.assert_array_equal(a, b)
    model.train()
    assert rel(forward(model, batch), a) > 1e-4


def test_embed_matches_the_forward_in_batches(batch):
    model = _model(E3GNNConfig.small())
    out = embed(model, batch, batch_size=3)  # one full batch and one padded
    assert out.shape == (N, 1536) and out.dtype == np.float32
    np.testing.assert_allclose(out, forward(model, batch), rtol=1e-5, atol=1e-6)


def test_hidden_irreps_must_start_with_scalars():
    with pytest.raises(ValueError, match="hidden_irreps must start with scalars"):
        E3PocketEncoder(E3GNNConfig.small(), rngs=nnx.Rngs(0), hidden_irreps="4x1o+8x0e")
