"""Checks shared by the single-cell loaders (CFM-VC, GenoFlow): reading, counts, cell names.

Each loader turns an ``anndata.AnnData`` (or an ``.h5ad`` path) into a
:class:`jaxstab.plugin.Dataset`; what they have in common lives here:

- :func:`as_anndata` / :func:`read_h5ad`: the source as an AnnData; a file that cannot be read
  is one error naming the file;
- :func:`counts_source`: where the counts are (``layers[counts_key]``, or ``X`` for
  ``counts_key=None``; a missing layer is an error, never a silent fall-back to ``X``);
- :func:`check_counts`: the counts as a dense float32 array after checking every value, dense,
  CSR and CSC alike; a bad value raises ``ValueError`` naming the field and the first bad cell
  (index and obs name) and gene;
- :func:`cell_name`, :func:`listing`, :func:`require_real`, :func:`to_train_dtype`,
  :func:`first_bad_row_dense`, :func:`is_number`: small pieces of the error messages and checks.

Example:
  >>> import anndata as ad, numpy as np
  >>> adata = ad.AnnData(np.array([[1.0, 0.0], [2.0, 0.5]], np.float32))
  >>> check_counts(adata, adata.X, "X")
  Traceback (most recent call last):
  ...
  ValueError: X has a non-integer value at cell 1 ('1'), gene 1 ('1'): value 0.5; counts must ...
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

# The dtype the models train in: counts and coordinates are checked after the cast to it.
TRAIN_DTYPE = np.float32
# Dense counts are checked this many values at a time (bounded temporary memory).
CHUNK = 1 << 22


def cell_name(adata: ad.AnnData, i: int) -> str:
    """How an error message names cell ``i``: its index and its obs name.

    >>> import anndata as ad, numpy as np
    >>> cell_name(ad.AnnData(np.zeros((3, 1), np.float32)), 2)
    "cell 2 ('2')"
    """
    return f"cell {i} ({adata.obs_names[i]!r})"


def listing(names: Sequence[str], limit: int = 10) -> str:
    """``names`` joined by commas, cut after ``limit`` with the total count.

    >>> listing(["a", "b", "c"], limit=2)
    'a, b, ... (3 in all)'
    """
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (``bool`` excluded).

    >>> is_number(3), is_number(2.5), is_number(True), is_number("3")
    (True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def read_h5ad(path: str | os.PathLike[str]) -> ad.AnnData:
    """Reads an ``.h5ad`` file; every failure is one error that names the file.

    >>> read_h5ad("/nonexistent/cells.h5ad")
    Traceback (most recent call last):
    ...
    FileNotFoundError: file '/nonexistent/cells.h5ad' does not exist
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"file {name!r} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"{name!r} is a directory, not an .h5ad file")
    if not os.access(name, os.R_OK):
        raise PermissionError(f"file {name!r} is not readable (permission denied)")
    if os.path.getsize(name) == 0:
        raise ValueError(f"file {name!r} is empty (0 bytes); expected an .h5ad file")
    if not h5py.is_hdf5(name):
        raise ValueError(f"file {name!r} is not an HDF5 file; expected an .h5ad file")
    try:
        return ad.read_h5ad(name)
    except MemoryError:
        raise
    except Exception as e:  # h5py and anndata raise OSError, KeyError, TypeError, ...
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ValueError(f"file {name!r} is not a readable .h5ad file ({reason})") from e


def as_anndata(source: str | os.PathLike[str] | ad.AnnData) -> ad.AnnData:
    """``source`` itself when it is an AnnData, else the ``.h5ad`` file it names.

    >>> as_anndata(42)
    Traceback (most recent call last):
    ...
    TypeError: source must be an AnnData or a path, got int
    """
    if isinstance(source, str | os.PathLike):
        return read_h5ad(source)
    if isinstance(source, ad.AnnData):
        return source
    raise TypeError(f"source must be an AnnData or a path, got {type(source).__name__}")


def first_bad_row_dense(bad: np.ndarray) -> tuple[int, int] | None:
    """``(row, column)`` of the first ``True`` of a 2-D mask, row-major, or ``None``.

    >>> first_bad_row_dense(np.array([[False, False], [False, True]]))
    (1, 1)
    """
    rows = bad.any(axis=1)
    if not rows.any():
        return None
    i = int(np.argmax(rows))
    return i, int(np.argmax(bad[i]))


def require_real(field: str, dtype: np.dtype) -> None:
    """Raises ``TypeError`` naming ``field`` unless ``dtype`` holds real numbers.

    >>> require_real("X", np.dtype(bool))
    Traceback (most recent call last):
    ...
    TypeError: X must hold real numbers, got dtype bool
    """
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{field} must hold real numbers, got dtype {dtype}")


