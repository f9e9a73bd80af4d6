"""GenoFlow data: the branching simulator, the validated loader and the kNN gene graph."""

from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxstab.models.genoflow import data as data_mod
from jaxstab.models.genoflow.data import default_data, gene_graph_knn, load_anndata, simulate

FORMATS = {"dense": np.asarray, "csr": sp.csr_matrix, "csc": sp.csc_matrix}
META_KEYS = {
    "n_genes",
    "n_conditions",
    "conditions",
    "time_points",
    "n_time_points",
    "time_labels",
    "var_names",
    "gene_graph",
    "gene_graph_source",
    "warnings",
    "true_gene_graph",
}


@pytest.fixture(scope="module")
def adata():
    return simulate(40, 30, n_time_points=4, seed=0)


@pytest.fixture(scope="module")
def big():
    return simulate(seed=0)  # the default size: 5 time points × 300 cells × 200 genes


def with_counts(adata, counts, key: str | None = "counts"):
    b = adata.copy()
    if key is None:
        b.X = counts
        del b.layers["counts"]
    else:
        b.layers[key] = counts
    return b


def assert_same(a, b):
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        assert a.arrays[k].dtype == b.arrays[k].dtype, k
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)
    np.testing.assert_array_equal(a.meta["gene_graph"], b.meta["gene_graph"])
    for k in ("conditions", "time_points", "time_labels", "var_names", "gene_graph_source"):
        assert a.meta[k] == b.meta[k], k


def error(adata, match: str, **kw):
    with pytest.raises(ValueError, match=re.escape(match)):
        load_anndata(adata, **kw)


# ----------------------------------------------------------------------------- simulate → load


def test_contract(adata):
    data = load_anndata(adata)
    a, m = data.arrays, data.meta
    assert set(a) == {"x", "condition", "time", "library"} and set(m) == META_KEYS
    assert a["x"].shape == (160, 30) and a["x"].dtype == np.float32
    for k in ("condition", "time"):
        assert a[k].shape == (160,) and a[k].dtype == np.int32
    assert a["library"].shape == (160,) and a["library"].dtype == np.float32
    np.testing.assert_array_equal(a["x"], adata.layers["counts"])
    np.testing.assert_array_equal(a["library"], adata.layers["counts"].astype(float).sum(1))
    assert m["n_genes"] == 30 and m["var_names"] == list(adata.var_names)
    assert m["time_points"] == [0.0, 1.0, 2.0, 3.0] and m["n_time_points"] == 4
    assert m["time_labels"] == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(a["time"], adata.obs["time"].to_numpy())
    assert m["conditions"] == ["cond_0", "cond_1"] and m["n_conditions"] == 2
    labels = np.array(m["conditions"])[a["condition"]]
    np.testing.assert_array_equal(labels, adata.obs["condition"].astype(str).to_numpy())
    for t in range(4):  # every condition at every time point
        assert set(a["condition"][a["time"] == t]) == {0, 1}
    g = m["gene_graph"]
    assert g.dtype == np.int32 and g.shape[0] == 2 and g.shape[1] > 0
    assert m["gene_graph_source"] == "varp" and m["warnings"] == []
    np.testing.assert_array_equal(g, m["true_gene_graph"])
    np.testing.assert_array_equal(np.stack(adata.varp["gene_graph"].nonzero()), g)
    roles = adata.var["role"].to_numpy()
    assert set(roles[g[0]]) == {"regulator"} and set(roles[g[1]]) == {"target"}


def test_determinism():
    a, b, c = simulate(20, 15, seed=3), simulate(20, 15, seed=3), simulate(20, 15, seed=4)
    np.testing.assert_array_equal(a.layers["counts"], b.layers["counts"])
    np.testing.assert_array_equal(a.obsm["true_state"], b.obsm["true_state"])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert (a.varp["gene_graph"] != b.varp["gene_graph"]).nnz == 0
    assert not np.array_equal(a.layers["counts"], c.layers["counts"])
    assert not np.array_equal(a.uns["true_gene_graph"], c.uns["true_gene_graph"])


