"""Data-parallel ``fit`` (``mesh=``, ``shard_params=``) on 8 host CPU devices.

Every multi-device check runs in one subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this file run as a script, see
:func:`child`), which prints one JSON object of measurements; compiling once there keeps the
cost down. The tests below read that object.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from jaxstab.train import fit
from jaxstab.train import mesh as placement

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
RTOL, ATOL = 1e-5, 1e-6


def _toy():
    spec = importlib.util.spec_from_file_location("_mesh_toy", os.path.join(HERE, "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _excess(a, b) -> float:
    """Max of ``|a - b| / (ATOL + RTOL·|b|)`` over every leaf: at most 1 when close."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y) / (ATOL + RTOL * np.abs(y)), initial=0)))
    return worst


def _params(model):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _cfmvc(out: dict) -> None:
    """CFM-VC (small preset, VAE stage, guarded AdamW): 8 devices, FSDP, against 1 device."""
    from jaxstab import diagnose, plugin, registry
    from jaxstab.models.cfmvc import load_anndata, simulate

    entry = registry.get("cfmvc")
    data = load_anndata(simulate(256, 40, n_perturbations=3, seed=0)).arrays
    cfg = plugin.run_config(entry, preset="small") | {"stage": "vae"}
    tx = diagnose.optimizer(entry, cfg, guard=True)
    loss_fn = entry.stage("vae").loss_fn

    def run(mesh, shard=False):
        model = entry.build_model(
            load_anndata(simulate(256, 40, n_perturbations=3, seed=0)),
            plugin.model_config(entry, cfg),
            nnx.Rngs(0),
        )
        kw = {"batch_size": 64, "epochs": 2, "key": jax.random.key(0)}
        return fit(model, tx, loss_fn, data, mesh=mesh, shard_params=shard, **kw)

    one = run(None)
    eight = run(jax.make_mesh((8,), ("data",)))  # explicit axes, as jax.make_mesh makes them
    fsdp = run(placement.data_mesh(8), shard=True)
    out["cfmvc"] = {
        "status": [one.status, eight.status, fsdp.status],
        "steps": [one.steps, eight.steps, fsdp.steps],
        "loss_excess": _excess(eight.history["loss"], one.history["loss"]),
        "param_excess": _excess(_params(eight.model), _params(one.model)),
        "replicated": all(
            v.sharding.is_fully_replicated for v in jax.tree.leaves(nnx.state(eight.model))
        ),
        "fsdp_loss_excess": _excess(fsdp.history["loss"], eight.history["loss"]),
        "fsdp_param_excess": _excess(_params(fsdp.model), _params(eight.model)),
    }
    params = jax.tree.leaves(nnx.state(fsdp.model, nnx.Param))
    opt = [x for x in jax.tree.leaves(fsdp.opt_state) if np.ndim(x) >= 1]
    mesh = params[0].sharding.mesh
    rule = all(
        v.sharding.is_equivalent_to(NamedSharding(mesh, placement.fsdp_spec(v.shape, 8)), v.ndim)
        for v in params + opt
    )
    sharded = [v for v in params if not v.sharding.is_fully_replicated]
    local = [v.addressable_shards[0].data.size * 8 == v.size for v in sharded]
    out["fsdp"] = {
        "rule": rule,
        "n_params": len(params),
        "n_sharded": len(sharded),
        "shards_are_an_eighth": all(local),
        "opt_sharded": sum(not x.sharding.is_fully_replicated for x in opt),
    }


