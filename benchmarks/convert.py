"""PyTorch ``state_dict()`` ↔ Flax NNX parameters, by a name map.

A port that mirrors its PyTorch version module for module gives a *name map*: the NNX
parameter path (``("encoder", "fc1", "kernel")``) to the state-dict key
(``"encoder.fc1.weight"``), as a function of the path or a mapping. A Linear kernel is stored
``[in, out]`` by NNX and ``[out, in]`` by PyTorch, so the leaves that ``transpose`` selects
(default :func:`is_linear_kernel`: every leaf named ``kernel``) are transposed on the way.

- :func:`state_dict_to_nnx`: a state dict → an ``nnx.State`` of ``Param`` with the target's
  paths, dtypes and shapes (every key used exactly once, every shape checked);
- :func:`load_state_dict`: the same, written into a model in place;
- :func:`nnx_to_state_dict`: NNX parameters (or gradients) → ``{key: numpy array}`` in
  PyTorch's layout;
- :func:`torch_grads`: the ``.grad`` of every parameter of a PyTorch module, by name.

Values may be PyTorch tensors or NumPy arrays; this module does not import PyTorch.

Example:
  >>> import numpy as np
  >>> from flax import nnx
  >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  >>> sd = {"weight": np.arange(6.0).reshape(2, 3), "bias": np.ones(2)}
  >>> names = {("kernel",): "weight", ("bias",): "bias"}
  >>> model = load_state_dict(sd, model, names)
  >>> model.kernel.shape, float(model.kernel[2, 1])
  ((3, 2), 5.0)
  >>> nnx_to_state_dict(nnx.state(model, nnx.Param), names)["weight"].tolist()
  [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[Any, ...]
NameMap = Callable[[Path], str] | Mapping[Path, str]


def is_linear_kernel(path: Path) -> bool:
    """Whether the NNX leaf at ``path`` is a Linear or 1-D convolution kernel (named
    ``kernel``), transposed."""
    return bool(path) and path[-1] == "kernel"


def _namer(name_map: NameMap) -> Callable[[Path], str]:
    if callable(name_map):
        return name_map
    table = {tuple(k): v for k, v in name_map.items()}

    def name(path: Path) -> str:
        if path not in table:
            raise KeyError(f"the name map has no entry for NNX parameter {_show(path)}")
        return table[path]

    return name


def _show(path: Path) -> str:
    return "/".join(map(str, path))


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a PyTorch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _params(target: nnx.Module | nnx.State) -> nnx.State:
    return target if isinstance(target, nnx.State) else nnx.state(target, nnx.Param)


def _flip(value: np.ndarray, key: str) -> np.ndarray:
    # A Linear kernel [in, out] is PyTorch's weight [out, in]; a 1-D convolution kernel
    # [k, in, out] is Conv1d's [out, in, k]. Both are ``.T``, which is its own inverse.
    if value.ndim not in (2, 3):
        raise ValueError(f"{key}: a transposed leaf must be 2-D or 3-D, got shape {value.shape}")
    return value.T


def _keys(flat: Iterable[tuple[Path, Any]], name: Callable[[Path], str]) -> dict[Path, str]:
    keys: dict[Path, str] = {}
    owner: dict[str, Path] = {}
    for path, _ in flat:
        path = tuple(path)
        key = name(path)
        if key in owner:
            raise ValueError(
                f"the name map gives {key!r} to both {_show(owner[key])} and {_show(path)}"
            )
        keys[path], owner[key] = key, path
    return keys


def state_dict_to_nnx(
    state_dict: Mapping[str, Any],
    target: nnx.Module | nnx.State,
    name_map: NameMap,
    *,
    transpose: Callable[[Path], bool] = is_linear_kernel,
    optional: Callable[[str], bool] | None = None,
) -> nnx.State:
    """The ``Param`` state of ``target`` with every value taken from ``state_dict``.

    ``target`` (a model, possibly abstract from ``nnx.eval_shape``, or its ``Param`` state)
    gives the paths, shapes and dtypes; it is not changed. Raises ``KeyError`` for a
    parameter with no state-dict entry or an entry with no parameter (naming them), and
    ``ValueError`` for a shape that does not match (after the transpose). Entries whose key
    ``optional`` accepts may go unused (buffers the port computes instead of storing, such as
    constant frequencies).
    """
    flat = list(nnx.to_flat_state(_params(target)))
    keys = _keys(flat, _namer(name_map))
    unused = dict(state_dict)
    leaves = []
    for path, var in flat:
        path = tuple(path)
        key = keys[path]
        if key not in unused:
            raise KeyError(f"state_dict has no entry {key!r} for NNX parameter {_show(path)}")
        value = _numpy(unused.pop(key))
        if transpose(path):
            value = _flip(value, key)
        like = var.get_value()
        if value.shape != tuple(like.shape):
            raise ValueError(
                f"{key}: shape {value.shape} does not match NNX parameter {_show(path)} "
                f"{tuple(like.shape)}" + (" (after transposing)" if transpose(path) else "")
            )
        leaves.append((path, var.replace(jnp.asarray(value, like.dtype))))
    unused = [k for k in unused if optional is None or not optional(k)]
    if unused:
        raise KeyError(f"state_dict entries with no NNX parameter: {sorted(unused)}")
    return nnx.from_flat_state(leaves)


def load_state_dict(
    state_dict: Mapping[str, Any],
    model: nnx.Module,
    name_map: NameMap,
    *,
    transpose: Callable[[Path], bool] = is_linear_kernel,
) -> nnx.Module:
    """:func:`state_dict_to_nnx` written into ``model`` (in place); returns ``model``."""
    nnx.update(model, state_dict_to_nnx(state_dict, model, name_map, transpose=transpose))
    return model


def nnx_to_state_dict(
    state: nnx.Module | nnx.State,
    name_map: NameMap,
    *,
    groups: Iterable[str] | None = None,
    transpose: Callable[[Path], bool] = is_linear_kernel,
) -> dict[str, np.ndarray]:
    """NNX parameters (or gradients, an ``nnx.State`` of the same paths) by state-dict key,
    in PyTorch's layout. ``groups``: only the leaves under these top-level names."""
    keep = None if groups is None else set(groups)
    flat = [(tuple(p), v) for p, v in nnx.to_flat_state(_params(state))]
    flat = [(p, v) for p, v in flat if keep is None or p[0] in keep]
    values = dict(flat)
    out = {}
    for path, key in _keys(flat, _namer(name_map)).items():
        value = np.asarray(values[path].get_value())
        out[key] = _flip(value, key) if transpose(path) else value
    return out


def torch_grads(torch_model: Any) -> dict[str, np.ndarray]:
    """``{name: .grad}`` of every parameter of a PyTorch module (copies), zeros where it is
    ``None``."""
    out = {}
    for name, param in torch_model.named_parameters():
        grad = param.grad
        out[name] = np.zeros_like(_numpy(param)) if grad is None else _numpy(grad).copy()
    return out