def test_branching(big):
    z = big.obsm["true_state"]
    t = big.obs["time"].to_numpy()
    branch = big.obs["branch"].astype(str).to_numpy()
    assert set(branch[t == 0]) == {"trunk"} and "trunk" not in set(branch[t == 4])
    assert z[t == 4, 2].std() > 10 * z[t == 0, 2].std()
    last = t == 4
    a, b = z[last & (branch == "A"), 2], z[last & (branch == "B"), 2]
    assert a.min() > 1.5 and b.max() < -1.5  # two clusters, far apart
    cond = big.obs["condition"].astype(str).to_numpy()
    frac_a = [np.mean(branch[last & (cond == c)] == "A") for c in ("cond_0", "cond_1")]
    assert frac_a[0] > 0.65 and frac_a[1] < 0.35  # the condition picks the branch
    # cond_1 moves faster: further along the trunk coordinate at the same time point
    mid = t == 2
    assert z[mid & (cond == "cond_1"), 0].mean() > z[mid & (cond == "cond_0"), 0].mean() + 0.15


def test_dynamics_are_nonlinear_in_time(big):
    """The middle time point is not the average of its neighbours (linear interpolation)."""
    z = big.obsm["true_state"]
    t = big.obs["time"].to_numpy()
    c0 = (big.obs["condition"] == "cond_0").to_numpy()
    for k in (1, 2, 3):
        mean = [z[(t == j) & c0, :2].mean(0) for j in (k - 1, k, k + 1)]
        assert np.linalg.norm(mean[1] - (mean[0] + mean[2]) / 2) > 0.15, k


def test_true_edges_carry_correlation(big):
    x = np.log1p(big.layers["counts"])
    corr = np.abs(np.corrcoef(x.T))
    edges = big.uns["true_gene_graph"]
    roles = big.var["role"].to_numpy()
    reg, tgt = np.nonzero(roles == "regulator")[0], np.nonzero(roles == "target")[0]
    adj = np.zeros(corr.shape, bool)
    adj[edges[0], edges[1]] = True
    block, linked = corr[np.ix_(reg, tgt)], adj[np.ix_(reg, tgt)]
    assert block[linked].mean() > block[~linked].mean() + 0.05


def test_counts_are_nb_like(big):
    x = big.layers["counts"]
    assert x.dtype == np.float32 and np.all(x == np.floor(x)) and x.min() >= 0
    assert big.X is None
    mean, var = x.mean(0), x.var(0)
    assert np.median(var / np.maximum(mean, 1e-9)) > 1.5  # over-dispersed, not Poisson


def test_default_data_is_fast():
    t0 = time.perf_counter()
    data = default_data(0)
    elapsed = time.perf_counter() - t0
    assert data.arrays["x"].shape == (1500, 200) and data.meta["n_time_points"] == 5
    assert data.meta["n_conditions"] == 2 and data.meta["gene_graph_source"] == "varp"
    assert elapsed < 3.0  # well under a second when the machine is not busy
    np.testing.assert_array_equal(default_data(0).arrays["x"], data.arrays["x"])


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_matches_dense(adata, fmt):
    dense = load_anndata(adata)
    assert_same(load_anndata(with_counts(adata, FORMATS[fmt](adata.layers["counts"]))), dense)
    del_graph = adata.copy()
    del del_graph.varp["gene_graph"]  # the kNN graph too
    sparse = with_counts(del_graph, FORMATS[fmt](adata.layers["counts"]))
    assert_same(load_anndata(sparse), load_anndata(del_graph))


def test_x_matches_layer(adata):
    b = with_counts(adata, sp.csr_matrix(adata.layers["counts"]), key=None)
    assert_same(load_anndata(b, counts_key=None), load_anndata(adata))
    error(b, "layers['counts'] is missing; layers present: []; counts_key=None reads X")


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(
    ("value", "what"),
    [
        (2.5, "a non-integer value"),
        (-1.0, "a negative value"),
        (np.nan, "a non-finite value"),
        (np.inf, "a non-finite value"),
    ],
)
def test_bad_count_names_field_and_first_cell(adata, fmt, value, what):
    x = np.array(adata.layers["counts"], np.float64)
    x[[57, 90], [4, 2]] = value
    for key, field in (("counts", "layers['counts']"), (None, "X")):
        b = with_counts(adata, FORMATS[fmt](x), key)
        error(b, f"{field} has {what} at cell 57 ('cell_57'), gene 4 ('gene_4')", counts_key=key)


