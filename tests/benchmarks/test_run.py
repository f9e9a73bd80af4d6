"""The benchmark runner and the parity suite (at the small size; the full size is the benchmark)."""

from __future__ import annotations

import json

import pytest

from benchmarks import parity, specs
from benchmarks import run as runner


@pytest.fixture(scope="module")
def small_parity() -> dict:
    return parity.run(models=["cfmvc"], size="small")


def test_parity_loop_runs_every_preset_within_tolerance(small_parity):
    spec = specs.get("cfmvc")
    assert list(small_parity["models"]) == [parity.result_key(spec, p) for p in spec.presets]
    assert set(small_parity["environment"]) >= {"jax", "torch", "platform"}
    for res in small_parity["models"].values():
        errors = res["max_relative_error"]
        assert set(errors) >= {"nb_log_likelihood", "vae_gradients", "flow_velocity"}
        assert res["tolerance"]["vae_gradients"] == parity.TOLERANCES["gradient"]
        assert res["tolerance"]["vae_loss"] == parity.TOLERANCES["value"]
        assert all(res["within_tolerance"].values()), errors
        assert any(err > 0 for err in errors.values())  # two float32 implementations, not one
        assert res["config"]["size"] == "small"


def test_parity_markdown_flags_a_failure(small_parity):
    res = small_parity["models"]["cfmvc"]
    bad = {**res, "within_tolerance": {**res["within_tolerance"], "alpha": False}}
    md = parity.parity_markdown({**small_parity, "models": {"cfmvc": bad}})
    assert "| alpha |" in md and "| NO |" in md
    assert md.count("| yes |") == len(bad["within_tolerance"]) - 1


