"""Where a benchmark ran: library versions, the JAX device, the CPU, Python.

Every suite puts :func:`environment` under the key ``"environment"`` of its result and
:func:`describe` in its markdown. Versions are read from the installed distributions, so
asking for PyTorch's does not import it; a library that is not installed is ``None``.

Example:
  >>> env = environment()
  >>> sorted(KEYS) == sorted(env)
  True
  >>> describe({**env, "platform": "cpu", "cpu": "x86_64", "cpu_count": 2,
  ...           "jax": "0.1", "flax": "0.2", "optax": "0.3", "torch": None}).split(";")[0]
  'cpu (x86_64, 2 cores)'
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "torch", "numpy")
KEYS = (*LIBRARIES, "python", "platform", "device_kind", "device_count", "cpu", "cpu_count")


def version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or ``None``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions of the libraries, JAX's default platform and device, the CPU, Python."""
    import jax

    device = jax.devices()[0]
    return {
        **{name: version(name) for name in LIBRARIES},
        "python": platform.python_version(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def describe(env: dict[str, Any]) -> str:
    """One line for a markdown report: device, CPU, library versions."""
    host = f"{env['cpu']}, {env['cpu_count']} cores"
    if env["platform"] == "cpu":
        where = f"cpu ({host})"
    else:
        count = env.get("device_count", 1)
        where = f"{env['platform']}: {count} × {env['device_kind']} (host {host})"
    libs = ", ".join(f"{k} {env[k]}" for k in ("jax", "flax", "optax", "torch") if env.get(k))
    return f"{where}; {libs}; Python {env['python']}"