def to_train_dtype(values: np.ndarray) -> np.ndarray:
    """``values`` cast to :data:`TRAIN_DTYPE`; values past its range become ``inf`` quietly.

    >>> to_train_dtype(np.array([1.0, 1e39]))
    array([ 1., inf], dtype=float32)
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported later
        return values.astype(TRAIN_DTYPE)


def _first_bad_count(values: np.ndarray, cast: np.ndarray) -> int | None:
    """Flat index of the first value that is not a non-negative integer, finite in float32."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(cast) | (values < 0)
        if np.issubdtype(values.dtype, np.floating):
            bad |= values != np.floor(values)
    flat = bad.reshape(-1)
    return int(np.argmax(flat)) if flat.any() else None


def _describe(value: Any, cast: Any) -> tuple[str, str]:
    """What is wrong with a bad count, and its value (and float32 value)."""
    if not np.isfinite(value):
        return "a non-finite value", f"value {value}"
    if value < 0:
        return "a negative value", f"value {value}"
    if not np.isfinite(cast):
        return "a value too large for float32", f"value {value}, {cast} in float32"
    return "a non-integer value", f"value {value}"


def _bad_count(adata: ad.AnnData, field: str, i: int, j: int, value: Any, cast: Any) -> ValueError:
    what, detail = _describe(value, cast)
    return ValueError(
        f"{field} has {what} at {cell_name(adata, i)}, gene {j} ({adata.var_names[j]!r}): "
        f"{detail}; counts must be non-negative integers, finite in float32"
    )


def counts_source(adata: ad.AnnData, counts_key: str | None) -> tuple[Any, str]:
    """The counts matrix and the field name used in messages.

    ``counts_key=None`` reads ``X``; otherwise ``layers[counts_key]`` must exist (a missing
    layer is an error listing the layers present, never a silent fall-back to ``X``).

    >>> import anndata as ad, numpy as np
    >>> counts_source(ad.AnnData(np.zeros((2, 2), np.float32)), "counts")
    Traceback (most recent call last):
    ...
    ValueError: layers['counts'] is missing; layers present: []; counts_key=None reads X
    """
    if counts_key is None:
        if adata.X is None:
            raise ValueError("X is missing (counts_key=None reads the counts from X)")
        return adata.X, "X"
    field = f"layers[{counts_key!r}]"
    if counts_key not in adata.layers:
        hint = "; counts_key=None reads X" if adata.X is not None else ""
        raise ValueError(f"{field} is missing; layers present: {list(adata.layers.keys())}{hint}")
    return adata.layers[counts_key], field


def check_counts(adata: ad.AnnData, counts: Any, field: str, *, chunk: int = CHUNK) -> np.ndarray:
    """The counts as a dense float32 array, after checking every value in that dtype.

    Dense, CSR and CSC input take the same path: a sparse matrix is first made canonical on a
    private copy (duplicate entries summed in at least float64, indices sorted), so a cell's
    value is checked as the model will see it. The caller's matrix is left untouched. Dense
    input is checked ``chunk`` values (whole rows, at least one) at a time.

    >>> import anndata as ad, numpy as np, scipy.sparse as sp
    >>> adata = ad.AnnData(np.array([[1, 0], [2, 3]], np.float32))
    >>> check_counts(adata, sp.csr_matrix(adata.X), "X")
    array([[1., 0.],
           [2., 3.]], dtype=float32)
    """
    shape = tuple(np.shape(counts))
    if shape != (adata.n_obs, adata.n_vars):
        raise ValueError(f"{field} has shape {shape} but the AnnData is {adata.shape}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{field} is empty (shape {shape})")
    n_genes = adata.n_vars
    if sp.issparse(counts):
        require_real(field, counts.dtype)
        csr = sp.csr_matrix(counts.copy())
        csr = csr.astype(np.result_type(csr.dtype, np.float64), copy=False)
        csr.sum_duplicates()
        data = to_train_dtype(csr.data)
        k = _first_bad_count(csr.data, data)
        if k is not None:  # canonical CSR is row-major: the first hit is in the first bad row
            i = int(np.searchsorted(csr.indptr, k, side="right") - 1)
            raise _bad_count(adata, field, i, int(csr.indices[k]), csr.data[k], data[k])
        x = sp.csr_matrix((data, csr.indices, csr.indptr), shape=shape).toarray()
    else:
        values = np.asarray(counts)
        require_real(field, values.dtype)
        x = np.empty(shape, TRAIN_DTYPE)
        step = max(1, chunk // n_genes)
        for r0 in range(0, shape[0], step):
            block = values[r0 : r0 + step]
            x[r0 : r0 + step] = cast = to_train_dtype(block)
            k = _first_bad_count(block, cast)
            if k is not None:
                i, j = divmod(k, n_genes)
                raise _bad_count(adata, field, r0 + i, j, block[i, j], cast[i, j])
    with np.errstate(over="ignore"):
        totals = x.sum(axis=1, dtype=TRAIN_DTYPE)
    if not np.isfinite(totals).all():
        i = int(np.argmax(~np.isfinite(totals)))
        total = float(x[i].astype(np.float64).sum())
        raise ValueError(
            f"{field} has a total count too large for float32 ({total:g}) at {cell_name(adata, i)}"
        )
    return x