# ----------------------------------------------------------------------------- time


def test_nan_time(adata):
    b = adata.copy()
    b.obs["time"] = b.obs["time"].astype(float)
    b.obs.iloc[[33, 70], b.obs.columns.get_loc("time")] = np.nan
    error(b, "obs['time'] has a non-finite time at cell 33 ('cell_33')")
    b.obs["time"] = b.obs["time"].fillna(np.inf)
    error(b, "obs['time'] has a non-finite time at cell 33")


def test_single_time_point(adata):
    b = adata[adata.obs["time"] == 2].copy()
    error(b, "obs['time'] has a single time point (2); GenoFlow needs >= 2")
    b.obs["time"] = pd.Categorical(["day1"] * b.n_obs, categories=["day1"], ordered=True)
    error(b, "obs['time'] has a single time point ('day1')")


def test_ordered_categorical_time(adata):
    b = adata.copy()
    labels = np.array(["late", "early", "mid", "end"])  # category order != alphabetical
    order = ["early", "mid", "late", "end"]
    b.obs["time"] = pd.Categorical(labels[b.obs["time"].to_numpy()], categories=order, ordered=True)
    data = load_anndata(b)
    assert data.meta["time_points"] == [0.0, 1.0, 2.0, 3.0] and data.meta["time_labels"] == order
    expected = [order.index(s) for s in labels[adata.obs["time"].to_numpy()]]
    np.testing.assert_array_equal(data.arrays["time"], expected)


def test_unordered_or_string_time_is_refused(adata):
    b = adata.copy()
    b.obs["time"] = pd.Categorical(np.array(["d0", "d1", "d2", "d3"])[b.obs["time"]])
    error(b, "obs['time'] is an unordered categorical (d0, d1, d2, d3); time needs an order")
    b.obs["time"] = b.obs["time"].astype(str)
    error(b, "obs['time'] holds non-numeric values")


def test_unordered_numeric_categorical_time_is_numeric(adata):
    b = adata.copy()
    b.obs["time"] = pd.Categorical(b.obs["time"] * 10)
    assert load_anndata(b).meta["time_points"] == [0.0, 10.0, 20.0, 30.0]


def test_unused_ordered_time_point(adata):
    b = adata.copy()
    b.obs["time"] = pd.Categorical(
        np.array(["a", "b", "d", "e"])[b.obs["time"]], categories=list("abcde"), ordered=True
    )
    error(b, "obs['time']: time point 'c' (category 2 of the ordered categorical) has no cells")


def test_uneven_float_times(adata):
    b = adata.copy()
    real = np.array([0.0, 0.5, 2.0, 7.25])
    b.obs["time"] = real[b.obs["time"].to_numpy()][::-1].copy()  # not sorted in obs
    data = load_anndata(b)
    assert data.meta["time_points"] == [0.0, 0.5, 2.0, 7.25]
    assert data.meta["time_labels"] == ["0", "0.5", "2", "7.25"]
    np.testing.assert_array_equal(real[data.arrays["time"]], b.obs["time"].to_numpy())


# ----------------------------------------------------------------------------- condition


def one_hot_adata(adata, names=None):
    b = adata.copy()
    codes = b.obs["condition"].cat.codes.to_numpy()
    del b.obs["condition"]
    b.obsm["condition"] = np.eye(2, dtype=np.float32)[codes]
    if names is not None:
        b.uns["condition_names"] = names
    return b, codes


