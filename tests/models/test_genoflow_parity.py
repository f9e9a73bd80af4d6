"""GenoFlow's Flax port against its PyTorch version (``benchmarks/torch_ref/genoflow.py``): the
same state dict on both sides, then the same numbers — model quantities at the spec's small
size for both presets, the GATv2 layer against PyTorch Geometric's, diffrax against
torchdiffeq, ott-jax against POT, and BatchNorm's running statistics.

The port is built with an ``rbg`` PRNG key: its initial weights are replaced by the PyTorch
ones, and ``rbg`` initialisers compile in a fraction of threefry's time.
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks import parity, specs
from benchmarks.torch_ref import genoflow as tref
from jaxstab.models.genoflow.model import GATv2, GenoFlow, with_self_loops
from jaxstab.models.genoflow.pairing import pair_by_ot, pair_time_points
from jaxstab.models.genoflow.trajectory import integrate_latent

SPEC = specs.get("genoflow")
SIZE = "small"
# The original CausalGenoFlow's state-dict keys (modules in its order), parameters and buffers.
ORIGINAL_KEYS = (
    [f"encoder.fc.{i}.{w}" for i in (0, 3) for w in ("weight", "bias")]
    + [f"encoder.fc.{i}.{w}" for i in (1, 4)
       for w in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    + [f"encoder.{h}.{w}" for h in ("mu_head", "logvar_head") for w in ("weight", "bias")]
    + [f"decoder.{m}.{w}" for m in ("fc.0", "fc.2", "scale_head") for w in ("weight", "bias")]
    + ["decoder.px_r", "vector_field.gene_embeddings", "vector_field.gat.att",
       "vector_field.gat.bias", "vector_field.edge_index"]
    + [f"vector_field.{m}.{w}" for m in ("gat.lin_l", "gat.lin_r", "query_proj", "time_mlp.0",
                                         "time_mlp.2", "cond_mlp", "final_mlp.0", "final_mlp.3")
       for w in ("weight", "bias")]
    + [f"discriminator.net.{i}.{w}" for i in (0, 3, 6) for w in ("weight", "bias")]
)  # fmt: skip


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def build_port(preset: str, seed: int = 0) -> GenoFlow:
    dataset = SPEC.data(SIZE, seed)
    rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
    return SPEC.model_entry().build_model(dataset, SPEC.config(SIZE, preset), rngs)


def trained_statistics(torch_model: tref.GenoFlowModel, seed: int = 0) -> None:
    """Running statistics away from their initial 0 and 1 (as after training), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in (1, 4):
            bn = torch_model.encoder.fc[i]
            bn.running_mean.normal_(0.0, 0.3, generator=gen)
            bn.running_var.uniform_(0.3, 2.0, generator=gen)


@pytest.fixture(scope="module", params=["default", "original"])
def pair(request):
    """``(preset, torch model, port, errors)``: the spec's parity quantities at the small size,
    PyTorch weights (with the spec's noise and trained running statistics) on both sides."""
    preset = request.param
    torch_model = SPEC.build_torch(SIZE, preset, 0)
    torch_model.eval()
    SPEC.parity_weights(torch_model, 0)
    trained_statistics(torch_model)
    model = tref.torch_state_dict_to_nnx(torch_model.state_dict(), build_port(preset))
    model.eval()
    inputs = SPEC.inputs(SIZE, 0)
    ours, theirs = SPEC.outputs_jax(model, inputs), SPEC.outputs_torch(torch_model, inputs)
    assert set(ours) == set(theirs)
    errors = {k: parity.error(ours[k], theirs[k], SPEC.zero_gradients) for k in ours}
    n_grads = (len(ours["vae_gradients"]), len(ours["flow_gradients"]))
    return preset, torch_model, model, errors, n_grads, inputs


