"""The README's Python examples run as written (each in a fresh interpreter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
# Blocks that continue the previous one's session run after it.
PRELUDE = "import jax\nimport jax.numpy as jnp\nimport optax\nimport jaxstab\n"


def _block(word: str) -> str:
    found = [b for b in BLOCKS if word in b]
    assert len(found) == 1, f"expected one README block containing {word!r}"
    return found[0]


def _run(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_block_is_covered():
    assert len(BLOCKS) == 10  # the user-model block runs in tests/jaxstab/test_plugin.py


def test_safe_math_example():
    out = _run(_block("jn.bond_angle") + "\nprint(float(jn.bond_angle(a, b, c)))")
    assert abs(float(out.split()[-1]) - 3.14159265) < 1e-5


def test_transforms_example_skips_the_nan_step():
    code = _block("skip_bad_steps(") + (
        "\nprint(int(stats['grad/nan/encoder']), bool(stats['skip/skipped']),"
        " float(abs(updates['head']['w']).max()))"
    )
    assert _run(code).split() == ["9", "True", "0.0"]


def test_shard_map_example_on_eight_devices():
    code = PRELUDE + _block("jax.shard_map") + "\nprint(norms.tolist())"
    out = _run(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert eval(out.strip().splitlines()[-1]) == [8.0] * 5  # sqrt(64 ones), on every device


def test_checks_example_finds_the_backward_nan():
    out = _run(_block("locate_nonfinite"))
    assert "non-finite value in leaf" in out
    assert "under jvp" in out and "loss_fn" in out


@pytest.mark.slow  # 45 s; models/cfmvc's docstring example and tests cover train + generate
def test_cfmvc_example():
    out = _run(_block("train_cfmvc") + "\nprint(cells.expression.shape, int(cells.n_replaced))")
    assert "{'vae': 'ok', 'flow': 'ok'}" in out
    assert out.strip().splitlines()[-1] == "(3, 200) 0"


@pytest.mark.slow  # ~2 min; tests/models/test_e3gnn_train.py and test_e3gnn_model.py cover it
def test_e3gnn_example():
    out = _run(_block("train_e3gnn") + "\nprint(out.fit.status, vectors.shape)")
    assert out.strip().splitlines()[-1] == "ok (365, 1536)"


@pytest.mark.slow  # ~2 min of compilation; tests/models/test_sidechain_train.py covers it
def test_sidechain_example():
    out = _run(_block("train_sidechain"))
    assert out.strip().splitlines()[-1] == "(10, 173, 14, 3) (10, 173, 21)"


@pytest.mark.slow  # ~40 s of compilation; tests/models/test_genoflow_train.py covers it
def test_genoflow_example():
    out = _run(_block("train_genoflow"))
    assert out.strip().splitlines()[-1] == "(100, 5, 4) (100, 5, 50)"


def test_recorder_example_reports_the_finding(tmp_path):
    import json

    out = _run(_block("jaxstab.Recorder(").replace("runs/my-loop", str(tmp_path / "loop")))
    assert out.startswith("always_clipped - The clip at 0.1 acted on 300 of 300 steps")
    report = json.loads((tmp_path / "loop" / "diagnosis_report.json").read_text())
    assert report["status"] == "ok" and [f["code"] for f in report["findings"]] == [
        "always_clipped"
    ]
