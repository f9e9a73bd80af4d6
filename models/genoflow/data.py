"""Single-cell time courses for GenoFlow: a branching simulator and a validated AnnData loader.

GenoFlow learns cell-state dynamics from snapshots: cells measured at a few ordered time
points, each under one condition, and a gene graph its vector field passes messages on. The
loader turns an ``anndata.AnnData`` (or an ``.h5ad`` path) into a :class:`jaxstab.plugin.Dataset`:

- ``x``: raw counts ``[N, G]`` float32, dense (the encoder applies ``log1p`` itself);
- ``condition``: ``[N]`` int32 codes into ``meta["conditions"]``;
- ``time``: ``[N]`` int32 index into ``meta["time_points"]`` (ascending);
- ``library``: ``[N]`` float32, each cell's total count.

and ``meta`` with ``n_genes``, ``n_conditions``, ``conditions``, ``time_points``,
``n_time_points``, ``time_labels``, ``var_names``, ``gene_graph`` (``[2, E]`` int32, row 0 the
source gene, row 1 the target; no self loops, no duplicates, sorted by source then target),
``gene_graph_source`` (``"varp"`` or ``"knn"``), ``warnings`` and, for simulated data,
``true_gene_graph`` (same layout).

Everything is checked before anything is returned; a problem raises ``ValueError`` naming the
field and the first bad cell (its index and its obs name). Counts are checked as in CFM-VC
(:func:`jaxstab.models.single_cell.check_counts`): dense, CSR and CSC alike, every value a
finite non-negative integer that stays finite in float32. The caller's AnnData is never
modified.

Example:
  >>> data = load_anndata(simulate(40, 30, n_time_points=3, seed=0))
  >>> data.arrays["x"].shape, data.meta["time_points"], data.meta["conditions"]
  ((120, 30), [0.0, 1.0, 2.0], ['cond_0', 'cond_1'])
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from jaxstab.models.single_cell import (
    TRAIN_DTYPE,
    as_anndata,
    cell_name,
    check_counts,
    counts_source,
    first_bad_row_dense,
    is_number,
    listing,
    require_real,
)
from jaxstab.plugin import Dataset

__all__ = ["DEFAULT_KNN", "default_data", "gene_graph_knn", "load_anndata", "simulate"]

# Neighbours per gene of the correlation graph built when the data has no gene graph.
DEFAULT_KNN = 8
# Reference point of the simulator's latent state: regulators are at their base level there.
_Z_REF = np.array([1.0, 0.75, 0.0])
# Genes of one correlation block (``block × n_genes`` float32 at a time) in gene_graph_knn.
_KNN_BLOCK = 1 << 24


# ----------------------------------------------------------------------------- simulator


def simulate(
    n_cells_per_time: int = 300,
    n_genes: int = 200,
    *,
    n_time_points: int = 5,
    n_conditions: int = 2,
    seed: int = 0,
    n_regulators: int | None = None,
    max_parents: int = 3,
    frac_targets: float = 0.8,
    branch_point: float = 0.25,
    branch_prob: tuple[float, float] = (0.8, 0.2),
    speed: tuple[float, float] = (1.0, 0.7),
    state_noise: float = 0.1,
    gene_noise: float = 0.2,
    mean_log_expression: float = 1.0,
    dispersion: float = 5.0,
    library_sigma: float = 0.2,
) -> ad.AnnData:
    """Negative-binomial counts along known branching dynamics, with a true gene graph.

    Dynamics: time point ``t`` of ``T`` is at ``s = t / (T - 1)``; a cell of condition ``c``
    has progressed to ``u = s ** speed_c`` (``speed_c`` runs linearly from ``speed[0]`` for
    ``cond_0`` to ``speed[1]`` for the last condition; below 1 is faster). Each cell has a fate
    A (probability ``branch_prob_c``, linear from ``branch_prob[0]`` to ``branch_prob[1]``)
    or B, and a 3-D latent state
    ``z = (2u, 1.5 sin(πu), ±2.5 ((u - branch_point)_+ / (1 - branch_point))^1.5) + noise``
    (``+`` for A; noise N(0, ``state_noise``)): one curved trunk that splits into two
    branches after ``branch_point``. The path is nonlinear in time, so the average of two
    neighbouring time points is not the one between them.

    Genes: ``n_regulators`` regulators (default ``clip(n_genes // 20, 1, 12)``) are driven by
    the latent state, ``a_r = (z - z_ref) · W_r + ε``; a ``frac_targets`` share of the other
    genes are targets, each of 1 to ``max_parents`` regulators with weights ``±U(0.5, 1)``,
    ``a_g = Σ w_rg a_r + ε``; the rest only have noise ``ε`` (all ε ~ N(0, ``gene_noise``)).
    The mean of gene ``g`` is ``s · exp(base_g + a_g)``, ``base_g ~ N(mean_log_expression,
    1)``, with a log-normal size factor ``s`` (σ ``library_sigma``), and counts are NB with
    per-gene dispersion ``theta_g = dispersion · exp(N(0, 0.3))`` (a Gamma-Poisson draw).

    Layout: ``layers["counts"]`` float32 dense ``[T · n_cells_per_time, n_genes]`` (``X`` is
    left empty), cells ordered by time point; ``obs["time"]`` the time point ``0, 1, ...``
    (int), ``obs["condition"]`` categorical ``cond_0, ...`` (spread evenly within each time
    point), ``obs["branch"]`` categorical ``trunk`` (``u <= branch_point``), ``A`` or ``B``,
    ``obs["true_progress"]`` ``u``; ``obsm["true_state"]`` ``z`` ``[N, 3]`` float32;
    ``var["role"]`` ``regulator``/``target``/``other``; the true graph (regulator → target)
    as ``varp["gene_graph"]`` (CSR 0/1 float32 ``[G, G]``, entry (i, j) = edge i → j) and
    ``uns["true_gene_graph"]`` (``[2, E]`` int64); ``uns["simulation"]`` the seed and the
    per-condition ``speed`` and ``branch_prob``. The same arguments give the same data.

    Example:
      >>> adata = simulate(50, 40, n_time_points=4, seed=1)
      >>> adata.layers["counts"].shape, sorted(set(adata.obs["time"]))
      ((200, 40), [0, 1, 2, 3])
      >>> list(adata.obs["branch"].cat.categories), adata.obsm["true_state"].shape
      (['trunk', 'A', 'B'], (200, 3))
    """
    if n_cells_per_time < 1 or n_genes < 2:
        raise ValueError(
            f"n_cells_per_time must be >= 1 and n_genes >= 2, got {n_cells_per_time} and {n_genes}"
        )
    if n_time_points < 2 or n_conditions < 1:
        raise ValueError(
            f"n_time_points must be >= 2 and n_conditions >= 1, got {n_time_points} and "
            f"{n_conditions}"
        )
    n_reg = max(1, min(12, n_genes // 20)) if n_regulators is None else n_regulators
    if not 1 <= n_reg < n_genes:
        raise ValueError(f"n_regulators must be in [1, n_genes), got {n_reg} for {n_genes} genes")
    if max_parents < 1 or not 0.0 <= frac_targets <= 1.0 or not 0.0 <= branch_point < 1.0:
        raise ValueError(
            "need max_parents >= 1, 0 <= frac_targets <= 1 and 0 <= branch_point < 1, got "
            f"{max_parents}, {frac_targets}, {branch_point}"
        )
    rng = np.random.default_rng(seed)
    n_t, n_c, g = n_time_points, n_conditions, n_genes

    # Genes: regulators and targets at random positions, the regulator -> target weights.
    perm = rng.permutation(g)
    regulators = np.sort(perm[:n_reg])
    rest = perm[n_reg:]
    targets = np.sort(rest[: round(frac_targets * len(rest))])
    base = rng.normal(mean_log_expression, 1.0, size=g)
    theta = dispersion * np.exp(rng.normal(0.0, 0.3, size=g))
    drive = rng.normal(0.0, 0.7, size=(3, n_reg))
    weights = np.zeros((n_reg, g))
    for target in targets:
        k = int(rng.integers(1, min(max_parents, n_reg) + 1))
        parents = rng.choice(n_reg, size=k, replace=False)
        sign = rng.choice(np.array([-1.0, 1.0]), size=k)
        weights[parents, target] = sign * rng.uniform(0.5, 1.0, size=k)

    # Cells: time point, condition, progress, fate and latent state.
    time = np.repeat(np.arange(n_t), n_cells_per_time)
    cond = np.concatenate([rng.permutation(np.arange(n_cells_per_time) % n_c) for _ in range(n_t)])
    n = len(time)
    speeds = np.linspace(speed[0], speed[1], n_c)  # one condition: the first value
    p_a = np.linspace(branch_prob[0], branch_prob[1], n_c)
    u = (time / (n_t - 1)) ** speeds[cond]
    fate_a = rng.random(n) < p_a[cond]
    split = (np.clip(u - branch_point, 0.0, None) / (1.0 - branch_point)) ** 1.5
    z = np.stack([2.0 * u, 1.5 * np.sin(np.pi * u), np.where(fate_a, 2.5, -2.5) * split], axis=1)
    z = z + rng.normal(0.0, state_noise, size=z.shape)

    # Expression: regulators follow the state, targets their regulators, NB counts.
    reg_activity = (z - _Z_REF) @ drive + rng.normal(0.0, gene_noise, size=(n, n_reg))
    activity = rng.normal(0.0, gene_noise, size=(n, g)) + reg_activity @ weights
    activity[:, regulators] = reg_activity
    size = np.exp(rng.normal(0.0, library_sigma, size=n))
    mean = size[:, None] * np.exp(base + np.clip(activity, -8.0, 8.0))
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)

    branch = np.where(u <= branch_point, 0, np.where(fate_a, 1, 2))
    obs = pd.DataFrame(
        {
            "time": time.astype(np.int64),
            "condition": pd.Categorical.from_codes(cond, [f"cond_{c}" for c in range(n_c)]),
            "branch": pd.Categorical.from_codes(branch, ["trunk", "A", "B"]),
            "true_progress": u,
        },
        index=[f"cell_{i}" for i in range(n)],
    )
    role = np.full(g, "other", dtype=object)
    role[targets] = "target"
    role[regulators] = "regulator"
    var = pd.DataFrame({"role": pd.Categorical(role)}, index=[f"gene_{j}" for j in range(g)])
    adjacency = np.zeros((g, g), np.float32)
    adjacency[regulators] = weights != 0
    adata = ad.AnnData(obs=obs, var=var, layers={"counts": counts})
    adata.obsm["true_state"] = z.astype(np.float32)
    adata.varp["gene_graph"] = sp.csr_matrix(adjacency)
    adata.uns["true_gene_graph"] = np.stack(np.nonzero(adjacency)).astype(np.int64)
    adata.uns["simulation"] = {
        "seed": seed,
        "speed": speeds,
        "branch_prob": p_a,
        "branch_point": branch_point,
        "theta": theta,
    }
    return adata


# ----------------------------------------------------------------------------- gene graph


def _canonical_edges(src: np.ndarray, dst: np.ndarray, n_genes: int) -> np.ndarray:
    """``[2, E]`` int32: self loops dropped, duplicates merged, sorted by source then target."""
    keep = src != dst
    flat = np.unique(src[keep].astype(np.int64) * n_genes + dst[keep].astype(np.int64))
    return np.stack([flat // n_genes, flat % n_genes]).astype(np.int32)


def gene_graph_knn(counts: Any, k: int = DEFAULT_KNN) -> np.ndarray:
    """A gene graph from co-expression: each gene linked to its ``k`` most correlated genes.

    The similarity of two genes is the absolute Pearson correlation of their ``log1p`` counts
    over the cells (``counts`` is ``[n_cells, n_genes]``, dense or sparse, non-negative);
    every gene picks the ``k`` genes most similar to it (ties go to the lower gene index) and
    each pick becomes an edge in both directions, duplicates merged. So the graph is
    symmetric, has no self loops, and every non-constant gene has at least
    ``min(k, n_nonconstant - 1)`` out-edges (more when other genes picked it). A constant
    gene (the same count in every cell, e.g. never detected) has no correlation: it gets no
    edges at all and is never picked, so no NaN enters. Edges are ``[2, E]`` int32 (row 0 the
    source gene, row 1 the target), sorted by source then target.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> a = rng.poisson(5.0, size=(100, 1))
      >>> counts = np.hstack([a, a + rng.poisson(1.0, (100, 1)), rng.poisson(5.0, (100, 3))])
      >>> edges = gene_graph_knn(counts, k=1)
      >>> bool(((edges[0] == 0) & (edges[1] == 1)).any()), edges.shape[0]
      (True, 2)
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    if x.ndim != 2:
        raise ValueError(f"counts must be [n_cells, n_genes], got shape {x.shape}")
    if x.dtype != np.bool_:
        require_real("counts", x.dtype)
    x = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        hit = first_bad_row_dense(~np.isfinite(x) | (x < 0))
    if hit is not None:
        i, j = hit
        raise ValueError(
            f"counts must be finite and non-negative; cell {i}, gene {j} has value {x[i, j]}"
        )
    n_genes = x.shape[1]
    if x.shape[0] == 0:
        return np.zeros((2, 0), np.int32)
    varying = np.nonzero(x.max(axis=0) != x.min(axis=0))[0]
    kk = min(int(k), len(varying) - 1)
    if kk < 1:
        return np.zeros((2, 0), np.int32)
    logs = np.log1p(x[:, varying])
    centred = logs - logs.mean(axis=0)
    unit = (centred / np.sqrt((centred**2).sum(axis=0))).astype(np.float32)
    block = max(1, _KNN_BLOCK // len(varying))
    src, dst = [], []
    for b0 in range(0, len(varying), block):
        rows = np.arange(b0, min(b0 + block, len(varying)))
        sim = np.abs(unit[:, rows].T @ unit)
        sim[np.arange(len(rows)), rows] = -1.0  # never oneself
        kth = -np.partition(-sim, kk - 1, axis=1)[:, kk - 1 : kk]
        above = sim > kth
        tied = sim == kth
        room = kk - above.sum(axis=1, keepdims=True)
        picked = above | (tied & (np.cumsum(tied, axis=1) <= room))  # ties: lower index first
        r, c = np.nonzero(picked)
        src.append(varying[rows[r]])
        dst.append(varying[c])
    s, d = np.concatenate(src), np.concatenate(dst)
    return _canonical_edges(np.concatenate([s, d]), np.concatenate([d, s]), n_genes)


def _gene_name(adata: ad.AnnData, j: int) -> str:
    return f"gene {j} ({adata.var_names[j]!r})"


def _graph_from_matrix(adata: ad.AnnData, matrix: Any, field: str) -> np.ndarray:
    """Edges of a ``[G, G]`` matrix: nonzero (i, j) is the edge i → j."""
    g = adata.n_vars
    shape = tuple(np.shape(matrix))
    if shape != (g, g):
        raise ValueError(f"{field} has shape {shape}; expected ({g}, {g}) (genes × genes)")
    if sp.issparse(matrix):
        if matrix.dtype != np.bool_:
            require_real(field, matrix.dtype)
        csr = sp.csr_matrix(matrix.copy()).astype(np.float64)
        csr.sum_duplicates()
        bad = ~np.isfinite(csr.data)
        if bad.any():
            k = int(np.argmax(bad))
            i = int(np.searchsorted(csr.indptr, k, side="right") - 1)
            j = int(csr.indices[k])
            raise ValueError(
                f"{field} has a non-finite value at {_gene_name(adata, i)} → "
                f"{_gene_name(adata, j)}: value {csr.data[k]}"
            )
        coo = csr.tocoo()
        nz = coo.data != 0
        src, dst = coo.row[nz], coo.col[nz]
    else:
        m = np.asarray(matrix)
        if m.dtype != np.bool_:
            require_real(field, m.dtype)
        m = m.astype(np.float64)
        hit = first_bad_row_dense(~np.isfinite(m))
        if hit is not None:
            i, j = hit
            raise ValueError(
                f"{field} has a non-finite value at {_gene_name(adata, i)} → "
                f"{_gene_name(adata, j)}: value {m[i, j]}"
            )
        src, dst = np.nonzero(m)
    return _canonical_edges(src, dst, g)


def _true_graph(adata: ad.AnnData) -> np.ndarray:
    field = "uns['true_gene_graph']"
    edges = np.asarray(adata.uns["true_gene_graph"])
    if edges.ndim != 2 or edges.shape[0] != 2 or not np.issubdtype(edges.dtype, np.integer):
        raise ValueError(f"{field} must be [2, E] integers, got shape {edges.shape}, {edges.dtype}")
    if edges.size and (edges.min() < 0 or edges.max() >= adata.n_vars):
        raise ValueError(f"{field} has a gene index outside [0, {adata.n_vars})")
    return _canonical_edges(edges[0], edges[1], adata.n_vars)


# ----------------------------------------------------------------------------- obs fields


def _time(adata: ad.AnnData, key: str) -> tuple[np.ndarray, list[float], list[str]]:
    """Codes ``[N]`` into the ascending time points, the time points and their labels."""
    field = f"obs[{key!r}]"
    if key not in adata.obs:
        raise ValueError(
            f"{field} is missing; obs columns: [{listing([str(c) for c in adata.obs.columns])}]"
        )
    col = adata.obs[key]
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = list(col.cat.categories)
        if col.cat.ordered:
            codes = col.cat.codes.to_numpy()
            if (codes < 0).any():
                i = int(np.argmax(codes < 0))
                raise ValueError(f"{field} has a missing time at {cell_name(adata, i)}")
            if len(cats) < 2:
                raise ValueError(
                    f"{field} has a single time point ({cats[0]!r}); GenoFlow needs at least 2"
                )
            per = np.bincount(codes, minlength=len(cats))
            if (per == 0).any():
                k = int(np.argmax(per == 0))
                raise ValueError(
                    f"{field}: time point {cats[k]!r} (category {k} of the ordered categorical) "
                    "has no cells; drop it with .cat.remove_unused_categories()"
                )
            labels = [str(c) for c in cats]
            return codes.astype(np.int32), [float(k) for k in range(len(cats))], labels
        if not all(is_number(c) for c in cats):
            raise ValueError(
                f"{field} is an unordered categorical ({listing([str(c) for c in cats])}); "
                "time needs an order: make it an ordered categorical (category order = time "
                "order) or numeric"
            )
        values = col.astype(float).to_numpy(dtype=np.float64, na_value=np.nan)
    elif pd.api.types.is_bool_dtype(col.dtype):
        raise ValueError(f"{field} is boolean; time must be numeric or an ordered categorical")
    elif pd.api.types.is_numeric_dtype(col.dtype):
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        raw = col.to_numpy(dtype=object)
        if not all(is_number(v) or v is None for v in raw):
            raise ValueError(
                f"{field} holds non-numeric values (dtype {col.dtype}); time must be numeric "
                "or an ordered categorical (category order = time order)"
            )
        values = np.array([np.nan if v is None else float(v) for v in raw], np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{field} has a non-finite time at {cell_name(adata, i)}: {values[i]}")
    points = np.unique(values)
    if len(points) < 2:
        raise ValueError(f"{field} has a single time point ({points[0]:g}); GenoFlow needs >= 2")
    codes = np.searchsorted(points, values).astype(np.int32)
    return codes, [float(p) for p in points], [f"{p:g}" for p in points]


def _declared_names(adata: ad.AnnData, key: str) -> list[str] | None:
    names_key = f"{key}_names"
    if names_key not in adata.uns:
        return None
    field = f"uns[{names_key!r}]"
    raw = adata.uns[names_key]
    values = [raw] if isinstance(raw, str) else list(np.asarray(raw, dtype=object).reshape(-1))
    names = [str(v) for v in values]
    if not names or any(not n.strip() for n in names):
        raise ValueError(f"{field} must list non-empty condition names, got {names}")
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ValueError(f"{field} names the condition {dup!r} twice")
    return names


def _labels(
    adata: ad.AnnData, key: str, declared: list[str] | None
) -> tuple[np.ndarray, list[str], str]:
    """Codes, condition names and where the names come from, for labels in ``obs[key]``."""
    field = f"obs[{key!r}]"
    names_field = f"uns[{key + '_names'!r}]"
    col = adata.obs[key]
    categorical = isinstance(col.dtype, pd.CategoricalDtype)
    raw = col.astype(object).to_numpy()
    empty = pd.isna(raw) | np.array([str(v).strip() == "" for v in raw])
    if empty.any():
        i = int(np.argmax(empty))
        raise ValueError(f"{field} has an empty label at {cell_name(adata, i)}")
    if all(is_number(v) for v in raw):
        values = np.asarray(raw, np.float64)
        bad = ~np.isfinite(values) | (values != np.floor(values))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{field} has a non-integer label at {cell_name(adata, i)}: {raw[i]}; "
                "condition labels are strings or integers"
            )
        if (values < 0).any():
            i = int(np.argmax(values < 0))
            raise ValueError(
                f"{field} has a negative label at {cell_name(adata, i)}: {int(values[i])}; "
                "integer labels are codes 0, 1, ..."
            )
        ints = values.astype(np.int64)
        if declared is not None:
            out = ints >= len(declared)
            if out.any():
                i = int(np.argmax(out))
                raise ValueError(
                    f"{field} label out of range at {cell_name(adata, i)}: label {ints[i]}, "
                    f"but {names_field} declares {len(declared)} conditions (codes 0 to "
                    f"{len(declared) - 1})"
                )
            return ints.astype(np.int32), declared, names_field
        if not categorical:
            points = np.unique(ints)
            codes = np.searchsorted(points, ints).astype(np.int32)
            return codes, [str(p) for p in points], field
    text = np.array([str(v) for v in raw], dtype=object)
    if declared is not None:
        lookup = {n: c for c, n in enumerate(declared)}
        unknown = np.array([t not in lookup for t in text])
        if unknown.any():
            i = int(np.argmax(unknown))
            raise ValueError(
                f"{field} has the label {text[i]!r} at {cell_name(adata, i)}, which is not one "
                f"of the conditions declared in {names_field} ({listing(declared)})"
            )
        return np.array([lookup[t] for t in text], np.int32), declared, names_field
    if categorical:
        names = [str(c) for c in col.cat.categories]
        return col.cat.codes.to_numpy().astype(np.int32), names, f"the categories of {field}"
    names = sorted(set(text))
    lookup = {n: c for c, n in enumerate(names)}
    return np.array([lookup[t] for t in text], np.int32), names, field


def _one_hot(
    adata: ad.AnnData, m: Any, key: str, declared: list[str] | None
) -> tuple[np.ndarray, list[str], str]:
    """Codes and condition names from the one-hot rows ``m`` (``obsm[key]``)."""
    field = f"obsm[{key!r}]"
    columns = [str(c) for c in m.columns] if isinstance(m, pd.DataFrame) else None
    m = m.toarray() if sp.issparse(m) else np.asarray(m)
    if m.ndim != 2 or m.shape[0] != adata.n_obs or m.shape[1] < 1:
        raise ValueError(
            f"{field} has shape {m.shape}; expected ({adata.n_obs}, C) one-hot rows, C >= 1"
        )
    if m.dtype != np.bool_:
        require_real(field, m.dtype)
    v = m.astype(np.float64)
    bad_value = (v != 0) & (v != 1)  # NaN included
    bad_row = bad_value.any(axis=1) | (v.sum(axis=1) != 1)
    if bad_row.any():
        i = int(np.argmax(bad_row))
        if bad_value[i].any():
            j = int(np.argmax(bad_value[i]))
            what = f"the value {v[i, j]} in column {j}"
        else:
            what = f"{int(v[i].sum())} ones"
        raise ValueError(
            f"{field} is not one-hot at {cell_name(adata, i)}: the row has {what}; each row "
            "must hold exactly one 1 and zeros"
        )
    n_cols = m.shape[1]
    if declared is not None:
        if len(declared) != n_cols:
            raise ValueError(
                f"uns[{key + '_names'!r}] names {len(declared)} conditions but {field} has "
                f"{n_cols} columns"
            )
        names = declared
    else:
        names = columns if columns is not None else [str(c) for c in range(n_cols)]
    return np.argmax(v, axis=1).astype(np.int32), names, f"the columns of {field}"


def _conditions(
    adata: ad.AnnData, key: str | None, warnings: list[str]
) -> tuple[np.ndarray, list[str]]:
    if key is None:
        return np.zeros(adata.n_obs, np.int32), ["all"]
    declared = _declared_names(adata, key)
    if key in adata.obs:
        if key in adata.obsm:
            warnings.append(
                f"both obs[{key!r}] and obsm[{key!r}] exist; the conditions are read from "
                f"obs[{key!r}]"
            )
        codes, names, source = _labels(adata, key, declared)
    elif key in adata.obsm:
        codes, names, source = _one_hot(adata, adata.obsm[key], key, declared)
    else:
        raise ValueError(
            f"obs[{key!r}] and obsm[{key!r}] are both missing; obs columns: "
            f"[{listing([str(c) for c in adata.obs.columns])}], obsm keys: "
            f"[{listing(list(adata.obsm.keys()))}]; condition_key=None puts every cell in one "
            "condition"
        )
    per = np.bincount(codes, minlength=len(names))
    if (per == 0).any():
        k = int(np.argmax(per == 0))
        hint = (
            "; drop it with .cat.remove_unused_categories()"
            if source.startswith("the categories")
            else ""
        )
        raise ValueError(f"condition {names[k]!r} has no cells (declared by {source}){hint}")
    return codes, names


# ----------------------------------------------------------------------------- loader


def load_anndata(
    source: str | os.PathLike[str] | ad.AnnData,
    *,
    time_key: str = "time",
    condition_key: str | None = "condition",
    counts_key: str | None = "counts",
    graph_key: str | None = "gene_graph",
    knn: int = DEFAULT_KNN,
) -> Dataset:
    """Validates an AnnData (or an ``.h5ad`` path) and returns GenoFlow's arrays.

    Args:
      source: an ``anndata.AnnData`` or a path to an ``.h5ad`` file.
      time_key: ``obs`` column of the time points: numbers (any spacing; ``time_points`` keep
        the values, ascending) or an ordered categorical (category order is time order;
        ``time_points`` are then ``0.0, 1.0, ...`` and ``time_labels`` the categories). An
        unordered categorical of strings, strings, missing or non-finite values, fewer than 2
        time points or an ordered category with no cells are errors.
      condition_key: ``obs`` column of labels (strings, integers or categorical) or ``obsm``
        key of one-hot rows ``[N, C]`` (``obs`` is read when both exist, with a warning).
        ``uns[f"{condition_key}_names"]``, when present, declares the conditions in code
        order: integer labels are then codes into it (a label ``>= len(names)`` is "out of
        range"), string labels must be among the names, and it names the one-hot columns.
        Without it the conditions are, in code order: the categories of a categorical; the
        sorted integers of integer labels (``0, 2, 5`` → codes ``0, 1, 2``); the sorted
        strings; or the one-hot columns (DataFrame column names, else ``"0", "1", ...``).
        Negative and non-integer numeric labels, empty labels, rows that are not exactly
        one-hot and a declared condition with no cells are errors. ``None`` puts every cell
        in one condition named ``"all"``.
      counts_key: the layer holding raw counts (dense, CSR or CSC); ``None`` reads ``X``. As in
        CFM-VC a missing layer is an error (listing the layers), never a fall-back to ``X``.
      graph_key: ``varp`` key of the gene graph, a ``[G, G]`` matrix (dense or sparse) whose
        nonzero entry ``(i, j)`` is the edge ``i → j``; self loops are dropped, duplicate
        sparse entries summed first. When the key is absent (or ``None``) the graph is
        :func:`gene_graph_knn` of the counts and ``meta["warnings"]`` says so.
      knn: neighbours per gene of that correlation graph (default 8).

    Returns:
      A :class:`jaxstab.plugin.Dataset`: arrays ``x`` (float32 counts ``[N, G]``),
      ``condition`` (int32), ``time`` (int32 index into ``time_points``) and ``library``
      (float32 total count per cell); meta ``n_genes``, ``n_conditions``, ``conditions``,
      ``time_points`` (floats, ascending), ``n_time_points``, ``time_labels`` (strings),
      ``var_names``, ``gene_graph`` (``[2, E]`` int32, source row then target row, sorted,
      no self loops or duplicates), ``gene_graph_source`` (``"varp"`` or ``"knn"``),
      ``warnings`` (sentences, possibly none) and, when ``uns["true_gene_graph"]`` exists
      (simulated data), ``true_gene_graph`` in the same layout.

    Raises:
      ValueError: a missing key (the message lists what is there), bad counts (non-integer,
        negative, non-finite or past float32, named by field, cell and gene), bad time or
        condition labels (named by field and first bad cell), a gene graph that is not
        ``[G, G]`` or holds non-finite values. A file that cannot be read as an ``.h5ad``
        gives a ``ValueError`` (``FileNotFoundError`` when missing) naming the file.
      TypeError: counts, graph or one-hot values that are not real numbers.

    Example:
      >>> adata = simulate(30, 20, n_time_points=3, seed=0)
      >>> data = load_anndata(adata)
      >>> data.arrays["time"][:3], data.meta["gene_graph_source"], data.meta["warnings"]
      (array([0, 0, 0], dtype=int32), 'varp', [])
      >>> del adata.varp["gene_graph"]
      >>> data = load_anndata(adata, knn=4)
      >>> data.meta["gene_graph_source"], "k=4 most correlated" in data.meta["warnings"][0]
      ('knn', True)
    """
    if isinstance(knn, bool) or not isinstance(knn, numbers.Integral) or knn < 1:
        raise ValueError(f"knn must be an integer >= 1, got {knn!r}")
    adata = as_anndata(source)
    counts, field = counts_source(adata, counts_key)
    x = check_counts(adata, counts, field)
    time, time_points, time_labels = _time(adata, time_key)
    warnings: list[str] = []
    condition, conditions = _conditions(adata, condition_key, warnings)

    if graph_key is not None and graph_key in adata.varp:
        graph = _graph_from_matrix(adata, adata.varp[graph_key], f"varp[{graph_key!r}]")
        graph_source = "varp"
        if graph.shape[1] == 0:
            warnings.append(f"varp[{graph_key!r}] has no edges between distinct genes")
    else:
        graph = gene_graph_knn(x, knn)
        graph_source = "knn"
        missing = (
            ""
            if graph_key is None
            else f"varp[{graph_key!r}] is missing (varp keys: "
            f"[{listing(list(adata.varp.keys()))}]); "
        )
        warnings.append(
            f"{missing}the gene graph was built from the absolute Pearson correlation of "
            f"log1p counts over cells: each gene linked to its k={knn} most correlated genes, "
            f"edges in both directions ({graph.shape[1]} edges)"
        )
        constant = np.nonzero(x.max(axis=0) == x.min(axis=0))[0]
        if len(constant):
            warnings.append(
                f"{len(constant)} genes have the same count in every cell and no edges in the "
                f"correlation graph: {listing([str(adata.var_names[j]) for j in constant])}"
            )

    library = x.sum(axis=1, dtype=TRAIN_DTYPE)
    if (library == 0).any():
        i = int(np.argmax(library == 0))
        warnings.append(
            f"{int((library == 0).sum())} cells have no counts at all (the first: "
            f"{cell_name(adata, i)})"
        )
    meta: dict[str, Any] = {
        "n_genes": int(adata.n_vars),
        "n_conditions": len(conditions),
        "conditions": conditions,
        "time_points": time_points,
        "n_time_points": len(time_points),
        "time_labels": time_labels,
        "var_names": [str(v) for v in adata.var_names],
        "gene_graph": graph,
        "gene_graph_source": graph_source,
        "warnings": warnings,
    }
    if "true_gene_graph" in adata.uns:
        meta["true_gene_graph"] = _true_graph(adata)
    arrays = {"x": x, "condition": condition, "time": time, "library": library}
    return Dataset(arrays=arrays, meta=meta)


def default_data(seed: int) -> Dataset:
    """The bundled default data: :func:`simulate` at its default size, loaded.

    5 time points × 300 cells × 200 genes, 2 conditions, the true gene graph in ``varp``.

    Example:
      >>> data = default_data(0)
      >>> data.arrays["x"].shape, data.meta["n_time_points"], data.meta["n_conditions"]
      ((1500, 200), 5, 2)
    """
    return load_anndata(simulate(seed=seed))
