"""Tests for jaxstab.checks: assert_finite, guard_step, wait_checks, locate_nonfinite."""

from __future__ import annotations

import inspect
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxstab import checks
from jaxstab.checks import (
    NonFiniteReport,
    assert_finite,
    guard_step,
    locate_nonfinite,
    wait_checks,
)


def _line_of(fn, text: str) -> int:
    """Line number of the first source line of ``fn`` that contains ``text``."""
    lines, start = inspect.getsourcelines(fn)
    for offset, line in enumerate(lines):
        if text in line:
            return start + offset
    raise AssertionError(f"{text!r} not in {fn}")


# ---------------------------------------------------------------- assert_finite


def test_public_names_resolve_from_package_and_submodules():
    assert checks.assert_finite is checks.finite.assert_finite
    assert checks.locate_nonfinite is checks.locate.locate_nonfinite
    assert checks.wait_checks is checks.finite.wait_checks


def test_assert_finite_eager_passes_on_finite_tree_and_skips_integers():
    tree = {"w": jnp.ones((2, 3)), "step": jnp.array(7, jnp.int32), "b": [np.zeros(2)]}
    assert assert_finite(tree, "params") is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_assert_finite_eager_names_path_and_first_index(bad):
    w = np.ones((2, 3), np.float32)
    w[1, 1] = bad
    w[1, 2] = bad
    tree = {"a": jnp.zeros(2), "layers": [{"kernel": jnp.ones(1)}, {"kernel": jnp.asarray(w)}]}
    with pytest.raises(AssertionError) as info:
        assert_finite(tree, "params")
    msg = str(info.value)
    assert msg.startswith("params:")
    assert "'layers/1/kernel'" in msg
    assert "flat index 4" in msg
    assert str(np.float32(bad)) in msg


def test_assert_finite_rejects_non_string_name():
    with pytest.raises(TypeError, match="name"):
        assert_finite(jnp.ones(2), 3)


def test_assert_finite_under_chexify_jit_reports_first_bad_leaf_in_tree_order():
    @chex.chexify
    @jax.jit
    def f(tree):
        assert_finite(tree, "batch")
        return jax.tree.map(lambda x: 2 * x, tree)

    good = {"x": jnp.ones(4), "y": jnp.zeros((2, 2))}
    out = f(good)
    f.wait_checks()
    np.testing.assert_array_equal(out["x"], 2 * np.ones(4))

    bad = {"x": jnp.array([1.0, 2.0, 3.0, jnp.inf]), "y": jnp.array([[0.0, jnp.nan], [0, 0]])}
    f(bad)  # asynchronous: the failing call itself returns
    with pytest.raises(AssertionError) as info:
        f.wait_checks()
    msg = str(info.value)
    assert "batch: non-finite value in leaf 'x'" in msg
    assert "flat index 3" in msg


def test_assert_finite_under_chexify_sync_raises_immediately():
    f = chex.chexify(jax.jit(lambda t: assert_finite(t, "grads") or t), async_check=False)
    f({"g": jnp.ones(3)})
    with pytest.raises(AssertionError, match=r"grads: .*leaf 'g'.*flat index 2"):
        f({"g": jnp.array([0.0, 1.0, jnp.nan])})


# ---------------------------------------------------------------- guard_step


