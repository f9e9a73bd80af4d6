"""``python -m benchmarks.run --suite gpu``: its dry run at tiny sizes exercises every suite's
settings, so the run on a GPU cannot fail on a typo."""

from __future__ import annotations

import json

import pytest

from benchmarks import run as runner
from benchmarks import specs


def test_dry_run_runs_every_device_suite_with_its_settings(tmp_path, capsys):
    assert runner.main(["--suite", "gpu", "--dry-run", "--out", str(tmp_path)]) == 0
    dev = runner.device_name()
    summary = json.loads((tmp_path / f"gpu_suite-{dev}.json").read_text())
    assert list(summary["suites"]) == list(runner.GPU_SUITES)
    assert summary["dry_run"] is True and summary["seconds"] > 0
    for suite, name in [("numerics", "numerics"), ("overhead", "overhead"),
                        ("speed", "models"), ("stability", "stability")]:  # fmt: skip
        assert summary["suites"][suite]["files"] == [f"{name}-{dev}.json", f"{name}-{dev}.md"]
        assert (tmp_path / f"{name}-{dev}.md").read_text().strip()
    first = specs.names()[0]
    overhead = json.loads((tmp_path / f"overhead-{dev}.json").read_text())
    assert "mlp-tiny" in json.dumps(overhead)
    speed = json.loads((tmp_path / f"models-{dev}.json").read_text())
    assert list(speed["models"]) == [first]
    rows = speed["models"][first]["results"]
    assert [r["variant"] for r in rows] == list(runner.DRY_RUN_SETTINGS["speed"]["variants"])
    assert all("error" not in r for r in rows), rows
    assert speed["models"][first]["size"] == "small"
    stab = json.loads((tmp_path / f"stability-{dev}.json").read_text())
    table = stab["models"][first]
    assert table["setup"]["seeds"] == 1
    assert list(table["variants"]) == list(runner.DRY_RUN_SETTINGS["stability"]["variants"])
    assert "gpu:" in capsys.readouterr().out
    # Nothing of the dry run lands in the committed results.
    assert not (runner.RESULTS / "gpu_suite-cpu.json").exists()


def test_gpu_settings_name_only_parameters_the_suites_take():
    import inspect

    for table in (runner.GPU_SETTINGS, runner.DRY_RUN_SETTINGS):
        assert set(table) == set(runner.GPU_SUITES)
        for suite, settings in table.items():
            fn, _ = runner._resolve(suite)
            assert set(settings) <= set(inspect.signature(fn).parameters), suite


def test_a_setting_the_suite_does_not_take_fails_before_it_runs(tmp_path, monkeypatch):
    from benchmarks import bench_overhead

    monkeypatch.setattr(bench_overhead, "run", lambda **_: pytest.fail("suite ran"))
    with pytest.raises(TypeError, match="takes no setting 'config'"):
        runner.run_suite("overhead", tmp_path, settings={"config": {}})


def test_gpu_suite_refuses_the_cpu_without_dry_run(capsys, monkeypatch):
    monkeypatch.setattr(runner, "device_name", lambda: "cpu")
    assert runner.main(["--suite", "gpu"]) == 2
    assert "needs an accelerator" in capsys.readouterr().err
    assert runner.main(["--suite", "gpu", "--suite", "numerics", "--dry-run"]) == 2
    assert runner.main(["--suite", "numerics", "--dry-run"]) == 2
