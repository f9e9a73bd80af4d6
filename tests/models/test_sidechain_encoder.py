"""The side-chain feature encoder (:mod:`jaxstab.models.sidechain.sidechain_encoder`) against
its PyTorch version (:mod:`benchmarks.torch_ref.sidechain_conv`): one state dict, real side
chains in their residues' frames, the same outputs and gradients; plus the pool's masking.

Weights are the PyTorch module's initial ones plus ``0.1 · N(0, 1)`` on every parameter, so
the norms' scales and biases are not at 1 and 0 and every leaf of the conversion matters.
The repository's converter transposes 2-D Linear kernels only; a Conv1d weight
``[out, in, k]`` is NNX's ``[k, in, out]``, converted here before and after it.
"""

from __future__ import annotations

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks.convert import nnx_to_state_dict, state_dict_to_nnx
from benchmarks.specs.sidechain_names import name_map
from benchmarks.torch_ref import sidechain_conv as tc
from jaxstab.models.sidechain import center_crop, default_data
from jaxstab.models.sidechain.rigid import Rigid
from jaxstab.models.sidechain.sidechain_encoder import (
    SideAtomsFeatureHead,
    masked_avg_pool_1d,
)

L, HIDDEN = 20, 16
DESIGNED = ((0, (1, 5, 6)), (1, (0, 10, 19)))  # (chain, residues) given zero atoms and mask
ORIGINAL_KEYS = (  # some state-dict keys of the original's SideAtomsFeatureHead
    "branchA_in.0.weight", "branchA_blocks.3.gn.weight", "branchA_blocks.0.conv2.bias",
    "branchB_in.0.weight", "branchB_in.1.weight", "branchB_blocks.0.net.3.weight",
    "branchB_blocks.0.norm.bias", "fuse_in.weight", "fuse_blocks.3.net.0.bias",
)  # fmt: skip


def is_conv_kernel(path: tuple) -> bool:
    return path[-1] == "kernel" and (path[0] == "branchA_in" or path[-2] in ("conv1", "conv2"))


def is_linear_kernel(path: tuple) -> bool:
    return path[-1] == "kernel" and not is_conv_kernel(path)


def torch_conv_kernel_to_flax(w) -> np.ndarray:
    """Conv1d ``[out, in, k]`` ↔ ``nnx.Conv`` ``[k, in, out]`` (its own inverse)."""
    return np.transpose(np.asarray(w.detach() if hasattr(w, "detach") else w), (2, 1, 0))


def _np(a) -> np.ndarray:
    return np.asarray(a.detach() if hasattr(a, "detach") else a, np.float64)


