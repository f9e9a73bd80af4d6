"""Safe math: primitives whose values and gradients stay finite at the boundaries.

Every function is jittable, vmappable, differentiable in forward and reverse mode, keeps the
input dtype (float32, bfloat16, float64; 16-bit inputs are computed in float32 internally),
gives finite values and gradients for finite inputs at the boundary cases listed in each
docstring, and propagates NaN inputs as NaN.
"""

from jaxstab.numerics.attention import dot_product_attention
from jaxstab.numerics.bounds import (
    bounded_positive,
    bounded_positive_inverse,
    soft_clip,
    straight_through_clip,
)
from jaxstab.numerics.distributions import (
    gaussian_kl,
    gaussian_nll_3d,
    nb_log_prob,
    zinb_log_prob,
)
from jaxstab.numerics.elementary import safe_div, safe_exp, safe_log, safe_sqrt
from jaxstab.numerics.geometry import (
    bond_angle,
    cosine_loss,
    cosine_similarity,
    dihedral,
    pairwise_distances,
    safe_norm,
    safe_normalize,
    vector_angle,
)
from jaxstab.numerics.statistics import safe_zscore

__all__ = [
    "bond_angle",
    "bounded_positive",
    "bounded_positive_inverse",
    "cosine_loss",
    "cosine_similarity",
    "dihedral",
    "dot_product_attention",
    "gaussian_kl",
    "gaussian_nll_3d",
    "nb_log_prob",
    "pairwise_distances",
    "safe_div",
    "safe_exp",
    "safe_log",
    "safe_norm",
    "safe_normalize",
    "safe_sqrt",
    "safe_zscore",
    "soft_clip",
    "straight_through_clip",
    "vector_angle",
    "zinb_log_prob",
]
