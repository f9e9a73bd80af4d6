"""GenoFlow model pieces: GATv2, attention scale, adversarial split, losses, trajectories."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.stats import nbinom

from jaxstab import numerics as jn
from jaxstab.models.genoflow.config import GenoFlowConfig
from jaxstab.models.genoflow.losses import kl_original, nb_log_likelihood, vae_terms
from jaxstab.models.genoflow.model import GenoFlow, segment_softmax, with_self_loops
from jaxstab.models.genoflow.train import optimizer
from jaxstab.models.genoflow.trajectory import (
    condition_codes,
    integrate_latent,
    simulate_trajectory,
)

SMALL = GenoFlowConfig.small()
G, C = 10, 3
GRAPH = np.array([[0, 1, 2, 3, 3, 5], [1, 2, 0, 4, 1, 5]])  # gene 6.. have no in-edges


def _model(config=SMALL, **kw):
    return GenoFlow(G, C, GRAPH, config, rngs=nnx.Rngs(0), conditions=["a", "b", "c"], **kw)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(4.0, (n, G)).astype(np.float32)
    return {"x": x, "condition": np.arange(n) % C, "library": x.sum(1)}


def test_self_loops_replace_existing_ones_and_cover_every_gene():
    edges = with_self_loops(GRAPH, G)
    assert (edges[0] == edges[1]).sum() == G  # gene 5's own loop is kept once
    assert set(edges[1].tolist()) == set(range(G))
    with pytest.raises(ValueError, match="outside"):
        with_self_loops(np.array([[0], [G]]), G)


def test_segment_softmax_normalises_each_target_and_is_shift_safe():
    logits = jnp.array([1000.0, 1001.0, -5.0, 3.0])
    seg = jnp.array([0, 0, 1, 2])
    p = segment_softmax(logits, seg, 3)
    np.testing.assert_allclose(np.asarray(jax.ops.segment_sum(p, seg, 3)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(p[1] / p[0]), np.e, rtol=1e-5)


def test_gatv2_matches_the_formula_edge_by_edge():
    model = _model()
    model.eval()
    gat, x = model.vector_field.gat, model.vector_field.gene_embeddings[...]
    out = np.asarray(model.vector_field.gene_features())
    edges = np.asarray(model.vector_field.edge_index[...])
    h, d = SMALL.gat_heads, SMALL.gene_dim
    xl = np.asarray(gat.lin_l(x)).reshape(G, h, d)
    xr = np.asarray(gat.lin_r(x)).reshape(G, h, d)
    att = np.asarray(gat.att[...])[0]
    for i in range(G):
        src = edges[0, edges[1] == i]
        e = xl[src] + xr[i]
        e = np.where(e > 0, e, 0.2 * e)
        score = (e * att).sum(-1)  # [n_in, heads]
        w = np.exp(score - score.max(0)) / np.exp(score - score.max(0)).sum(0)
        want = (w[..., None] * xl[src]).sum(0).reshape(-1) + np.asarray(gat.bias[...])
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-6)


def test_cross_attention_scales_by_the_query_size_not_the_gene_count():
    model = _model()
    model.eval()
    vf = model.vector_field
    z = jax.random.normal(jax.random.key(1), (4, SMALL.latent_dim))
    genes = vf.gene_features()
    q = vf.query_proj(z)
    width = SMALL.gene_dim * SMALL.gat_heads
    assert q.shape[-1] == width and genes.shape[0] == G != width
    context = jax.nn.softmax(q @ genes.T / np.sqrt(width), axis=-1) @ genes
    got = jn.dot_product_attention(q[None, :, None], genes[None, :, None], genes[None, :, None])
    # An absolute floor at 1e-6 of the largest entry: entries near zero differ by float32
    # rounding between the fused and the spelled-out softmax.
    floor = 1e-6 * float(np.abs(np.asarray(context)).max())
    np.testing.assert_allclose(np.asarray(got[0, :, 0]), np.asarray(context), rtol=1e-5, atol=floor)
    wrong = jax.nn.softmax(q @ genes.T / np.sqrt(G), axis=-1) @ genes
    assert not np.allclose(np.asarray(context), np.asarray(wrong), rtol=1e-3)


def test_adversarial_terms_reach_only_their_own_side():
    model = _model(SMALL.replace(disc_dropout=0.0))
    batch = _batch()
    eps = jnp.zeros((8, SMALL.latent_dim))

    def part(m, name):
        _loss, aux = vae_terms(m, batch, eps)
        return aux[name] if name != "entropy" else aux["vae_total"] - aux["recon"] - aux["kl"]

    g_ce = nnx.jit(nnx.grad(lambda m: part(m, "disc_ce")))(model)
    g_h = nnx.jit(nnx.grad(lambda m: part(m, "entropy")))(model)

    def norm(tree):
        return float(optax.tree.norm(jax.tree.leaves(tree)))

    assert norm(g_ce["discriminator"]) > 0 and norm(g_ce["encoder"]) == 0.0
    assert norm(g_h["encoder"]) > 0 and norm(g_h["discriminator"]) == 0.0
    assert norm(g_h["decoder"]) == 0.0 and norm(g_ce["vector_field"]) == 0.0


def test_discriminator_steps_are_adam_at_half_the_learning_rate():
    model = _model()
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(
        lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params
    )
    tx, ref_full, ref_half = optimizer(SMALL), optax.adam(SMALL.lr), optax.adam(SMALL.lr / 2)

    @jax.jit
    def three_steps(params, grads):
        s, s1, s2 = tx.init(params), ref_full.init(params), ref_half.init(params)
        for _ in range(3):
            u, s = tx.update(grads, s, params)
            u1, s1 = ref_full.update(grads, s1, params)
            u2, s2 = ref_half.update(grads, s2, params)
        return u, u1, u2

    u, u1, u2 = three_steps(params, grads)
    for group, ref in (("discriminator", u2), ("encoder", u1), ("vector_field", u1)):
        for a, b in zip(jax.tree.leaves(u[group]), jax.tree.leaves(ref[group]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_original_losses_match_the_safe_ones_inside_their_bounds_only():
    x = jnp.array([0.0, 3.0, 40.0])
    mean, theta = jnp.array([0.5, 2.0, 30.0]), jnp.array([1.0, 5.0, 50.0])
    # Against scipy in float64: the safe form to float32 rounding, the original's lgamma
    # formula within what its float32 cancellation loses (1e-5 relative at x = 40).
    x64, m64, t64 = (np.asarray(a, np.float64) for a in (x, mean, theta))
    ref = nbinom.logpmf(x64, t64, t64 / (t64 + m64))
    np.testing.assert_allclose(
        np.asarray(nb_log_likelihood(x, mean, theta, "safe")), ref, rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(nb_log_likelihood(x, mean, theta, "original")), ref, rtol=3e-5
    )
    mu, lv = jnp.array([[0.3, -1.0]]), jnp.array([[0.2, -0.5]])
    np.testing.assert_allclose(
        float(kl_original(mu, lv)[0]), float(jn.gaussian_kl(mu, lv)[0]), 1e-6
    )
    # Beyond the clamps the original's value is wrong and its gradient is exactly zero.
    big = jnp.array([[0.0, 30.0]])
    assert float(jax.grad(lambda v: kl_original(jnp.zeros((1, 2)), v).sum())(big)[0, 1]) == 0.0
    assert float(jax.grad(lambda v: jn.gaussian_kl(jnp.zeros((1, 2)), v).sum())(big)[0, 1]) > 0.0
    # At mean 0 the original's 1e-8 guards are finite; the exact log-likelihood of x = 0 is 0.
    assert float(nb_log_likelihood(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), "safe")[0]) == 0.0


def test_interval_time_reads_the_time_within_each_interval():
    model = _model(SMALL.replace(flow_time="interval"), time_points=[0, 2, 3, 7])
    model.eval()
    z = jax.random.normal(jax.random.key(2), (3, SMALL.latent_dim))
    c = jnp.zeros(3, int)
    vf = model.vector_field
    np.testing.assert_allclose(model.velocity(1.25, z, c), vf(0.25, z, c), rtol=1e-6)
    np.testing.assert_allclose(model.velocity(3.0, z, c), vf(1.0, z, c), rtol=1e-6)
    np.testing.assert_allclose(model.velocity(1.0, z, c), vf(1.0, z, c), rtol=1e-6)  # an end
    np.testing.assert_allclose(model.velocity(0.0, z, c), vf(0.0, z, c), rtol=1e-6)
    assert model.flow_times() == (0.0, 1.0, 2.0, 3.0)
    glob = _model(time_points=[0, 2, 3, 7])
    np.testing.assert_allclose(glob.flow_times(), [0, 2 / 7, 3 / 7, 1.0])


def test_condition_labels_out_of_range_or_unknown_raise():
    model = _model()
    assert condition_codes(model, ["c", 0, "b"], 3).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="code 3 out of range"):
        condition_codes(model, 3, 2)
    with pytest.raises(ValueError, match="code -1 out of range"):
        condition_codes(model, [0, -1], 2)
    with pytest.raises(ValueError, match="unknown label 'd'"):
        condition_codes(model, "d", 2)
    with pytest.raises(ValueError, match="expected one value or 2"):
        condition_codes(model, [0, 1, 2], 2)


def test_trajectory_starts_at_the_encoding_and_matches_a_fine_euler_solution():
    model = _model()
    x0 = _batch(4)["x"]
    out = simulate_trajectory(model, x0, "b", n_save=6)
    work = nnx.merge(*nnx.split(model))
    work.eval()
    codes = jnp.ones(4, jnp.int32)
    z0 = work.encode_mean(jnp.asarray(x0), codes)
    np.testing.assert_allclose(np.asarray(out.latent[0]), np.asarray(z0), rtol=1e-6)
    n = 4000
    graphdef, state = nnx.split(work)

    def euler(z, k):
        return z + (1.0 / n) * nnx.merge(graphdef, state).velocity(k / n, z, codes), None

    z, _ = jax.lax.scan(euler, z0, jnp.arange(n))
    np.testing.assert_allclose(np.asarray(out.latent[-1]), np.asarray(z), atol=2e-3)
    assert out.expression.shape == (6, 4, G)
    np.testing.assert_allclose(np.asarray(out.expression.sum(-1)), SMALL.library_size, rtol=1e-4)
    # Labels and codes are the same request; the caller's model stays in its own mode.
    same = simulate_trajectory(model, x0, 1, n_save=6)
    np.testing.assert_array_equal(np.asarray(same.latent), np.asarray(out.latent))
    assert model.vector_field.drop_2.deterministic is not True


def test_trajectory_gradient_only_with_grad():
    model = _model()
    x0 = _batch(3)["x"]

    def end(m, with_grad):
        return jnp.sum(simulate_trajectory(m, x0, 0, n_save=3, with_grad=with_grad).latent[-1])

    g_on = nnx.jit(nnx.grad(lambda m: end(m, True)))(model)
    g_off = nnx.jit(nnx.grad(lambda m: end(m, False)))(model)
    on = float(optax.tree.norm(jax.tree.leaves(g_on["vector_field"])))
    off = float(optax.tree.norm(jax.tree.leaves(g_off)))
    assert np.isfinite(on) and on > 0 and off == 0.0


def test_integrate_latent_reports_steps_and_is_jittable():
    model = _model()
    model.eval()
    z0 = jnp.zeros((2, SMALL.latent_dim))
    ys, steps = jax.jit(
        lambda z: integrate_latent(model, z, jnp.zeros(2, int), jnp.linspace(0, 1, 3))
    )(z0)
    assert ys.shape == (3, 2, SMALL.latent_dim) and int(steps) >= 1