def test_one_hot_conditions(adata):
    b, codes = one_hot_adata(adata)
    data = load_anndata(b)
    assert data.meta["conditions"] == ["0", "1"]
    np.testing.assert_array_equal(data.arrays["condition"], codes)
    b, _ = one_hot_adata(adata, names=["ctrl", "drug"])
    assert load_anndata(b).meta["conditions"] == ["ctrl", "drug"]
    b.obsm["condition"] = pd.DataFrame(b.obsm["condition"], index=b.obs_names, columns=["x", "y"])
    del b.uns["condition_names"]
    assert load_anndata(b).meta["conditions"] == ["x", "y"]


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ([1, 1], "the row has 2 ones"),
        ([0, 0], "the row has 0 ones"),
        ([0.5, 0.5], "the row has the value 0.5 in column 0"),
    ],
)
def test_one_hot_row_is_checked(adata, row, what):
    b, _ = one_hot_adata(adata)
    m = b.obsm["condition"].copy()
    m[[21, 99]] = row
    b.obsm["condition"] = m
    error(b, f"obsm['condition'] is not one-hot at cell 21 ('cell_21'): {what}")


def test_one_hot_names_and_shape_checked(adata):
    b, _ = one_hot_adata(adata, names=["a", "b", "c"])
    error(b, "uns['condition_names'] names 3 conditions but obsm['condition'] has 2 columns")
    b, _ = one_hot_adata(adata)
    b.obsm["condition"] = np.tile(np.array([1.0, 0.0], np.float32), (b.n_obs, 1))
    error(b, "condition '1' has no cells (declared by the columns of obsm['condition'])")
    # AnnData refuses a mis-shaped obsm; the loader's own check guards other callers.
    with pytest.raises(ValueError, match=re.escape("obsm['condition'] has shape (159, 2)")):
        data_mod._one_hot(adata, np.eye(2)[np.zeros(159, int)], "condition", None)


def int_labels(adata, labels, names=None):
    b = adata.copy()
    b.obs["condition"] = np.asarray(labels, np.int64)
    if names is not None:
        b.uns["condition_names"] = names
    return b


def test_integer_labels(adata):
    codes = adata.obs["condition"].cat.codes.to_numpy()
    data = load_anndata(int_labels(adata, codes * 3 + 2))  # labels 2 and 5
    assert data.meta["conditions"] == ["2", "5"]
    np.testing.assert_array_equal(data.arrays["condition"], codes)
    data = load_anndata(int_labels(adata, codes, names=["wt", "ko"]))
    assert data.meta["conditions"] == ["wt", "ko"]
    np.testing.assert_array_equal(data.arrays["condition"], codes)


def test_integer_label_out_of_range(adata):
    labels = adata.obs["condition"].cat.codes.to_numpy().copy()
    labels[[44, 120]] = 2
    error(
        int_labels(adata, labels, names=["wt", "ko"]),
        "obs['condition'] label out of range at cell 44 ('cell_44'): label 2, but "
        "uns['condition_names'] declares 2 conditions",
    )


def test_negative_label(adata):
    labels = adata.obs["condition"].cat.codes.to_numpy().copy()
    labels[[5, 6]] = -1
    for names in (None, ["wt", "ko"]):
        error(
            int_labels(adata, labels, names),
            "obs['condition'] has a negative label at cell 5 ('cell_5'): -1",
        )


def test_declared_condition_without_cells(adata):
    codes = adata.obs["condition"].cat.codes.to_numpy()
    error(
        int_labels(adata, codes, names=["wt", "ko", "het"]),
        "condition 'het' has no cells (declared by uns['condition_names'])",
    )
    b = adata.copy()
    b.obs["condition"] = b.obs["condition"].cat.add_categories(["cond_9"])
    error(b, "condition 'cond_9' has no cells (declared by the categories of obs['condition'])")
    b.obs["condition"] = b.obs["condition"].astype(str)
    b.uns["condition_names"] = ["cond_0", "cond_1", "cond_9"]
    error(b, "condition 'cond_9' has no cells")


