"""GenoFlow in Flax NNX: an adversarial NB-VAE, then flow matching between adjacent time points
on cells paired by entropic optimal transport, with a gene-graph vector field.

Example:
  >>> from flax import nnx
  >>> from jaxstab.models.genoflow import GenoFlowConfig, build_model, load_anndata, simulate
  >>> from jaxstab.models.genoflow import simulate_trajectory
  >>> data = load_anndata(simulate(40, 30, n_time_points=3, seed=0))
  >>> model = build_model(data, GenoFlowConfig.small(), nnx.Rngs(0))  # train_genoflow trains it
  >>> traj = simulate_trajectory(model, data.arrays["x"][:2], "cond_1", n_save=5)
  >>> traj.latent.shape, traj.expression.shape
  ((5, 2, 4), (5, 2, 30))
"""

from jaxstab.models.genoflow.config import DEVIATIONS, GenoFlowConfig
from jaxstab.models.genoflow.data import default_data, gene_graph_knn, load_anndata, simulate
from jaxstab.models.genoflow.losses import flow_loss, flow_terms, vae_loss, vae_terms
from jaxstab.models.genoflow.model import (
    CausalEncoder,
    CorrectedGNNVectorField,
    GATv2,
    GenoFlow,
    NBDecoder,
    TissueDiscriminator,
)
from jaxstab.models.genoflow.pairing import Pairing, pair_by_ot, pair_time_points
from jaxstab.models.genoflow.train import (
    ENTRY,
    STAGES,
    TrainedGenoFlow,
    build_model,
    flow_pairs,
    train_genoflow,
    train_stage,
)
from jaxstab.models.genoflow.trajectory import Trajectory, simulate_trajectory

__all__ = [
    "DEVIATIONS",
    "ENTRY",
    "STAGES",
    "CausalEncoder",
    "CorrectedGNNVectorField",
    "GATv2",
    "GenoFlow",
    "GenoFlowConfig",
    "NBDecoder",
    "Pairing",
    "TissueDiscriminator",
    "TrainedGenoFlow",
    "Trajectory",
    "build_model",
    "default_data",
    "flow_loss",
    "flow_pairs",
    "flow_terms",
    "gene_graph_knn",
    "load_anndata",
    "pair_by_ot",
    "pair_time_points",
    "simulate",
    "simulate_trajectory",
    "train_genoflow",
    "train_stage",
    "vae_loss",
    "vae_terms",
]
