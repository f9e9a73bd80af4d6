"""GenoFlow's two stages: what each trains, the OT pairs, BatchNorm modes, the registry entry."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstab import plugin, registry
from jaxstab.cli import main
from jaxstab.models.genoflow import (
    ENTRY,
    GenoFlowConfig,
    flow_pairs,
    load_anndata,
    simulate,
    simulate_trajectory,
    train_genoflow,
)
from jaxstab.models.genoflow.train import build_model, encode_means

SMALL = GenoFlowConfig.small()


@pytest.fixture(scope="module")
def data():
    return load_anndata(simulate(30, 24, n_time_points=3, seed=1))


@pytest.fixture(scope="module")
def trained(data):
    model = build_model(data, SMALL, nnx.Rngs(0))
    before = nnx.clone(model)
    out = train_genoflow(data, epochs=2, key=jax.random.key(0), model=model, batch_size=16)
    return before, out


def _leaves(module, kind=nnx.Param):
    return {
        "/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(module, kind))
    }


def _moved(a, b, kind=nnx.Param):
    la, lb = _leaves(a, kind), _leaves(b, kind)
    return {k.split("/")[0] for k in la if not np.array_equal(la[k], lb[k])}


def test_each_stage_moves_only_its_own_groups_and_batch_stats(trained):
    before, out = trained
    assert [(k, r.fit.status) for k, r in out.stages.items()] == [("vae", "ok"), ("flow", "ok")]
    after_vae = out.stages["vae"].fit.model
    assert _moved(before, after_vae) == {"encoder", "decoder", "discriminator"}
    assert _moved(before, after_vae, nnx.BatchStat) == {"encoder"}  # running stats trained
    assert _moved(after_vae, out.model) == {"vector_field"}
    assert _moved(after_vae, out.model, nnx.BatchStat) == set()  # the flow stage never trains BN


def test_batch_norm_uses_batch_statistics_in_training_and_running_ones_in_eval(trained, data):
    _, out = trained
    model = nnx.clone(out.model)
    x = jnp.log1p(jnp.asarray(data.arrays["x"][:16]))
    c = jnp.asarray(data.arrays["condition"][:16])
    stats = _leaves(model, nnx.BatchStat)
    model.eval()
    a = model.encoder(x, c)[0]
    assert all(np.array_equal(v, _leaves(model, nnx.BatchStat)[k]) for k, v in stats.items())
    model.train()
    b = model.encoder(x, c)[0]
    changed = _leaves(model, nnx.BatchStat)
    assert all(not np.array_equal(v, changed[k]) for k, v in stats.items())
    assert not np.allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(
        encode_means(out.model, data.arrays["x"][:16], c), a, rtol=1e-5, atol=1e-6
    )


def test_flow_pairs_cover_each_earlier_cell_once_with_a_later_partner(trained, data):
    _, out = trained
    pairs = flow_pairs(out.model, data)
    a, time = pairs.arrays, data.arrays["time"]
    assert sorted(a["source"].tolist()) == np.flatnonzero(time < 2).tolist()
    np.testing.assert_array_equal(time[a["target"]], time[a["source"]] + 1)
    z = encode_means(out.model, data.arrays["x"], data.arrays["condition"])
    np.testing.assert_allclose(a["z0"], z[a["source"]], rtol=1e-6)
    np.testing.assert_allclose(a["z1"], z[a["target"]], rtol=1e-6)
    tau = np.asarray(out.model.flow_times(), np.float32)
    np.testing.assert_array_equal(a["tau0"], tau[time[a["source"]]])
    np.testing.assert_array_equal(a["condition"], data.arrays["condition"][a["source"]])


def test_a_constant_latent_dimension_pairs_and_trains_finitely(trained, data):
    _, out = trained
    model = nnx.clone(out.model)
    head = model.encoder.mu_head
    head.kernel[...] = head.kernel[...].at[:, 0].set(0.0)  # dimension 0: constant 0.7
    head.bias[...] = head.bias[...].at[0].set(0.7)
    pairs = flow_pairs(model, data)
    assert np.all(pairs.arrays["z0"][:, 0] == np.float32(0.7))
    assert all(np.all(np.isfinite(v)) for v in pairs.arrays.values())
    res = train_genoflow(data, stages=("flow",), epochs=1, key=jax.random.key(1), model=model)
    assert res.stages["flow"].fit.status == "ok"
    assert np.all(np.isfinite(res.stages["flow"].fit.history["loss"]))


def test_trajectory_of_a_trained_model_is_finite(trained, data):
    _, out = trained
    traj = simulate_trajectory(out.model, data.arrays["x"][:3], ["cond_0", "cond_1", 0], n_save=4)
    assert np.all(np.isfinite(np.asarray(traj.expression)))
    np.testing.assert_allclose(traj.times, np.linspace(0, 1, 4), atol=1e-7)


def test_registry_entry_presets_and_optimizer():
    entry = registry.get("genoflow")
    assert entry is ENTRY and [s.name for s in entry.stages] == ["vae", "flow"]
    assert entry.stage("flow").prepare is flow_pairs
    assert entry.preset("original") == GenoFlowConfig.original()
    cfg = plugin.run_config(entry, preset="small")
    assert plugin.model_config(entry, cfg) == SMALL
    assert cfg["batch_size"] == SMALL.batch_size and cfg["explosion_norm"] == SMALL.explosion_norm


def test_diagnose_runs_the_flow_stage_from_an_h5ad_file(tmp_path):
    # The flow stage's OT pairing runs inside diagnose (Stage.prepare); the vae stage is the
    # entry's default and trains through the same code in the fixture above.
    stage = "flow"
    path = tmp_path / "cells.h5ad"
    simulate(30, 24, n_time_points=3, seed=2).write_h5ad(path)
    out = tmp_path / stage
    args = ["--preset", "small", "--stage", stage, "--epochs", "1", "--no-progress"]
    code = main(["diagnose", "--model", "genoflow", "--data", str(path), *args,
                 "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "diagnosis_report.json").read_text())
    assert report["status"] == "ok" and report["config"]["stage"] == stage
    groups = {row["param"].split("/")[0] for row in report["weight_changes"]
              if row["abs_change"] > 0}  # fmt: skip
    assert groups == {"vector_field"}
