"""The side-chain model's trunk layers and heads: the sequence transformer layer, the node and
edge transitions, and the sequence and side-chain atom heads (names as in the original).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstab.models.sidechain.features import layer_norm, zeros_linear
from jaxstab.numerics import dot_product_attention

__all__ = [
    "EdgeTransition",
    "MLPResBlock",
    "SequenceHead",
    "SidechainAtomHead",
    "StructureModuleTransition",
    "TransformerEncoderLayer",
]


class TransformerEncoderLayer(nnx.Module):
    """PyTorch's post-norm ``TransformerEncoderLayer`` (ReLU, feed-forward ``d``, no
    dropout): ``self_attn`` (``in_proj`` d → 3d, ``out_proj``), ``linear1``, ``linear2``,
    ``norm1``, ``norm2``; padded keys masked.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = TransformerEncoderLayer(8, 2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 3, 8)), jnp.ones((1, 3), bool)).shape
    (1, 3, 8)
    """

    def __init__(self, d: int, n_heads: int, *, rngs: nnx.Rngs) -> None:
        self.n_heads = n_heads
        self.self_attn = nnx.Dict(
            in_proj=nnx.Linear(d, 3 * d, rngs=rngs), out_proj=nnx.Linear(d, d, rngs=rngs)
        )
        self.linear1 = nnx.Linear(d, d, rngs=rngs)
        self.linear2 = nnx.Linear(d, d, rngs=rngs)
        self.norm1, self.norm2 = layer_norm(d, rngs), layer_norm(d, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``x [b, L, d]``, ``mask [b, L]`` bool (True: real residue)."""
        b, n, d = x.shape
        q, k, v = jnp.split(self.self_attn["in_proj"](x), 3, axis=-1)
        q, k, v = (a.reshape(b, n, self.n_heads, d // self.n_heads) for a in (q, k, v))
        att = dot_product_attention(q, k, v, mask[:, None, None, :]).reshape(b, n, d)
        x = self.norm1(x + self.self_attn["out_proj"](att))
        return self.norm2(x + self.linear2(jax.nn.relu(self.linear1(x))))


class StructureModuleTransition(nnx.Module):
    """``ln(s + linear_3(relu(linear_2(relu(linear_1(s))))))`` (OpenFold).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> StructureModuleTransition(4, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).shape
    (2, 4)
    """

    def __init__(self, c: int, *, rngs: nnx.Rngs) -> None:
        self.linear_1 = nnx.Linear(c, c, rngs=rngs)
        self.linear_2 = nnx.Linear(c, c, rngs=rngs)
        self.linear_3 = nnx.Linear(c, c, rngs=rngs)
        self.ln = layer_norm(c, rngs)

    def __call__(self, s: jax.Array) -> jax.Array:
        """Transitioned ``s``."""
        h = self.linear_3(jax.nn.relu(self.linear_2(jax.nn.relu(self.linear_1(s)))))
        return self.ln(s + h)


class EdgeTransition(nnx.Module):
    """FrameFlow's edge transition: ``initial_embed`` (c_s → c_s/2) of both nodes with the
    edge, two ReLU ``trunk`` layers with a residual, ``final_layer`` (zero-init),
    ``layer_norm``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> EdgeTransition(8, 4, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 8)), jnp.ones((1, 3, 3, 4))).shape
    (1, 3, 3, 4)
    """

    def __init__(self, c_s: int, c_z: int, *, rngs: nnx.Rngs) -> None:
        bias = c_s // 2
        hidden = 2 * bias + c_z
        self.initial_embed = nnx.Linear(c_s, bias, rngs=rngs)
        self.trunk = nnx.Sequential(
            nnx.Linear(hidden, hidden, rngs=rngs),
            nnx.relu,
            nnx.Linear(hidden, hidden, rngs=rngs),
            nnx.relu,
        )
        self.final_layer = zeros_linear(hidden, c_z, rngs)
        self.layer_norm = layer_norm(c_z, rngs)

    def __call__(self, s: jax.Array, z: jax.Array) -> jax.Array:
        """Updated ``z [b, L, L, c_z]``."""
        e = self.initial_embed(s)
        n = s.shape[1]
        shape = (e.shape[0], n, n, e.shape[-1])
        x = jnp.concatenate(
            [z, jnp.broadcast_to(e[:, :, None], shape), jnp.broadcast_to(e[:, None], shape)], -1
        )
        return self.layer_norm(self.final_layer(self.trunk(x) + x))


class MLPResBlock(nnx.Module):
    """``norm(x + net(x))`` with ``net`` = Linear(c, 4c), SiLU, Linear(4c, c) (no dropout).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> MLPResBlock(4, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).shape
    (2, 4)
    """

    def __init__(self, c: int, *, rngs: nnx.Rngs) -> None:
        self.net = nnx.Sequential(
            nnx.Linear(c, 4 * c, rngs=rngs), nnx.silu, nnx.Linear(4 * c, c, rngs=rngs)
        )
        self.norm = layer_norm(c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``norm(x + net(x))``."""
        return self.norm(x + self.net(x))


class SequenceHead(nnx.Module):
    """``mlp`` (Linear, LayerNorm, SiLU, residual blocks, LayerNorm) → ``projection`` to 21
    logits (zero-initialised, so the initial logits are 0).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> SequenceHead(4, 1, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).tolist()[0][:2]
    [0.0, 0.0]
    """

    def __init__(self, c: int, n_layers: int, *, rngs: nnx.Rngs, n_classes: int = 21) -> None:
        blocks = [MLPResBlock(c, rngs=rngs) for _ in range(n_layers)]
        self.mlp = nnx.Sequential(
            nnx.Linear(c, c, rngs=rngs), layer_norm(c, rngs), nnx.silu, *blocks, layer_norm(c, rngs)
        )
        self.projection = zeros_linear(c, n_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[..., 21]``."""
        return self.projection(self.mlp(x))


class SidechainAtomHead(nnx.Module):
    """``projection`` (Linear, LayerNorm, SiLU, Linear; last weights N(0, 1e-4²), bias 0) →
    normalised offsets ``u [b, L, 10, 3]`` (and, with ``per_atom_gaussians``, per-atom
    log-scale changes and rotation vectors, 9 numbers per atom).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> head = SidechainAtomHead(8, 3, rngs=nnx.Rngs(0))
    >>> head(jnp.ones((1, 2, 8))).shape
    (1, 2, 10, 3)
    """

    def __init__(self, c: int, n_params: int, *, rngs: nnx.Rngs, n_atoms: int = 10) -> None:
        self.n_atoms, self.n_params = n_atoms, n_params
        self.projection = nnx.Sequential(
            nnx.Linear(c, c, rngs=rngs),
            layer_norm(c, rngs),
            nnx.silu,
            nnx.Linear(
                c,
                n_atoms * n_params,
                kernel_init=nnx.initializers.normal(1e-4),
                bias_init=nnx.initializers.zeros,
                rngs=rngs,
            ),
        )

    def __call__(self, s: jax.Array) -> jax.Array:
        """Raw per-atom parameters ``[b, L, n_atoms, n_params]``."""
        return self.projection(s).reshape(*s.shape[:-1], self.n_atoms, self.n_params)
