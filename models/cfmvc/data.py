"""Single-cell perturbation data for CFM-VC: a count simulator and a validated AnnData loader.

The loader turns an ``anndata.AnnData`` (or an ``.h5ad`` file) into a
:class:`jaxstab.registry.Dataset` with the arrays the model consumes:

- ``x``: raw counts ``[N, G]`` float32 (the encoder applies ``log1p`` itself);
- ``p``: perturbation one-hot ``[N, P]`` float32, the control label mapping to all zeros;
- ``batch`` and ``cell_type``: integer codes ``[N]`` int32;
- ``spatial``: coordinates ``[N, D]`` float32, only when ``obsm["spatial"]`` exists.

Everything is checked before the first training step; a problem raises ``ValueError`` naming
the field and the first bad cell (its index and its obs name). Counts are checked as the model
will see them: a sparse matrix (CSR or CSC) first has its duplicate entries summed, on a copy,
so it takes the same path as a dense one, and every value must be a finite non-negative integer
that stays finite once cast to float32. The caller's AnnData is never modified.

Control label: the cells of the control condition get the all-zero perturbation vector.
``load_anndata(..., control=LABEL)`` names it; ``LABEL`` is compared with the labels in
``obs["perturbation"]`` in their own type, so ``control=0`` and ``control="0"`` both find the
integer label ``0``, a category ``0`` or the string ``"0"``. With ``control="auto"`` (the
default) a label is the control when, lower-cased and with spaces, ``-``, ``_`` and ``.``
removed, it is one of :data:`CONTROL_LABELS`: ``control``, ``ctrl``, ``ctl``,
``non-targeting``, ``non-target``, ``NT``, ``NTC``, ``negative control``, ``neg ctrl``,
``scramble``, ``scrambled``, ``unperturbed``, ``vehicle``, ``DMSO``. When none is found the
loader does not guess: ``meta["control"]`` is ``None``, every label gets its own column and
``meta["warnings"]`` says so. ``control=None`` asks for that layout without a warning.

Example:
  >>> adata = simulate(200, 50, n_perturbations=3, seed=0)
  >>> data = load_anndata(adata)
  >>> data.arrays["x"].shape, data.arrays["p"].shape, data.meta["control"]
  ((200, 50), (200, 3), 'control')
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from jaxstab.models import single_cell
from jaxstab.models.single_cell import TRAIN_DTYPE as TRAIN_DTYPE  # re-exported
from jaxstab.models.single_cell import as_anndata as _as_anndata
from jaxstab.models.single_cell import cell_name as _cell
from jaxstab.models.single_cell import counts_source as _counts_source
from jaxstab.models.single_cell import first_bad_row_dense as _first_bad_row_dense
from jaxstab.models.single_cell import is_number as _is_number
from jaxstab.models.single_cell import listing as _listing
from jaxstab.models.single_cell import require_real as _require_real
from jaxstab.models.single_cell import to_train_dtype as _to_train_dtype
from jaxstab.plugin import Dataset

# Labels recognised as the unperturbed condition when ``control="auto"``. A label matches when
# it equals one of these after both are lower-cased and stripped of spaces, "-", "_" and ".".
CONTROL_LABELS: tuple[str, ...] = (
    "control",
    "ctrl",
    "ctl",
    "non-targeting",
    "non-target",
    "NT",
    "NTC",
    "negative control",
    "neg ctrl",
    "scramble",
    "scrambled",
    "unperturbed",
    "vehicle",
    "DMSO",
)
OBS_KEYS: tuple[str, ...] = ("perturbation", "batch", "cell_type")
# Dense counts are checked this many values at a time (bounded temporary memory).
_CHUNK = single_cell.CHUNK


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


def _check_counts(adata: ad.AnnData, counts: Any, field: str) -> np.ndarray:
    """:func:`jaxstab.models.single_cell.check_counts`, dense input checked ``_CHUNK`` at a time."""
    return single_cell.check_counts(adata, counts, field, chunk=_CHUNK)


def _codes(adata: ad.AnnData, key: str) -> tuple[np.ndarray, list[str], list[Any]]:
    """Integer codes, the label names (as strings) and each name's label as stored in obs."""
    field = f"obs[{key!r}]"
    if key not in adata.obs:
        raise ValueError(f"{field} is missing; required keys: {list(OBS_KEYS)}")
    labels = adata.obs[key].astype(object)
    empty = labels.isna().to_numpy() | (labels.astype(str).str.strip() == "").to_numpy()
    if empty.any():
        i = int(np.argmax(empty))
        raise ValueError(f"{field} has an empty label at {_cell(adata, i)}")
    # Unused categories of a pandas Categorical are dropped: only observed labels get a code.
    text = labels.astype(str).to_numpy()
    names, first = np.unique(text, return_index=True)
    raws = list(labels.to_numpy()[first])
    order = np.arange(len(names))
    if all(_is_number(r) for r in raws):  # numeric labels in numeric order: 2 before 10
        order = np.argsort([float(r) for r in raws], kind="stable")
    names = [str(names[o]) for o in order]
    codes = pd.Categorical(text, categories=names).codes.astype(np.int32)
    return codes, names, [raws[o] for o in order]


def _normalise(label: str) -> str:
    return re.sub(r"[\s_.\-]+", "", label.lower())


_CONTROL_KEYS = frozenset(_normalise(n) for n in CONTROL_LABELS)


def _same_label(raw: Any, control: str | int | float) -> bool:
    """``control`` read in the type of the stored label ``raw``: 0, "0" and 0.0 find 0."""
    if _is_number(raw):
        try:
            return float(control) == float(raw)
        except (TypeError, ValueError):
            return False
    return str(raw) == str(control)


