"""The benchmark runner and the parity suite (at a small size; the full size is the benchmark)."""

from __future__ import annotations

import json

import pytest

from benchmarks import parity
from benchmarks import run as runner


@pytest.fixture(scope="module")
def small_parity() -> dict:
    return parity._cfmvc(n_cells=12, n_genes=40, seed=1)


def test_parity_errors_are_measured_and_small(small_parity):
    errors = small_parity["max_relative_error"]
    assert set(errors) >= {"nb_log_likelihood", "vae_gradients", "flow_velocity", "flow_gradients"}
    assert all(err < 1e-4 for err in errors.values()), errors
    assert all(small_parity["within_tolerance"].values())
    assert any(err > 0 for err in errors.values())  # two float32 implementations, not one


def test_parity_markdown_flags_a_failure(small_parity):
    bad = {**small_parity, "within_tolerance": {**small_parity["within_tolerance"], "alpha": False}}
    md = parity.parity_markdown({"torch": "x", "cfmvc": bad})
    assert "| alpha |" in md and "| NO |" in md
    assert md.count("| yes |") == len(bad["within_tolerance"]) - 1


def test_run_suite_writes_json_and_markdown(tmp_path, monkeypatch, small_parity):
    monkeypatch.setattr(parity, "run", lambda: {"torch": "x", "cfmvc": small_parity})
    json_path, md_path = runner.run_suite("parity", out_dir=tmp_path)
    assert json_path.name == f"parity-{runner.device_name()}.json"
    assert json.loads(json_path.read_text())["cfmvc"]["within_tolerance"]["flow_gradients"]
    assert "| flow_gradients |" in md_path.read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--suite", "nope"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module", ["run", "parity", "bench_numerics", "stability", "deviations_cfmvc"]
)
def test_docstring_examples(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"benchmarks.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_deviation_variants_change_one_field_each():
    from benchmarks.deviations_cfmvc import FUNCTION_FIELDS, variants
    from jaxstab.models.cfmvc import CFMVCConfig

    default, original = CFMVCConfig.default(), CFMVCConfig.original()
    found = dict(variants(control_column=2))
    assert found["default"] == default
    differing = [f for f in FUNCTION_FIELDS if getattr(default, f) != getattr(original, f)]
    assert all(getattr(found["original"], f) == getattr(original, f) for f in FUNCTION_FIELDS)
    assert found["original"].control_column == 2
    singles = [n for n in found if n not in ("default", "original")]
    assert len(singles) == len(differing)
    for name in singles:
        cfg = found[name]
        changed = [f for f in FUNCTION_FIELDS if getattr(cfg, f) != getattr(default, f)]
        assert changed == [name.split("=")[0]], name
