"""The PyTorch side-chain model (``benchmarks/torch_ref/sidechain*.py``): geometry, shapes,
masks, equivariance, losses and the training loop with its guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.torch_ref import sidechain as ts
from benchmarks.torch_ref import sidechain_geometry as tg
from jaxstab.models.sidechain import SideChainConfig, center_crop, default_data

L = 16
SMALL = SideChainConfig.small()


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    raw = {k: v[:2] for k, v in default_data("val").arrays.items()}
    out = {k: np.array(v) for k, v in center_crop(raw, L).items()}
    gen = torch.Generator().manual_seed(3)
    out["design_mask"] = ts.design_mask(torch.tensor(out["residue_mask"]), 0.5, 1.0, gen).numpy()
    return out


@pytest.fixture(scope="module")
def model() -> ts.SideChainTorch:
    # Perturbed weights: at initialisation the zero-initialised heads and updates put every
    # designed atom on its CA, which would make the geometric tests trivial.
    torch.manual_seed(0)
    m = ts.SideChainTorch(SMALL)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return m.eval()


def _rotation(seed: int) -> torch.Tensor:
    q = torch.randn(4, generator=torch.Generator().manual_seed(seed))
    return tg.quaternion_to_rotation(q)


# ------------------------------------------------------------------ geometry
def test_frames_are_proper_rotations_with_the_original_axes(arrays):
    pos = torch.tensor(arrays["atom14_pos"][0])
    f = tg.Rigid.from_three_points(pos[:, 0], pos[:, 1], pos[:, 2])
    eye = torch.eye(3).expand(L, 3, 3)
    torch.testing.assert_close(f.rotation.transpose(-1, -2) @ f.rotation, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(f.rotation), torch.ones(L), atol=1e-5, rtol=0)
    n_local, c_local = f.invert_apply(pos[:, 0]), f.invert_apply(pos[:, 2])
    assert torch.all(n_local[:, 0] > 1.0) and n_local[:, 1:].abs().max() < 1e-4  # N on +x
    assert c_local[:, 1].abs().max() < 1e-4 and torch.all(c_local[:, 2] < 0)  # C: xz, z < 0


def test_degenerate_frames_are_finite_rotations_with_finite_gradients():
    pts = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 0, 0]], requires_grad=True)  # coincident
    col = torch.tensor([[2.0, 0, 0], [0, 0, 0], [1, 0, 0]], requires_grad=True)  # collinear
    for p in (pts, col):
        f = tg.Rigid.from_three_points(p[0], p[1], p[2])
        assert abs(float(torch.linalg.det(f.rotation.detach())) - 1) < 1e-6
        f.rotation.sum().backward()
        assert torch.isfinite(p.grad).all()


def test_quaternion_update_and_gaussian_update():
    r = tg.Rigid.identity(())
    moved = r.compose_update(torch.tensor([0, 0, 0, 1.0, 2, 3]))
    assert moved.translation.tolist() == [1.0, 2.0, 3.0]
    torch.testing.assert_close(moved.rotation, torch.eye(3))
    half_turn = r.compose_update(torch.tensor([1e8, 0, 0, 0, 0, 0.0])).rotation
    torch.testing.assert_close(half_turn, torch.diag(torch.tensor([1.0, -1, -1])), atol=1e-6,
                               rtol=0)  # fmt: skip
    g = tg.OffsetGaussian(r, torch.tensor([1.0, 0, 0]), torch.zeros(3))
    u = torch.zeros(12)
    u[6], u[9:] = 1.0, math.log(2.0)
    g2 = g.update(u)
    torch.testing.assert_close(g2.local_mean, torch.tensor([4.0, 0, 0]))  # (1/1 + 1) · 2
    assert g.update(torch.full((12,), 5.0), mask=torch.tensor(0.0)).local_mean.tolist() == [
        1.0, 0.0, 0.0]  # fmt: skip
    for clip in ("hard", "soft"):
        high = g.update(torch.zeros(12).index_fill(0, torch.arange(9, 12), 50.0), clip=clip)
        assert float(high.scaling_log.max()) <= 3.0


def test_residue_gaussian_construction(arrays):
    pos = torch.tensor(arrays["atom14_pos"][0])
    mask = torch.tensor(arrays["atom14_mask"][0])
    f = tg.Rigid.from_three_points(pos[:, 0], pos[:, 1], pos[:, 2])
    designed = torch.zeros(L, dtype=torch.bool)
    designed[0] = True
    g = tg.OffsetGaussian.from_rigid_and_sidechain(f, pos, mask, designed, (2.5, 0.5))
    i = int(torch.nonzero(mask[:, 4:].sum(-1) >= 3)[1])  # a context residue with a side chain
    side = pos[i, 4:][mask[i, 4:] > 0]
    centroid = side.mean(0)
    local = (side - centroid) @ f.rotation[i]
    torch.testing.assert_close(g.local_mean[i], f.invert_apply(centroid)[i], atol=1e-5, rtol=0)
    std = local.pow(2).mean(0).sqrt()
    torch.testing.assert_close(g.scaling_log[i], torch.log(std + 0.5 + 1e-6), atol=1e-5, rtol=0)
    # a designed residue: hidden side chain, centred on CA, thickness 2.5 Å
    assert g.local_mean[0].abs().max() < 1e-5
    torch.testing.assert_close(g.scaling_log[0], torch.full((3,), math.log(2.5 + 1e-6)))


def test_safe_functions_keep_their_slopes():
    x = torch.tensor([0.0, 0, 0], requires_grad=True)
    tg.safe_norm(x).backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0]
    y = torch.tensor(1000.0, requires_grad=True)
    tg.safe_exp(y).backward()
    assert torch.isfinite(y.grad) and y.grad > 0
    z = torch.tensor([0.0, 50.0, -1e3], requires_grad=True)
    out = tg.soft_clip(z, -6.0, 3.0)
    assert torch.all(out <= 3.0) and torch.all(out >= -6.0)
    out.sum().backward()
    assert torch.all(z.grad > 0)
    d, ld = tg.mahalanobis_logdet(torch.tensor([1.0, 2, 3]), torch.diag(torch.tensor([1.0, 4, 9])))
    assert abs(float(d) - 3.0) < 1e-5 and abs(float(ld) - math.log(36.0)) < 1e-5


# ------------------------------------------------------------------ model
def test_output_shapes_and_backbone_copied(model, arrays):
    batch = ts.batch_to_tensors(arrays)
    with torch.no_grad():
        out = model(batch)
    assert out["atom14_pos"].shape == (2, L, 14, 3) and out["aatype_logits"].shape == (2, L, 21)
    assert out["sidechain_local"].shape == (2, L, 10, 3)
    assert out["gaussian"].local_mean.shape == (2, L, 3)
    assert torch.isfinite(out["atom14_pos"]).all()
    ok = batch["atom14_mask"][..., :4, None] > 0
    torch.testing.assert_close(torch.where(ok, out["atom14_pos"][..., :4, :], 0.0),
                               torch.where(ok, batch["atom14_pos"][..., :4, :], 0.0))  # fmt: skip


def test_equivariance(model, arrays):
    batch = ts.batch_to_tensors(arrays)
    rot, shift = _rotation(3), torch.tensor([12.0, -30.0, 7.5])
    moved = {**batch, "atom14_pos": batch["atom14_pos"] @ rot.T + shift}
    with torch.no_grad():
        out, out2 = model(batch), model(moved)
    expect = out["atom14_pos"] @ rot.T + shift
    assert float((out2["atom14_pos"] - expect).abs().max()) < 1e-3
    side = out["sidechain_local"][batch["design_mask"]]
    assert float(side.abs().max()) > 0.1  # the atoms really moved off the CA
    assert float((out2["aatype_logits"] - out["aatype_logits"]).abs().max()) < 1e-4


def test_padding_and_designed_side_chains_do_not_leak(model, arrays):
    n = 12
    short = ts.crop_arrays(arrays, np.zeros(2, int), n)
    padded = ts.crop_arrays(short, np.zeros(2, int), L)
    padded["atom14_pos"][:, n:] = 5.0
    padded["aatype"][:, n:] = 3
    with torch.no_grad():
        a, b = model(ts.batch_to_tensors(short)), model(ts.batch_to_tensors(padded))
    torch.testing.assert_close(b["atom14_pos"][:, :n], a["atom14_pos"], atol=2e-4, rtol=0)
    torch.testing.assert_close(b["aatype_logits"][:, :n], a["aatype_logits"], atol=1e-4, rtol=0)
    assert torch.all(b["atom14_pos"][:, n:] == 0)
    # moving a designed residue's true side chain and type changes nothing
    i = int(np.nonzero(arrays["design_mask"][0])[0][0])
    changed = {k: v.copy() for k, v in arrays.items()}
    changed["atom14_pos"][0, i, 4:] += 2.0
    changed["aatype"][0, i] = (changed["aatype"][0, i] + 1) % 20
    with torch.no_grad():
        c, d = model(ts.batch_to_tensors(arrays)), model(ts.batch_to_tensors(changed))
    torch.testing.assert_close(c["atom14_pos"], d["atom14_pos"])


def test_loss_terms_and_options(model, arrays):
    batch = ts.batch_to_tensors(arrays)
    loss, metrics = ts.sidechain_loss(model, batch)
    assert torch.isfinite(loss) and all(float(metrics[t].detach()) >= 0 for t in ts.TERMS[:5])
    total = sum(getattr(SMALL, f"w_{t}") * metrics[t] for t in ts.TERMS)
    torch.testing.assert_close(loss, total)
    assert 0 <= float(metrics["seq_recovery"]) <= 1
    assert float(metrics["n_designed"]) == float(batch["design_mask"].sum())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    # no design mask in the batch: one is drawn
    plain = {k: v for k, v in batch.items() if k != "design_mask"}
    assert torch.isfinite(ts.sidechain_loss(model, plain)[0])
    cfg = SMALL.replace(use_esm=True, per_atom_gaussians=True, log_scale_clip="soft")
    other = ts.SideChainTorch(cfg)
    extra = {**batch, "esm_single": torch.randn(2, L, cfg.esm_single_dim),
             "esm_pair": torch.randn(2, L, L, cfg.esm_pair_dim)}  # fmt: skip
    out = other(extra)
    assert out["atom_gaussian_rotation"].shape == (2, L, 10, 3, 3)
    assert torch.isfinite(ts.loss_terms(out, extra, cfg)[0])


def test_design_mask_and_crop(arrays):
    gen = torch.Generator().manual_seed(0)
    res = torch.ones(64, 50)
    res[:, 40:] = 0
    share = ts.design_mask(res, 0.3, 0.3, gen).float().sum(1) / 40
    assert abs(float(share.mean()) - 0.3) < 0.05
    assert not ts.design_mask(res, 1.0, 1.0, gen)[:, 40:].any()
    window = ts.crop_arrays(arrays, np.array([3, 0]), 8)
    np.testing.assert_array_equal(window["aatype"][0], arrays["aatype"][0, 3:11])
    assert window["chain_length"].tolist() == [8, 8]


@pytest.mark.parametrize("name", ["sidechain", "sidechain_data", "sidechain_geometry",
                                  "sidechain_modules"])  # fmt: skip
def test_docstring_examples(name):
    import doctest
    import importlib

    mod = importlib.import_module(f"benchmarks.torch_ref.{name}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
    from benchmarks.specs import sidechain_names

    result = doctest.testmod(sidechain_names)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ training
def test_train_lowers_the_loss(arrays):
    torch.manual_seed(0)
    m = ts.SideChainTorch(SMALL.replace(n_blocks=1))
    one = {k: v[:1] for k, v in arrays.items()}
    out = ts.train(m, one, epochs=8, batch_size=1, seed=0, lr=3e-3, check_every=4)
    assert len(out["loss"]) == 8 and all(math.isfinite(v) for v in out["loss"])
    assert out["loss"][-1] < 0.7 * out["loss"][0]
    assert out["first_nonfinite_step"] is None and out["nonfinite_params"] == []
    assert [s for s, _ in out["grad_norms"]] == [0, 4] and len(out["epoch_seconds"]) == 8


def test_train_crops_and_draws_masks():
    arr = ts.toy_arrays(3, 10, seed=2)
    torch.manual_seed(0)
    m = ts.SideChainTorch(SMALL.replace(n_blocks=1))
    out = ts.train(m, arr, epochs=1, batch_size=2, seed=0, max_len=6)
    assert len(out["loss"]) == 2 and all(math.isfinite(v) for v in out["loss"])


@pytest.mark.parametrize("policy", ["skip", "step"])
def test_train_skips_a_nan_batch(arrays, policy):
    arr = {k: v.copy() for k, v in arrays.items()}
    arr["atom14_pos"][1, 2, 0, 0] = np.nan
    perm = torch.randperm(2, generator=torch.Generator().manual_seed(1)).tolist()
    step = perm.index(1)
    torch.manual_seed(0)
    m = ts.SideChainTorch(SMALL.replace(n_blocks=1))
    out = ts.train(m, arr, epochs=1, batch_size=1, seed=1, check_every=1, on_nonfinite=policy)
    assert out["first_nonfinite_step"] == step and out["nonfinite_steps"][0] == step
    assert math.isnan(out["loss"][step]) and all(math.isfinite(v) for v in out["loss"][:step])
    finite = all(torch.isfinite(p).all() for p in m.parameters())
    if policy == "skip":  # the other batch stays finite
        assert finite and out["nonfinite_params"] == [] and out["nonfinite_steps"] == [step]
    else:  # stepping a NaN gradient (clipped to NaN) writes NaN into the weights
        assert not finite and any(s.endswith(f"@{step}") for s in out["nonfinite_params"])
