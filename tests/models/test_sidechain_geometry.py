"""Rigid frames and residue Gaussians of the side-chain port against float64 NumPy/SciPy
references of the original's formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from scipy.stats import multivariate_normal

from jaxstab.models.sidechain.geometry import OffsetGaussianRigid, Rigid, sidechain_local
from jaxstab.models.sidechain.rigid import quaternion_to_rotation

N_RES = 24


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _backbone(seed: int, n: int = N_RES):
    rng = np.random.default_rng(seed)
    ca = rng.normal(size=(n, 3)) * 15
    n_at = ca + 1.46 * _unit(rng.normal(size=(n, 3)))
    c_at = ca + 1.52 * _unit(rng.normal(size=(n, 3)))
    return n_at, ca, c_at


def _residues(seed: int, n: int = N_RES):
    """Global atom14 positions and masks; residue 0 is a Gly, residue 1 has only CB."""
    rng = np.random.default_rng(seed)
    n_at, ca, c_at = _backbone(seed, n)
    pos = ca[:, None] + rng.normal(size=(n, 14, 3)) * 2.0
    pos[:, 0], pos[:, 1], pos[:, 2] = n_at, ca, c_at
    n_side = rng.integers(0, 11, size=n)
    n_side[0], n_side[1] = 0, 1
    mask = np.zeros((n, 14))
    mask[:, :4] = 1
    for i, k in enumerate(n_side):
        mask[i, 4 : 4 + k] = 1
    pos[mask == 0] = 1e3  # absent atoms hold garbage
    designed = rng.random(n) < 0.5
    designed[0] = designed[1] = False
    return pos, mask, designed


def _chroma_frame(n_at, ca, c_at):
    n1 = _unit(n_at - ca)
    n2 = _unit(np.cross(n1, _unit(c_at - ca)))
    n3 = _unit(np.cross(n1, n2))
    return np.stack([n1, n2, n3], axis=-1), ca


def _original_gaussian(rot, trans, pos, mask, thickness, count_eps=0.0, var_eps=0.0):
    # The original's from_rigid_and_sidechain (data/GaussianRigid.py:369-413) in float64; it
    # divides by ``count + 1e-6`` (count_eps=1e-6), the port by the exact count.
    m = mask[..., None]
    count = m.sum(-2)
    denom = np.maximum(count, 1) + count_eps
    centroid = np.where(count > 0, (pos * m).sum(-2) / denom, trans)
    local_mean = np.einsum("nji,nj->ni", rot, centroid - trans)
    centred = np.einsum("nji,naj->nai", rot, pos - centroid[:, None]) * m
    var = (centred**2).sum(-2) / denom
    return local_mean, np.log(np.sqrt(var + var_eps) + thickness + 1e-6)


def _random_rigid(seed: int, n: int = N_RES):
    rot = Rotation.random(n, random_state=seed).as_matrix()
    trans = np.random.default_rng(seed).normal(size=(n, 3)) * 5
    return rot, trans


def _jr(rot, trans) -> Rigid:
    return Rigid(jnp.asarray(rot, jnp.float32), jnp.asarray(trans, jnp.float32))


# --------------------------------------------------------------------------------------------
# Rigid frames
# --------------------------------------------------------------------------------------------


def test_backbone_frame_is_the_originals_and_orthonormal():
    n_at, ca, c_at = _backbone(0)
    f = Rigid.from_three_points(*(jnp.asarray(p, jnp.float32) for p in (n_at, ca, c_at)))
    rot = np.asarray(f.rotation, np.float64)
    np.testing.assert_allclose(
        rot @ np.swapaxes(rot, -1, -2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    ref_rot, _ = _chroma_frame(n_at, ca, c_at)
    np.testing.assert_allclose(rot, ref_rot, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(f.invert_apply(jnp.asarray(ca, jnp.float32))), 0, atol=1e-4
    )
    n_loc = np.asarray(f.invert_apply(jnp.asarray(n_at, jnp.float32)))
    c_loc = np.asarray(f.invert_apply(jnp.asarray(c_at, jnp.float32)))
    np.testing.assert_allclose(n_loc[:, 1:], 0, atol=1e-4)  # N on the +x axis
    np.testing.assert_allclose(n_loc[:, 0], 1.46, atol=1e-4)
    np.testing.assert_allclose(c_loc[:, 1], 0, atol=1e-4)  # C in the xz-plane, z < 0
    assert (c_loc[:, 2] < 0).all()
    np.testing.assert_allclose(np.linalg.norm(c_loc, axis=-1), 1.52, atol=1e-4)


def test_gram_schmidt_frame_follows_alphafold():
    n_at, ca, c_at = _backbone(1)
    f = Rigid.from_gram_schmidt(*(jnp.asarray(p, jnp.float32) for p in (c_at, ca, n_at)))
    e0 = _unit(ca - c_at)
    e1 = _unit((n_at - ca) - np.sum(e0 * (n_at - ca), -1, keepdims=True) * e0)
    ref = np.stack([e0, e1, np.cross(e0, e1)], axis=-1)
    np.testing.assert_allclose(np.asarray(f.rotation), ref, atol=1e-5)
    c_loc = np.asarray(f.invert_apply(jnp.asarray(c_at, jnp.float32)))
    n_loc = np.asarray(f.invert_apply(jnp.asarray(n_at, jnp.float32)))
    np.testing.assert_allclose(c_loc[:, 1:], 0, atol=1e-4)
    assert (c_loc[:, 0] < 0).all()  # the first point on the negative x axis
    np.testing.assert_allclose(n_loc[:, 2], 0, atol=1e-4)
    assert (n_loc[:, 1] > 0).all()  # the third point in the xy-plane, y > 0


def test_compose_invert_apply_against_numpy():
    (ra, ta), (rb, tb), (rc, tc) = (_random_rigid(s) for s in (2, 3, 4))
    a, b, c = _jr(ra, ta), _jr(rb, tb), _jr(rc, tc)
    x = np.random.default_rng(5).normal(size=(N_RES, 3)) * 3
    ab = a.compose(b)
    np.testing.assert_allclose(np.asarray(ab.rotation), ra @ rb, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ab.translation), np.einsum("nij,nj->ni", ra, tb) + ta, atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(a.apply(x)), np.einsum("nij,nj->ni", ra, x) + ta, atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(a.invert_apply(x)), np.einsum("nji,nj->ni", ra, x - ta), atol=1e-4
    )
    inv = a.invert()
    np.testing.assert_allclose(np.asarray(inv.rotation), np.swapaxes(ra, -1, -2), atol=1e-6)
    np.testing.assert_allclose(np.asarray(inv.apply(a.apply(x))), x, atol=1e-4)
    for ident in (a.compose(inv), inv.compose(a)):
        np.testing.assert_allclose(
            np.asarray(ident.rotation), np.broadcast_to(np.eye(3), ra.shape), atol=1e-5
        )
        np.testing.assert_allclose(np.asarray(ident.translation), 0, atol=1e-4)
    left, right = a.compose(b).compose(c), a.compose(b.compose(c))
    for u, v in zip(left, right, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ab.apply(x)), np.asarray(a.apply(b.apply(x))), atol=1e-4)


def test_quaternion_update_against_scipy():
    rng = np.random.default_rng(6)
    upd = rng.normal(size=(N_RES, 6))
    ra, ta = _random_rigid(7)
    r_u = Rotation.from_quat(np.concatenate([upd[:, :3], np.ones((N_RES, 1))], -1)).as_matrix()
    # jit: one compilation instead of one per primitive (eager mode is covered elsewhere).
    got = jax.jit(Rigid.from_quaternion_update)(jnp.asarray(upd, jnp.float32))
    np.testing.assert_allclose(np.asarray(got.rotation), r_u, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.translation), upd[:, 3:], atol=1e-6)
    new = jax.jit(Rigid.compose_update)(_jr(ra, ta), jnp.asarray(upd, jnp.float32))
    np.testing.assert_allclose(np.asarray(new.rotation), ra @ r_u, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(new.translation), ta + np.einsum("nij,nj->ni", ra, upd[:, 3:]), atol=1e-4
    )
    q = Rotation.random(N_RES, random_state=8).as_quat()  # scalar last
    to_rot = jax.jit(quaternion_to_rotation)
    np.testing.assert_allclose(
        np.asarray(to_rot(jnp.asarray(np.roll(q, 1, -1) * 3.0, jnp.float32))),
        Rotation.from_quat(q).as_matrix(),
        atol=1e-5,
    )
    ident = jax.jit(Rigid.compose_update)(Rigid.identity((N_RES,)), jnp.zeros((N_RES, 6)))
    np.testing.assert_array_equal(np.asarray(ident.rotation), np.broadcast_to(np.eye(3), ra.shape))


def test_expand_and_scale_translation():
    ra, ta = _random_rigid(9, 4)
    r = _jr(ra, ta)
    x = np.random.default_rng(9).normal(size=(4, 7, 3))
    np.testing.assert_allclose(
        np.asarray(r.expand().apply(x)), np.einsum("nij,naj->nai", ra, x) + ta[:, None], atol=1e-4
    )
    assert r.expand(0).rotation.shape == (1, 4, 3, 3) and r.expand(0).translation.shape == (1, 4, 3)
    np.testing.assert_allclose(
        np.asarray(r.scale_translation(0.1).translation), ta * 0.1, atol=1e-6
    )


# --------------------------------------------------------------------------------------------
# Residue Gaussians
# --------------------------------------------------------------------------------------------


def _gaussian(seed: int, atoms: str = "sidechain"):
    pos, mask, designed = _residues(seed)
    frame = Rigid.from_three_points(*(jnp.asarray(pos[:, i], jnp.float32) for i in range(3)))
    g = OffsetGaussianRigid.from_rigid_and_sidechain(
        frame, jnp.asarray(pos, jnp.float32), jnp.asarray(mask), jnp.asarray(designed), atoms=atoms
    )
    return g, pos, mask, designed


@pytest.mark.parametrize(("atoms", "start"), [("sidechain", 4), ("sidechain_o", 3), ("all", 0)])
def test_gaussian_matches_the_originals_formula(atoms, start):
    g, pos, mask, designed = _gaussian(10, atoms)
    rot = np.asarray(g.rigid.rotation, np.float64)
    keep = mask[:, start:] * ~designed[:, None]
    if atoms == "all":
        keep[:, :3] = mask[:, :3]
    thickness = np.where(designed, 2.5, 0.5)[:, None]
    # The original's all-atom Gaussian (data/GaussianRigid.py:522) takes sqrt(var + 1e-8).
    var_eps = 1e-8 if atoms == "all" else 0.0
    ref_mean, ref_log = _original_gaussian(rot, pos[:, 1], pos[:, start:], keep, thickness,
                                           var_eps=var_eps)  # fmt: skip
    np.testing.assert_allclose(np.asarray(g.local_mean), ref_mean, atol=5e-5)
    np.testing.assert_allclose(np.asarray(g.scaling_log), ref_log, atol=2e-5)
    # The original's ``count + 1e-6`` shifts the centroid by ~1e-6 of the coordinates.
    orig_mean, orig_log = _original_gaussian(rot, pos[:, 1], pos[:, start:], keep, thickness, 1e-6,
                                             var_eps)  # fmt: skip
    np.testing.assert_allclose(np.asarray(g.local_mean), orig_mean, atol=2e-4)
    np.testing.assert_allclose(np.asarray(g.scaling_log), orig_log, atol=2e-4)
    if atoms == "sidechain":
        # Gly and designed residues: the Gaussian sits on CA with the base thickness.
        for i, t in [(0, 0.5), *((int(j), 2.5) for j in np.flatnonzero(designed))]:
            np.testing.assert_allclose(np.asarray(g.local_mean[i]), 0, atol=1e-6)
            np.testing.assert_allclose(np.asarray(g.scaling_log[i]), np.log(t + 1e-6), rtol=1e-6)
        # A lone CB: mean at CB, zero spread.
        cb_local = np.einsum("ji,j->i", rot[1], pos[1, 4] - pos[1, 1])
        np.testing.assert_allclose(np.asarray(g.local_mean[1]), cb_local, atol=1e-4)
        np.testing.assert_allclose(np.asarray(g.scaling_log[1]), np.log(0.5 + 1e-6), atol=1e-6)


def test_custom_thickness_and_nan_in_absent_atoms():
    pos, mask, designed = _residues(11)
    pos[mask == 0] = np.nan
    frame = Rigid.from_three_points(*(jnp.asarray(pos[:, i], jnp.float32) for i in range(3)))
    g = OffsetGaussianRigid.from_rigid_and_sidechain(
        frame, jnp.asarray(pos, jnp.float32), mask, designed, base_thickness=(1.0, 0.2)
    )
    assert (
        np.isfinite(np.asarray(g.local_mean)).all() and np.isfinite(np.asarray(g.scaling_log)).all()
    )
    np.testing.assert_allclose(np.asarray(g.scaling_log[0]), np.log(0.2 + 1e-6), rtol=1e-6)
    j = int(np.flatnonzero(designed)[0])
    np.testing.assert_allclose(np.asarray(g.scaling_log[j]), np.log(1.0 + 1e-6), atol=1e-6)


def test_covariance_is_the_rotated_diagonal_and_positive_definite():
    g, *_ = _gaussian(12)
    cov = np.asarray(g.covariance(), np.float64)
    rot = np.asarray(g.rigid.rotation, np.float64)
    s = np.exp(np.asarray(g.scaling_log, np.float64))
    ref = np.einsum("nij,nj,nkj->nik", rot, s**2, rot) + 1e-6 * np.eye(3)
    np.testing.assert_allclose(cov, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cov, np.swapaxes(cov, -1, -2))
    assert (np.linalg.eigvalsh(cov) > 0).all()
    np.testing.assert_allclose(
        np.asarray(g.mean()),
        np.einsum("nij,nj->ni", rot, np.asarray(g.local_mean)) + np.asarray(g.rigid.translation),
        atol=1e-4,
    )


def test_gaussian_is_equivariant():
    pos, mask, designed = _residues(13)
    q = Rotation.random(random_state=13).as_matrix()
    shift = np.array([30.0, -12.0, 7.0])
    pos2 = np.where(mask[..., None] > 0, pos @ q.T + shift, pos)

    def build(p):
        p = jnp.asarray(p, jnp.float32)
        frame = Rigid.from_three_points(p[:, 0], p[:, 1], p[:, 2])
        return OffsetGaussianRigid.from_rigid_and_sidechain(frame, p, mask, designed)

    g, g2 = build(pos), build(pos2)
    np.testing.assert_allclose(np.asarray(g2.local_mean), np.asarray(g.local_mean), atol=2e-4)
    np.testing.assert_allclose(np.asarray(g2.scaling_log), np.asarray(g.scaling_log), atol=2e-5)
    np.testing.assert_allclose(np.asarray(g2.mean()), np.asarray(g.mean()) @ q.T + shift, atol=3e-4)
    cov = np.asarray(g.covariance(), np.float64)
    np.testing.assert_allclose(np.asarray(g2.covariance()), q @ cov @ q.T, atol=2e-5)


def test_nll_matches_scipy():
    g, pos, _, _ = _gaussian(14)
    mean = np.asarray(g.mean(), np.float64)
    rot = np.asarray(g.rigid.rotation, np.float64)
    s2 = np.exp(2 * np.asarray(g.scaling_log, np.float64))
    x = mean + np.random.default_rng(14).normal(size=mean.shape) * 2
    got = np.asarray(g.nll(jnp.asarray(x, jnp.float32)))
    for i in range(N_RES):
        cov = rot[i] @ np.diag(s2[i]) @ rot[i].T
        np.testing.assert_allclose(
            got[i], -multivariate_normal.logpdf(x[i], mean[i], cov), rtol=1e-5
        )
        jittered = np.asarray(g.covariance()[i], np.float64)
        np.testing.assert_allclose(
            got[i], -multivariate_normal.logpdf(x[i], mean[i], jittered), rtol=1e-4
        )
    atoms = np.asarray(g.nll(jnp.asarray(pos[:, 4:], jnp.float32)))  # one more axis: per atom
    assert atoms.shape == (N_RES, 10)
    cov = rot[5] @ np.diag(s2[5]) @ rot[5].T
    np.testing.assert_allclose(
        atoms[5, 2], -multivariate_normal.logpdf(pos[5, 6], mean[5], cov), rtol=1e-5
    )


def _original_update(rot, trans, local_mean, scaling_log, u):
    r_u = Rotation.from_quat(np.concatenate([u[:, :3], np.ones((len(u), 1))], -1)).as_matrix()
    alpha = local_mean / np.maximum(np.exp(scaling_log), 1e-6)
    log_new = np.clip(scaling_log + u[:, 9:12], -6.0, 3.0)
    return (
        rot @ r_u,
        trans + np.einsum("nij,nj->ni", rot, u[:, 3:6]),
        (alpha + u[:, 6:9]) * np.exp(log_new),
        log_new,
    )


def test_update_matches_the_originals_12d_update():
    g, *_ = _gaussian(15)
    g = g.scale_translation(0.1)
    u = np.random.default_rng(15).normal(size=(N_RES, 12)) * 0.3
    u[0, 9:12] = [10.0, -10.0, 0.0]  # beyond the clip
    ref = _original_update(
        *(np.asarray(a, np.float64) for a in (*g.rigid, g.local_mean, g.scaling_log)), u
    )
    new = g.update(jnp.asarray(u, jnp.float32))
    for got, want in zip((*new.rigid, new.local_mean, new.scaling_log), ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    assert float(new.scaling_log[0, 0]) == 3.0 and float(new.scaling_log[0, 1]) == -6.0
    frozen = g.update(jnp.asarray(u, jnp.float32), mask=jnp.zeros(N_RES))
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    only_frame = g.update(jnp.asarray(u[:, :6], jnp.float32))
    np.testing.assert_array_equal(np.asarray(only_frame.local_mean), np.asarray(g.local_mean))

    def last_log(v, clip):
        return jnp.sum(g.update(v, clip=clip).scaling_log[0])

    grad = jax.jit(jax.grad(last_log), static_argnums=1)
    grad_hard, grad_soft = (grad(jnp.asarray(u, jnp.float32), c) for c in ("hard", "soft"))
    assert float(grad_hard[0, 9]) == 0.0 and float(grad_soft[0, 9]) > 0.0


def test_scale_translation_to_nm_and_back():
    g, *_ = _gaussian(16)
    nm = g.scale_translation(0.1)
    np.testing.assert_allclose(
        np.asarray(nm.mean()), np.asarray(g.mean()) * 0.1, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(nm.covariance()), np.asarray(g.covariance()) * 0.01, rtol=1e-4, atol=2e-6
    )
    back = nm.scale_translation(10.0)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_sidechain_local_head():
    rng = np.random.default_rng(17)
    mu, sigma, u = (
        rng.normal(size=(5, 1, 3)),
        np.exp(rng.normal(size=(5, 1, 3))),
        rng.normal(size=(5, 10, 3)) * 3,
    )
    mask = rng.random((5, 10)) < 0.7
    got = np.asarray(sidechain_local(mu, sigma, jnp.asarray(u, jnp.float32), mask))
    want = (mu + np.tanh(u) * (1 + 0.2 * np.abs(u)) * sigma) * mask[..., None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Degenerate inputs, jit and vmap
# --------------------------------------------------------------------------------------------


def _loss(n_at, ca, c_at, atoms, mask):
    frame = Rigid.from_three_points(n_at, ca, c_at)
    pos = jnp.concatenate([jnp.stack([n_at, ca, c_at, ca], 0), atoms], 0)
    g = OffsetGaussianRigid.from_rigid_and_sidechain(frame, pos, mask, False)
    return jnp.sum(g.nll(atoms) * mask[4:]) + jnp.sum(g.covariance()) + jnp.sum(frame.rotation)


_loss_and_grads = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize(
    "case", ["coincident_backbone", "collinear_backbone", "single_atom", "no_side_chain"]
)
def test_degenerate_inputs_are_finite(case):
    n_at, ca, c_at = jnp.array([1.46, 0, 0]), jnp.zeros(3), jnp.array([-0.5, 1.4, 0])
    atoms = jnp.asarray(np.random.default_rng(18).normal(size=(10, 3)), jnp.float32)
    mask = jnp.zeros(14).at[:8].set(1.0)
    if case == "coincident_backbone":
        n_at = c_at = ca
    elif case == "collinear_backbone":
        c_at = jnp.array([-2.0, 0, 0])
    elif case == "single_atom":
        mask = jnp.zeros(14).at[:5].set(1.0)
    else:
        mask = jnp.zeros(14).at[:4].set(1.0)
    frame = Rigid.from_three_points(n_at, ca, c_at)
    rot = np.asarray(frame.rotation, np.float64)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)
    value, grads = _loss_and_grads(n_at, ca, c_at, atoms, mask)
    assert np.isfinite(float(value))
    for gr in grads:
        assert np.isfinite(np.asarray(gr)).all()


def test_jit_and_vmap_agree_with_eager():
    pos, mask, designed = _residues(19)
    pos = jnp.asarray(pos, jnp.float32)

    def build(p, m, d):
        frame = Rigid.from_three_points(p[..., 0, :], p[..., 1, :], p[..., 2, :])
        g = OffsetGaussianRigid.from_rigid_and_sidechain(frame, p, m, d)
        return g.update(jnp.full((*g.local_mean.shape[:-1], 12), 0.1))

    eager = build(pos, mask, designed)
    jitted = jax.jit(build)(pos, mask, designed)
    mapped = jax.jit(jax.vmap(build))(pos, mask, designed)  # per-residue calls
    batched = jax.jit(jax.vmap(build))(
        pos[None].repeat(2, 0), mask[None].repeat(2, 0), designed[None].repeat(2, 0)
    )
    for e, j, m, b in zip(
        *(jax.tree.leaves(t) for t in (eager, jitted, mapped, batched)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(m), np.asarray(e), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(b[1]), np.asarray(e), rtol=1e-5, atol=1e-5)
    cov = jax.jit(lambda g: g.covariance())(eager)
    np.testing.assert_allclose(
        np.asarray(cov), np.asarray(eager.covariance()), rtol=1e-6, atol=1e-7
    )