# ------------------------------------------------------------------ one state dict
def test_one_state_dict_loads_into_both_versions_and_both_presets():
    torch.manual_seed(0)
    meta = SPEC.data(SIZE, 0).meta
    graph = np.asarray(meta["gene_graph"])
    source = tref.GenoFlowModel(meta["n_genes"], meta["n_conditions"], graph,
                                SPEC.config(SIZE, "default"))  # fmt: skip
    trained_statistics(source)
    sd = source.state_dict()
    assert sorted(sd) == sorted(ORIGINAL_KEYS)
    for preset in ("default", "original"):
        torch.manual_seed(1)
        other = tref.GenoFlowModel(meta["n_genes"], meta["n_conditions"], graph,
                                   SPEC.config(SIZE, preset))  # fmt: skip
        assert not torch.equal(other.encoder.fc[0].weight, source.encoder.fc[0].weight)
        other.load_state_dict(sd, strict=True)
        model = tref.torch_state_dict_to_nnx(sd, build_port(preset))
        flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))
        assert len(flat) == len(sd) - 3  # no num_batches_tracked (2), edge_index kept as loops
        for path, var in flat.items():
            value = sd[tref.nnx_name(path)].numpy()
            value = value.T if path[-1] == "kernel" else value
            np.testing.assert_array_equal(np.asarray(var[...]), value, err_msg=str(path))
        # The suites' converter fills the same parameters (running statistics: optional keys).
        params = dict(nnx.to_flat_state(SPEC.convert(sd, model)))
        assert params.keys() == dict(nnx.to_flat_state(nnx.state(model, nnx.Param))).keys()
    np.testing.assert_array_equal(np.asarray(model.vector_field.edge_index[...]),
                                  with_self_loops(graph, meta["n_genes"]))  # fmt: skip


def test_converter_rejects_a_different_graph_and_missing_keys():
    model = build_port("default")
    sd = dict(SPEC.build_torch(SIZE, "default", 0).state_dict())
    wrong = {**sd, "vector_field.edge_index": torch.tensor([[0], [1]])}
    with pytest.raises(ValueError, match=r"vector_field\.edge_index"):
        tref.torch_state_dict_to_nnx(wrong, model)
    missing = {k: v for k, v in sd.items() if k != "encoder.fc.4.running_var"}
    with pytest.raises(KeyError, match=re.escape("encoder.fc.4.running_var")):
        tref.torch_state_dict_to_nnx(missing, model)


# ------------------------------------------------------------------ parity
def test_parity_of_every_quantity(pair):
    preset, _, _, errors, n_grads, _ = pair
    assert n_grads == (25, 19)  # encoder + decoder + discriminator; vector field
    for name, (err, kind) in errors.items():
        assert err < parity.TOLERANCES[kind], (preset, name, err)


def test_flow_time_reaches_both_sides(pair):
    preset, torch_model, model, *_ = pair
    expected = (0.0, 0.5, 1.0) if preset == "default" else (0.0, 1.0, 2.0)
    assert model.flow_times() == torch_model.flow_times() == expected
    z = np.random.default_rng(0).normal(size=(3, model.config.latent_dim)).astype(np.float32)
    cond = np.array([0, 1, 0])
    # "interval": flow time 1.25 is 0.25 into the second interval.
    tau = 1.25 if preset == "original" else 0.25
    ours = model.velocity(jnp.asarray(tau), jnp.asarray(z), jnp.asarray(cond))
    with torch.no_grad():
        theirs = torch_model.vector_field(torch.tensor(0.25), torch.tensor(z), torch.tensor(cond))
    assert rel_err(ours, theirs.numpy()) < 1e-5


