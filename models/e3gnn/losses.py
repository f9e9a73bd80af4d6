"""E3 GNN training losses on ``(prediction, target)`` embeddings, and the ``fit`` loss.

``config.loss`` picks one of the original's four (its training script's ``compute_loss``):

- ``"cosine"``: mean ``1 − cos(pred, target)`` (:func:`jaxstab.numerics.cosine_loss`: 0 and
  no NaN for a zero vector);
- ``"mse"``: mean squared error over every entry;
- ``"cos_mse"``: ``cos_weight · cosine + mse_weight · mse`` (0.7 and 0.3);
- ``"infonce"``: symmetric cross-entropy of ``normalise(pred) · normalise(target)ᵀ / τ`` with
  each molecule's own target as its class (τ = ``temperature``, 0.07).

Every term is returned in the auxiliary dict, whichever is trained on.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxstab.models.e3gnn.config import E3GNNConfig
  >>> pred, target = jnp.eye(3), jnp.eye(3)
  >>> loss, terms = embedding_loss(pred, target, E3GNNConfig.small())
  >>> float(loss), sorted(terms)
  (0.0, ['cosine', 'infonce', 'mse'])
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from jaxstab.models.e3gnn.config import E3GNNConfig
from jaxstab.models.e3gnn.model import E3PocketEncoder
from jaxstab.numerics import cosine_loss, safe_normalize

__all__ = ["e3gnn_loss", "embedding_loss", "infonce_loss", "mse_loss"]


def mse_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every entry (PyTorch's ``F.mse_loss``).

    >>> import jax.numpy as jnp
    >>> float(mse_loss(jnp.zeros((2, 2)), jnp.ones((2, 2))))
    1.0
    """
    return jnp.mean(jnp.square(pred - target))


def infonce_loss(pred: jax.Array, target: jax.Array, temperature: float) -> jax.Array:
    """Symmetric InfoNCE: molecule ``i``'s prediction against every target of the batch.

    >>> import jax.numpy as jnp
    >>> bool(infonce_loss(jnp.eye(4), jnp.eye(4), 0.07) < 1e-5)
    True
    """
    logits = safe_normalize(pred) @ safe_normalize(target).T / temperature
    labels = jnp.arange(pred.shape[0])
    p2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2p = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return 0.5 * (jnp.mean(p2t) + jnp.mean(t2p))


def embedding_loss(
    pred: jax.Array, target: jax.Array, config: E3GNNConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``config.loss`` of ``pred`` against ``target`` and every term (see the module doc)."""
    terms = {
        "cosine": cosine_loss(pred, target),
        "mse": mse_loss(pred, target),
        "infonce": infonce_loss(pred, target, config.temperature),
    }
    if config.loss == "cos_mse":
        loss = config.cos_weight * terms["cosine"] + config.mse_weight * terms["mse"]
    else:
        loss = terms[config.loss]
    return loss, terms


def e3gnn_loss(
    model: E3PocketEncoder, batch: Mapping[str, jax.Array], key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss (``jaxstab.train.fit`` signature): the encoder's embedding of the
    batch against ``batch["target"]``. ``key`` is unused (dropout draws from the model's own
    ``dropout`` stream).

    >>> import jax
    >>> from flax import nnx
    >>> from jaxstab.models.e3gnn.data import default_data
    >>> batch = {k: v[:4] for k, v in default_data().arrays.items()}
    >>> model = E3PocketEncoder(E3GNNConfig.small(), rngs=nnx.Rngs(0))
    >>> loss, terms = e3gnn_loss(model, batch, jax.random.key(0))
    >>> 0.0 < float(loss) < 2.0
    True
    """
    del key
    return embedding_loss(model(batch), jnp.asarray(batch["target"]), model.config)
