"""Side-chain Gaussian model for fixed-backbone sequence and side-chain design (Flax NNX).

Files in the order the data flows: :mod:`residue_constants` (residue and atom14 tables),
:mod:`data` (:func:`load_pdb` reads protein chains into padded atom14 arrays,
:func:`default_data` gives the bundled DSSP test chains split by chain), :mod:`crop`
(fixed-length residue windows), :mod:`rigid` (backbone frames), :mod:`geometry` (the
residues' offset Gaussians), :mod:`features` (designed-residue masks, input geometry, node and
edge features), :mod:`iga` (invariant Gaussian attention and the 12-D update), :mod:`layers`
(trunk layers and heads), :mod:`model` (:class:`SideChainModel`), :mod:`losses`
(:func:`sidechain_loss`, which crops batches wider than ``max_len``), :mod:`train`
(:func:`train_sidechain`, :func:`feature_stats` and the plugin entry ``ENTRY``), :mod:`predict`
(:func:`predict`: sequence and side chains for fixed backbones) and :mod:`config`
(:class:`SideChainConfig`).

Example:
  >>> from jaxstab.models.sidechain import default_data, residue_constants
  >>> data = default_data("val")
  >>> len(data), data.arrays["atom14_pos"].shape, data.meta["names"][0]
  (10, (10, 173, 14, 3), '1h4aX:X')
  >>> t = int(data.arrays["aatype"][0, 1])  # the chain's second residue
  >>> data.meta["sequences"][0][:3], residue_constants.ATOM14_NAMES_BY_TYPE[t][4:9]
  ('GKI', ('CB', 'CG', 'CD', 'CE', 'NZ'))
"""

from jaxstab.models.sidechain import residue_constants
from jaxstab.models.sidechain.config import SideChainConfig
from jaxstab.models.sidechain.crop import center_crop, crop
from jaxstab.models.sidechain.data import (
    RESIDUE_FIELDS,
    SPLITS,
    SUFFIXES,
    VAL_EVERY,
    default_data,
    dssp_paths,
    load_pdb,
)
from jaxstab.models.sidechain.features import design_mask
from jaxstab.models.sidechain.geometry import OffsetGaussianRigid, sidechain_local
from jaxstab.models.sidechain.losses import loss_terms, sidechain_loss
from jaxstab.models.sidechain.model import SideChainModel
from jaxstab.models.sidechain.predict import predict
from jaxstab.models.sidechain.rigid import Rigid
from jaxstab.models.sidechain.train import (
    ENTRY,
    STAGE,
    build_model,
    feature_stats,
    train_sidechain,
)

__all__ = [
    "ENTRY",
    "RESIDUE_FIELDS",
    "SPLITS",
    "STAGE",
    "SUFFIXES",
    "VAL_EVERY",
    "OffsetGaussianRigid",
    "Rigid",
    "SideChainConfig",
    "SideChainModel",
    "build_model",
    "center_crop",
    "crop",
    "default_data",
    "design_mask",
    "dssp_paths",
    "feature_stats",
    "load_pdb",
    "loss_terms",
    "predict",
    "residue_constants",
    "sidechain_local",
    "sidechain_loss",
    "train_sidechain",
]