def _host(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _planted_nan(out: dict, toy) -> None:
    """One NaN in device 1's shard of the only batch: the guard skips the step everywhere."""
    import jaxstab
    from jaxstab.train.batching import epoch_permutation

    data = toy.make_data(64)
    key = jax.random.key(3)
    perm = np.asarray(epoch_permutation(jax.random.split(key, 3)[0], 0, 64))
    data["x"][perm[13], 1] = np.nan  # batch position 13: device 1 holds positions 8..15
    model = toy.Regressor(nnx.Rngs(0, dropout=1), stateful=True)
    before = jax.tree.leaves(jax.tree.map(_host, nnx.state(model)))
    tx = jaxstab.stability_guard(optax.adam(1e-2))
    kw = {"explosion_norm": None, "halt_on_nonfinite": False, "record": True}
    res = fit(model, tx, toy.mse_loss, data, batch_size=64, epochs=1, key=key,
              mesh=placement.data_mesh(8), **kw)  # fmt: skip
    after = nnx.state(res.model)
    unchanged = []
    for b, a in zip(before, jax.tree.leaves(after), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        shards = [np.asarray(s.data) for s in a.addressable_shards]
        unchanged.append(len(shards) == 8 and all(np.array_equal(s, b) for s in shards))
    out["nan"] = {
        "skipped": res.history["skip/skipped"].tolist(),
        "loss_finite": bool(np.isfinite(res.history["loss"]).all()),
        "status": res.status,
        "unchanged_on_every_device": all(unchanged),
    }


def _checkpoints(out: dict, toy, tmp: str) -> None:
    """Written on 8 devices, resumed on 1 and on 4 (training data and eval data padded)."""
    import shutil

    data, eval_data = toy.make_data(37), toy.make_data(20, seed=1)
    tx = optax.adamw(1e-2, weight_decay=1e-3)

    def run(mesh, epochs, ckpt=None, resume=False):
        model = toy.Regressor(nnx.Rngs(0, dropout=1))
        return fit(model, tx, toy.mse_loss, data, batch_size=8, epochs=epochs,
                   key=jax.random.key(5), eval_data=eval_data, checkpoint_dir=ckpt,
                   resume=resume, mesh=mesh)  # fmt: skip

    m8 = placement.data_mesh(8)
    first = run(m8, 1, os.path.join(tmp, "ck8"))
    full = run(m8, 2)
    for name in ("r1", "r4", "f1", "f4"):
        shutil.copytree(os.path.join(tmp, "ck8"), os.path.join(tmp, name))
    meshes = {"1": None, "4": placement.data_mesh(4)}
    res = {}
    for n, mesh in meshes.items():
        done = run(mesh, 1, os.path.join(tmp, "f" + n), resume=True)  # nothing left to train
        more = run(mesh, 2, os.path.join(tmp, "r" + n), resume=True)
        devices = {d for v in jax.tree.leaves(nnx.state(more.model)) for d in v.devices()}
        res[n] = {
            "restored_bitwise": _same(_params(done.model), _params(first.model))
            and done.steps == first.steps,
            "history_kept": np.array_equal(
                more.history["loss"][: first.steps], first.history["loss"]
            ),
            "steps": more.steps,
            "loss_excess": _excess(more.history["loss"], full.history["loss"]),
            "param_excess": _excess(_params(more.model), _params(full.model)),
            "eval_excess": _excess(
                more.epoch_history["eval_loss"], full.epoch_history["eval_loss"]
            ),
            "n_devices": len(devices),
        }
    res["full_steps"] = full.steps
    out["checkpoint"] = res


def _errors_and_gather(out: dict, toy, tmp: str) -> None:
    """The fit-level divisibility error, and the batch gather's collectives."""
    import re

    import jax.numpy as jnp

    from jaxstab.train.step import Carry, carry_shardings, make_chunk_fn

    data = toy.make_data(64)
    ckpt = os.path.join(tmp, "never")
    try:
        fit(toy.Regressor(nnx.Rngs(0)), optax.sgd(0.1), toy.mse_loss, data, batch_size=64,
            epochs=1, key=jax.random.key(0), mesh=placement.data_mesh(3),
            checkpoint_dir=ckpt)  # fmt: skip
        out["divide_error"] = None
    except ValueError as e:
        out["divide_error"] = str(e)
    out["divide_error_wrote_nothing"] = not os.path.exists(ckpt)

    # A data set of 4096 rows on 8 devices: no collective moves anything of that size.
    mesh = placement.data_mesh(8)
    model = toy.Regressor(nnx.Rngs(0, dropout=1), stateful=True)
    model.train()
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)
    carry = Carry(params, tx.init(params), rest, jnp.int32(0))
    carry = placement.put_state(carry, carry_shardings(carry, mesh))
    big = placement.put_data(toy.make_data(4096), mesh)
    run = make_chunk_fn(gd, tx, toy.mse_loss, batch_size=64, explosion_norm=None, mesh=mesh)
    perm = jax.device_put(jnp.arange(4096), placement.replicated(mesh))
    hlo = run.lower(carry, big, perm, 0, 0, jax.random.key(0), n_steps=2).compile().as_text()
    collectives = [
        line
        for line in hlo.splitlines()
        if re.search(r" (all-gather|all-reduce|all-to-all|collective-permute)(-start)?\(", line)
    ]
    out["gather"] = {
        "n_collectives": len(collectives),
        "dataset_sized": [c.strip()[:120] for c in collectives if "[4096" in c],
        "shard_rows": big["x"].addressable_shards[0].data.shape[0],
    }


def child() -> None:
    import tempfile

    assert jax.device_count() == 8, jax.devices()
    toy = _toy()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        _errors_and_gather(out, toy, tmp)
        _planted_nan(out, toy)
        _checkpoints(out, toy, tmp)
        _cfmvc(out)
    print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def eight():
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}",
        "PYTHONPATH": REPO,
    }
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=REPO,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_cfmvc_on_eight_devices_matches_one(eight):
    r = eight["cfmvc"]
    assert r["status"] == ["ok"] * 3 and len(set(r["steps"])) == 1 and r["steps"][0] > 0
    assert r["loss_excess"] <= 1 and r["param_excess"] <= 1, r
    assert r["replicated"]


