"""Single-cell perturbation data for CFM-VC: a count simulator and a validated AnnData loader.

The loader turns an ``anndata.AnnData`` into a :class:`jaxstab.registry.Dataset` with the
arrays the model consumes:

- ``x``: raw counts ``[N, G]`` float32 (the encoder applies ``log1p`` itself);
- ``p``: perturbation one-hot ``[N, P]`` float32, the control label mapping to all zeros;
- ``batch`` and ``cell_type``: integer codes ``[N]`` int32;
- ``spatial``: coordinates ``[N, D]`` float32, only when ``obsm["spatial"]`` exists.

Everything is checked before the first training step; a problem raises ``ValueError`` naming
the field and the first bad cell (its index and its obs name).

Example:
  >>> adata = simulate(200, 50, n_perturbations=3, seed=0)
  >>> data = load_anndata(adata)
  >>> data.arrays["x"].shape, data.arrays["p"].shape, data.meta["control"]
  ((200, 50), (200, 3), 'control')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from jaxstab.registry import Dataset

# Labels recognised as the unperturbed condition when ``control="auto"`` (case-insensitive).
CONTROL_LABELS: tuple[str, ...] = ("control", "ctrl", "non-targeting", "nontargeting", "nt")
OBS_KEYS: tuple[str, ...] = ("perturbation", "batch", "cell_type")


def simulate(
    n_cells: int,
    n_genes: int,
    n_perturbations: int = 5,
    n_batches: int = 2,
    n_cell_types: int = 3,
    spatial: bool = False,
    seed: int = 0,
    *,
    frac_affected: float = 0.1,
    effect_size: tuple[float, float] = (0.5, 2.0),
    batch_scale: float = 0.2,
    cell_type_scale: float = 0.5,
    mean_log_expression: float = 0.5,
    dispersion: float = 5.0,
) -> ad.AnnData:
    """Negative-binomial counts with known perturbation effects, batches and cell types.

    The mean of gene ``g`` in a cell is
    ``s · exp(base_g + ct_{c,g} + batch_{b,g} + lfc_{p,g})`` with a per-cell size factor ``s``
    (log-normal, σ 0.2), and counts are NB with per-gene dispersion ``theta_g`` (Gamma-Poisson
    draw). Each non-control perturbation changes a random ``frac_affected`` share of the genes
    by a natural-log fold change of magnitude ``U(*effect_size)`` and random sign, the same in
    every cell type and batch, so the true per-gene log fold change against control is exactly
    ``lfc_{p,g}``.

    Labels: ``obs["perturbation"]`` in ``control, pert_0, ...``; ``obs["batch"]`` in
    ``batch_0, ...``; ``obs["cell_type"]`` in ``ct_0, ...``; cells are spread evenly over the
    ``n_perturbations + 1`` conditions. Ground truth: ``varm["true_lfc"]`` ``[G, P]`` (columns in
    the order of ``uns["true_lfc_perturbations"]``), ``uns["control"] = "control"``. With
    ``spatial=True``, ``obsm["spatial"]`` holds 2-D coordinates clustered by cell type.

    Example:
      >>> adata = simulate(100, 20, n_perturbations=2, seed=1)
      >>> adata.layers["counts"].shape, adata.varm["true_lfc"].shape
      ((100, 20), (20, 2))
    """
    if n_cells < 1 or n_genes < 1:
        raise ValueError(f"n_cells and n_genes must be >= 1, got {n_cells} and {n_genes}")
    if n_perturbations < 1 or n_batches < 1 or n_cell_types < 1:
        raise ValueError(
            "n_perturbations, n_batches and n_cell_types must be >= 1, got "
            f"{n_perturbations}, {n_batches}, {n_cell_types}"
        )
    rng = np.random.default_rng(seed)
    base = rng.normal(mean_log_expression, 1.0, size=n_genes)
    ct_eff = rng.normal(0.0, cell_type_scale, size=(n_cell_types, n_genes))
    batch_eff = rng.normal(0.0, batch_scale, size=(n_batches, n_genes))
    n_aff = max(1, round(frac_affected * n_genes))
    lfc = np.zeros((n_perturbations, n_genes))
    for k in range(n_perturbations):
        genes = rng.choice(n_genes, size=n_aff, replace=False)
        sign = rng.choice(np.array([-1.0, 1.0]), size=n_aff)
        lfc[k, genes] = sign * rng.uniform(*effect_size, size=n_aff)
    theta = dispersion * np.exp(rng.normal(0.0, 0.3, size=n_genes))

    pert = rng.permutation(np.arange(n_cells) % (n_perturbations + 1))  # 0 = control
    batch = rng.integers(0, n_batches, size=n_cells)
    ct = rng.integers(0, n_cell_types, size=n_cells)
    size = np.exp(rng.normal(0.0, 0.2, size=n_cells))
    lfc_full = np.concatenate([np.zeros((1, n_genes)), lfc])
    log_mean = base + ct_eff[ct] + batch_eff[batch] + lfc_full[pert]
    mean = size[:, None] * np.exp(log_mean)
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)

    pert_names = ["control"] + [f"pert_{k}" for k in range(n_perturbations)]
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical.from_codes(pert, pert_names),
            "batch": pd.Categorical.from_codes(batch, [f"batch_{b}" for b in range(n_batches)]),
            "cell_type": pd.Categorical.from_codes(ct, [f"ct_{c}" for c in range(n_cell_types)]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    adata = ad.AnnData(obs=obs, var=var, layers={"counts": counts})
    adata.varm["true_lfc"] = lfc.T.astype(np.float32)
    adata.uns["control"] = "control"
    adata.uns["true_lfc_perturbations"] = pert_names[1:]
    adata.uns["simulation"] = {"seed": seed, "frac_affected": frac_affected, "theta": theta}
    if spatial:
        centers = rng.uniform(0.0, 10.0, size=(n_cell_types, 2))
        adata.obsm["spatial"] = (centers[ct] + rng.normal(0.0, 1.0, (n_cells, 2))).astype(
            np.float32
        )
    return adata


def _cell(adata: ad.AnnData, i: int) -> str:
    return f"cell {i} ({adata.obs_names[i]!r})"


def _first_bad_row_dense(bad: np.ndarray) -> tuple[int, int] | None:
    rows = bad.any(axis=1)
    if not rows.any():
        return None
    i = int(np.argmax(rows))
    return i, int(np.argmax(bad[i]))


def _check_counts(adata: ad.AnnData, counts: Any, key: str) -> np.ndarray:
    field = f"layers[{key!r}]"
    shape = tuple(np.shape(counts))
    if shape != (adata.n_obs, adata.n_vars):
        raise ValueError(f"{field} has shape {shape} but the AnnData is {adata.shape}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{field} is empty (shape {shape})")
    if sp.issparse(counts):
        csr = sp.csr_matrix(counts)
        values, indptr = csr.data, csr.indptr
    else:
        values, indptr = np.asarray(counts), None
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(
        values.dtype, np.complexfloating
    ):
        raise TypeError(f"{field} must hold real numbers, got dtype {values.dtype}")
    values = values.astype(np.float64, copy=False)
    checks = (
        ("a non-finite value", lambda v: ~np.isfinite(v)),
        ("a negative value", lambda v: v < 0),
        ("a non-integer value", lambda v: v != np.round(v)),
    )
    for what, test in checks:
        with np.errstate(invalid="ignore"):
            bad = test(values)
        if indptr is None:
            hit = _first_bad_row_dense(bad)
        elif bad.any():
            k = int(np.argmax(bad))  # CSR data is row-major: the first hit is in the first row
            row = int(np.searchsorted(indptr, k, side="right") - 1)
            hit = (row, int(csr.indices[k]))
        else:
            hit = None
        if hit is not None:
            i, j = hit
            value = csr[i, j] if indptr is not None else values[i, j]
            raise ValueError(
                f"{field} has {what} ({value}) at {_cell(adata, i)}, gene {j} "
                f"({adata.var_names[j]!r}); counts must be finite non-negative integers"
            )
    dense = csr.toarray() if indptr is not None else values
    return np.ascontiguousarray(dense, dtype=np.float32)


def _codes(adata: ad.AnnData, key: str) -> tuple[np.ndarray, list[str]]:
    field = f"obs[{key!r}]"
    if key not in adata.obs:
        raise ValueError(f"{field} is missing; required keys: {list(OBS_KEYS)}")
    col = adata.obs[key]
    labels = col.astype(object)
    empty = labels.isna().to_numpy() | (labels.astype(str).str.strip() == "").to_numpy()
    if empty.any():
        i = int(np.argmax(empty))
        raise ValueError(f"{field} has an empty label at {_cell(adata, i)}")
    # Unused categories of a pandas Categorical are dropped: only observed labels get a code.
    cat = pd.Categorical(labels.astype(str))
    return cat.codes.astype(np.int32), [str(c) for c in cat.categories]


def _find_control(names: Sequence[str], control: str | None) -> str | None:
    if control is None:
        return None
    if control != "auto":
        if control not in names:
            raise ValueError(f"obs['perturbation'] has no cell with the control label {control!r}")
        return control
    found = [n for n in names if n.lower() in CONTROL_LABELS]
    if len(found) > 1:
        raise ValueError(f"obs['perturbation'] has several control labels {found}; pass control=")
    return found[0] if found else None


def load_anndata(
    source: str | ad.AnnData, *, counts_key: str = "counts", control: str | None = "auto"
) -> Dataset:
    """Validates an AnnData (or an ``.h5ad`` path) and returns the model's arrays.

    Args:
      source: an ``anndata.AnnData`` or a path to an ``.h5ad`` file.
      counts_key: the layer holding raw counts (dense or scipy sparse).
      control: the control perturbation label (mapped to the zero one-hot); ``"auto"`` looks
        for one of :data:`CONTROL_LABELS` (case-insensitive); ``None`` gives every label its
        own one-hot column.

    Returns:
      A :class:`jaxstab.registry.Dataset` with arrays ``x``, ``p``, ``batch``, ``cell_type``
      (and ``spatial``) and meta ``n_genes``, ``n_batches``, ``n_cell_types``,
      ``n_perturbations``, ``perturbations`` (one-hot column order), ``batches``,
      ``cell_types``, ``control``, ``spatial_dim``, ``var_names`` and, for simulated data,
      ``true_lfc`` ``[G, P]`` aligned with ``perturbations``.

    Raises:
      ValueError: missing keys, shape mismatches, negative / non-integer / non-finite counts,
        empty labels or non-finite coordinates; the message names the field and the first bad
        cell.

    Example:
      >>> data = load_anndata(simulate(60, 10, n_perturbations=2))
      >>> data.meta["perturbations"], int(data.arrays["p"].sum(1).min())
      (['pert_0', 'pert_1'], 0)
    """
    adata = ad.read_h5ad(source) if isinstance(source, str) else source
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"source must be an AnnData or a path, got {type(adata).__name__}")
    if counts_key not in adata.layers:
        raise ValueError(
            f"layers[{counts_key!r}] is missing; layers present: {list(adata.layers.keys())}"
        )
    x = _check_counts(adata, adata.layers[counts_key], counts_key)
    pert, pert_names = _codes(adata, "perturbation")
    batch, batch_names = _codes(adata, "batch")
    ct, ct_names = _codes(adata, "cell_type")

    ctrl = _find_control(pert_names, control)
    columns = [n for n in pert_names if n != ctrl]
    if not columns:
        raise ValueError("obs['perturbation'] holds only the control label; nothing to model")
    column_of = np.array([columns.index(n) if n != ctrl else -1 for n in pert_names])
    col = column_of[pert]
    p = np.zeros((adata.n_obs, len(columns)), np.float32)
    rows = np.nonzero(col >= 0)[0]
    p[rows, col[rows]] = 1.0

    arrays: dict[str, np.ndarray] = {"x": x, "p": p, "batch": batch, "cell_type": ct}
    spatial_dim = None
    if "spatial" in adata.obsm:
        s = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        if s.ndim != 2 or s.shape[0] != adata.n_obs or s.shape[1] < 1:
            raise ValueError(
                f"obsm['spatial'] has shape {s.shape}; expected ({adata.n_obs}, D) with D >= 1"
            )
        bad = _first_bad_row_dense(~np.isfinite(s))
        if bad is not None:
            raise ValueError(f"obsm['spatial'] has a non-finite value at {_cell(adata, bad[0])}")
        arrays["spatial"] = s.astype(np.float32)
        spatial_dim = int(s.shape[1])

    meta: dict[str, Any] = {
        "n_genes": int(adata.n_vars),
        "n_batches": len(batch_names),
        "n_cell_types": len(ct_names),
        "n_perturbations": len(columns),
        "perturbations": columns,
        "batches": batch_names,
        "cell_types": ct_names,
        "control": ctrl,
        "spatial_dim": spatial_dim,
        "var_names": [str(v) for v in adata.var_names],
    }
    if "true_lfc" in adata.varm and "true_lfc_perturbations" in adata.uns:
        truth = np.asarray(adata.varm["true_lfc"], np.float32)
        order = [str(n) for n in adata.uns["true_lfc_perturbations"]]
        sim_control = adata.uns.get("control")
        zero = np.zeros(truth.shape[0], np.float32)
        cols = [
            truth[:, order.index(n)] if n in order else zero if n == sim_control else None
            for n in columns
        ]
        if all(c is not None for c in cols):  # the true effect of every one-hot column
            meta["true_lfc"] = np.stack(cols, axis=1)
    return Dataset(arrays=arrays, meta=meta)
