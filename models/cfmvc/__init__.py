"""CFM-VC 2.x in Flax NNX: a perturbation-conditioned flow on an NB-VAE latent space.

Example:
  >>> import jax
  >>> from jaxstab.models.cfmvc import CFMVCConfig, generate_expression, load_anndata, simulate
  >>> from jaxstab.models.cfmvc import train_cfmvc
  >>> data = load_anndata(simulate(256, 40, n_perturbations=2, seed=0))
  >>> out = train_cfmvc(data, epochs=1, key=jax.random.key(0), config=CFMVCConfig.small())
  >>> cells = generate_expression(out.model, jax.numpy.array([-1, 0]), [0, 0], [0, 0],
  ...                             key=jax.random.key(1))
  >>> cells.expression.shape
  (2, 40)
"""

from jaxstab.models.cfmvc.config import CFMVCConfig
from jaxstab.models.cfmvc.data import load_anndata, simulate
from jaxstab.models.cfmvc.generate import Generated, generate_expression
from jaxstab.models.cfmvc.losses import flow_loss, joint_loss, mmd_rbf, vae_loss
from jaxstab.models.cfmvc.model import CFMVC, ContextEncoder, DecoderNB, EncoderVAE, FlowField
from jaxstab.models.cfmvc.train import (
    ENTRY,
    STAGES,
    TrainedCFMVC,
    build_model,
    train_cfmvc,
    train_stage,
)

__all__ = [
    "CFMVC",
    "ENTRY",
    "STAGES",
    "CFMVCConfig",
    "ContextEncoder",
    "DecoderNB",
    "EncoderVAE",
    "FlowField",
    "Generated",
    "TrainedCFMVC",
    "build_model",
    "flow_loss",
    "generate_expression",
    "joint_loss",
    "load_anndata",
    "mmd_rbf",
    "simulate",
    "train_cfmvc",
    "train_stage",
    "vae_loss",
]