def test_gatv2_matches_torch_geometric():
    """The plain-torch GATv2 against ``torch_geometric.nn.GATv2Conv`` (heads 2, concat, the
    same weights, eval): a graph with self loops, a duplicate edge and a node without
    in-edges."""
    from torch_geometric.nn import GATv2Conv

    torch.manual_seed(0)
    n, d, heads = 11, 6, 2
    ours = tref.GATv2(d, 5, heads, dropout=0.1, slope=0.2).eval()
    theirs = GATv2Conv(d, 5, heads=heads, concat=True, dropout=0.1, negative_slope=0.2).eval()
    with torch.no_grad():
        ours.bias.normal_(0.0, 0.1)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    rng = np.random.default_rng(0)
    edges = rng.integers(0, n - 1, size=(2, 30))  # node n - 1: no in-edges but its loop
    edges = np.concatenate([edges, [[2, 2, 4], [2, 3, 3]]], axis=1)  # a loop, a duplicate
    edges = torch.as_tensor(edges)
    x = torch.randn(n, d, requires_grad=True)
    out = ours(x, edges)
    ref = theirs(x, edges)
    assert rel_err(out.detach(), ref.detach()) < 1e-6
    (g_ours,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert rel_err(g_ours, g_ref) < 1e-5


def test_port_gatv2_matches_the_torch_gatv2():
    torch.manual_seed(1)
    n, d, heads = 9, 4, 2
    layer = tref.GATv2(d, 3, heads, dropout=0.0, slope=0.2).eval()
    with torch.no_grad():
        layer.bias.normal_(0.0, 0.1)
    port = GATv2(d, 3, heads, 0.0, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), slope=0.2)
    names = {("lin_l", "kernel"): "lin_l.weight", ("lin_r", "kernel"): "lin_r.weight",
             ("lin_l", "bias"): "lin_l.bias", ("lin_r", "bias"): "lin_r.bias",
             ("att",): "att", ("bias",): "bias"}  # fmt: skip
    from benchmarks.convert import load_state_dict

    load_state_dict(layer.state_dict(), port, names)
    edges = np.array([[0, 1, 2, 3, 5, 5, 8], [1, 2, 3, 1, 1, 6, 1]])
    x = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    ours = port(jnp.asarray(x), jnp.asarray(with_self_loops(edges, n)))
    with torch.no_grad():
        theirs = layer(torch.tensor(x), torch.as_tensor(edges))
    assert rel_err(ours, theirs.numpy()) < 1e-6


# ------------------------------------------------------------------ trajectories
@pytest.fixture(scope="module")
def trajectories(pair):
    """``(preset, port, PyTorch, float64 reference, start)``: z at 5 flow times from the first
    to the last time point, 8 cells; diffrax and torchdiffeq at rtol 1e-5 / atol 1e-6, the
    reference torchdiffeq in float64 at rtol 1e-11 / atol 1e-12."""
    preset, torch_model, model, _, _, inputs = pair
    a = inputs["arrays"]
    cond = np.asarray(a["condition"])[:8]
    with torch.no_grad():
        z0 = torch_model.encode_mean(torch.tensor(a["x"][:8]), torch.tensor(cond))
    ft = model.flow_times()
    times = np.linspace(ft[0], ft[-1], 5).astype(np.float32)
    ours, _ = integrate_latent(model, jnp.asarray(z0.numpy()), jnp.asarray(cond),
                               jnp.asarray(times), rtol=1e-5, atol=1e-6)  # fmt: skip
    exact = copy.deepcopy(torch_model).double()
    with torch.no_grad():
        theirs = tref.integrate_latent_torch(torch_model, z0, torch.tensor(cond),
                                             torch.tensor(times), rtol=1e-5, atol=1e-6)  # fmt: skip
        ref = tref.integrate_latent_torch(exact, z0.double(), torch.tensor(cond),
                                          torch.tensor(times).double(), rtol=1e-11,
                                          atol=1e-12)  # fmt: skip
    return preset, np.asarray(ours), theirs.numpy(), ref.numpy(), z0.numpy()


def test_diffrax_trajectory_matches_torchdiffeq(trajectories):
    preset, ours, theirs, _, z0 = trajectories
    moved = rel_err(theirs[-1], z0)
    assert moved > 1e-2, (preset, moved)  # the flow does move the cells
    assert rel_err(ours, theirs) < 1e-3, preset


def test_both_trajectories_reach_the_float64_reference(trajectories):
    """Both solvers within 1e-4 of a float64 solution at rtol 1e-11: with
    ``flow_time="interval"`` the vector field's time jumps at the interior time points, so the
    solver must be told (torchdiffeq's ``jump_t``; diffrax's ``ClipStepSizeController(...,
    jump_ts=...)``), or its steps straddle the jump and the error is near 1e-3."""
    preset, ours, theirs, ref, _ = trajectories
    assert rel_err(theirs, ref) < 1e-4, (preset, "torchdiffeq", rel_err(theirs, ref))
    assert rel_err(ours, ref) < 1e-4, (preset, "diffrax", rel_err(ours, ref))