def test_run_suite_writes_json_and_markdown(tmp_path, monkeypatch, small_parity):
    monkeypatch.setattr(parity, "run", lambda models=None: small_parity)
    json_path, md_path = runner.run_suite("parity", out_dir=tmp_path)
    assert json_path.name == f"parity-{runner.device_name()}.json"
    written = json.loads(json_path.read_text())
    assert written["models"]["cfmvc"]["within_tolerance"]["flow_gradients"]
    assert "| flow_gradients |" in md_path.read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_model_option_reaches_the_per_model_suites_only(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_parity(models=None):
        seen["parity"] = models
        return {"environment": {}, "models": {}}

    def fake_numerics(write=True):
        seen["numerics"] = "called"
        return {"x": 1.0}

    from benchmarks import bench_numerics

    monkeypatch.setattr(parity, "run", fake_parity)
    monkeypatch.setattr(parity, "parity_markdown", lambda r: "")
    monkeypatch.setattr(bench_numerics, "run", fake_numerics)
    monkeypatch.setattr(bench_numerics, "to_markdown", lambda r: "")
    monkeypatch.setattr(runner, "RESULTS", tmp_path)
    argv = ["--suite", "parity", "--suite", "numerics", "--model", "cfmvc", "--model", "cfmvc"]
    assert runner.main(argv) == 0
    assert seen == {"parity": ["cfmvc"], "numerics": "called"}
    assert "'numerics' has no model part" in capsys.readouterr().err
    assert (tmp_path / f"parity-{runner.device_name()}.json").exists()
    assert runner.per_model("speed") and runner.per_model("stability")
    assert not runner.per_model("overhead")


def test_preset_option_reaches_the_stability_suite_only(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_numerics, stability

    seen = {}

    def fake_stability(models=None, presets=("default",)):
        seen["stability"] = (models, presets)
        return {"environment": {}, "models": {}}

    monkeypatch.setattr(stability, "run", fake_stability)
    monkeypatch.setattr(stability, "to_markdown", lambda r: "")
    monkeypatch.setattr(bench_numerics, "run", lambda write=True: {"x": 1.0})
    monkeypatch.setattr(bench_numerics, "to_markdown", lambda r: "")
    monkeypatch.setattr(runner, "RESULTS", tmp_path)
    assert runner.main(["--suite", "stability"]) == 0
    assert seen.pop("stability") == (None, ("default",))  # the suite's own default
    argv = ["--suite", "stability", "--suite", "numerics", "--preset", "default",
            "--preset", "original"]  # fmt: skip
    assert runner.main(argv) == 0
    assert seen["stability"] == (None, ["default", "original"])
    assert "'numerics' takes no preset" in capsys.readouterr().err
    assert runner.takes_presets("stability") and not runner.takes_presets("parity")


def test_unknown_preset_exits_2_naming_the_known_ones(capsys, monkeypatch):
    from benchmarks import stability

    monkeypatch.setattr(stability, "run", lambda **_: pytest.fail("suite ran"))
    assert runner.main(["--suite", "stability", "--preset", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "has no preset 'nosuch'; presets: default, original" in err


def test_unknown_model_exits_2_naming_the_known_ones(capsys, monkeypatch):
    monkeypatch.setattr(parity, "run", lambda models=None: pytest.fail("suite ran"))
    assert runner.main(["--suite", "parity", "--model", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nosuch'" in err
    assert f"known models: {', '.join(specs.names())}" in err


def test_unknown_model_exits_2_from_the_command_line():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", "speed", "--model", "nosuch"],
        capture_output=True,
        text=True,
        cwd=runner.RESULTS.parents[1],
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown model 'nosuch'; known models: cfmvc" in proc.stderr


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--suite", "nope"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module",
    [
        "run",
        "parity",
        "bench_numerics",
        "nb_accuracy",
        "stability",
        "deviations_cfmvc",
        "convert",
        "meta",
        "specs",
        "specs.base",
        "specs.cfmvc",
        "specs.genoflow",
        "specs.sidechain",
        "experiments",
        "sidechain_per_atom",
    ],
)
def test_docstring_examples(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"benchmarks.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_suites_name_no_model():
    from pathlib import Path

    root = Path(runner.__file__).parent
    for name in ("run.py", "parity.py", "bench_models.py", "stability.py", "bench_overhead.py"):
        source = (root / name).read_text()
        assert '"cfmvc"' not in source and "'cfmvc'" not in source, name


def test_deviation_variants_change_one_field_each():
    from benchmarks.deviations_cfmvc import FUNCTION_FIELDS, STRAIGHT, variants
    from jaxstab.models.cfmvc import CFMVCConfig

    default, original = CFMVCConfig.default(), CFMVCConfig.original()
    found = dict(variants(control_column=2))
    assert found["default"] == default
    differing = [f for f in FUNCTION_FIELDS if getattr(default, f) != getattr(original, f)]
    assert all(getattr(found["original"], f) == getattr(original, f) for f in FUNCTION_FIELDS)
    assert found["original"].control_column == 2
    straight = found[STRAIGHT]
    assert straight.mean_bound == straight.logvar_bound == straight.theta_bound
    assert straight.mean_bound == "straight_through" and straight.control_column == 2
    assert straight.epochs == found["original"].epochs == default.epochs
    singles = [n for n in found if n not in ("default", "original", STRAIGHT)]
    assert len(singles) == len(differing)
    for name in singles:
        cfg = found[name]
        changed = [f for f in FUNCTION_FIELDS if getattr(cfg, f) != getattr(default, f)]
        assert changed == [name.split("=")[0]], name
        assert name == f"{changed[0]}={getattr(original, changed[0])}"
    # The bound rows take the original's hard clamps.
    assert {"logvar_bound=clip", "mean_bound=clip", "theta_bound=clip"} <= set(singles)


def _deviation_row(pearson, status="ok", max_norm=80.0):
    stage1 = {"status": status, "clipped_share": 1.0, "median_grad_norm": 50.0,
              "max_grad_norm": max_norm, "nonfinite_steps": 0, "steps": 3}  # fmt: skip
    return {"pearson": pearson, "heldout_nll": 100.0 + pearson, "stage1": stage1}


def test_deviations_run_loops_seeds_and_summarizes(monkeypatch):
    from benchmarks import deviations_cfmvc as dev

    calls = []

    def fake_one(config, train, held, *, seed, **_):
        calls.append((config.input_transform, seed, len(train)))
        return _deviation_row(0.1 * (seed + 1), max_norm=None if seed == 2 else 80.0)

    monkeypatch.setattr(dev, "run_one", fake_one)
    snapshots = []
    result = dev.run(n_cells=60, n_genes=12, seeds=(0, 1, 2), only=("default", "original"),
                     first_seed_only=("original",), progress=snapshots.append)  # fmt: skip
    # Each seed simulates its own data; "original" runs at the first seed alone.
    assert [(c[0], c[1]) for c in calls] == [("log1p", 0), ("none", 0), ("log1p", 1),
                                             ("log1p", 2)]  # fmt: skip
    assert len(snapshots) == 4 and list(result["variants"]) == ["default", "original"]
    s = result["variants"]["default"]["summary"]
    assert s["pearson"]["n"] == 3 and abs(s["pearson"]["mean"] - 0.2) < 1e-12
    assert (s["pearson"]["min"], s["pearson"]["max"]) == (0.1, 0.30000000000000004)
    assert s["max_grad_norm"]["n"] == 2 and s["statuses"] == ["ok"]
    assert sorted(result["variants"]["default"]["seeds"]) == [0, 1, 2]
    assert result["variants"]["original"]["summary"]["pearson"]["n"] == 1
    md = dev.markdown(result)
    assert "| default | 3 | 0.200 (0.100–0.300) |" in md
    assert "| original | 1 | 0.100 | 100.1 |" in md
    assert "Run at fewer seeds (for time): original (seed 0)." in md
    # Resuming from the written result trains only the missing (configuration, seed) runs.
    calls.clear()
    again = dev.run(n_cells=60, n_genes=12, seeds=(0, 1, 2), only=("default", "original"),
                    previous=json.loads(json.dumps(result)))  # fmt: skip
    assert [(c[0], c[1]) for c in calls] == [("none", 1), ("none", 2)]
    assert again["variants"]["original"]["summary"]["pearson"]["n"] == 3
    assert "fewer seeds" not in dev.markdown(again)
    with pytest.raises(ValueError, match="other sizes"):
        dev.run(n_cells=90, n_genes=12, seeds=(0,), previous=result)
    with pytest.raises(ValueError, match="unknown configurations"):
        dev.run(seeds=(0,), only=("nosuch",))


def test_the_speed_suite_writes_the_file_the_readme_quotes(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_resolve", lambda suite: (lambda: {"x": 1.0}, None))
    monkeypatch.setattr(runner, "device_name", lambda: "cpu")
    json_path, md_path = runner.run_suite("speed", out_dir=tmp_path)
    assert (json_path.name, md_path.name) == ("models-cpu.json", "models-cpu.md")
    assert runner.run_suite("parity", out_dir=tmp_path)[0].name == "parity-cpu.json"


def test_a_run_for_some_models_keeps_the_other_models_results(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "device_name", lambda: "cpu")
    old = {"environment": {"platform": "cpu", "jax": "0.1"},
           "models": {"a": {"x": 1}, "b": {"x": 2}}}  # fmt: skip
    (tmp_path / "speed-cpu.json").write_text(json.dumps(old))
    new = {"environment": {"platform": "cpu", "jax": "0.2"}, "models": {"b": {"x": 3}}}
    merged = runner.merge_models("speed", new, tmp_path)
    assert merged["models"] == {"a": {"x": 1, "environment": old["environment"]}, "b": {"x": 3}}
    assert merged["environment"] == new["environment"]
    # Same environment: nothing attached; a file without models is replaced whole.
    same = runner.merge_models("speed", {**new, "environment": old["environment"]}, tmp_path)
    assert same["models"]["a"] == {"x": 1}
    (tmp_path / "speed-cpu.json").write_text(json.dumps({"model": "a", "results": []}))
    assert runner.merge_models("speed", new, tmp_path) == new

    calls = []
    monkeypatch.setattr(runner, "_resolve", lambda suite: (lambda models=None: calls.append(
        models) or new, None))  # fmt: skip
    (tmp_path / "parity-cpu.json").write_text(json.dumps(old))
    runner.run_suite("parity", out_dir=tmp_path, models=["b"])
    assert set(json.loads((tmp_path / "parity-cpu.json").read_text())["models"]) == {"a", "b"}
    runner.run_suite("parity", out_dir=tmp_path)  # every model: the file is the new run alone
    assert set(json.loads((tmp_path / "parity-cpu.json").read_text())["models"]) == {"b"}
    assert calls == [["b"], None]


def test_specs_set_their_stability_epochs_seeds_and_speed_size():
    from benchmarks import bench_models, stability

    cfmvc, e3gnn = specs.get("cfmvc"), specs.get("e3gnn")
    assert stability.epochs(cfmvc) == stability.EPOCHS
    assert stability.default_seeds(cfmvc) == stability.SEEDS
    assert stability.epochs(e3gnn) == e3gnn.size("faults")["epochs"] != stability.EPOCHS
    assert stability.default_seeds(e3gnn) == tuple(range(e3gnn.size("faults")["seeds"]))
    assert stability.batch_order(0, 5, 2, 3, n_epochs=2).shape == (6, 2)
    assert bench_models.speed_size(cfmvc) == "full"
    assert bench_models.speed_size(e3gnn) == "speed"
    sidechain = specs.get("sidechain")
    assert stability.epochs(sidechain) == 4 and stability.default_seeds(sidechain) == (0, 1, 2)
    assert bench_models.speed_size(sidechain) == "speed"


def test_per_atom_study_summary_takes_medians_and_ratios_to_the_baseline():
    from benchmarks import sidechain_per_atom as pa

    def run(scale, status="ok"):
        row = {k: scale * (i + 1) for i, k in enumerate(pa.ATOMS)}
        row.update(mean_atom_mse=scale, seq_recovery=0.1, loss=1.0, final_train_loss=2.0,
                   status=status)  # fmt: skip
        return row

    runs = {"baseline/seed=0": run(1.0), "baseline/seed=1": run(3.0), "baseline/seed=2": run(2.0),
            "exp/seed=0": run(4.0, "nonfinite")}  # fmt: skip
    out = pa.summarize(runs, ["baseline", "exp", "linear"])
    assert set(out) == {"baseline", "exp"} and out["baseline"]["runs"] == 3
    assert out["baseline"]["atom04_mse"] == 2.0 and out["baseline"]["atom13_mse"] == 20.0
    assert out["exp"]["distal_vs_baseline"] == 2.0 and out["exp"]["nonfinite_runs"] == 1
    assert out["baseline"]["near_mse"] == 4.0  # mean of 2, 4, 6
    assert set(pa.variants("deviations")) >= {"baseline", "original", "backbone_graph"}
