"""Shared inputs for the jaxstab.numerics tests: interior and boundary points per function."""

from __future__ import annotations

import numpy as np
import pytest

import jaxstab.numerics as N

RNG = np.random.default_rng(0)


def _vec(*shape):
    return RNG.normal(size=shape)


def _pos(*shape):
    return RNG.uniform(0.5, 2.0, size=shape)


# name -> (function, interior arguments, boundary arguments, differentiable argnums)
# Interior points are where every formula is smooth; boundary points are the SPEC table's cases.
_ROT = np.linalg.qr(RNG.normal(size=(3, 3)))[0]
_COLLINEAR = [np.array([2.0, 0, 0]), np.zeros(3), np.array([-1.5, 0, 0]), np.array([3.0, 0, 0])]
_MASK = np.array([[True, False, True], [False, False, False]])[None, :, :]
CASES = {
    "safe_log": (N.safe_log, (_pos(4),), (np.array([0.0, -1.0, 1e-45, 1.0]),), (0,)),
    "safe_exp": (N.safe_exp, (_vec(4),), (np.array([1000.0, -1000.0, 88.0, 0.0]),), (0,)),
    "safe_div": (
        N.safe_div,
        (_vec(4), _pos(4)),
        (np.array([1.0, 0.0, -2.0, 3.0]), np.array([0.0, 0.0, 0.0, 1.0])),
        (0, 1),
    ),
    "safe_sqrt": (N.safe_sqrt, (_pos(4),), (np.array([0.0, -1.0, 1e-30, 4.0]),), (0,)),
    "safe_norm": (N.safe_norm, (_vec(2, 3),), (np.zeros((2, 3)),), (0,)),
    "safe_normalize": (N.safe_normalize, (_vec(2, 3),), (np.zeros((2, 3)),), (0,)),
    "cosine_similarity": (
        N.cosine_similarity,
        (_vec(2, 3), _vec(2, 3)),
        (np.zeros((2, 3)), _vec(2, 3)),
        (0, 1),
    ),
    "cosine_loss": (
        N.cosine_loss,
        (_vec(2, 3), _vec(2, 3)),
        (_vec(2, 3), np.zeros((2, 3))),
        (0, 1),
    ),
    "vector_angle": (
        N.vector_angle,
        (_vec(3), _vec(3)),
        (np.array([1.0, 2, 3]), np.array([-2.0, -4, -6])),
        (0, 1),
    ),
    "bond_angle": (N.bond_angle, (_vec(3), _vec(3), _vec(3)), tuple(_COLLINEAR[:3]), (0, 1, 2)),
    "dihedral": (
        N.dihedral,
        (_vec(3), _vec(3), _vec(3), _vec(3)),
        tuple(_COLLINEAR),
        (0, 1, 2, 3),
    ),
    "pairwise_distances": (N.pairwise_distances, (_vec(4, 3),), (np.zeros((3, 3)),), (0,)),
    "bounded_positive": (
        N.bounded_positive,
        (_vec(4), 0.1, 10.0),
        (np.array([-50.0, 50.0, -1e4, 1e4]), 0.1, 10.0),
        (0,),
    ),
    "bounded_positive_inverse": (
        N.bounded_positive_inverse,
        (RNG.uniform(0.5, 9.0, size=4), 0.1, 10.0),
        (np.array([0.1, 10.0, 0.0, 20.0]), 0.1, 10.0),
        (0,),
    ),
    "soft_clip": (
        N.soft_clip,
        (_vec(4), -1.0, 2.0),
        (np.array([-1e30, 1e30, 1e4, -1e4]), -1.0, 2.0),
        (0,),
    ),
    "straight_through_clip": (
        N.straight_through_clip,
        (_vec(4), -1.0, 2.0),
        (np.array([-1e30, 1e30, 1e4, 0.5]), -1.0, 2.0),
        (0,),
    ),
    "gaussian_kl": (
        N.gaussian_kl,
        (_vec(2, 3), _vec(2, 3)),
        (np.array([[1e4, -1e4, 0.0]]), np.array([[100.0, -100.0, 100.0]])),
        (0, 1),
    ),
    "nb_log_prob": (
        N.nb_log_prob,
        (np.array([0.0, 1.0, 4.0]), _pos(3), _pos(3)),
        (
            np.array([0.0, 0.0, 3.0, 3.0]),
            np.array([0.0, 5.0, 5.0, 0.0]),
            np.array([1e-8, 1e8, 1e-8, 1e8]),
        ),
        (1, 2),
    ),
    "zinb_log_prob": (
        N.zinb_log_prob,
        (np.array([0.0, 1.0, 4.0]), _pos(3), _pos(3), _vec(3)),
        (
            np.array([0.0, 0.0, 3.0, 0.0]),
            np.array([0.0, 5.0, 5.0, 1e3]),
            np.array([1e-8, 1e8, 1e-8, 1e8]),
            np.array([-50.0, 50.0, 50.0, -50.0]),
        ),
        (1, 2, 3),
    ),
    "gaussian_nll_3d": (
        N.gaussian_nll_3d,
        (_vec(3), _vec(3), 0.3 * _vec(3), _ROT),
        (_vec(3), _vec(3), np.array([-9.0, 9.0, -9.0]), _ROT),
        (0, 1, 2, 3),
    ),
    "safe_zscore": (
        N.safe_zscore,
        (_vec(5, 2),),
        (np.stack([np.full(5, 0.1), np.arange(5.0)], axis=1),),
        (0,),
    ),
    "dot_product_attention": (
        lambda q, k, v: N.dot_product_attention(q, k, v, mask=_MASK),
        (_vec(2, 1, 4), _vec(3, 1, 4), _vec(3, 1, 4)),
        (_vec(2, 1, 4), _vec(3, 1, 4), _vec(3, 1, 4)),
        (0, 1, 2),
    ),
}


@pytest.fixture(scope="session")
def cases():
    """name -> (function, interior args, boundary args, differentiable argnums)."""
    return CASES
