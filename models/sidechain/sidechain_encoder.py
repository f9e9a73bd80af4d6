"""The original model's side-chain feature encoder (its ``sidechain_head``): each residue's
side-chain atoms 4–13, in the residue's own frame, to a feature vector.

Two branches read the ``[A, 3]`` coordinates of a residue. Branch A treats the atoms as a
sequence of length ``A`` with 3 channels: a kernel-1 ``Conv1d`` to ``hidden`` channels and
SiLU (``branchA_in``), residual ``Conv1dResBlock``\\ s (``branchA_blocks``), then the mean over
the atoms that the mask keeps (:func:`masked_avg_pool_1d`). Branch B flattens the coordinates
to ``3A`` numbers: LayerNorm, Linear to ``hidden``, SiLU (``branchB_in``), residual
``MLPResBlock``\\ s (``branchB_blocks``). Their concatenation goes through ``fuse_in`` (Linear
``2 hidden → hidden``) and ``fuse_blocks``.

Names, layer order, sizes, eps and initialisation follow the original's
``SideAtomsFeatureHead`` (PyTorch): ``Conv1d`` and ``nn.Linear`` layers start from PyTorch's
default (uniform with bound ``1/√fan_in``, weights and biases), the residual MLPs' Linears
from OpenFold's default (LeCun truncated normal, bias 0), every norm with eps 1e-5.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "POOL_EPS",
    "TORCH_EPS",
    "Conv1dResBlock",
    "MLPResBlock",
    "SideAtomsFeatureHead",
    "masked_avg_pool_1d",
    "torch_default_init",
]

TORCH_EPS = 1e-5  # PyTorch's LayerNorm / GroupNorm eps (OpenFold's LayerNorm too)
POOL_EPS = 1e-8  # the pool's lower bound on the mask count, as the original


def torch_default_init(fan_in: int) -> tuple[nnx.Initializer, nnx.Initializer]:
    """Kernel and bias initialisers of PyTorch's default ``Linear`` / ``Conv1d`` init:
    kaiming-uniform with ``a = √5`` is uniform with bound ``1/√fan_in``, as is the bias.

    The kernel's fan-in is read from its shape (``in · k`` for a 1-D conv); the bias needs
    ``fan_in`` given.

    >>> import jax
    >>> kernel_init, bias_init = torch_default_init(4)
    >>> w = kernel_init(jax.random.key(0), (2, 2, 1000))  # Conv kernel [k, in, out]
    >>> b = bias_init(jax.random.key(1), (1000,))
    >>> bool(abs(w).max() <= 0.5 < 1.05 * abs(w).max()), bool(abs(b).max() <= 0.5)
    (True, True)
    """
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init


def _conv(n_in: int, n_out: int, kernel: int, rngs: nnx.Rngs) -> nnx.Conv:
    # PyTorch ``Conv1d(n_in, n_out, kernel, padding=kernel // 2)`` on channels-last input.
    kernel_init, bias_init = torch_default_init(n_in * kernel)
    pad = kernel // 2
    return nnx.Conv(
        n_in, n_out, (kernel,), padding=((pad, pad),), kernel_init=kernel_init,
        bias_init=bias_init, rngs=rngs,
    )  # fmt: skip


def _torch_linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    kernel_init, bias_init = torch_default_init(n_in)
    return nnx.Linear(n_in, n_out, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


def _layer_norm(c: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(c, epsilon=TORCH_EPS, use_fast_variance=False, rngs=rngs)


def _dropout_off(x: jax.Array) -> jax.Array:
    # Holds the place of the original's ``nn.Dropout`` (identity at inference), so that the
    # layer indices of ``nnx.Sequential`` are those of the original's ``nn.Sequential``.
    return x


def masked_avg_pool_1d(x: jax.Array, mask: jax.Array, eps: float = POOL_EPS) -> jax.Array:
    """Mean of ``x [..., A, C]`` over the atoms that ``mask [..., A]`` keeps:
    ``Σ x·m / max(Σ m, eps)``. An all-zero mask gives 0 (value and gradient finite).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0], [3.0], [100.0]]])
    >>> masked_avg_pool_1d(x, jnp.array([[1.0, 1.0, 0.0]])).tolist()
    [[2.0]]
    >>> masked_avg_pool_1d(x, jnp.zeros((1, 3))).tolist()
    [[0.0]]
    """
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), eps)


class Conv1dResBlock(nnx.Module):
    """``x + conv2(silu(conv1(gn(x))))`` over the atom axis: ``gn`` GroupNorm with one group
    (over atoms and channels of each residue), ``conv1``, ``conv2`` kernel 3, padding 1.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> Conv1dResBlock(8, rngs=nnx.Rngs(0))(jnp.ones((2, 10, 8))).shape
    (2, 10, 8)
    """

    def __init__(self, ch: int, *, rngs: nnx.Rngs, kernel: int = 3) -> None:
        self.gn = nnx.GroupNorm(
            ch, num_groups=1, epsilon=TORCH_EPS, use_fast_variance=False, rngs=rngs
        )
        self.conv1 = _conv(ch, ch, kernel, rngs)
        self.conv2 = _conv(ch, ch, kernel, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [n, A, ch]`` (channels last) → the same shape."""
        return x + self.conv2(nnx.silu(self.conv1(self.gn(x))))


