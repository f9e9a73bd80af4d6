"""Data-parallel placement for :func:`jaxstab.train.fit`: a ``data`` mesh axis, the batch
sharded over it, parameters and optimizer state replicated or (FSDP-style) sharded.

Everything is plain JAX: arrays are placed with ``jax.device_put`` on ``NamedSharding`` s of
a :class:`jax.sharding.Mesh` and the jitted step constrains its carry and batch with
``jax.lax.with_sharding_constraint``; XLA's partitioner inserts the collectives, so gradient
norms, batch statistics and the guard's skip decision are global.

With ``shard_params`` each parameter and optimizer-state array is split along its largest
dimension that the number of devices divides (the first such one on a tie); an array with no
such dimension, a scalar for instance, is replicated.

Example:
  >>> import jax
  >>> mesh = data_mesh(1)
  >>> mesh.axis_names, mesh.shape["data"]
  (('data',), 1)
  >>> fsdp_spec((6, 16), 4), fsdp_spec((3,), 4)
  (P(None, 'data'), P())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def data_mesh(devices: int | str | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named ``data``.

    ``devices`` is a count (the first that many of ``jax.devices()``), ``"all"`` or ``None``
    (every device: on one host every local device, after ``jax.distributed.initialize()``
    every device of every process) or a list of devices. Raises ``ValueError`` for a count
    below 1 or above the number of devices.

    >>> data_mesh("all").shape["data"] == jax.device_count()
    True
    """
    available = jax.devices()
    if devices is None or devices == "all":
        chosen = list(available)
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"the number of devices must be at least 1, got {devices}")
        if devices > len(available):
            raise ValueError(
                f"{devices} devices asked for but only {len(available)} "
                f"{available[0].platform.upper()} device(s) are visible"
            )
        chosen = list(available[:devices])
    elif isinstance(devices, Sequence) and not isinstance(devices, str) and devices:
        chosen = list(devices)
    else:
        raise ValueError(f"devices must be a positive count, 'all' or a device list: {devices!r}")
    return Mesh(np.asarray(chosen), (AXIS,), axis_types=(AxisType.Auto,))


def parse_devices(text: str) -> int | str:
    """The CLI's ``--devices`` value: ``all`` or a positive integer.

    >>> parse_devices("all"), parse_devices("4")
    ('all', 4)
    """
    if text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--devices takes a positive integer or 'all', got {text!r}")
    return n


def n_data(mesh: Mesh) -> int:
    """The size of the mesh's ``data`` axis."""
    return int(mesh.shape[AXIS])


def check_mesh(mesh: Mesh, batch_size: int) -> Mesh:
    """Validates ``mesh`` for a run with ``batch_size``; returns it with automatic axes.

    Raises ``ValueError`` when the mesh has no ``data`` axis or when ``batch_size`` does not
    divide by the number of devices along it.

    >>> check_mesh(data_mesh(1), 64).shape["data"]
    1
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have a {AXIS!r} axis to shard the batch over, got axes "
                         f"{mesh.axis_names}")  # fmt: skip
    n = n_data(mesh)
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} does not divide by the device count {n} (the mesh's "
            f"{AXIS!r} axis): every device takes an equal share of each batch"
        )
    # The step relies on XLA's automatic partitioning; an explicit-axes mesh (the default of
    # jax.make_mesh) would type every array with its sharding instead.
    if any(t != AxisType.Auto for t in mesh.axis_types):
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
    return mesh


def fsdp_spec(shape: Sequence[int], n: int) -> P:
    """``P`` sharding the largest dimension of ``shape`` that ``n`` divides, else ``P()``.

    >>> fsdp_spec((8, 3), 2), fsdp_spec((5, 7), 2), fsdp_spec((), 2)
    (P('data', None), P(), P())
    """
    if n <= 1:
        return P()
    best = None
    for i, size in enumerate(shape):
        if size % n == 0 and size >= n and (best is None or size > shape[best]):
            best = i
    if best is None:
        return P()
    return P(*(AXIS if i == best else None for i in range(len(shape))))


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_shardings(tree: Any, mesh: Mesh, *, shard: bool) -> Any:
    """``NamedSharding`` per leaf: replicated, or with ``shard`` by :func:`fsdp_spec`.

    PRNG keys and scalars are always replicated.
    """
    n = n_data(mesh)

    def one(x):
        if not shard or _is_key(x):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, fsdp_spec(np.shape(x), n))

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis over ``data``, the rest replicated."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def put_data(data: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a data set on the mesh, examples sharded over ``data``.

    When the number of examples does not divide by the device count, zero rows are appended
    (the batch indices never reach them: they are taken modulo the true size).

    >>> import numpy as np
    >>> put_data({"x": np.ones((3, 2))}, data_mesh(1))["x"].shape
    (3, 2)
    """
    n = n_data(mesh)
    out = {}
    for k, v in data.items():
        v = np.asarray(v)
        pad = (-v.shape[0]) % n
        if pad:
            v = np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
        out[k] = jax.device_put(v, batch_sharding(mesh))
    return out


def put_state(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` of every leaf onto its sharding (keys through their key data).

    Every leaf gets a fresh buffer of its own, never one of the input's (the training calls
    donate their carry). A leaf that is not a global array yet goes through the host: with
    several processes each one then places its own shards (every process holds the same
    initial values, built from the same seed).
    """

    def one(x, s):
        if _is_key(x):
            return jax.random.wrap_key_data(
                one(jax.random.key_data(x), s), impl=jax.random.key_impl(x)
            )
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s, may_alias=False)
        return jax.device_put(np.asarray(x), s)

    return jax.tree.map(one, tree, shardings)


def constrain(tree: Any, shardings: Any) -> Any:
    """``jax.lax.with_sharding_constraint`` (inside a jitted function); ``shardings`` is a
    tree prefix of ``tree`` (one sharding for every leaf, for instance)."""
    return jax.lax.with_sharding_constraint(tree, shardings)


def sync_processes(name: str) -> None:
    """Waits until every process got here (``jax.distributed``); nothing with one process.

    >>> sync_processes("doctest")
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