def test_string_labels(adata):
    b = adata.copy()
    b.obs["condition"] = b.obs["condition"].astype(str).str.replace("cond_", "z")
    assert load_anndata(b).meta["conditions"] == ["z0", "z1"]
    b.uns["condition_names"] = ["z1", "z0"]
    data = load_anndata(b)
    assert data.meta["conditions"] == ["z1", "z0"]
    np.testing.assert_array_equal(data.arrays["condition"], 1 - adata.obs["condition"].cat.codes)
    b.uns["condition_names"] = ["z1", "z2"]
    i = int(np.argmax(b.obs["condition"].to_numpy() == "z0"))
    error(b, f"obs['condition'] has the label 'z0' at cell {i} ('cell_{i}'), which is not one of")
    b.obs.iloc[3, b.obs.columns.get_loc("condition")] = ""
    error(b, "obs['condition'] has an empty label at cell 3 ('cell_3')")


def test_no_condition_key(adata):
    data = load_anndata(adata, condition_key=None)
    assert data.meta["conditions"] == ["all"] and not data.arrays["condition"].any()


def test_obs_wins_over_obsm_with_a_warning(adata):
    b = adata.copy()
    b.obsm["condition"] = np.eye(2)[1 - b.obs["condition"].cat.codes.to_numpy()]
    data = load_anndata(b)
    np.testing.assert_array_equal(data.arrays["condition"], adata.obs["condition"].cat.codes)
    assert any("both obs['condition'] and obsm['condition']" in w for w in data.meta["warnings"])


@pytest.mark.parametrize(
    ("key", "kw"), [("time", {}), ("condition", {}), ("day", {"time_key": "day"})]
)
def test_missing_obs_key(adata, key, kw):
    b = adata.copy()
    if key in b.obs:
        del b.obs[key]
    with pytest.raises(ValueError) as err:
        load_anndata(b, **kw)
    msg = str(err.value)
    assert f"obs[{key!r}]" in msg and "missing" in msg
    assert "branch" in msg and "true_progress" in msg  # lists the columns that are there


# ----------------------------------------------------------------------------- gene graph


def test_varp_graph_canonicalised(adata):
    b = adata.copy()
    g = b.n_vars
    rows = np.array([3, 3, 3, 7, 7, 5, 0])
    cols = np.array([4, 4, 3, 1, 2, 5, 9])  # a duplicate (3, 4) and self loops 3→3, 5→5
    vals = np.array([1.0, 2.0, 1.0, 0.5, 0.0, 1.0, -1.0])  # 7→2 stored but zero: no edge
    b.varp["gene_graph"] = sp.coo_matrix((vals, (rows, cols)), shape=(g, g)).tocsr()
    expected = [[0, 3, 7], [9, 4, 1]]
    np.testing.assert_array_equal(load_anndata(b).meta["gene_graph"], expected)
    dense = np.zeros((g, g))
    dense[rows, cols] = vals
    b.varp["gene_graph"] = dense
    np.testing.assert_array_equal(load_anndata(b).meta["gene_graph"], expected)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_varp_graph_non_finite(adata, fmt):
    b = adata.copy()
    m = np.zeros((30, 30))
    m[[2, 8], [6, 1]] = [np.nan, np.inf]
    b.varp["gene_graph"] = FORMATS[fmt](m)
    error(b, "varp['gene_graph'] has a non-finite value at gene 2 ('gene_2') → gene 6 ('gene_6')")


def test_varp_graph_shape(adata):
    # AnnData refuses a mis-shaped varp; the loader's own check guards other callers.
    with pytest.raises(
        ValueError, match=re.escape("varp['g'] has shape (30, 29); expected (30, 30)")
    ):
        data_mod._graph_from_matrix(adata, np.zeros((30, 29)), "varp['g']")