def _find_control(
    names: Sequence[str], raws: Sequence[Any], control: str | int | float | None
) -> tuple[str | None, list[str]]:
    """The control label's name (or None) and the warnings to pass on to the user."""
    field = "obs['perturbation']"
    if control is None:
        return None, []
    if isinstance(control, str) and control == "auto":
        found = [n for n in names if _normalise(n) in _CONTROL_KEYS]
        if len(found) > 1:
            raise ValueError(
                f"{field} has several control labels ({_listing(found)}); pass control=LABEL "
                "(CLI: --control LABEL) to choose one"
            )
        if found:
            return found[0], []
        return None, [
            f"no control label found in {field} (labels: {_listing(names)}); every cell is "
            "treated as perturbed; pass control=LABEL (CLI: --control LABEL)"
        ]
    if not (isinstance(control, str) or _is_number(control)):
        raise TypeError(f"control must be a label (str or int), 'auto' or None; got {control!r}")
    found = [n for n, raw in zip(names, raws, strict=True) if _same_label(raw, control)]
    if not found:
        raise ValueError(
            f"{field} has no cell with the control label {control!r} (labels: {_listing(names)})"
        )
    if len(found) > 1:
        raise ValueError(f"control={control!r} matches several labels in {field}: {found}")
    return found[0], []


def _check_spatial(adata: ad.AnnData, coords: Any) -> np.ndarray:
    field = "obsm['spatial']"
    s = np.asarray(coords)
    if s.ndim != 2 or s.shape[0] != adata.n_obs or s.shape[1] < 1:
        raise ValueError(f"{field} has shape {s.shape}; expected ({adata.n_obs}, D) with D >= 1")
    _require_real(field, s.dtype)
    cast = _to_train_dtype(s)
    hit = _first_bad_row_dense(~np.isfinite(cast))
    if hit is not None:
        i, j = hit
        what = "a non-finite value" if not np.isfinite(s[i, j]) else "a value too large for float32"
        raise ValueError(
            f"{field} has {what} at {_cell(adata, i)}, column {j}: value {s[i, j]}, "
            f"{cast[i, j]} in float32"
        )
    return cast


def load_anndata(
    source: str | os.PathLike[str] | ad.AnnData,
    *,
    counts_key: str | None = "counts",
    control: str | int | None = "auto",
) -> Dataset:
    """Validates an AnnData (or an ``.h5ad`` path) and returns the model's arrays.

    Args:
      source: an ``anndata.AnnData`` or a path to an ``.h5ad`` file.
      counts_key: the layer holding raw counts (dense, CSR or CSC); ``None`` reads ``X``.
      control: the control perturbation label (mapped to the zero one-hot), a string or an
        int compared with the labels in their own type; ``"auto"`` looks for one of
        :data:`CONTROL_LABELS` and, finding none, adds a message to ``meta["warnings"]``;
        ``None`` gives every label its own one-hot column.

    Returns:
      A :class:`jaxstab.registry.Dataset` with arrays ``x``, ``p``, ``batch``, ``cell_type``
      (and ``spatial``) and meta ``n_genes``, ``n_batches``, ``n_cell_types``,
      ``n_perturbations``, ``perturbations`` (one-hot column order), ``batches``,
      ``cell_types``, ``control`` (the control's name as in ``perturbations``, a string, or
      ``None``), ``warnings`` (a list of messages for the user, possibly empty),
      ``spatial_dim``, ``var_names`` and, for simulated data, ``true_lfc`` ``[G, P]`` aligned
      with ``perturbations``. Labels are named by their text: an integer label ``0`` is ``"0"``.

    Raises:
      ValueError: missing keys, shape mismatches, negative / non-integer / non-finite counts
        (checked after the cast to float32 and, for sparse input, after summing duplicate
        entries), empty labels, an unknown control label or non-finite coordinates; the
        message names the field and the first bad cell. A file that cannot be read as an
        ``.h5ad`` gives a ``ValueError`` (``FileNotFoundError`` when missing) naming the file.
      TypeError: counts or coordinates that are not real numbers.

    Example:
      >>> data = load_anndata(simulate(60, 10, n_perturbations=2))
      >>> data.meta["perturbations"], int(data.arrays["p"].sum(1).min())
      (['pert_0', 'pert_1'], 0)
      >>> adata = simulate(60, 10, n_perturbations=2)
      >>> adata.obs["perturbation"] = adata.obs["perturbation"].cat.codes.astype(int)
      >>> load_anndata(adata).meta["warnings"][0][:54]
      "no control label found in obs['perturbation'] (labels:"
      >>> data = load_anndata(adata, control=0)
      >>> data.meta["control"], data.meta["perturbations"], data.meta["warnings"]
      ('0', ['1', '2'], [])
    """
    adata = _as_anndata(source)
    counts, field = _counts_source(adata, counts_key)
    x = _check_counts(adata, counts, field)
    pert, pert_names, pert_raws = _codes(adata, "perturbation")
    batch, batch_names, _ = _codes(adata, "batch")
    ct, ct_names, _ = _codes(adata, "cell_type")

    ctrl, warnings = _find_control(pert_names, pert_raws, control)
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
        arrays["spatial"] = _check_spatial(adata, adata.obsm["spatial"])
        spatial_dim = int(arrays["spatial"].shape[1])

    meta: dict[str, Any] = {
        "n_genes": int(adata.n_vars),
        "n_batches": len(batch_names),
        "n_cell_types": len(ct_names),
        "n_perturbations": len(columns),
        "perturbations": columns,
        "batches": batch_names,
        "cell_types": ct_names,
        "control": ctrl,
        "warnings": warnings,
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
