"""Multi-host ``fit``: two processes on this machine, two CPU devices each, one 4-device mesh.

Each process runs this file as a script (:func:`worker`): ``jax.distributed.initialize``
with a local coordinator (cross-process collectives on CPU go through gloo, JAX's default),
one epoch with checkpoints into a shared folder, then a resume to the second epoch. Both
print their losses and final parameters; they must agree with each other exactly and with a
one-device run in this process to 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
from flax import nnx

from jaxstab.train import fit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _toy():
    spec = importlib.util.spec_from_file_location("_mesh_toy", os.path.join(HERE, "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(toy, epochs, **kw):
    # Not stateful: a bias right before a BatchNorm gets a gradient of rounding noise only,
    # which Adam would blow up to lr-sized steps that differ between device counts.
    model = toy.Regressor(nnx.Rngs(0, dropout=1))
    tx = optax.adamw(1e-2, weight_decay=1e-3)
    return fit(model, tx, toy.mse_loss, toy.make_data(37), batch_size=8, epochs=epochs,
               key=jax.random.key(5), eval_data=toy.make_data(20, seed=1), **kw)  # fmt: skip


def _summary(res) -> dict:
    params = [np.asarray(v).tolist() for v in jax.tree.leaves(nnx.state(res.model, nnx.Param))]
    return {
        "status": res.status,
        "steps": res.steps,
        "loss": res.history["loss"].tolist(),
        "eval_loss": res.epoch_history["eval_loss"].tolist(),
        "params": params,
    }


def worker(port: str, process_id: str, folder: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
    from jaxstab.train import mesh as placement

    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
    toy = _toy()
    mesh = placement.data_mesh("all")
    first = _run(toy, 1, mesh=mesh, checkpoint_dir=folder)
    resumed = _run(toy, 2, mesh=mesh, checkpoint_dir=folder, resume=True)
    out = {"first_steps": first.steps, **_summary(resumed)}
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(commands: list[list[str]]) -> list[str]:
    """Runs ``python *command`` for every command at once, with two CPU devices each; returns
    their standard outputs once every one has exited 0."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}",
        "PYTHONPATH": REPO,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for command in commands
    ]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, stderr[-4000:]
            outs.append(stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_and_resume(toy, tmp_path):
    port = str(_free_port())
    folder = str(tmp_path / "checkpoints")
    outs = []
    for stdout in _spawn([[os.path.abspath(__file__), port, str(i), folder] for i in range(2)]):
        lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        assert lines, stdout[-2000:]
        outs.append(json.loads(lines[-1][len("RESULT ") :]))
    assert outs[0] == outs[1]  # one global computation, the same replicated result on each host
    got = outs[0]
    ref = _summary(_run(toy, 2))
    assert got["status"] == "ok" and got["steps"] == ref["steps"] == 2 * got["first_steps"]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["eval_loss"], ref["eval_loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(got["params"], ref["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(folder)) == ["best", "latest"]


def test_cli_train_distributed_on_two_processes_then_resume_on_one(tmp_path):
    """``jaxstab train --distributed`` in two processes (process 0 writes the run's files,
    orbax the checkpoints), then ``--resume`` here on one device."""
    from jaxstab.cli import main

    toy = ["--model", os.path.join(REPO, "tests", "jaxstab", "test_cli.py") + ":TOY"]
    base = ["train", *toy, "--no-progress", "--epochs", "2"]
    out, ref = tmp_path / "run", tmp_path / "ref"
    cluster = ["--distributed", "--coordinator", f"localhost:{_free_port()}"]
    cmd = ["-m", "jaxstab", *base[:-1], "1", "--output-dir", str(out), *cluster]
    _spawn([[*cmd, "--num-processes", "2", "--process-id", str(i)] for i in range(2)])
    first = json.loads((out / "train_summary.json").read_text())
    assert first["epochs_completed"] == 1
    assert sorted(os.listdir(out)) == ["checkpoints", "jaxstab_run.json", "train_summary.json"]
    assert main([*base, "--resume", "--output-dir", str(out)]) == 0
    assert main([*base, "--output-dir", str(ref)]) == 0
    got = json.loads((out / "train_summary.json").read_text())
    want = json.loads((ref / "train_summary.json").read_text())
    assert got["steps"] == want["steps"] == 2 * first["steps"]
    np.testing.assert_allclose(got["final_loss"], want["final_loss"], rtol=1e-5)
    np.testing.assert_allclose(
        got["epoch_history"]["train_loss"], want["epoch_history"]["train_loss"], rtol=1e-5
    )


if __name__ == "__main__":
    worker(*sys.argv[1:4])