def planted(n_cells=300, seed=0):
    """Counts where gene 0 ~ gene 1 and gene 2 ~ gene 3 (strongly), gene 6 is constant."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(2.0, 2.0, size=(n_cells, 20))).astype(np.float32)
    a, b = rng.poisson(8.0, (n_cells, 1)), rng.poisson(8.0, (n_cells, 1))
    x[:, [0]] = a
    x[:, [1]] = a + rng.poisson(0.5, (n_cells, 1))
    x[:, [2]] = b
    x[:, [3]] = 30 - b.clip(0, 30)  # anti-correlated: |r| counts
    x[:, 6] = 4.0
    return x


@pytest.mark.parametrize("k", [1, 3, 8])
def test_knn_graph(k):
    x = planted()
    edges = gene_graph_knn(x, k=k)
    assert edges.dtype == np.int32 and edges.shape[0] == 2
    src, dst = edges
    pairs = set(zip(src.tolist(), dst.tolist(), strict=True))
    assert len(pairs) == edges.shape[1]  # no duplicates
    assert all(s != d for s, d in pairs)  # no self loops
    assert pairs == {(d, s) for s, d in pairs}  # symmetric
    assert {(0, 1), (1, 0), (2, 3), (3, 2)} <= pairs  # the planted pairs
    assert 6 not in set(src) | set(dst)  # the constant gene: no edges, no NaN
    out = np.bincount(src, minlength=20)
    assert (np.delete(out, 6) >= k).all()
    order = np.lexsort((dst, src))
    np.testing.assert_array_equal(order, np.arange(len(src)))  # sorted by source, target
    np.testing.assert_array_equal(gene_graph_knn(sp.csr_matrix(x), k=k), edges)


def test_knn_ties_and_small_cases():
    x = np.zeros((10, 4))
    x[:, 0] = np.arange(10)
    x[:, 1] = x[:, 2] = x[:, 3] = np.arange(10) ** 2  # 1, 2, 3 tie with each other
    expected = [[0, 1, 1, 1, 2, 3], [1, 0, 2, 3, 1, 1]]  # ties go to the lower index
    np.testing.assert_array_equal(gene_graph_knn(x, k=1), expected)
    assert gene_graph_knn(np.ones((5, 3)), k=2).shape == (2, 0)  # all constant
    assert gene_graph_knn(x, k=50).shape[1] == 12  # k clipped: complete graph on 4 genes
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        gene_graph_knn(x, k=0)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="cell 2, gene 1 has value nan"):
        gene_graph_knn(x)


def test_loader_builds_knn_graph_without_varp(adata):
    b = adata.copy()
    del b.varp["gene_graph"]
    counts = b.layers["counts"].copy()
    counts[:, 7] = 0  # a gene never detected
    b.layers["counts"] = counts
    data = load_anndata(b, knn=5)
    np.testing.assert_array_equal(data.meta["gene_graph"], gene_graph_knn(b.layers["counts"], 5))
    assert data.meta["gene_graph_source"] == "knn"
    warns = data.meta["warnings"]
    assert "varp['gene_graph'] is missing" in warns[0] and "k=5 most correlated" in warns[0]
    assert "no edges in the correlation graph: " in warns[1] and "gene_7" in warns[1]
    assert load_anndata(adata, graph_key=None).meta["gene_graph_source"] == "knn"
    with pytest.raises(ValueError, match="knn must be an integer >= 1"):
        load_anndata(adata, knn=0)


# ----------------------------------------------------------------------------- files


def test_h5ad_round_trip(adata, tmp_path):
    b = with_counts(adata, sp.csr_matrix(adata.layers["counts"]))
    path = tmp_path / "cells.h5ad"
    b.write_h5ad(path)
    from_file = load_anndata(path)
    assert_same(from_file, load_anndata(adata))
    np.testing.assert_array_equal(from_file.meta["true_gene_graph"], from_file.meta["gene_graph"])
    c = b.copy()
    order = ["t0", "t1", "t2", "t3"]
    c.obs["time"] = pd.Categorical(np.array(order)[c.obs["time"]], categories=order, ordered=True)
    c.write_h5ad(path)
    assert load_anndata(str(path)).meta["time_labels"] == order


def test_callers_anndata_is_not_modified(adata):
    b = with_counts(adata, sp.csr_matrix(adata.layers["counts"]))
    before = b.copy()
    load_anndata(b)
    assert (b.layers["counts"] != before.layers["counts"]).nnz == 0
    pd.testing.assert_frame_equal(b.obs, before.obs)