def _make_step():
    opt = optax.sgd(0.1)

    def loss_fn(w, x):
        return jnp.mean(jnp.log(x @ w))

    def step(w, opt_state, x):
        loss, g = jax.value_and_grad(loss_fn)(w, x)
        updates, opt_state = opt.update(g, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, loss

    return opt, step


def test_guard_step_returns_the_same_outputs_as_the_plain_step():
    opt, step = _make_step()
    w = jnp.array([1.0, 2.0])
    x = jnp.array([[1.0, 0.5], [0.2, 3.0]])
    state = opt.init(w)
    guarded = guard_step(step, names=("params", "opt_state", "loss"))
    ref = jax.jit(step)(w, state, x)
    out = guarded(w, state, x)
    guarded.wait_checks()
    chex.assert_trees_all_close(out, ref)


def test_guard_step_error_surfaces_at_wait_checks_naming_the_output():
    opt, step = _make_step()
    w = jnp.array([1.0, 2.0])
    guarded = guard_step(step, names=("params", "opt_state", "loss"))
    x_bad = jnp.array([[0.0, 0.0], [0.2, 3.0]])  # log(0) -> -inf loss, 0/0 -> NaN params
    w2, _, loss = guarded(w, opt.init(w), x_bad)  # does not raise itself
    assert np.isinf(float(loss)) and np.isnan(np.asarray(w2)).all()
    with pytest.raises(AssertionError, match=r"params: non-finite value in leaf '<root>'"):
        guarded.wait_checks()
    guarded.wait_checks()  # the error was consumed


def test_guard_step_error_surfaces_at_a_later_call_without_waiting():
    opt, step = _make_step()
    w = jnp.array([1.0, 2.0])
    state = opt.init(w)
    guarded = guard_step(step)
    x_good = jnp.array([[1.0, 0.5], [0.2, 3.0]])
    x_bad = jnp.array([[0.0, 0.0], [0.2, 3.0]])
    jax.block_until_ready(guarded(w, state, x_bad))
    for _ in range(1000):
        try:
            guarded(w, state, x_good)
        except AssertionError as e:
            assert "guard_step output: non-finite value in leaf '0'" in str(e)
            break
        time.sleep(0.01)
    else:
        pytest.fail("the failed check never surfaced at a later call")
    guarded.wait_checks()


def test_guard_step_checks_values_asserted_inside_the_step():
    def step(w, x):
        g = jax.grad(lambda w: jnp.sqrt(jnp.sum(w * x)))(w)  # grad of sqrt at 0 -> inf
        assert_finite({"dense": {"kernel": g}}, "grads")
        return w - jnp.nan_to_num(g, posinf=0.0, neginf=0.0)

    guarded = guard_step(step)
    guarded(jnp.ones(2), jnp.ones(2))
    guarded.wait_checks()
    guarded(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(AssertionError, match=r"grads: .*'dense/kernel'.*flat index 0"):
        wait_checks()


def test_guard_step_select_restricts_what_is_checked():
    def step(x):
        return x + 1.0, jnp.full((2,), jnp.inf)  # second output legitimately holds inf

    guarded = guard_step(step, select=lambda out: out[0])
    guarded(jnp.zeros(3))
    guarded.wait_checks()
    guarded(jnp.array([0.0, jnp.nan, 0.0]))
    with pytest.raises(AssertionError, match="flat index 1"):
        guarded.wait_checks()


def test_guard_step_validates_its_arguments():
    with pytest.raises(TypeError, match="step_fn"):
        guard_step(3)
    with pytest.raises(TypeError, match=r"names\[1\]"):
        guard_step(lambda x: x, names=("a", 2))
    guarded = guard_step(lambda x: (x, x), names=("a", "b", "c"))
    with pytest.raises(ValueError, match="names has 3 entries"):
        guarded(jnp.ones(2))


# ---------------------------------------------------------------- locate_nonfinite


def _log_times_zero(x):
    return jnp.log(x) * 0.0


def _overflow(x):
    return jnp.sum(jnp.exp(x))


def _norm_loss(x):
    return jnp.linalg.norm(x)


def test_locate_returns_none_when_everything_is_finite():
    assert locate_nonfinite(_norm_loss, jnp.ones(3)) is None
    assert locate_nonfinite(jax.grad(_norm_loss), jnp.ones(3)) is None


def test_locate_forward_log_of_zero():
    report = locate_nonfinite(_log_times_zero, jnp.array([1.0, 0.0, 2.0]))
    assert isinstance(report, NonFiniteReport)
    assert report.primitive == "log"
    assert report.kind == "-inf"
    assert report.flat_index == 1
    assert report.file == __file__
    assert report.line == _line_of(_log_times_zero, "jnp.log")
    assert report.module_path is None
    assert report.transforms == ()
    assert report.input_ranges == ((0.0, 2.0),)
    assert str(report) == report.message
    assert "log" in report.message and f"{__file__}:{report.line}" in report.message


def test_locate_inf_from_overflow_under_jit():
    report = locate_nonfinite(jax.jit(_overflow), jnp.array([1.0, 1000.0]))
    assert (report.primitive, report.kind, report.flat_index) == ("exp", "+inf", 1)
    assert report.line == _line_of(_overflow, "jnp.exp")
    assert report.input_ranges == ((1.0, 1000.0),)


def test_locate_nan_born_in_the_backward_pass():
    x = jnp.zeros(3)
    assert np.isfinite(_norm_loss(x))  # the forward pass is finite
    assert np.isnan(jax.grad(_norm_loss)(x)).all()
    report = locate_nonfinite(jax.grad(_norm_loss), x)
    # d sqrt(s) = ds / (2 sqrt(s)): the division by sqrt(0) is where it starts.
    assert report.primitive == "div"
    assert report.kind == "+inf"
    assert "jvp" in report.transforms
    assert report.line == _line_of(_norm_loss, "jnp.linalg.norm")
    assert report.input_ranges[1] == (0.0, 0.0)


def test_locate_reports_the_first_primitive_in_execution_order():
    def f(x):
        a = jnp.sqrt(x - 2.0)  # NaN first
        return jnp.exp(a * 0 + 1000.0)  # NaN propagates, no new +inf is born

    report = locate_nonfinite(f, jnp.ones(2))
    assert (report.primitive, report.kind) == ("sqrt", "nan")
    assert report.input_ranges == ((-1.0, -1.0),)


def test_locate_finds_values_inside_control_flow():
    def loop(x):
        body = lambda c: (c[0] * 1e30, c[1] + 1)
        return jax.lax.while_loop(lambda c: c[1] < 3, body, (x, 0))[0]

    report = locate_nonfinite(loop, jnp.ones(2))
    assert (report.primitive, report.kind) == ("mul", "+inf")
    assert report.line == _line_of(loop, "1e30")


def test_locate_rejects_non_finite_inputs_and_non_callables():
    with pytest.raises(ValueError, match=r"input args\[1\]\['b'\].*flat index 2"):
        locate_nonfinite(lambda a, t: a, jnp.ones(1), {"b": jnp.array([0.0, 1.0, jnp.nan])})
    with pytest.raises(TypeError, match="fn must be callable"):
        locate_nonfinite(3, jnp.ones(1))


class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
        return jnp.log(self.lin(x))


class _Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs), _Block(rngs)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.encoder = _Encoder(rngs)
        self.head = nnx.Linear(4, 1, rngs=rngs)
        self.scale = nnx.Param(jnp.zeros(()))

    def __call__(self, x):
        return self.head(self.encoder(x)) + jnp.sqrt(self.scale[...])


def _model_loss(model, x):
    return jnp.mean(model(x) ** 2)


def test_locate_names_the_nnx_module_path_forward_and_under_nnx_grad():
    model = _Model(nnx.Rngs(0))
    x = jnp.array([[1.0, -2.0, 3.0], [0.5, 0.1, -0.3]])
    log_input = np.asarray(model.encoder.layers[1].lin(model.encoder.layers[0](x)))
    assert (log_input < 0).any()  # so the log makes a NaN
    expected_line = _line_of(_Block.__call__, "jnp.log")
    expected_ranges = ((float(log_input.min()), float(log_input.max())),)

    fwd = locate_nonfinite(lambda m, x: m(x), model, x)
    back = locate_nonfinite(nnx.grad(_model_loss), model, x)
    for report in (fwd, back):
        assert report.primitive == "log"
        assert report.kind == "nan"
        assert report.module_path == "encoder/layers/1"
        assert (report.file, report.line) == (__file__, expected_line)
        np.testing.assert_allclose(report.input_ranges, expected_ranges, rtol=1e-6)
        assert report.flat_index == int(np.argmax((log_input < 0).ravel()))
        assert "module 'encoder/layers/1'" in report.message


def test_locate_backward_only_value_in_the_outermost_module():
    model = _Model(nnx.Rngs(0))
    x = jnp.abs(jnp.array([[1.0, 2.0, 3.0]])) + 5.0
    # Keep the log input positive so the forward pass is finite.
    model.encoder.layers[1].lin.bias[...] = jnp.full((4,), 100.0)
    assert np.isfinite(_model_loss(model, x))
    report = locate_nonfinite(nnx.grad(_model_loss), model, x)
    # sqrt(scale) at scale = 0 is finite; its derivative 1 / (2 sqrt(0)) is not.
    assert report.primitive == "div"
    assert report.module_path == ""
    assert "jvp" in report.transforms
    assert report.line == _line_of(_Model.__call__, "jnp.sqrt")


def test_locate_leaves_plain_checkify_and_nnx_modules_as_they_were():
    from jax.experimental import checkify

    model = _Model(nnx.Rngs(0))
    call_before = nnx.Linear.__call__
    locate_nonfinite(lambda m, x: m(x), model, jnp.ones((1, 3)))
    assert nnx.Linear.__call__ is call_before
    assert _Block.__call__ is _Block.__dict__["__call__"]
    assert not hasattr(_Block.__call__, "__jaxstab_scoped__")

    # The extra ±Inf check is only active inside locate_nonfinite: plain checkify
    # float checks still ignore +Inf and report NaN with their own message.
    f = jax.jit(checkify.checkify(lambda x: jnp.exp(x), errors=checkify.float_checks))
    err, _ = f(jnp.array([1000.0]))
    assert err.get() is None
    g = jax.jit(checkify.checkify(lambda x: jnp.log(x), errors=checkify.nan_checks))
    err, _ = g(jnp.array([-1.0]))
    assert "nan generated by primitive: log" in err.get()


def test_wait_checks_raises_pending_failures_of_every_guarded_step():
    a = guard_step(lambda x: x * 2.0)
    b = guard_step(lambda x: jnp.sqrt(x))
    a(jnp.ones(2))
    b(jnp.array([4.0, -1.0]))
    with pytest.raises(AssertionError, match="flat index 1"):
        wait_checks()
    wait_checks()  # nothing pending any more


class _LogEncoder(nnx.Module):
    def __call__(self, x):
        return jnp.log(x)


class _Net(nnx.Module):
    def __init__(self):
        self.encoder = _LogEncoder()
        self.decoder = nnx.Sequential(_LogEncoder())

    def __call__(self, x):
        return self.decoder(self.encoder(x) + 10.0)


def test_locate_module_path_of_a_direct_submodule_and_inside_sequential():
    net = _Net()
    line = _line_of(_LogEncoder.__call__, "jnp.log")
    report = locate_nonfinite(lambda m, x: m(x), net, jnp.array([2.0, -1.0]))
    assert (report.primitive, report.module_path, report.line) == ("log", "encoder", line)
    # log(e^-15) + 10 = -5: the encoder is finite, the log inside the Sequential is not.
    report = locate_nonfinite(lambda m, x: m(x), net, jnp.array([2.0, jnp.exp(-15.0)]))
    assert (report.primitive, report.module_path) == ("log", "decoder/layers/0")
    assert report.input_ranges == ((pytest.approx(-5.0), pytest.approx(10.0 + np.log(2.0))),)
