"""Side-chain model's name map: the Flax port's NNX parameter path → the state-dict key of
``benchmarks.torch_ref.sidechain.SideChainTorch``.

Rules, in order:

- NNX's ``nnx.Sequential`` level ``layers`` is dropped (its indices are the ``nn.Sequential``
  indices, activations included);
- a sequence transformer ``seq_tfmr_<b>`` (an ``nnx.List`` of layers) is PyTorch's
  ``nn.TransformerEncoder``, whose layers sit under ``layers``: ``seq_tfmr_<b>.layers.<i>``;
- its attention's ``in_proj`` Linear is ``nn.MultiheadAttention``'s packed
  ``in_proj_weight`` / ``in_proj_bias``;
- the leaf ``kernel`` (Linear), ``scale`` (LayerNorm) and ``embedding`` (Embed) is ``weight``.

Every other name is the port's own. The PyTorch version registers no buffers, so no
state-dict key is optional.

Example:
  >>> name_map(("trunk", "seq_tfmr_0", 0, "self_attn", "in_proj", "kernel"))
  'trunk.seq_tfmr_0.layers.0.self_attn.in_proj_weight'
  >>> name_map(("logits_head", "mlp", "layers", 3, "net", "layers", 0, "kernel"))
  'logits_head.mlp.3.net.0.weight'
  >>> name_map(("trunk", "iga_1", "geo_scale"))
  'trunk.iga_1.geo_scale'
"""

from __future__ import annotations

__all__ = ["name_map", "optional_keys"]

_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def name_map(path: tuple) -> str:
    """The NNX parameter ``path`` → the PyTorch state-dict key (module docstring).

    >>> name_map(("edge_feature_net", "edge_embedder", "layers", 5, "scale"))
    'edge_feature_net.edge_embedder.5.weight'
    """
    parts: list[str] = []
    for p in path:
        if p == "layers":
            continue
        parts.append(str(p))
        if str(p).startswith("seq_tfmr_"):
            parts.append("layers")
    leaf = _LEAVES.get(parts[-1], parts[-1])
    if len(parts) >= 2 and parts[-2] == "in_proj":
        parts[-2:] = [f"in_proj_{leaf}"]
    else:
        parts[-1] = leaf
    return ".".join(parts)


def optional_keys(key: str) -> bool:
    """No state-dict key may go unused: every entry of ``SideChainTorch`` is a parameter.

    >>> optional_keys("trunk.iga_0.geo_bias")
    False
    """
    return False
