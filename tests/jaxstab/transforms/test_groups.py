"""Group naming and the fused, overflow-safe statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxstab.transforms import _groups


def test_group_names_dict_depth_and_none():
    tree = {"encoder": {"layers": [{"kernel": jnp.ones(2), "bias": jnp.ones(1)}]}, "head": 1.0}
    assert _groups.leaf_group_names(tree, 1) == ["encoder", "encoder", "head"]
    assert _groups.leaf_group_names(tree, 2) == ["encoder/layers", "encoder/layers", "head"]
    assert _groups.leaf_group_names(tree, None) == [
        "encoder/layers/0/bias",
        "encoder/layers/0/kernel",
        "head",
    ]


def test_group_names_from_real_nnx_state(nnx_model):
    state = nnx.state(nnx_model, nnx.Param)
    assert _groups.group_layout(state, 1)[0] == ["encoder", "head"]
    assert _groups.group_layout(state, 2)[0] == ["encoder/layers", "head/bias", "head/kernel"]
    assert _groups.group_layout(state, 3)[0][:2] == ["encoder/layers/0", "encoder/layers/1"]
    full = _groups.leaf_group_names(state, None)
    assert "encoder/layers/0/kernel" in full and "head/bias" in full
    assert not any(name.endswith("value") for name in full)


def test_group_names_namedtuple_attrs():
    state = optax.ScaleByAdamState(count=jnp.zeros(()), mu={"a": 1.0}, nu={"a": 2.0})
    assert _groups.leaf_group_names(state, 1) == ["count", "mu", "nu"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_group_depth_validation(bad):
    with pytest.raises(ValueError, match="group_depth"):
        _groups.check_group_depth(bad)


def _np_stats(leaves):
    out = []
    for x in leaves:
        x = np.asarray(x, np.float64).ravel()
        fin = np.isfinite(x)
        out.append(
            (
                np.sqrt(np.sum(x[fin] ** 2)),
                np.max(np.abs(x[fin]), initial=0.0),
                int(np.isnan(x).sum()),
                int(np.isinf(x).sum()),
                int((x == 0).sum()),
            )
        )
    return out


# Fixed shapes (3 leaves of 8) so that the eager kernels compile once. No subnormals:
# XLA on CPU flushes them to zero.
_entry = st.one_of(
    st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    st.sampled_from([0.0, np.nan, np.inf, -np.inf]),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(_entry, min_size=8, max_size=8), min_size=3, max_size=3))
def test_tree_stats_match_numpy(values):
    leaves = [jnp.asarray(v, jnp.float32) for v in values]
    ts = _groups.tree_stats(leaves)
    for i, (norm, mx, nan, inf, zeros) in enumerate(_np_stats(values)):
        np.testing.assert_allclose(
            float(_groups.combined_norm(ts, [i])), norm, rtol=1e-5, atol=1e-30
        )
        np.testing.assert_allclose(float(ts.max_abs[i]), mx, rtol=1e-6)
        assert (int(ts.nan[i]), int(ts.inf[i]), int(ts.zeros[i])) == (nan, inf, zeros)
        assert int(ts.size[i]) == len(values[i])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_300_does_not_overflow(dtype):
    g = {"a": jnp.full((64,), 300.0, dtype), "b": jnp.full((3, 5), -300.0, dtype)}
    ref = np.sqrt(79 * 300.0**2)
    norm = _groups.global_norm(_groups.tree_stats(g))
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), ref, rtol=1e-6)
    if dtype == jnp.float16:
        assert not np.isfinite(float(optax.tree.norm(g)))  # optax's float16 sum overflows


def test_float32_overflow_path_rescales():
    # 1e30**2 overflows float32: the rescaled path must give the float64 answer.
    x = np.array([1e30, -2e30, 3.0, 0.0], np.float32)
    y = np.array([5e29], np.float32)
    ts = _groups.tree_stats([jnp.asarray(x), jnp.asarray(y)])
    ref = np.sqrt(np.sum(x.astype(np.float64) ** 2) + np.sum(y.astype(np.float64) ** 2))
    np.testing.assert_allclose(float(_groups.global_norm(ts)), ref, rtol=1e-6)
    np.testing.assert_allclose(float(_groups.combined_norm(ts, [1])), 5e29, rtol=1e-6)


def test_bfloat16_huge_values():
    x = jnp.asarray([1e25, -1e25], jnp.bfloat16)
    ref = np.sqrt(2) * float(x[0].astype(jnp.float32))
    np.testing.assert_allclose(float(_groups.global_norm(_groups.tree_stats(x))), ref, rtol=1e-6)


def test_empty_and_zero_size_leaves():
    assert float(_groups.global_norm(_groups.tree_stats({}))) == 0.0
    ts = _groups.tree_stats({"a": jnp.zeros((0, 3)), "b": jnp.array([3.0, 4.0])})
    assert float(_groups.global_norm(ts)) == 5.0
    assert int(ts.size[0]) == 0


def test_stats_under_jit_match_eager():
    g = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([jnp.nan, 1.0])}
    eager = _groups.tree_stats(g)
    jitted = jax.jit(_groups.tree_stats)(g)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
