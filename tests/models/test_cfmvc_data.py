"""CFM-VC data: the simulator's ground truth and the loader's validation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxstab.models.cfmvc.data import load_anndata, simulate


@pytest.fixture(scope="module")
def adata():
    return simulate(120, 30, n_perturbations=3, n_batches=2, n_cell_types=2, seed=0)


def test_simulate_layout(adata):
    counts = adata.layers["counts"]
    assert counts.shape == (120, 30)
    assert np.all(counts >= 0) and np.all(counts == np.round(counts))
    assert list(adata.obs["perturbation"].cat.categories) == [
        "control",
        *[f"pert_{k}" for k in range(3)],
    ]
    assert adata.varm["true_lfc"].shape == (30, 3)
    assert adata.uns["control"] == "control"
    # Each perturbation touches a 10 % subset of genes.
    assert np.all(np.count_nonzero(adata.varm["true_lfc"], axis=0) == 3)
    assert "spatial" not in adata.obsm
    s = simulate(50, 10, spatial=True, seed=1)
    assert s.obsm["spatial"].shape == (50, 2) and np.all(np.isfinite(s.obsm["spatial"]))


def test_simulated_fold_changes_are_the_true_ones():
    a = simulate(6000, 200, n_perturbations=2, seed=4, frac_affected=0.2)
    x = a.layers["counts"]
    pert = a.obs["perturbation"].to_numpy()
    ctrl = x[pert == "control"].mean(0)
    for k, name in enumerate(a.uns["true_lfc_perturbations"]):
        emp = np.log(x[pert == name].mean(0) + 1e-3) - np.log(ctrl + 1e-3)
        truth = a.varm["true_lfc"][:, k]
        assert np.corrcoef(emp, truth)[0, 1] > 0.95
        hit = truth != 0
        np.testing.assert_allclose(emp[hit], truth[hit], atol=0.35)


def test_load_arrays_and_vocabularies(adata):
    data = load_anndata(adata)
    a = data.arrays
    assert a["x"].dtype == np.float32 and a["p"].shape == (120, 3)
    assert a["batch"].dtype == np.int32 and a["cell_type"].dtype == np.int32
    assert data.meta["perturbations"] == ["pert_0", "pert_1", "pert_2"]
    assert data.meta["control"] == "control" and data.meta["warnings"] == []
    labels = adata.obs["perturbation"].to_numpy()
    # control → zero row, pert_k → one-hot column k
    assert np.all(a["p"][labels == "control"] == 0)
    for k in range(3):
        rows = a["p"][labels == f"pert_{k}"]
        assert np.all(rows[:, k] == 1) and np.all(rows.sum(1) == 1)
    np.testing.assert_array_equal(a["x"], adata.layers["counts"])
    assert data.meta["true_lfc"].shape == (30, 3)
    assert [data.meta["batches"][i] for i in a["batch"][:5]] == list(adata.obs["batch"][:5])


def test_control_label_variants(adata):
    b = adata.copy()
    b.obs["perturbation"] = b.obs["perturbation"].cat.rename_categories({"control": "CTRL"})
    data = load_anndata(b)
    assert data.meta["control"] == "CTRL"
    assert data.arrays["p"].shape[1] == 3
    data = load_anndata(b, control=None)  # every label its own column
    assert data.arrays["p"].shape[1] == 4 and data.meta["control"] is None
    with pytest.raises(ValueError, match="control label 'ctl'"):
        load_anndata(b, control="ctl")


def test_sparse_and_h5ad(adata, tmp_path):
    b = adata.copy()
    b.layers["counts"] = sp.csr_matrix(b.layers["counts"])
    np.testing.assert_array_equal(load_anndata(b).arrays["x"], adata.layers["counts"])
    path = tmp_path / "cells.h5ad"
    b.write_h5ad(path)
    np.testing.assert_array_equal(load_anndata(str(path)).arrays["x"], adata.layers["counts"])


BAD_VALUES = [
    (-1.0, "negative"),
    (2.5, "non-integer"),
    (np.nan, "non-finite"),
    (np.inf, "non-finite"),
]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(("value", "what"), BAD_VALUES)
def test_bad_counts_name_field_and_first_cell(adata, value, what, sparse):
    b = adata.copy()
    x = b.layers["counts"].copy()
    x[[41, 77], 5] = value  # the first bad cell is 41
    b.layers["counts"] = sp.csr_matrix(x) if sparse else x
    msg = re.escape("layers['counts']") + f".*{what}.*cell 41 \\('cell_41'\\), gene 5"
    with pytest.raises(ValueError, match=msg):
        load_anndata(b)


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, 119), min_size=1, max_size=4), col=st.integers(0, 29))
def test_first_bad_cell_is_reported(adata, rows, col):
    x = np.array(adata.layers["counts"])
    x[rows, col] = -3.0
    b = adata.copy()
    b.layers["counts"] = sp.csr_matrix(x) if len(rows) % 2 else x
    with pytest.raises(ValueError, match=f"cell {min(rows)} \\('cell_{min(rows)}'\\)"):
        load_anndata(b)


def test_missing_keys(adata):
    b = adata.copy()
    del b.layers["counts"]
    with pytest.raises(ValueError, match=re.escape("layers['counts'] is missing")):
        load_anndata(b)
    for key in ("perturbation", "batch", "cell_type"):
        b = adata.copy()
        del b.obs[key]
        with pytest.raises(ValueError, match=re.escape(f"obs['{key}'] is missing")):
            load_anndata(b)


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_empty_labels(adata, empty):
    b = adata.copy()
    col = b.obs["cell_type"].astype(object).to_numpy()
    col[[13, 60]] = empty
    b.obs["cell_type"] = col
    with pytest.raises(
        ValueError, match=re.escape("obs['cell_type'] has an empty label at cell 13")
    ):
        load_anndata(b)


def test_bad_spatial(adata):
    b = adata.copy()
    s = np.zeros((120, 2), np.float32)
    s[9, 1] = np.nan
    b.obsm["spatial"] = s
    with pytest.raises(
        ValueError, match=re.escape("obsm['spatial'] has a non-finite value at cell 9")
    ):
        load_anndata(b)
    b.obsm["spatial"] = np.zeros((120, 0), np.float32)
    with pytest.raises(ValueError, match=re.escape("obsm['spatial'] has shape (120, 0)")):
        load_anndata(b)


def test_shape_mismatch_and_types(adata):
    from jaxstab.models.cfmvc.data import _check_counts

    # AnnData itself refuses a mis-shaped layer; the loader's own check guards other callers.
    with pytest.raises(ValueError, match=re.escape("layers['counts'] has shape (119, 30)")):
        _check_counts(adata, np.zeros((119, 30)), "layers['counts']")
    with pytest.raises(TypeError, match="AnnData or a path"):
        load_anndata(42)  # type: ignore[arg-type]
    c = adata.copy()
    c.layers["counts"] = c.layers["counts"].astype(bool)
    with pytest.raises(TypeError, match=re.escape("layers['counts'] must hold real numbers")):
        load_anndata(c)


def test_only_control_is_rejected(adata):
    b = adata[adata.obs["perturbation"] == "control"].copy()
    with pytest.raises(ValueError, match="only the control"):
        load_anndata(b)
