"""CFM-VC loader: an unreadable ``.h5ad`` gives one error that names the file."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from jaxstab.models.cfmvc.data import load_anndata, simulate


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("h5ad") / "cells.h5ad"
    simulate(30, 6, n_perturbations=2, seed=0).write_h5ad(path)
    return path


def make_empty(path: Path, good: Path) -> None:
    path.write_bytes(b"")


def make_text(path: Path, good: Path) -> None:
    path.write_text("cell,gene,count\n0,0,3\n")


def make_plain_hdf5(path: Path, good: Path) -> None:
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)


def make_truncated(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_overwritten(path: Path, good: Path) -> None:
    data = bytearray(good.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(4096)  # size unchanged, contents zeroed
    path.write_bytes(bytes(data))


def make_directory(path: Path, good: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (make_empty, "is empty (0 bytes)"),
        (make_text, "is not an HDF5 file"),
        (make_plain_hdf5, "is not a readable .h5ad file"),
        (make_truncated, "is not a readable .h5ad file"),
        (make_overwritten, "is not a readable .h5ad file"),
        (make_directory, "is a directory"),
    ],
)
@pytest.mark.parametrize("as_str", [True, False])
@pytest.mark.filterwarnings("ignore:Element '/x' was written without encoding metadata")
def test_unreadable_file_names_the_file(tmp_path, good_file, make, reason, as_str):
    path = tmp_path / "broken data.h5ad"
    make(path, good_file)
    with pytest.raises(ValueError) as err:
        load_anndata(str(path) if as_str else path)
    msg = str(err.value)
    assert str(path) in msg and reason in msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "cells.h5ad"
    with pytest.raises(FileNotFoundError, match=re.escape(f"file {str(path)!r} does not exist")):
        load_anndata(path)


def test_path_object_loads(good_file):
    data = load_anndata(good_file)
    assert data.arrays["x"].shape == (30, 6) and data.meta["control"] == "control"


def test_missing_obs_key_in_a_file_names_the_key(tmp_path):
    a = simulate(30, 6, n_perturbations=2, seed=0)
    del a.obs["perturbation"]
    path = tmp_path / "no_pert.h5ad"
    a.write_h5ad(path)
    with pytest.raises(ValueError, match=re.escape("obs['perturbation'] is missing")):
        load_anndata(path)
