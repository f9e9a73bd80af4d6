"""Report tables, thresholds, JSON and figures against direct numpy computations."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import numpy as np
import pytest

from jaxstab.report import compare, plots, report_json, tables
from jaxstab.report.thresholds import DANGER, NORMAL, WARNING, Thresholds, levels


def _history(n=30, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.uniform(0.5, 2.0, n)
    dec = rng.uniform(0.1, 1.0, n)
    return {
        "loss": np.linspace(2.0, 1.0, n),
        "mse": np.linspace(1.5, 0.5, n),
        "grad/global_norm": np.sqrt(enc**2 + dec**2),
        "grad/norm/enc": enc,
        "grad/norm/dec": dec,
        "grad/nan/enc": np.zeros(n, np.int32),
        "grad/nan/dec": np.zeros(n, np.int32),
        "grad/inf/enc": np.zeros(n, np.int32),
        "grad/inf/dec": np.zeros(n, np.int32),
        "clip/clipped": rng.uniform(size=n) > 0.5,
        "skip/skipped": np.zeros(n, bool),
        "input/x_col0_min": rng.normal(-2, 0.1, n),
        "input/x_col0_max": rng.normal(2, 0.1, n),
        "input/pos_std": rng.normal(1, 0.05, n),
    }


def test_gradient_table_columns_and_values():
    h = _history()
    h["grad/norm/dec"][4] = np.nan
    h["grad/nan/dec"][4] = 3
    h["grad/inf/enc"][9] = 2
    t = tables.gradient_table(h, steps_per_epoch=7, lr=np.full(30, 0.01))
    assert list(t) == [
        "step",
        "epoch",
        "loss",
        "lr",
        "total_grad_norm",
        "max_grad_norm",
        "num_nan_grads",
        "num_inf_grads",
        "clipped",
        "skipped",
        "grad_norm:dec",
        "grad_norm:enc",
    ]
    np.testing.assert_array_equal(t["epoch"], np.arange(30) // 7)
    expected_max = np.nanmax(np.stack([h["grad/norm/enc"], h["grad/norm/dec"]]), axis=0)
    np.testing.assert_array_equal(t["max_grad_norm"], expected_max)
    assert t["num_nan_grads"][4] == 3 and t["num_inf_grads"][9] == 2
    assert t["num_nan_grads"].sum() == 3
    np.testing.assert_array_equal(t["clipped"], h["clip/clipped"].astype(int))


def test_levels_follow_the_seed_thresholds():
    total = np.array([0.05, 4.9, 5.1, 9.9, 10.1, 1.0, 1.0, np.nan, 1.0])
    group = np.array([0.01, 1.0, 1.0, 1.0, 1.0, 3.5, 10.5, 1.0, 1.0])
    nonfin = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1])
    got = levels(Thresholds(), total=total, max_group=group, nonfinite=nonfin)
    want = [NORMAL, NORMAL, WARNING, WARNING, DANGER, WARNING, DANGER, DANGER, DANGER]
    assert got.tolist() == want
    custom = levels(
        Thresholds(total_warning=1e3, total_danger=1e4, group_warning=1e3, group_danger=1e4),
        total=np.array([500.0, 5e3, 2e4]),
        max_group=np.zeros(3),
        nonfinite=np.zeros(3),
    )
    assert custom.tolist() == [NORMAL, WARNING, DANGER]


def test_suspicious_features_flag_planted_anomalies_only():
    rng = np.random.default_rng(1)
    clean = {f"f{i}": rng.normal(i, 1.0 + i, 200) for i in range(5)}
    clean["few_values"] = rng.choice([0.0, 0.69], size=200, p=[0.8, 0.2])
    assert not any(tables.suspicious_features(clean))
    dirty = {k: v.copy() for k, v in clean.items()}
    dirty["f2"][50] = 1e4
    dirty["f3"][120] = np.nan
    flags = tables.suspicious_features(dirty)
    assert [i for i, f in enumerate(flags) if f] == [50, 120]
    assert flags[50] == "f2" and flags[120] == "f3"


def test_feature_table_and_csv_round_trip(tmp_path):
    h = _history()
    h["input/x_col0_max"][17] = 1e6
    t = tables.feature_table(h, steps_per_epoch=10)
    assert list(t) == [
        "step",
        "epoch",
        "x_col0_min",
        "x_col0_max",
        "pos_std",
        "suspicious_features",
    ]
    path = tmp_path / "f.csv"
    tables.write_csv(path, t)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30
    assert rows[17]["suspicious_features"] == "x_col0_max"
    assert sum(bool(r["suspicious_features"]) for r in rows) == 1
    np.testing.assert_allclose([float(r["pos_std"]) for r in rows], h["input/pos_std"])


def _exploding_table():
    h = _history()
    h["grad/norm/enc"][20:] = [50, 400, 3000, 2e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10]
    h["grad/norm/dec"][25] = 20.0
    h["grad/global_norm"] = np.sqrt(h["grad/norm/enc"] ** 2 + h["grad/norm/dec"] ** 2)
    return tables.gradient_table(h, steps_per_epoch=10, lr=np.full(30, 1e-3)), h


def test_report_fields_and_ranking(tmp_path):
    t, h = _exploding_table()
    th = Thresholds()
    before = {"enc/kernel": np.ones((4, 4)), "enc/bias": np.zeros(4), "dec/kernel": np.ones(3)}
    after = {
        "enc/kernel": np.ones((4, 4)) * 3,
        "enc/bias": np.full(4, 1e-4),
        "dec/kernel": np.ones(3) * 1.1,
    }
    rows = report_json.weight_changes(before, after)
    aux = {"loss": h["loss"], "mse": h["mse"]}
    r = report_json.build_report(
        t, status="explosion", thresholds=th, config={"lr": 1e-3}, weight_change_rows=rows, aux=aux
    )
    lv = levels(
        th,
        total=t["total_grad_norm"],
        max_group=t["max_grad_norm"],
        nonfinite=t["num_nan_grads"] + t["num_inf_grads"],
    )
    assert r["first_anomaly_step"] == int(np.argmax(lv == DANGER)) == 20
    assert [g["group"] for g in r["offending_groups"]] == ["enc", "dec"]
    assert r["offending_groups"][0]["first_danger_step"] == 20
    assert r["offending_groups"][1]["danger_steps"] == 1
    # kernel: |2·1|·4/4 = 2.0; bias: 2e-4 / (1e-3·2) = 0.1; dec: 0.1·√3/√3 = 0.1
    assert r["weight_changes"][0]["param"] == "enc/kernel"
    assert math.isclose(r["weight_changes"][0]["relative_change"], 2.0)
    assert math.isclose(
        next(w for w in r["weight_changes"] if w["param"] == "enc/bias")["relative_change"],
        1e-4 * 2 / (1e-3 * 2),
    )
    assert set(r["loss_terms"]) == {"loss", "mse"}
    assert math.isclose(r["loss_terms"]["mse"]["mean"], float(np.mean(h["mse"])))
    assert r["summary"]["max_total_grad_norm_step"] == 29
    assert r["thresholds"] == th.as_dict()
    path = tmp_path / "r.json"
    report_json.write_report(path, r)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))


def test_nonfinite_values_are_strict_json(tmp_path):
    t, _ = _exploding_table()
    t["loss"][-1] = np.nan
    t["total_grad_norm"][-1] = np.inf
    r = report_json.build_report(t, status="nonfinite", thresholds=Thresholds(), config={})
    assert r["summary"]["final_loss"] == "NaN"
    assert r["summary"]["nonfinite_loss_steps"] == 1
    assert r["summary"]["max_total_grad_norm"] == "Infinity"
    path = tmp_path / "r.json"
    report_json.write_report(path, r)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))


def _nonblank(path):
    img = matplotlib.image.imread(path)
    return img.ndim == 3 and float(img[..., :3].var()) > 0


def test_figures_render_with_nonfinite_values(tmp_path):
    t, h = _exploding_table()
    t["loss"][-1] = np.nan
    t["grad_norm:dec"][-1] = np.inf
    t["clipped"][:] = 1
    plots.plot_diagnostics(t, Thresholds(), tmp_path / "d.png")
    plots.plot_heatmap(t, tmp_path / "h.png")
    feats = tables.feature_table(h, steps_per_epoch=10)
    plots.plot_features(feats, tmp_path / "f.png")
    plots.plot_features(
        {"step": np.arange(3), "epoch": np.zeros(3), "suspicious_features": ["", "", ""]},
        tmp_path / "empty.png",
    )
    for name in ("d.png", "h.png", "f.png", "empty.png"):
        assert _nonblank(tmp_path / name), name
    # The heatmap marks the non-finite cell: magenta pixels exist only when one is present.
    img = matplotlib.image.imread(tmp_path / "h.png")[..., :3]
    magenta = (img[..., 0] > 0.9) & (img[..., 1] < 0.1) & (img[..., 2] > 0.9)
    assert magenta.any()
    t["grad_norm:dec"][-1] = 1.0
    plots.plot_heatmap(t, tmp_path / "h2.png")
    img = matplotlib.image.imread(tmp_path / "h2.png")[..., :3]
    assert not ((img[..., 0] > 0.9) & (img[..., 1] < 0.1) & (img[..., 2] > 0.9)).any()


def test_compare_reads_runs_and_plots(tmp_path):
    for name, status in (("a", "ok"), ("b", "explosion")):
        d = tmp_path / name
        d.mkdir()
        t, _ = _exploding_table()
        tables.write_csv(d / "gradient_stats.csv", t)
        r = report_json.build_report(t, status=status, thresholds=Thresholds(), config={})
        report_json.write_report(d / "diagnosis_report.json", r)
    runs = compare.compare([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "c.png")
    assert [r.name for r in runs] == ["a", "b"]
    np.testing.assert_allclose(runs[0].columns["total_grad_norm"], t["total_grad_norm"])
    assert _nonblank(tmp_path / "c.png")
    table = compare.comparison_table(runs)
    assert [c.header for c in table.columns] == ["", "a", "b"]
