"""E3 GNN pocket encoder in Flax NNX on e3nn-jax: an E(3)-invariant embedding of 3D molecules.

Example:
  >>> import jax
  >>> from flax import nnx
  >>> from jaxstab.models.e3gnn import E3GNNConfig, E3PocketEncoder, default_data, embed
  >>> data = default_data()
  >>> model = E3PocketEncoder(E3GNNConfig.small(), rngs=nnx.Rngs(0))
  >>> embed(model, {k: v[:3] for k, v in data.arrays.items()}).shape
  (3, 1536)
"""

from jaxstab.models.e3gnn.config import LOSSES, NORMS, WEIGHT_PARAMS, E3GNNConfig
from jaxstab.models.e3gnn.data import default_data, egfr_path, load_sdf
from jaxstab.models.e3gnn.losses import e3gnn_loss, embedding_loss, infonce_loss, mse_loss
from jaxstab.models.e3gnn.model import E3PocketEncoder, MessageLayer, PathBranch, embed
from jaxstab.models.e3gnn.train import ENTRY, STAGE, build_model, feature_stats, train_e3gnn

__all__ = [
    "ENTRY",
    "LOSSES",
    "NORMS",
    "STAGE",
    "WEIGHT_PARAMS",
    "E3GNNConfig",
    "E3PocketEncoder",
    "MessageLayer",
    "PathBranch",
    "build_model",
    "default_data",
    "e3gnn_loss",
    "egfr_path",
    "embed",
    "embedding_loss",
    "feature_stats",
    "infonce_loss",
    "load_sdf",
    "mse_loss",
    "train_e3gnn",
]
