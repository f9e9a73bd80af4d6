"""The model specs, the shared converter, the environment metadata and the suites' model parts."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks import bench_models, convert, meta, specs, stability
from benchmarks.specs.base import size_examples


# ------------------------------------------------------------------ specs
@pytest.mark.parametrize("name", specs.names())
def test_spec_builds_both_sides_at_its_small_size(name):
    spec = specs.get(name)
    assert spec.name == name and {"small", "full", "faults"} <= set(spec.sizes)
    entry = spec.model_entry()
    stage = entry.stage(spec.stage)
    size = spec.size("small")
    for preset in spec.presets:
        model, dataset = spec.build_jax("small", preset, 0)
        assert len(dataset) == size_examples(size)
        torch_model = spec.build_torch("small", preset, 0)
        for group in stage.trainable or ():
            assert hasattr(model, group) and hasattr(torch_model, group)
        # Every state-dict entry but the buffers the spec marks optional lands on an NNX
        # parameter of the same shape, and every NNX parameter is filled.
        sd = torch_model.state_dict()
        state = spec.convert(sd, model)
        n_params = len(list(nnx.to_flat_state(nnx.state(model, nnx.Param))))
        n_torch = len(dict(torch_model.named_parameters()))
        assert len(list(nnx.to_flat_state(state))) == n_params == n_torch
    inputs = spec.inputs("small", 0)
    assert inputs == inputs and spec.inputs("small", 0) is not inputs  # built afresh


def test_unknown_spec_and_size_name_the_known_ones():
    with pytest.raises(KeyError, match="known models: cfmvc"):
        specs.get("nosuch")
    with pytest.raises(KeyError, match="sizes: small, full, faults"):
        specs.get("cfmvc").size("huge")


def test_seed_guards_reach_the_torch_side():
    spec = specs.get("cfmvc")
    torch_model = spec.build_torch("small", "default", 0, **spec.seed_guards)
    assert torch_model.config.logvar_bound == "clip"
    assert spec.build_torch("small", "default", 0).config.logvar_bound == "soft"


# ------------------------------------------------------------------ converter
def _stack():
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    ours = nnx.Sequential(
        nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(5, 2, rngs=nnx.Rngs(1))
    )
    return theirs, ours


def _name(path):
    return f"{path[1]}.{'weight' if path[-1] == 'kernel' else path[-1]}"


def test_converter_round_trips_a_linear_stack():
    theirs, ours = _stack()
    sd = theirs.state_dict()
    convert.load_state_dict(sd, ours, _name)
    np.testing.assert_array_equal(np.asarray(ours.layers[0].kernel[...]), sd["0.weight"].numpy().T)
    back = convert.nnx_to_state_dict(ours, _name)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value.numpy())
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-6)


def test_converter_fails_clearly_on_missing_extra_and_misshaped_keys():
    theirs, ours = _stack()
    sd = dict(theirs.state_dict())
    before = np.asarray(ours.layers[0].kernel[...]).copy()
    missing = "no entry '2.bias' for NNX parameter layers/2/bias"
    with pytest.raises(KeyError, match=re.escape(missing)):
        convert.state_dict_to_nnx({k: v for k, v in sd.items() if k != "2.bias"}, ours, _name)
    with pytest.raises(KeyError, match=re.escape("'3.weight'")):
        convert.state_dict_to_nnx({**sd, "3.weight": torch.zeros(1)}, ours, _name)
    with pytest.raises(ValueError, match=r"0\.weight: shape \(3, 4\) does not match .*\(3, 5\)"):
        convert.state_dict_to_nnx({**sd, "0.weight": torch.zeros(4, 3)}, ours, _name)
    with pytest.raises(ValueError, match=re.escape("gives '0.weight' to both")):
        convert.state_dict_to_nnx(sd, ours, lambda path: "0.weight")
    np.testing.assert_array_equal(np.asarray(ours.layers[0].kernel[...]), before)  # untouched


def test_converter_takes_an_abstract_target_and_a_mapping():
    theirs, _ = _stack()
    abstract = nnx.eval_shape(
        lambda: nnx.Sequential(
            nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(5, 2, rngs=nnx.Rngs(0))
        )
    )
    paths = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    table = {p: _name(p) for p in paths}
    state = convert.state_dict_to_nnx(theirs.state_dict(), abstract, table)
    assert state["layers"][2]["kernel"][...].shape == (5, 2)
    with pytest.raises(KeyError, match="name map has no entry"):
        convert.state_dict_to_nnx(theirs.state_dict(), abstract, dict(list(table.items())[1:]))


def test_torch_grads_fill_missing_gradients_with_zeros():
    theirs, _ = _stack()
    theirs[2].weight.requires_grad_(False)
    theirs(torch.ones(2, 3)).sum().backward()
    grads = convert.torch_grads(theirs)
    assert sorted(grads) == sorted(theirs.state_dict())
    assert grads["2.weight"].shape == (2, 5) and not grads["2.weight"].any()  # no .grad
    np.testing.assert_array_equal(grads["2.bias"], theirs[2].bias.grad.numpy())
    theirs.zero_grad(set_to_none=False)  # in place: the copies keep their values
    assert grads["2.bias"].all()


# ------------------------------------------------------------------ metadata
def test_environment_has_every_key():
    env = meta.environment()
    assert set(env) == set(meta.KEYS)
    assert env["jax"] == jax.__version__ and env["torch"].split("+")[0] in torch.__version__
    assert env["platform"] == jax.devices()[0].platform and env["cpu_count"] >= 1
    assert isinstance(env["cpu"], str) and env["cpu"]
    assert env["python"] in meta.describe(env)


# ------------------------------------------------------------------ speed suite
@pytest.mark.parametrize("variant", ["jax_scan", "jax_scan_unguarded"])
def test_speed_jax_variants_train_the_stage_with_stage_optimizer(variant):
    spec = specs.get("cfmvc")
    model, dataset, tx, loss_fn, _ = bench_models.jax_setup(spec, variant, "small")
    stage = spec.model_entry().stage(spec.stage)
    assert loss_fn is stage.loss_fn and len(dataset) == spec.size("small")["n_cells"]
    groups = list(nnx.state(model, nnx.Param))
    assert set(stage.trainable) < set(groups)
    # The optimizer acts on the model's top-level groups; a stand-in tree keeps this cheap.
    params = {g: {"w": jnp.ones(3)} for g in groups}
    nan = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    updates, _ = jax.jit(tx.update)(nan, tx.init(params), params)
    for group in groups:
        u = updates[group]["w"]
        # Frozen groups get exact zeros; with the guard, a non-finite step is skipped.
        if group not in stage.trainable or variant == "jax_scan":
            assert float(jnp.abs(u).max()) == 0.0, group
        else:  # unguarded: the NaN goes through
            assert bool(jnp.isnan(u).all()), group


def test_speed_torch_variant_at_the_small_size():
    row = bench_models.run_variant("cfmvc", "torch_eager", epochs=1, size="small")
    size = specs.get("cfmvc").size("small")
    assert row["steps_per_epoch"] == math.ceil(size["n_cells"] / size["batch_size"])
    assert math.isfinite(row["final_epoch_loss"]) and row["seconds_per_epoch"] > 0


@pytest.mark.slow  # compiles fit's scan (~20 s); the jax_setup test covers the optimizer
def test_speed_jax_variant_at_the_small_size():
    row = bench_models.run_variant("cfmvc", "jax_scan", epochs=1, size="small")
    assert row["status"] == "ok" and math.isfinite(row["final_epoch_loss"])


# ------------------------------------------------------------------ stability suite
def test_stability_split_and_optimizers():
    spec = specs.get("cfmvc")
    size = spec.size(stability.SIZE)
    train, held = stability.split(spec, 0)
    assert len(train["x"]) == size["n_cells"] - size["n_eval"] and len(held["x"]) == size["n_eval"]
    for variant in ("jax_none", "jax_guard", "jax_guard_noclip"):
        assert callable(stability.optimizer(spec, variant).update)
    with pytest.raises(ValueError, match="unknown JAX variant"):
        stability.optimizer(spec, "torch_seed")


def test_stability_torch_runs_for_one_seed():
    raw = stability.run_torch(specs.get("cfmvc"), seeds=(0,))
    assert set(raw) == {(0, fault) for fault in stability.FAULTS}
    clean, finite = raw[(0, "clean")]
    assert finite and math.isfinite(clean)
    summary = stability.summarize(raw)
    assert set(summary) >= set(stability.FAULTS[1:])


def test_stability_presets_reach_both_sides_and_keys():
    spec = specs.get("cfmvc")
    assert stability.result_key(spec, "default") == "cfmvc"
    assert stability.result_key(spec, "original") == "cfmvc-original"
    with pytest.raises(ValueError, match="no preset 'nosuch'; presets: default, original"):
        stability.run(presets=("default", "nosuch"))  # refused before any training
    with pytest.raises(ValueError, match="no preset 'nosuch'"):
        stability.run_model(spec, variants=(), preset="nosuch")
    res = stability.run_model(spec, variants=(), seeds=(0,), preset="original")
    assert res["preset"] == "original" and res["variants"] == {}
    # The original preset's optimizer is the same stage optimizer, built from its config.
    assert callable(stability.optimizer(spec, "jax_guard", "original").update)


def test_stability_torch_runs_the_original_preset():
    import dataclasses

    spec = specs.get("cfmvc")
    built = []

    def spy(size, preset, seed, **changes):
        model = spec.build_torch(size, preset, seed, **changes)
        built.append(model.config)
        return model

    raw = stability.run_torch(dataclasses.replace(spec, build_torch=spy), (0,), "original")
    assert built and all(c.input_transform == "none" and c.theta_bound == "clip" for c in built)
    assert math.isfinite(raw[(0, "clean")][0])


@pytest.mark.slow  # compiles the fault-injection scan (~15 s); the tests above cover the parts
def test_stability_jax_guard_survives_a_nan_batch():
    res = stability.run_model(specs.get("cfmvc"), variants=("jax_guard",), seeds=(0,))
    assert res["variants"]["jax_guard"]["nan_batch"]["survived"] == 1.0
    md = stability.to_markdown({"environment": meta.environment(), "models": {"cfmvc": res}})
    assert "## cfmvc, stage vae" in md


# ------------------------------------------------------------------ side-chain spec
def test_sidechain_spec_fixed_inputs_and_both_losses():
    """The parity/eval inputs are fixed and the same on both sides; the PyTorch training
    loss crops and designs at random; with one state dict both evaluation losses agree."""
    from benchmarks.specs import sidechain as sc

    spec = specs.get("sidechain")
    config = spec.config("small")
    a, b = spec.inputs("small", 0), spec.inputs("small", 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["aatype"].shape == (2, config.max_len)
    assert 0 < a["design_mask"].sum() < a["design_mask"].size
    train, held_out = stability.split(spec, 0)  # the faults size: 24 train, 8 validation
    from jaxstab.models.sidechain import default_data

    val = default_data("val").arrays
    assert len(train["aatype"]) == 24
    assert np.array_equal(held_out["atom14_pos"], np.asarray(val["atom14_pos"])[:8])
    torch_model = spec.build_torch("small", "default", 0)
    batch = {k: torch.as_tensor(v[:2]) for k, v in spec.data("small", 0).arrays.items()}
    first, second = sc.torch_loss(torch_model, batch), sc.torch_loss(torch_model, batch)
    first, second = float(first.detach()), float(second.detach())
    assert np.isfinite(first) and first != second  # a new window and design mask
    model, _ = spec.build_jax("small", "default", 0)
    sc.parity_weights(torch_model, 0)
    nnx.update(model, spec.convert(torch_model.state_dict(), model))
    torch_model.eval()
    model.eval()
    held = {k: v[:2] for k, v in spec.data("small", 0).arrays.items()}
    ours = float(sc.eval_loss_jax(model, {k: jnp.asarray(v) for k, v in held.items()}))
    theirs = sc.eval_loss_torch(torch_model, {k: torch.as_tensor(v) for k, v in held.items()})
    assert abs(ours - theirs) <= 1e-5 * abs(theirs) and theirs > 0
