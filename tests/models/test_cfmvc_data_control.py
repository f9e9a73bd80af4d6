"""CFM-VC loader: the control label, named or recognised, never guessed."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from jaxstab.models.cfmvc.data import CONTROL_LABELS, load_anndata, simulate


@pytest.fixture(scope="module")
def adata():
    # Labels control, pert_0, pert_1, pert_2: codes 0 (control) to 3.
    return simulate(48, 8, n_perturbations=3, n_batches=1, n_cell_types=1, seed=2)


def relabel(adata, labels):
    b = adata.copy()
    b.obs["perturbation"] = labels
    return b


def codes(adata) -> np.ndarray:
    return adata.obs["perturbation"].cat.codes.to_numpy().astype(np.int64)


def int_forms(adata) -> dict[str, object]:
    """The same labels (0 = control) stored as obs commonly holds them."""
    c = codes(adata)
    return {
        "int": c,
        "int category": pd.Categorical(c),
        "str": c.astype(str).astype(object),
        "str category": pd.Categorical(c.astype(str)),
        "float": c.astype(np.float64),
    }


def assert_control_rows_zero(data, is_control: np.ndarray, n_columns: int):
    p = data.arrays["p"]
    assert p.shape[1] == n_columns
    np.testing.assert_array_equal(p[is_control], 0)
    np.testing.assert_array_equal(p[~is_control].sum(1), 1)


@pytest.mark.parametrize("form", ["int", "int category", "str", "str category", "float"])
@pytest.mark.parametrize("control", [0, "0"])
def test_integer_control_label(adata, form, control):
    b = relabel(adata, int_forms(adata)[form])
    data = load_anndata(b, control=control)
    assert data.meta["control"] == ("0.0" if form == "float" else "0")
    assert data.meta["warnings"] == []
    assert len(data.meta["perturbations"]) == 3
    assert_control_rows_zero(data, codes(adata) == 0, 3)
    # The other labels keep their own one-hot column, in numeric order.
    col = data.arrays["p"][codes(adata) != 0].argmax(1)
    np.testing.assert_array_equal(col, codes(adata)[codes(adata) != 0] - 1)


@pytest.mark.parametrize("form", ["int", "int category", "str", "str category"])
def test_no_control_found_is_said_not_guessed(adata, form):
    data = load_anndata(relabel(adata, int_forms(adata)[form]))
    assert data.meta["control"] is None
    assert data.arrays["p"].shape[1] == 4 and np.all(data.arrays["p"].sum(1) == 1)
    (warning,) = data.meta["warnings"]
    assert warning == (
        "no control label found in obs['perturbation'] (labels: 0, 1, 2, 3); every cell is "
        "treated as perturbed; pass control=LABEL (CLI: --control LABEL)"
    )


def test_many_labels_are_listed_in_numeric_order(adata):
    labels = np.arange(adata.n_obs) % 12
    data = load_anndata(relabel(adata, labels))
    assert data.meta["perturbations"] == [str(k) for k in range(12)]
    assert "(labels: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (12 in all))" in data.meta["warnings"][0]
    data = load_anndata(relabel(adata, labels), control=11)
    assert data.meta["perturbations"] == [str(k) for k in range(11)]
    assert_control_rows_zero(data, labels == 11, 11)


@pytest.mark.parametrize(
    "name",
    [
        "Control",
        "CTRL",
        "ctl",
        "non-targeting",
        "Non_Targeting",
        "NonTargeting",
        "non targeting",
        "NT",
        "ntc",
        "negative control",
        "Negative_Control",
        "NegCtrl",
        "scramble",
        "Scrambled",
        "unperturbed",
        "vehicle",
        "DMSO",
    ],
)
def test_usual_control_names_are_recognised(adata, name):
    b = adata.copy()
    b.obs["perturbation"] = b.obs["perturbation"].cat.rename_categories({"control": name})
    data = load_anndata(b)
    assert data.meta["control"] == name and data.meta["warnings"] == []
    assert_control_rows_zero(data, codes(adata) == 0, 3)


@pytest.mark.parametrize("name", ["controlled", "ctrl_KO", "NT5E", "scrambler", "treated"])
def test_similar_names_are_not_taken_for_the_control(adata, name):
    b = adata.copy()
    b.obs["perturbation"] = b.obs["perturbation"].cat.rename_categories({"control": name})
    data = load_anndata(b)
    assert data.meta["control"] is None and data.arrays["p"].shape[1] == 4
    assert data.meta["warnings"] and name in data.meta["warnings"][0]


def test_documented_names_are_all_recognised(adata):
    for name in CONTROL_LABELS:
        b = adata.copy()
        b.obs["perturbation"] = b.obs["perturbation"].cat.rename_categories({"control": name})
        assert load_anndata(b).meta["control"] == name


def test_several_control_names_need_a_choice(adata):
    b = adata.copy()
    b.obs["perturbation"] = b.obs["perturbation"].cat.rename_categories(
        {"control": "ctrl", "pert_0": "non-targeting"}
    )
    with pytest.raises(ValueError, match=re.escape("several control labels (ctrl, non-targeting)")):
        load_anndata(b)
    data = load_anndata(b, control="non-targeting")
    assert data.meta["control"] == "non-targeting"
    assert "ctrl" in data.meta["perturbations"]


def test_named_control_must_exist(adata):
    b = relabel(adata, int_forms(adata)["int"])
    with pytest.raises(ValueError, match=re.escape("control label 7 (labels: 0, 1, 2, 3)")):
        load_anndata(b, control=7)
    with pytest.raises(ValueError, match=re.escape("control label 'ctrl' (labels: 0, 1, 2, 3)")):
        load_anndata(b, control="ctrl")


@pytest.mark.parametrize("control", [True, [0], 1.5j])
def test_control_of_the_wrong_type(adata, control):
    with pytest.raises(TypeError, match="control must be a label"):
        load_anndata(adata, control=control)


def test_control_none_gives_every_label_a_column_without_warning(adata):
    data = load_anndata(relabel(adata, int_forms(adata)["int"]), control=None)
    assert data.meta["control"] is None and data.meta["warnings"] == []
    assert data.arrays["p"].shape[1] == 4
