"""CFM-VC loader: counts are checked as the model sees them (float32, duplicates summed)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxstab.models.cfmvc import data as data_mod
from jaxstab.models.cfmvc.data import load_anndata, simulate

FORMATS = ["dense", "csr", "csc"]


@pytest.fixture(scope="module")
def adata():
    return simulate(40, 12, n_perturbations=2, n_batches=2, n_cell_types=2, seed=0)


def as_format(x: np.ndarray, fmt: str):
    return {"dense": np.asarray, "csr": sp.csr_matrix, "csc": sp.csc_matrix}[fmt](x)


def with_counts(adata, counts, key: str | None = "counts"):
    b = adata.copy()
    if key is None:
        b.X = counts
        del b.layers["counts"]
    else:
        b.layers[key] = counts
    return b


def compressed(rows, cols, values, shape, fmt: str):
    """A CSR or CSC matrix holding exactly these entries, duplicates kept (not summed)."""
    major, minor, n = (rows, cols, shape[0]) if fmt == "csr" else (cols, rows, shape[1])
    order = np.argsort(major, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(major, minlength=n))])
    cls = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
    m = cls((np.asarray(values)[order], np.asarray(minor)[order], indptr), shape=shape)
    assert m.nnz == len(values)
    return m


def split_duplicates(x: np.ndarray, fmt: str):
    """``x`` as a sparse matrix whose every stored value is split into two duplicate entries."""
    rows, cols = np.nonzero(x)
    v = x[rows, cols]
    half = np.floor(v / 2)
    both = np.concatenate([half, v - half])
    m = compressed(np.tile(rows, 2), np.tile(cols, 2), both, x.shape, fmt)
    assert not m.has_canonical_format
    return m


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", ["counts", None])
def test_value_past_float32_range_is_refused(adata, fmt, key):
    x = np.array(adata.layers["counts"], np.float64)
    x[[17, 30], 5] = 1e39  # finite in float64, inf once cast to float32
    field = "X" if key is None else "layers['counts']"
    msg = re.escape(f"{field} has a value too large for float32 at cell 17 ('cell_17'), gene 5")
    with pytest.raises(ValueError, match=msg):
        load_anndata(with_counts(adata, as_format(x, fmt), key), counts_key=key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_total_count_past_float32_range_is_refused(adata, fmt):
    x = np.array(adata.layers["counts"], np.float64)
    x[23] = 3e37  # every value fits float32, the cell's total (3.6e38) does not
    msg = re.escape("layers['counts'] has a total count too large for float32 (3.6e+38)")
    with pytest.raises(ValueError, match=msg + r".*cell 23 \('cell_23'\)"):
        load_anndata(with_counts(adata, as_format(x, fmt)))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize(
    ("parts", "dtype", "total"),
    [
        ((0.5, 0.5), np.float64, 1.0),  # each entry a fraction, the cell an integer
        ((-1.0, 4.0), np.float64, 3.0),  # one entry negative, the cell positive
        ((100, 100), np.int8, 200.0),  # would wrap around in int8
        ((2.0, 3.0, 4.0), np.float32, 9.0),
    ],
)
def test_duplicates_are_summed_before_the_check(adata, fmt, parts, dtype, total):
    x = np.array(adata.layers["counts"]).clip(0, 100).astype(dtype)
    x[3, 2] = 0
    rows, cols = np.nonzero(x)
    k = len(parts)
    m = compressed(
        np.concatenate([rows, [3] * k]),
        np.concatenate([cols, [2] * k]),
        np.concatenate([x[rows, cols], np.array(parts, dtype)]),
        x.shape,
        fmt,
    )
    assert not m.has_canonical_format
    got = load_anndata(with_counts(adata, m)).arrays["x"]
    expected = x.astype(np.float32)
    expected[3, 2] = total
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_duplicates_summing_past_float32_are_refused(adata, fmt):
    x = np.array(adata.layers["counts"], np.float64)
    x[7, 4] = 6e38  # stored as 3e38 + 3e38: each part fits float32, their sum does not
    m = split_duplicates(x, fmt)
    assert np.all(np.abs(m.data) < np.finfo(np.float32).max)
    with pytest.raises(ValueError, match=re.escape("too large for float32 at cell 7 ('cell_7')")):
        load_anndata(with_counts(adata, m))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_callers_matrix_is_not_modified(adata, fmt):
    m = split_duplicates(np.array(adata.layers["counts"], np.float64), fmt)
    before = (m.data.copy(), m.indices.copy(), m.indptr.copy())
    b = with_counts(adata, m)
    x = load_anndata(b).arrays["x"]
    np.testing.assert_array_equal(x, adata.layers["counts"])
    stored = b.layers["counts"]
    for arr, old in zip((stored.data, stored.indices, stored.indptr), before, strict=True):
        np.testing.assert_array_equal(arr, old)


def test_h5ad_with_duplicate_entries(adata, tmp_path):
    x = np.array(adata.layers["counts"], np.float64)
    x[9, 1] = 3.0  # stored as 1 + 2
    m = split_duplicates(x, "csr")
    path = tmp_path / "dup.h5ad"
    with_counts(adata, m).write_h5ad(path)
    np.testing.assert_array_equal(load_anndata(str(path)).arrays["x"], x.astype(np.float32))
    x[9, 1] = 6e38
    with_counts(adata, split_duplicates(x, "csr")).write_h5ad(path)
    with pytest.raises(ValueError, match=re.escape("too large for float32 at cell 9 ('cell_9')")):
        load_anndata(path)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.float16, np.float32])
def test_integer_and_narrow_dtypes_load(adata, dtype):
    x = np.asarray(adata.layers["counts"]).clip(0, 60).astype(dtype)
    got = load_anndata(with_counts(adata, x)).arrays["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32))


BAD = st.sampled_from([-3.0, 2.5, np.nan, 1e39, -1e39])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    data=st.data(),
    cells=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 11)), min_size=1, max_size=4),
    chunk=st.integers(1, 60),
)
def test_dense_csr_csc_take_one_path(adata, data, cells, chunk):
    """The same bad values give the same error, naming the first bad cell, in every format."""
    x = np.array(adata.layers["counts"], np.float64)
    for i, j in cells:
        x[i, j] = data.draw(BAD)
    first = min(cells)
    messages = set()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_mod, "_CHUNK", chunk)  # dense input is checked in blocks of rows
        for fmt in FORMATS:
            m = as_format(x, fmt) if fmt == "dense" else split_duplicates(x, fmt)
            with pytest.raises(ValueError) as err:
                load_anndata(with_counts(adata, m))
            messages.add(str(err.value))
    assert len(messages) == 1, messages
    (msg,) = messages
    assert f"at cell {first[0]} ('cell_{first[0]}'), gene {first[1]} " in msg