class MLPResBlock(nnx.Module):
    """``norm(x + net(x))``, ``net`` = Linear(c, c_mid), SiLU, Linear(c_mid, c) with
    OpenFold's default init, and identity slots where the original has dropout (so the
    Linears are ``net`` layers 0 and 3, as the original's state-dict keys).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> block = MLPResBlock(4, 16, rngs=nnx.Rngs(0))
    >>> block(jnp.ones((2, 4))).shape, block.net.layers[3].kernel.shape
    ((2, 4), (16, 4))
    """

    def __init__(self, c: int, c_mid: int, *, rngs: nnx.Rngs) -> None:
        # nnx.Linear's defaults are OpenFold's "default": LeCun truncated normal, bias 0.
        self.net = nnx.Sequential(
            nnx.Linear(c, c_mid, rngs=rngs), nnx.silu, _dropout_off,
            nnx.Linear(c_mid, c, rngs=rngs), _dropout_off,
        )  # fmt: skip
        self.norm = _layer_norm(c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``norm(x + net(x))``."""
        return self.norm(x + self.net(x))


class SideAtomsFeatureHead(nnx.Module):
    """Side-chain atom coordinates ``[b, L, A, 3]`` (each residue's frame, Å) → features
    ``[b, L, hidden]`` (module docstring). The original's ``SideAtomsFeatureHead`` with
    ``num_classes=0`` (no classification head; ``node_mask`` only masked its logits).

    Deterministic: the original's dropout (0.1) acts only in training, so this is its
    eval-mode function. ``atom_mask`` affects only branch A's pool; the convolutions, the
    GroupNorms and branch B see every atom's coordinates, so give zeros where atoms are
    absent, as the original's data does. Computes in the input's dtype (float32, float64).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> head = SideAtomsFeatureHead(16, rngs=nnx.Rngs(0))
    >>> x, mask = jnp.ones((2, 5, 10, 3)), jnp.ones((2, 5, 10))
    >>> head(x, mask).shape
    (2, 5, 16)
    >>> bool(jnp.isfinite(head(x, mask.at[0, 0].set(0.0))).all())
    True
    """

    def __init__(
        self,
        hidden: int,
        *,
        n_atoms: int = 10,
        conv_blocks: int = 4,
        mlp_blocks: int = 4,
        fuse_blocks: int = 4,
        rngs: nnx.Rngs,
    ) -> None:
        self.hidden, self.n_atoms = hidden, n_atoms
        self.branchA_in = nnx.Sequential(_conv(3, hidden, 1, rngs), nnx.silu)
        self.branchA_blocks = nnx.List(
            [Conv1dResBlock(hidden, rngs=rngs) for _ in range(conv_blocks)]
        )
        flat = 3 * n_atoms
        self.branchB_in = nnx.Sequential(
            _layer_norm(flat, rngs), _torch_linear(flat, hidden, rngs), nnx.silu
        )
        self.branchB_blocks = nnx.List(
            [MLPResBlock(hidden, 4 * hidden, rngs=rngs) for _ in range(mlp_blocks)]
        )
        self.fuse_in = _torch_linear(2 * hidden, hidden, rngs)
        self.fuse_blocks = nnx.List(
            [MLPResBlock(hidden, 4 * hidden, rngs=rngs) for _ in range(fuse_blocks)]
        )

    def branch_a(self, x: jax.Array, atom_mask: jax.Array) -> jax.Array:
        """Branch A: conv stack over the atoms, masked mean → ``[b, L, hidden]``."""
        b, n, a, _ = x.shape
        h = self.branchA_in(x.reshape(b * n, a, 3))
        for block in self.branchA_blocks:
            h = block(h)
        return masked_avg_pool_1d(h, atom_mask.reshape(b * n, a)).reshape(b, n, self.hidden)

    def branch_b(self, x: jax.Array) -> jax.Array:
        """Branch B: flattened coordinates through the residual MLP → ``[b, L, hidden]``."""
        h = self.branchB_in(x.reshape(*x.shape[:-2], -1))
        for block in self.branchB_blocks:
            h = block(h)
        return h

    def __call__(self, x: jax.Array, atom_mask: jax.Array) -> jax.Array:
        """``x [b, L, A, 3]``, ``atom_mask [b, L, A]`` (1: atom counts in the pool) →
        ``[b, L, hidden]``."""
        if x.shape[-2:] != (self.n_atoms, 3):
            raise ValueError(f"expected [b, L, {self.n_atoms}, 3] atoms, got {x.shape}")
        h = self.fuse_in(jnp.concatenate([self.branch_a(x, atom_mask), self.branch_b(x)], -1))
        for block in self.fuse_blocks:
            h = block(h)
        return h