def test_shard_params_matches_replicated_and_shards(eight):
    r, f = eight["cfmvc"], eight["fsdp"]
    assert r["fsdp_loss_excess"] <= 1 and r["fsdp_param_excess"] <= 1, r
    assert f["rule"], "each array is sharded along its largest dimension divisible by 8"
    assert f["n_sharded"] >= f["n_params"] // 2 and f["shards_are_an_eighth"], f
    assert f["opt_sharded"] > 0  # AdamW's mu and nu (of the stage's groups) follow the params


def test_planted_nan_on_one_device_skips_the_step_everywhere(eight):
    r = eight["nan"]
    assert r["skipped"] == [1] and not r["loss_finite"] and r["status"] == "ok"
    assert r["unchanged_on_every_device"]


def test_checkpoint_from_eight_devices_resumes_on_one_and_four(eight):
    r = eight["checkpoint"]
    for n in ("1", "4"):
        got = r[n]
        assert got["restored_bitwise"] and got["history_kept"], (n, got)
        assert got["steps"] == r["full_steps"]
        assert max(got["loss_excess"], got["param_excess"], got["eval_excess"]) <= 1, (n, got)
        assert got["n_devices"] == int(n)


def test_batch_that_does_not_divide_is_a_value_error(eight):
    message = eight["divide_error"]
    assert message and "batch size 64" in message and "device count 3" in message
    assert eight["divide_error_wrote_nothing"]


def test_batch_gather_keeps_the_data_set_sharded(eight):
    g = eight["gather"]
    assert g["shard_rows"] == 4096 // 8
    assert g["n_collectives"] > 0 and g["dataset_sized"] == [], g


def test_shard_params_without_a_mesh_is_refused(toy, data):
    with pytest.raises(ValueError, match="needs a mesh"):
        fit(toy.Regressor(nnx.Rngs(0)), optax.sgd(0.1), toy.mse_loss, data, batch_size=8,
            epochs=1, key=jax.random.key(0), shard_params=True)  # fmt: skip


if __name__ == "__main__":
    child()