def rel_err(a, b) -> float:
    a, b = _np(a), _np(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@jax.jit
def _local_sidechains(pos: jax.Array) -> jax.Array:
    # atoms 4–13 in the frame of each residue's N, CA, C (one compilation, not op by op)
    rigid = Rigid.from_three_points(pos[..., 0, :], pos[..., 1, :], pos[..., 2, :])
    return rigid.expand().invert_apply(pos[..., 4:14, :])


@pytest.fixture(scope="module")
def sidechains() -> tuple[np.ndarray, np.ndarray]:
    """Atoms 4–13 of two real chains' central 20 residues in their backbone frames (Å,
    absent atoms 0), and their mask; a few residues "designed": atoms and mask zeroed."""
    arrays = {k: v[:2] for k, v in default_data("val").arrays.items()}
    b = center_crop(arrays, L)
    mask = (np.asarray(b["atom14_mask"]) > 0) & (np.asarray(b["residue_mask"]) > 0)[..., None]
    pos = np.where(mask[..., None], np.asarray(b["atom14_pos"]), 0.0)
    x = np.array(_local_sidechains(pos), np.float32)
    m = np.array(mask[..., 4:14], np.float32)
    for chain, residues in DESIGNED:
        x[chain, list(residues)] = 0.0
        m[chain, list(residues)] = 0.0
    x *= m[..., None]
    return x, m


def _torch_head(blocks: int = 4) -> tc.SideAtomsFeatureHead:
    torch.manual_seed(0)
    model = tc.SideAtomsFeatureHead(
        HIDDEN, conv_blocks=blocks, mlp_blocks=blocks, fuse_blocks=blocks
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _nnx_head(torch_model: tc.SideAtomsFeatureHead, dtype=np.float32) -> SideAtomsFeatureHead:
    n = (
        len(torch_model.branchA_blocks),
        len(torch_model.branchB_blocks),
        len(torch_model.fuse_blocks),
    )
    abstract = nnx.eval_shape(
        lambda: SideAtomsFeatureHead(
            HIDDEN, conv_blocks=n[0], mlp_blocks=n[1], fuse_blocks=n[2], rngs=nnx.Rngs(0)
        )
    )
    graphdef, _ = nnx.split(abstract)
    sd = {k: torch_conv_kernel_to_flax(v) if v.ndim == 3 else v
          for k, v in torch_model.state_dict().items()}  # fmt: skip
    state = state_dict_to_nnx(sd, abstract, name_map, transpose=is_linear_kernel)
    state = jax.tree.map(lambda v: jnp.asarray(np.asarray(v, dtype)), state)
    return nnx.merge(graphdef, state)


def _cotangent(dtype) -> np.ndarray:
    return np.random.default_rng(2).normal(size=(2, L, HIDDEN)).astype(dtype)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(graphdef: nnx.GraphDef, params: nnx.State, x, m, cot):
    # One compilation per dtype, shared by the tests (the graph is the same throughout).
    def f(params, x):
        model = nnx.merge(graphdef, params)
        out = model(x, m)
        return (out * cot).sum(), (out, model.branch_a(x, m))

    return jax.value_and_grad(f, (0, 1), has_aux=True)(params, x)


def _jax_run(model: SideAtomsFeatureHead, x: np.ndarray, m: np.ndarray) -> dict:
    graphdef, params = nnx.split(model, nnx.Param)
    cot = _cotangent(x.dtype)
    (_, (out, pooled)), (g_params, g_x) = _value_and_grads(graphdef, params, x, m, cot)
    grads = nnx_to_state_dict(g_params, name_map, transpose=is_linear_kernel)
    grads = {k: torch_conv_kernel_to_flax(v) if v.ndim == 3 else v for k, v in grads.items()}
    return {"out": out, "x": g_x, "params": grads, "branch_a": np.asarray(pooled)}


def _torch_run(model: tc.SideAtomsFeatureHead, x: np.ndarray, m: np.ndarray) -> dict:
    model.zero_grad()
    tx = torch.tensor(x, requires_grad=True)
    out = model(tx, torch.tensor(m))
    (out * torch.tensor(_cotangent(x.dtype))).sum().backward()
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    return {"out": out, "x": tx.grad, "params": grads}


def _errors(ours: dict, theirs: dict) -> dict[str, float]:
    assert set(ours["params"]) == set(theirs["params"])
    errs = {"out": rel_err(ours["out"], theirs["out"]), "x": rel_err(ours["x"], theirs["x"])}
    errs.update({k: rel_err(ours["params"][k], g) for k, g in theirs["params"].items()})
    return errs


def test_state_dict_keys_are_the_nnx_paths_one_to_one():
    model = nnx.eval_shape(lambda: SideAtomsFeatureHead(HIDDEN, rngs=nnx.Rngs(0)))
    paths = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    keys = [name_map(p) for p in paths]
    torch_keys = set(tc.SideAtomsFeatureHead(HIDDEN).state_dict())
    assert len(set(keys)) == len(keys) and set(keys) == torch_keys
    for key in ORIGINAL_KEYS:
        assert key in torch_keys, key


def test_float32_outputs_and_every_gradient_match_torch(sidechains):
    x, m = sidechains
    assert (m.sum(-1) == 0).sum() >= 6 and (m.sum(-1) > 0).sum() >= 30
    torch_model = _torch_head()
    ours, theirs = _jax_run(_nnx_head(torch_model), x, m), _torch_run(torch_model, x, m)
    assert ours["out"].dtype == jnp.float32
    errs = _errors(ours, theirs)
    assert errs["out"] < 1e-5, errs["out"]
    bad = {k: v for k, v in errs.items() if not v < 1e-4}
    assert not bad, bad
    assert all(np.abs(g).max() > 0 for g in theirs["params"].values())


def test_float64_agrees_to_rounding(sidechains):
    """One block per stack (every operation of the float32 test, a quarter of the compile)."""
    x, m = (a.astype(np.float64) for a in sidechains)
    torch_model = _torch_head(blocks=1).double()
    with jax.enable_x64(True):
        ours = _jax_run(_nnx_head(torch_model, np.float64), x, m)
        assert ours["out"].dtype == jnp.float64
    theirs = _torch_run(torch_model, x, m)
    bad = {k: v for k, v in _errors(ours, theirs).items() if not v < 1e-10}
    assert not bad, bad


def test_all_zero_masks_give_finite_values_and_gradients(sidechains):
    x, m = sidechains
    model = _nnx_head(_torch_head())
    for xs, ms in ((x, m), (x, np.zeros_like(m)), (np.zeros_like(x), np.zeros_like(m))):
        run = _jax_run(model, xs, ms)
        for value in (run["out"], run["x"], *run["params"].values()):
            assert np.isfinite(np.asarray(value)).all()
    # a residue with no atom in the pool: branch A gives 0, whatever its coordinates
    empty = m.sum(-1) == 0
    moved = x + (1.0 + np.arange(10, dtype=np.float32))[:, None] * empty[..., None, None]
    for xs in (x, moved):
        np.testing.assert_array_equal(_jax_run(model, xs, m)["branch_a"][empty], 0.0)


def test_the_pool_ignores_masked_atoms(sidechains):
    x, m = sidechains
    rng = np.random.default_rng(3)
    h = rng.normal(size=(*m.shape, HIDDEN)).astype(np.float32)
    h_moved = np.where(m[..., None] > 0, h, 1e3 * rng.normal(size=h.shape)).astype(np.float32)
    pooled = masked_avg_pool_1d(jnp.asarray(h), jnp.asarray(m))
    np.testing.assert_array_equal(pooled, masked_avg_pool_1d(jnp.asarray(h_moved), m))
    real = m.sum(-1) > 0
    mean = (h * m[..., None]).sum(-2)[real] / m.sum(-1)[real][:, None]
    np.testing.assert_allclose(np.asarray(pooled)[real], mean, rtol=1e-5, atol=1e-6)
    # Upstream of the pool, masked atoms are seen (as in the original): the kernel-3
    # convolutions mix neighbouring atoms and each GroupNorm averages over all of them.
    model = _nnx_head(_torch_head())
    partly = (m.sum(-1) > 0) & (m.sum(-1) < 10)
    x_moved = np.where((m[..., None] == 0) & partly[..., None, None], np.float32(3.0), x)
    diff = _jax_run(model, x_moved, m)["branch_a"] - _jax_run(model, x, m)["branch_a"]
    assert partly.sum() > 5 and np.abs(diff[partly]).min() > 0


def test_initialisation_follows_the_original():
    # one block per stack (the same layers as four); jitted, the initialisers compile at once
    model = nnx.jit(
        lambda: SideAtomsFeatureHead(
            HIDDEN, conv_blocks=1, mlp_blocks=1, fuse_blocks=1, rngs=nnx.Rngs(0)
        )
    )()
    flat = {tuple(p): np.asarray(v.get_value()) for p, v in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}  # fmt: skip
    for path, w in flat.items():
        owner, leaf = path[:-1], path[-1]
        if owner[-1] in ("gn", "norm") or owner == ("branchB_in", "layers", 0):  # norms
            np.testing.assert_array_equal(w, 1.0 if leaf == "scale" else 0.0)
        elif "net" in owner:  # OpenFold's Linear: LeCun truncated normal (±2σ), bias 0
            if leaf == "bias":
                np.testing.assert_array_equal(w, 0.0)
            else:
                sigma = 1.0 / np.sqrt(w.shape[0]) / 0.87962566103423978
                assert np.abs(w).max() <= 2 * sigma, path
                assert abs(w.std() * np.sqrt(w.shape[0]) - 1) < 0.1, path
        else:  # PyTorch's Conv1d / Linear default: uniform, bound 1/√fan_in, bias too
            bound = 1.0 / np.sqrt(np.prod(flat[(*owner, "kernel")].shape[:-1]))
            assert np.abs(w).max() <= bound, path
            assert leaf == "bias" or np.abs(w).max() > 0.9 * bound, path


def test_torch_version_docstring_examples():
    result = doctest.testmod(tc, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
