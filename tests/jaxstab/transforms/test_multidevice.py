"""Multi-device behaviour of the stability transforms on 8 host CPU devices.

The checks run in two subprocesses (``_multidevice_worker.py``, started side by side with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), because the device count is
fixed when JAX starts. Each subprocess reports one JSON object; the tests below assert
on it. The reference is always the same transform with ``axis_name=None`` on the full,
unsharded arrays on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_multidevice_worker.py")
MARKER = "JAXSTAB_MULTIDEVICE_RESULT "
TIMEOUT_S = 600

TRANSFORMS = (
    "clip_by_global_norm",
    "clip_by_group_norm",
    "log_norms",
    "zero_nonfinite",
    "zclip",
    "autoclip",
    "skip_bad_steps",
    "dynamic_loss_scale",
    "stability_guard",
)
# Chains that together contain every transform (see SUITES in the worker).
SUITES = (
    "clip_by_global_norm",
    "guard_zclip_skip",
    "skip_bad_steps",
    "zero_autoclip_group_scale",
)
# Under GSPMD and explicit sharding: chains that together contain every transform.
JIT_SUITES = ("clip_by_global_norm", "guard_zclip_skip", "zero_autoclip_group_scale")
EXPLICIT = ("guard_zclip_skip", "zero_autoclip_group_scale")
BAD_SHARD = ("skip_bad_steps", "stability_guard")

# Two subprocesses of about equal cost, run side by side.
GROUPS = (
    [f"abstract_init/{n}" for n in TRANSFORMS]
    + [f"shard_map/{n}" for n in SUITES]
    + [f"bad_shard/{n}" for n in BAD_SHARD]
    + [f"jit_sharding/{n}" for n in JIT_SUITES if n != "guard_zclip_skip"],
    ["jit_sharding/guard_zclip_skip"] + [f"explicit_types/{n}" for n in EXPLICIT],
)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *keys],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for keys in GROUPS
    ]
    merged: dict[str, dict] = {}
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"multi-device worker timed out:\n{stderr[-3000:]}")
        lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
        assert proc.returncode == 0 and lines, (
            f"worker failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
        )
        merged.update(json.loads(lines[-1][len(MARKER) :]))
    return merged


def _assert_ok(results: dict[str, dict], key: str) -> None:
    assert key in results, f"check {key} did not run; ran: {sorted(results)}"
    assert results[key]["ok"], results[key]["detail"]


@pytest.mark.parametrize("suite", SUITES)
def test_shard_map_with_axis_name_equals_single_device(results, suite):
    """Gradient sharded along the axis under jax.shard_map: updates and every statistic
    over 5 steps (one norm spike) equal the single-device run."""
    _assert_ok(results, f"shard_map/{suite}")


@pytest.mark.parametrize("name", BAD_SHARD)
def test_one_non_finite_shard_makes_every_shard_skip(results, name):
    """A NaN on shard 3 only: all 8 shards skip, updates are zero, params unchanged; the
    control run without axis_name skips on shard 3 alone."""
    _assert_ok(results, f"bad_shard/{name}")


@pytest.mark.parametrize("suite", JIT_SUITES)
def test_jit_with_named_sharding_equals_single_device(results, suite):
    """Plain jit on NamedSharding-sharded params and gradients (GSPMD), no axis name."""
    _assert_ok(results, f"jit_sharding/{suite}")


@pytest.mark.parametrize("name", TRANSFORMS)
def test_init_on_abstract_inputs(results, name):
    """jax.eval_shape(init) on ShapeDtypeStructs (and init on them directly) gives the
    shapes and dtypes of the concrete init."""
    _assert_ok(results, f"abstract_init/{name}")


@pytest.mark.parametrize("suite", EXPLICIT)
def test_explicit_sharding_state_types_are_stable(results, suite):
    """Under jax.set_mesh with an Explicit axis, jax.typeof of every state leaf (shape,
    dtype, sharding) is the same after init, update, jit(init) and jit(update)."""
    _assert_ok(results, f"explicit_types/{suite}")
