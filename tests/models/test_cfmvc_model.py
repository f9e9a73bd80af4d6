"""CFM-VC model pieces: control α = 0, bounds, the MMD term and generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxstab.models.cfmvc import CFMVC, CFMVCConfig, generate_expression, mmd_rbf
from jaxstab.models.cfmvc.losses import flow_terms, vae_terms

SMALL = CFMVCConfig.small()
ORIGINAL = CFMVCConfig.small(CFMVCConfig.original())
DI, DT = SMALL.dim_int, SMALL.dim_tech
G, NB, NC, NP = 24, 2, 3, 5


@pytest.fixture(scope="module")
def model():
    m = CFMVC(G, NB, NC, NP, SMALL, rngs=nnx.Rngs(0), spatial_dim=2)
    m.eval()
    return m


@pytest.fixture(scope="module")
def context_fn(model):
    graphdef, state = nnx.split(model.context_encoder)
    return jax.jit(lambda p, b, c, s: nnx.merge(graphdef, state)(p, b, c, s))


@settings(max_examples=25, deadline=None)
@given(
    b=st.lists(st.integers(0, NB - 1), min_size=4, max_size=4),
    c=st.lists(st.integers(0, NC - 1), min_size=4, max_size=4),
    k=st.integers(0, NP - 1),
    seed=st.integers(0, 2**16),
)
def test_control_alpha_is_exactly_zero(context_fn, b, c, k, seed):
    b, c = jnp.asarray(b), jnp.asarray(c)
    s = jax.random.normal(jax.random.key(seed), (4, 2)) * 10
    _, alpha = context_fn(jnp.zeros((4, NP)), b, c, s)
    assert np.all(np.asarray(alpha) == 0.0)
    _, alpha = context_fn(jax.nn.one_hot(jnp.full(4, k), NP), b, c, s)
    assert np.all(np.abs(np.asarray(alpha)).max(-1) > 0)


def test_alpha_depends_on_cell_type(context_fn):
    p = jax.nn.one_hot(jnp.zeros(3, int), NP)
    _, alpha = context_fn(p, jnp.zeros(3, int), jnp.arange(3), jnp.zeros((3, 2)))
    assert not np.allclose(alpha[0], alpha[1])


def test_control_velocity_is_the_base_field(model):
    z, t = jax.random.normal(jax.random.key(1), (3, DI)), jnp.array([0.0, 0.3, 0.9])
    b, c, s = jnp.zeros(3, int), jnp.array([0, 1, 2]), jnp.ones((3, 2))
    v = model.velocity(z, t, jnp.zeros((3, NP)), b, c, s)
    context, _ = model.context_encoder(jnp.zeros((3, NP)), b, c, s)
    h = model.flow.trunk(jnp.concatenate([z, model.flow.time_mlp(t[:, None]), context], -1))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(model.flow.base_head(h)))


def test_logvar_and_log_mean_are_bounded_with_gradient(model):
    x = jnp.full((2, G), 1e6).at[1].set(0.0)

    def max_logvar(m):
        enc = m.encoder(x, jnp.zeros(2, int), jnp.zeros(2, int), deterministic=True)
        return jnp.sum(enc.int_logvar), enc

    # Blow up the logvar head so that its raw output is far outside ±10.
    m = nnx.clone(model)
    m.encoder.z_int_logvar.bias[...] = jnp.full((DI,), 1e4)
    (_, enc), grads = nnx.jit(nnx.value_and_grad(max_logvar, has_aux=True))(m)
    assert float(enc.int_logvar.max()) <= 10.0 and float(enc.int_logvar.max()) > 9.9
    assert float(jnp.abs(grads["encoder"]["z_int_logvar"]["bias"][...]).min()) > 0.0

    m.decoder.mean_out.bias[...] = jnp.full((G,), 1e4)
    mean, _ = m.decoder(jnp.zeros((2, DI)), jnp.zeros((2, DT)), deterministic=True)
    assert np.all(np.isfinite(mean)) and float(mean.max()) <= np.exp(20.0) * (1 + 1e-6)


def test_library_size_option():
    m = CFMVC(G, NB, NC, NP, SMALL, rngs=nnx.Rngs(0), use_library_size=True)
    lib = jnp.array([100.0, 5000.0])
    mean, _ = m.decoder(jnp.zeros((2, DI)), jnp.zeros((2, DT)), lib, deterministic=True)
    np.testing.assert_allclose(np.asarray(mean.sum(-1)), np.asarray(lib), rtol=1e-4)
    with pytest.raises(ValueError, match="library"):
        m.decoder(jnp.zeros((2, DI)), jnp.zeros((2, DT)), deterministic=True)


def _mmd_numpy(x, y, bandwidths):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]

    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * s**2 * d)) for s in bandwidths)

    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def test_mmd_matches_float64_reference():
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (40, 6))
    y = jax.random.normal(ky, (30, 6)) + 0.7
    bw = (0.5, 1.0, 2.0)
    mmd = jax.jit(mmd_rbf, static_argnums=2)
    np.testing.assert_allclose(float(mmd(x, y, bw)), _mmd_numpy(x, y, bw), rtol=1e-4)
    assert float(mmd(x, x, bw)) == 0.0
    g = jax.jit(jax.grad(lambda a: mmd_rbf(a, y)))(x)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_lambda_dist_changes_the_flow_gradient():
    batch = {
        "x": jnp.ones((8, G)) * jnp.arange(8.0)[:, None],
        "p": jax.nn.one_hot(jnp.arange(8) % NP, NP),
        "batch": jnp.zeros(8, int),
        "cell_type": jnp.zeros(8, int),
    }
    z0, t = jax.random.normal(jax.random.key(2), (8, DI)), jnp.linspace(0.1, 0.9, 8)

    def grads(lam):
        m = CFMVC(G, NB, NC, NP, SMALL, rngs=nnx.Rngs(0), lambda_dist=lam)
        (_, aux), g = nnx.jit(
            nnx.value_and_grad(lambda m: flow_terms(m, batch, z0, t), has_aux=True)
        )(m)
        return aux, g

    aux0, g0 = grads(0.0)
    aux1, g1 = grads(10.0)
    assert float(aux0["dist"]) == 0.0 and float(aux1["dist"]) > 0.0
    assert float(aux0["fm"]) == pytest.approx(float(aux1["fm"]), rel=1e-6)
    diff = jnp.abs(g1["flow"]["base_head"]["kernel"][...] - g0["flow"]["base_head"]["kernel"][...])
    assert float(diff.max()) > 1e-6
    # The VAE never sees the flow loss, MMD included.
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g1["encoder"]))


def test_generation_is_finite_and_reproducible(model):
    p = jnp.array([-1, 0, 4, -1])
    b, c, s = jnp.array([0, 1, 0, 1]), jnp.array([0, 1, 2, 0]), jnp.zeros((4, 2))
    a = generate_expression(model, p, b, c, key=jax.random.key(3), spatial=s)
    a2 = generate_expression(model, p, b, c, key=jax.random.key(3), spatial=s)
    other = generate_expression(model, p, b, c, key=jax.random.key(4), spatial=s)
    assert a.expression.shape == (4, G) and np.all(np.isfinite(a.expression))
    np.testing.assert_array_equal(np.asarray(a.expression), np.asarray(a2.expression))
    assert not np.allclose(a.expression, other.expression)
    assert int(a.n_replaced) == 0
    counts = generate_expression(model, p, b, c, key=jax.random.key(3), spatial=s, use_mean=False)
    assert np.all(np.asarray(counts.expression) == np.round(np.asarray(counts.expression)))
    # Euler with one step from the same noise: z1 = z0 + v(z0, 0).
    one = generate_expression(model, p, b, c, n_steps=1, key=jax.random.key(3), spatial=s)
    z0 = jax.random.normal(jax.random.split(jax.random.key(3), 3)[0], (4, DI))
    v0 = nnx.jit(lambda m: m.velocity(z0, jnp.zeros(4), jax.nn.one_hot(p, NP), b, c, s))(model)
    np.testing.assert_allclose(np.asarray(one.z_int), np.asarray(z0 + v0), rtol=1e-5, atol=1e-6)


def test_generation_counts_replaced_velocities(model):
    m = nnx.clone(model)
    m.flow.base_head.bias[...] = m.flow.base_head.bias[...].at[3].set(jnp.nan)
    out = generate_expression(
        m, jnp.array([0, 1]), jnp.zeros(2, int), jnp.zeros(2, int), n_steps=7,
        key=jax.random.key(0), spatial=jnp.zeros((2, 2)),
    )  # fmt: skip
    assert int(out.n_replaced) == 2 * 7  # one entry per cell per step
    assert np.all(np.isfinite(out.expression)) and np.all(np.isfinite(out.z_int))


def test_generation_input_errors(model):
    b = jnp.zeros(2, int)
    with pytest.raises(ValueError, match="perturbation code 5 at index 1"):
        generate_expression(model, jnp.array([0, 5]), b, b, key=jax.random.key(0))
    with pytest.raises(ValueError, match="cell_type has shape"):
        generate_expression(model, jnp.array([0, 1]), b, jnp.zeros(3, int), key=jax.random.key(0))
    with pytest.raises(ValueError, match="columns"):
        generate_expression(model, jnp.zeros((2, 3)), b, b, key=jax.random.key(0))


# ------------------------------------------------------------------ config and presets
def test_config_from_dict_rejects_unknown_keys_and_bad_choices():
    with pytest.raises(KeyError, match=r"'hiden_vae'.*valid keys: dim_int, dim_tech"):
        CFMVCConfig.from_dict({"hidden_vae": 8, "hiden_vae": 8})
    with pytest.raises(ValueError, match=r"flow_target = 'noise'"):
        SMALL.replace(flow_target="noise")
    with pytest.raises(ValueError, match="dropout"):
        SMALL.replace(dropout=1.0)
    cfg = CFMVCConfig.from_dict({**ORIGINAL.to_dict(), "lr": 5e-4})
    assert cfg == ORIGINAL.replace(lr=5e-4) and cfg != ORIGINAL
    assert hash(cfg) == hash(ORIGINAL.replace(lr=5e-4))  # static model attribute: hashable
    with pytest.raises(KeyError, match="n_layers"):
        CFMVC(G, NB, NC, NP, SMALL, rngs=nnx.Rngs(0), n_layers=3)


@pytest.mark.parametrize("straight_through", [False, True])
def test_original_preset_bounds_are_hard_clamps(straight_through):
    cfg = CFMVCConfig.small(CFMVCConfig.original(straight_through=straight_through))
    m = CFMVC(G, NB, NC, NP, cfg, rngs=nnx.Rngs(0))
    m.eval()
    m.decoder.mean_out.bias[...] = jnp.full((G,), 50.0).at[0].set(3.0)
    m.decoder.log_theta[...] = jnp.full((G,), -30.0).at[0].set(2.0)
    z = (jnp.zeros((2, DI)), jnp.zeros((2, DT)))
    mean, theta = m.decoder(*z)
    # Forward values are the clamps' (exp(±20), exp(±10)); inside they are untouched.
    np.testing.assert_allclose(np.asarray(mean[:, 1:]), np.exp(np.float32(20.0)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(theta[1:]), np.exp(np.float32(-10.0)), rtol=1e-6)
    assert float(theta[0]) == pytest.approx(np.exp(2.0), rel=1e-6)
    g = nnx.grad(lambda d: jnp.sum(jnp.log(d(*z)[0])) + jnp.sum(jnp.log(d(*z)[1])))(m.decoder)
    # d log(mean) / d bias per cell: 1 inside the clamp; outside, 0 as torch.clamp gives, or 1
    # through the straight-through clamp.
    outside = 1.0 if straight_through else 0.0
    np.testing.assert_allclose(np.asarray(g["mean_out"]["bias"][...][0]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g["mean_out"]["bias"][...][1:]), 2.0 * outside)
    np.testing.assert_allclose(np.asarray(g["log_theta"][...][0]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g["log_theta"][...][1:]), outside)
    # The default leaves log_theta unbounded and its soft bounds leave small values alone.
    d = CFMVC(G, NB, NC, NP, SMALL, rngs=nnx.Rngs(0))
    d.decoder.log_theta[...] = jnp.full((G,), -30.0)
    assert float(d.decoder(*z, deterministic=True)[1][0]) == pytest.approx(np.exp(-30.0))


def test_input_transform_raw_counts_vs_log1p():
    x = jnp.full((2, G), 7.0)
    codes = jnp.zeros(2, int)
    raw = CFMVC(G, NB, NC, NP, SMALL.replace(input_transform="none"), rngs=nnx.Rngs(0))
    logged = CFMVC(G, NB, NC, NP, SMALL, rngs=nnx.Rngs(0))  # same weights, log1p input
    e_raw = raw.encoder(x, codes, codes, deterministic=True)
    e_log = logged.encoder(jnp.expm1(x), codes, codes, deterministic=True)
    np.testing.assert_allclose(np.asarray(e_raw.int_mean), np.asarray(e_log.int_mean), rtol=2e-5)
    e_same = logged.encoder(x, codes, codes, deterministic=True)
    assert not np.allclose(e_same.int_mean, e_raw.int_mean)


def test_column_control_encoding_and_no_gating_as_in_the_original():
    m = CFMVC(G, NB, NC, NP, ORIGINAL.replace(control_column=2), rngs=nnx.Rngs(0))
    assert m.context_encoder.pert_mlp_layers[0].kernel.shape[0] == NP + 1 + 8
    codes = jnp.zeros(2, int)
    p = jnp.zeros((2, NP)).at[1, 2].set(1.0)
    _, alpha = m.context_encoder(p, codes, codes)
    # The control has its own column, so its alpha is not zero (the original's behaviour),
    # and it differs from that of the perturbation now in column 3.
    assert float(jnp.abs(alpha[0]).max()) > 0 and not np.allclose(alpha[0], alpha[1])
    # Row 0 is fed [one-hot of column 2, ungated cell-type embedding]; row 1 [e_3, ...].
    ce = m.context_encoder
    layers = ce.pert_mlp_layers
    for row, col in ((0, 2), (1, 3)):
        h = jnp.concatenate([jax.nn.one_hot(col, NP + 1), ce.ct_emb(codes[:1])[0]])[None]
        h = layers[2](jax.nn.relu(layers[1](jax.nn.relu(layers[0](h)))))
        np.testing.assert_allclose(np.asarray(alpha[row]), np.asarray(h[0]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="control_column 6"):
        CFMVC(G, NB, NC, NP, ORIGINAL.replace(control_column=6), rngs=nnx.Rngs(0))


def test_flow_target_sample_uses_the_posterior_noise():
    batch = {
        "x": jnp.ones((4, G)) * jnp.arange(4.0)[:, None],
        "p": jax.nn.one_hot(jnp.arange(4) % NP, NP),
        "batch": jnp.zeros(4, int),
        "cell_type": jnp.zeros(4, int),
    }
    z0, t = jnp.zeros((4, DI)), jnp.full(4, 0.5)
    m = CFMVC(G, NB, NC, NP, SMALL.replace(flow_target="sample"), rngs=nnx.Rngs(0))
    m.eval()
    with pytest.raises(ValueError, match="eps"):
        flow_terms(m, batch, z0, t)
    mean_target = CFMVC(G, NB, NC, NP, SMALL, rngs=nnx.Rngs(0))
    fm_mean = flow_terms(mean_target, batch, z0, t)[0]
    # eps = 0 gives the mean target exactly; eps != 0 another loss.
    assert float(flow_terms(m, batch, z0, t, jnp.zeros((4, DI)))[0]) == float(fm_mean)
    assert float(flow_terms(m, batch, z0, t, jnp.ones((4, DI)))[0]) != float(fm_mean)


def test_eps_nb_likelihood_is_the_originals_biased_one():
    batch = {"x": jnp.full((2, G), 3.0), "batch": jnp.zeros(2, int), "cell_type": jnp.zeros(2, int)}
    noise = (jnp.zeros((2, DI)), jnp.zeros((2, DT)))
    exact = CFMVC(G, NB, NC, NP, SMALL, rngs=nnx.Rngs(0))
    eps = CFMVC(G, NB, NC, NP, SMALL.replace(nb_likelihood="eps"), rngs=nnx.Rngs(0))
    a = vae_terms(exact, batch, *noise, deterministic=True)[1]["nll"]
    b = vae_terms(eps, batch, *noise, deterministic=True)[1]["nll"]
    assert float(a) == pytest.approx(float(b), rel=1e-5)  # moderate means: the same
    for m in (exact, eps):  # tiny means (log-mean -25): the eps guard biases the likelihood
        m.decoder.mean_out.bias[...] = jnp.full((G,), -25.0)
    a = vae_terms(exact, batch, *noise, deterministic=True)[1]["nll"]
    b = vae_terms(eps, batch, *noise, deterministic=True)[1]["nll"]
    assert float(a) - float(b) > 0.02 * float(a)
