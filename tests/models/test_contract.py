"""The contract every registered model meets (parametrized over ``jaxstab.registry.names()``).

At the ``small`` preset on (a slice of) its default data: finite loss and gradients at
initialisation (the first step of a ``fit``), one compilation per epoch shape, no host
callback in the guarded training step, and the guarded scan-fused epoch lowers with
``jax.export`` for TPU and CUDA with no host callback or CPU-only custom call in the module:
how "runs on TPU" is checked on a CPU.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxstab import registry
from jaxstab.plugin import Dataset, ModelEntry, inner_optimizer, model_config, run_config
from jaxstab.train import fit
from jaxstab.train.stages import stage_optimizer
from jaxstab.train.step import Carry, make_chunk_fn

N_EXAMPLES, BATCH, STEPS = 32, 8, 3
# Custom calls allowed in an exported module: none of them reaches the host.
ALLOWED_CUSTOM_CALLS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})


@functools.cache  # one default data set per model for the whole module
def _small(name: str) -> tuple[ModelEntry, dict, Dataset]:
    entry = registry.get(name)
    cfg = run_config(entry, preset="small" if "small" in entry.presets else None)
    data = entry.default_data(0)
    n = min(N_EXAMPLES, len(data))
    sliced = Dataset({k: np.asarray(v)[:n] for k, v in data.arrays.items()}, data.meta)
    return entry, cfg, sliced


def _tx(entry: ModelEntry, cfg: dict) -> optax.GradientTransformation:
    inner = inner_optimizer(entry, cfg)
    return stage_optimizer(inner, entry.stage().trainable, clip=cfg["grad_clip"])


def _chunk(entry: ModelEntry, cfg: dict, data: Dataset):
    model = entry.build_model(data, model_config(entry, cfg), nnx.Rngs(0))
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    tx = _tx(entry, cfg)
    run = make_chunk_fn(
        gd, tx, entry.stage().loss_fn or entry.loss_fn, batch_size=BATCH, explosion_norm=None
    )
    arrays = {k: jnp.asarray(v) for k, v in data.arrays.items()}
    args = (Carry(params, tx.init(params), rest, jnp.int32(0)), arrays, jnp.arange(len(data)))
    return run, (*args, 0, 0, jax.random.key(0))


def _primitive_names(jaxpr) -> set[str]:
    """Every primitive of ``jaxpr`` and of the jaxprs nested in its equations (scan, cond...)."""
    names: set[str] = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    names |= _primitive_names(sub)
    return names


def host_callbacks(fn, *args, **kwargs) -> set[str]:
    """Primitives of ``fn``'s jaxpr that call back to the host."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    return {n for n in _primitive_names(jaxpr) if "callback" in n}


def exported_custom_calls(fn, args, platform: str, n_steps: int) -> set[str]:
    """Custom-call targets in ``fn`` lowered for ``platform`` through ``jax.export``."""
    exp = jax.export.export(fn, platforms=(platform,))(*args, n_steps=n_steps)
    text = exp.mlir_module()
    found = re.findall(r'call_target_name = "([^"]+)"', text)
    found += re.findall(r"stablehlo\.custom_call @([\w.]+)", text)
    return set(found)


@pytest.fixture(params=registry.names())
def model_name(request) -> str:
    return request.param


def test_finite_loss_and_gradients_at_init(model_name):
    # the first step of the run below is at initialisation: its loss, aux terms and gradient
    # norm (finite iff every gradient is) before the first update
    history = _fit_runs(model_name)[2].history
    terms = {k: v[0] for k, v in history.items() if not k.startswith("grad/")}
    assert "loss" in terms and all(np.isfinite(v) for v in terms.values()), terms
    assert np.isfinite(history["grad/global_norm"][0]) and history["grad/global_norm"][0] > 0


def _count_compiles(fn) -> int:
    events: list[str] = []

    def listener(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


@functools.cache  # one pair of runs per model, shared by the tests that read them
def _fit_runs(model_name: str):
    """Compilations of a one-epoch ``fit`` from cleared caches, then of a two-epoch ``fit`` of
    a fresh model with those executables kept, and the one-epoch run's result."""
    entry, cfg, data = _small(model_name)
    tx = _tx(entry, cfg)
    loss_fn = entry.stage().loss_fn or entry.loss_fn
    results = []

    def run(epochs: int):
        model = entry.build_model(data, model_config(entry, cfg), nnx.Rngs(0))
        return lambda: results.append(
            fit(
                model,
                tx,
                loss_fn,
                data.arrays,
                batch_size=BATCH,
                epochs=epochs,
                key=jax.random.key(0),
                explosion_norm=None,
            )
        )

    jax.clear_caches()
    make_chunk_fn.cache_clear()
    one = _count_compiles(run(1))
    two = _count_compiles(run(2))
    return one, two, results[0]


def test_one_compilation_per_epoch_shape(model_name):
    one, two, _ = _fit_runs(model_name)
    # A fresh model, two epochs, the executables of the one-epoch run kept: the second epoch
    # (and the first) reuse them, so nothing compiles (one compilation of the training step
    # per model, where clearing the caches again would compile it twice).
    assert one >= 1
    assert two == 0, f"{two} compilations in a run whose epochs all have the first's shape"


def test_guarded_step_has_no_host_callback(model_name):
    entry, cfg, data = _small(model_name)
    run, args = _chunk(entry, cfg, data)
    assert host_callbacks(lambda *a: run(*a, n_steps=STEPS), *args) == set()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_guarded_epoch_exports_for_accelerators(model_name, platform):
    entry, cfg, data = _small(model_name)
    run, args = _chunk(entry, cfg, data)
    calls = exported_custom_calls(run, args, platform, STEPS)
    assert not {c for c in calls if "callback" in c.lower() or "cpu" in c.lower()}
    assert calls <= ALLOWED_CUSTOM_CALLS, calls - ALLOWED_CUSTOM_CALLS


# The checks above must be able to fail: a loss that calls back to the host is caught.
def _callback_entry() -> ModelEntry:
    def build(dataset, config, rngs):
        return nnx.Linear(2, 1, rngs=rngs)

    def loss(model, batch, key):
        out = jnp.mean(model(batch["x"]) ** 2)
        jax.debug.callback(lambda v: None, out)
        return out, {}

    def data(seed):
        return Dataset({"x": np.ones((N_EXAMPLES, 2), np.float32)})

    return ModelEntry("with_callback", build, loss, data)


def test_checks_catch_a_host_callback():
    entry = _callback_entry()
    cfg = run_config(entry)
    run, args = _chunk(entry, cfg, entry.default_data(0))
    assert host_callbacks(lambda *a: run(*a, n_steps=STEPS), *args)
    try:
        calls = exported_custom_calls(run, args, "cuda", STEPS)
    except Exception as e:  # jax.export refuses to lower a host callback for another platform
        assert "callback" in str(e).lower() or "platform" in str(e).lower(), e
    else:
        assert any("callback" in c.lower() for c in calls)