# ------------------------------------------------------------------ OT pairing
def test_ott_pairing_matches_pot():
    rng = np.random.default_rng(0)
    n, d, n_times = 12, 4, 3
    base = rng.normal(size=(n, d)) * 3.0
    latent, time = [], []
    for k in range(n_times):  # each time point: the same cells, shuffled, shifted, jittered
        perm = rng.permutation(n)
        latent.append(base[perm] + 0.5 * k + 0.01 * rng.normal(size=(n, d)))
        time.append(np.full(n, k))
    latent = np.concatenate(latent).astype(np.float32)
    time = np.concatenate(time)
    kw = {"epsilon": 0.01, "cost": "euclidean", "ddof": 1}
    ours = pair_time_points(latent, time, n_times, **kw)
    theirs = tref.pair_time_points_pot(latent, time, n_times, **kw)
    for o, t in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(o, t)
    # The right partners (the same cell, shifted by 0.5) and close plans.
    assert np.max(np.abs(latent[ours[1]] - latent[ours[0]] - 0.5)) < 0.1
    plan = np.asarray(pair_by_ot(latent[:n], latent[n : 2 * n], **kw).plan)
    plan_pot, _ = tref.pair_by_pot(latent[:n], latent[n : 2 * n], **kw)
    assert np.max(np.abs(plan - plan_pot)) < 1e-4


# ------------------------------------------------------------------ BatchNorm
def _fresh_pair() -> tuple[tref.GenoFlowModel, GenoFlow, np.ndarray, np.ndarray]:
    torch_model = SPEC.build_torch(SIZE, "default", 0)
    model = tref.torch_state_dict_to_nnx(torch_model.state_dict(), build_port("default"))
    a = SPEC.inputs(SIZE, 0)["arrays"]
    return torch_model, model, np.log1p(a["x"]), np.asarray(a["condition"])


def _stats(model: GenoFlow) -> dict:
    return {k: np.asarray(v[...]).copy()
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}  # fmt: skip


def test_batchnorm_statistics_move_in_training_only_and_their_mean_matches_torch():
    torch_model, model, x_log, cond = _fresh_pair()
    before = _stats(model)
    model.eval()
    model.encoder(jnp.asarray(x_log), jnp.asarray(cond))
    assert all(np.array_equal(before[k], v) for k, v in _stats(model).items())
    model.train()
    ours = model.encoder(jnp.asarray(x_log), jnp.asarray(cond))
    after = _stats(model)
    assert all(not np.array_equal(before[k], v) for k, v in after.items())
    torch_model.train()
    with torch.no_grad():
        theirs = torch_model.encoder(torch.tensor(x_log), torch.tensor(cond))
    for o, t in zip(ours, theirs, strict=True):  # training-mode outputs: batch statistics
        assert rel_err(o, t.numpy()) < 1e-5
    for i in (1, 4):
        mean = torch_model.encoder.fc[i].running_mean.numpy()
        assert rel_err(after[("encoder", f"fc_{i}", "mean")], mean) < 1e-6


def test_batchnorm_running_variance_matches_torch():
    """PyTorch updates the running variance with the unbiased batch variance
    (``n / (n - 1)`` times the biased one); the port must too, or its eval-mode encoder differs
    from the original's after training."""
    torch_model, model, x_log, cond = _fresh_pair()
    model.train()
    model.encoder(jnp.asarray(x_log), jnp.asarray(cond))
    torch_model.train()
    with torch.no_grad():
        torch_model.encoder(torch.tensor(x_log), torch.tensor(cond))
    n = x_log.shape[0]
    for i in (1, 4):
        ours = _stats(model)[("encoder", f"fc_{i}", "var")]
        theirs = torch_model.encoder.fc[i].running_var.numpy()
        # After one update from 1: theirs - 1 = m (v_unbiased - 1), ours - 1 = m (v_biased - 1).
        err = rel_err(ours, theirs)
        assert err < 1e-5, (
            f"encoder.fc.{i}.running_var: max relative difference {err:.2e} after one "
            f"training step at batch {n} (the port updates with the biased batch variance)"
        )
