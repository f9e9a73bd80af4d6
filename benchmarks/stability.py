"""Stability under injected faults: each port's stage with and without the guard.

For every spec of :mod:`benchmarks.specs` (or the ones named with ``--model``), at its
``"faults"`` size (CFM-VC: stage 1, the NB-VAE, on 256 simulated cells x 100 genes, 128
held out; 8 epochs and 10 seeds unless the size sets ``epochs`` and ``seeds``), each variant
trains once per seed cleanly and once per fault:

- ``nan_batch``: every floating-point input of one batch replaced by NaN;
- ``inf_grad``: +Inf added to one gradient entry (of the first trainable group) at one step;
- ``spike``: every gradient multiplied by 1e4 at one step;
- ``lr_burst``: the update multiplied by 100 for 5 steps (a learning-rate burst).

A run *survives* when every parameter ends finite and its final evaluation loss
(``spec.eval_loss_jax`` / ``spec.eval_loss_torch``: CFM-VC's at the posterior means, eval
mode, on the held-out set) is within 5 % of the same seed's clean run.

Variants, all with the port's inner optimizer ``inner`` (CFM-VC: AdamW, lr 1e-3, weight
decay 1e-5) restricted to the stage's trainable groups by
``jaxstab.train.stages.stage_optimizer``: ``jax_none`` (``guard=False``: norms recorded,
nothing changed), ``jax_guard`` (the guard with ``clip=1.0``), ``jax_guard_noclip`` (the
guard with ``clip=None``: skipping only, which separates the clip's effect) and
``torch_seed`` (the PyTorch version with ``spec.seed_guards``, CFM-VC's ``clamp`` bounds, and
the seed's loop guards: ``clip_grad_norm_(1.0)`` and the ``isfinite`` check every 10 batches
that ends the epoch on a non-finite loss). The JAX runs are one jitted ``lax.scan`` per run
whose fault schedule is an argument, so each variant compiles once.

Every run uses one config preset of the spec (``spec.presets``; default ``"default"``) on
both sides; ``presets`` (``--preset NAME``, repeatable) runs the table once per preset, keyed
``name`` for the default preset and ``name-<preset>`` for the others (as in the parity
suite). With ``original`` (CFM-VC: ``CFMVCConfig.original()``, whose bounds are already the
hard clamps) the ``torch_seed`` variant is the original's function with the seed's guards.

Run ``python -m benchmarks.run --suite stability [--model NAME] [--preset NAME ...]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxstab
from benchmarks import specs
from benchmarks.meta import describe, environment
from benchmarks.specs.base import size_examples
from jaxstab import stat_names as S

SIZE = "faults"
EPOCHS = 8
SEEDS = tuple(range(10))
CLIP = 1.0
FAULTS = ("clean", "nan_batch", "inf_grad", "spike", "lr_burst")
SPIKE, BURST, BURST_STEPS, TOLERANCE = 1e4, 100.0, 5, 0.05
VARIANTS = ("jax_none", "jax_guard", "jax_guard_noclip", "torch_seed")
NAN_CHECK_INTERVAL = 10


def split(spec: specs.ModelSpec, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The training arrays and the held-out ones (the last ``n_eval`` examples)."""
    arrays = spec.data(SIZE, seed).arrays
    n_eval = spec.size(SIZE)["n_eval"]
    train = {k: np.asarray(v)[:-n_eval] for k, v in arrays.items()}
    held = {k: np.asarray(v)[-n_eval:] for k, v in arrays.items()}
    return train, held


def schedule(seed: int, fault: str, steps: int) -> dict[str, np.ndarray]:
    """Per-step fault arrays: gradient multiplier and addend, update multiplier, NaN batch.

    >>> s = schedule(0, "lr_burst", 64)
    >>> int((s["u_mul"] == 100.0).sum())
    5
    """
    rng = np.random.default_rng(1000 + seed)
    at = int(rng.integers(steps // 4, steps // 2))
    s = {
        "g_mul": np.ones(steps, np.float32),
        "g_add": np.zeros(steps, np.float32),
        "u_mul": np.ones(steps, np.float32),
        "x_nan": np.zeros(steps, bool),
        "at": at,
    }
    if fault == "nan_batch":
        s["x_nan"][at] = True
    elif fault == "inf_grad":
        s["g_add"][at] = np.inf
    elif fault == "spike":
        s["g_mul"][at] = SPIKE
    elif fault == "lr_burst":
        s["u_mul"][at : at + BURST_STEPS] = BURST
    return s


def epochs(spec: specs.ModelSpec) -> int:
    """The spec's epochs per run: its ``faults`` size's ``epochs``, else :data:`EPOCHS`."""
    return int(spec.size(SIZE).get("epochs", EPOCHS))


def default_seeds(spec: specs.ModelSpec) -> tuple[int, ...]:
    """The spec's seeds: ``range(seeds)`` of its ``faults`` size, else :data:`SEEDS`."""
    n = spec.size(SIZE).get("seeds")
    return SEEDS if n is None else tuple(range(int(n)))


def batch_order(
    seed: int, n: int, batch: int, steps_per_epoch: int, n_epochs: int = EPOCHS
) -> np.ndarray:
    """``[steps, batch]`` example indices: a permutation per epoch, the last batch wrapping.

    >>> batch_order(0, 5, 2, 3).shape
    (24, 2)
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_epochs):
        perm = rng.permutation(n)
        for i in range(steps_per_epoch):
            rows.append(perm[np.arange(i * batch, (i + 1) * batch) % n])
    return np.stack(rows)


def _order(spec: specs.ModelSpec, seed: int, n: int) -> np.ndarray:
    batch = spec.size(SIZE)["batch_size"]
    return batch_order(seed, n, batch, math.ceil(n / batch), epochs(spec))


def _jax_runner(spec: specs.ModelSpec, tx: optax.GradientTransformation, graphdef: Any):
    entry = spec.model_entry()
    stage = entry.stage(spec.stage)
    stage_loss = stage.loss_fn or entry.loss_fn
    # The Inf goes into the first trainable group's first parameter, as in the PyTorch runs.
    inf_group = f"[{stage.trainable[0]!r}]" if stage.trainable else ""

    def loss_fn(params, rest, batch, key):
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = stage_loss(model, batch, key)[0]
        return loss, nnx.split(model, nnx.Param, ...)[2]  # BatchNorm statistics move too

    @jax.jit
    def run(params, rest, data, held, order, sched, key):
        opt_state = tx.init(params)

        def step(carry, inp):
            params, opt_state, rest = carry
            idx, g_mul, g_add, u_mul, x_nan, k = inp
            batch = {name: v[idx] for name, v in data.items()}
            batch = {name: jnp.where(x_nan, jnp.nan, v) if jnp.issubdtype(v.dtype, jnp.floating)
                     else v for name, v in batch.items()}  # fmt: skip
            grads, new_rest = jax.grad(loss_fn, has_aux=True)(params, rest, batch, k)
            paths, treedef = jax.tree_util.tree_flatten_with_path(grads)
            leaves = [g * g_mul for _, g in paths]
            i = next(j for j, (p, _) in enumerate(paths)
                     if jax.tree_util.keystr(p).startswith(inf_group))  # fmt: skip
            leaves[i] = leaves[i].at[(0,) * leaves[i].ndim].add(g_add)
            grads = jax.tree.unflatten(treedef, leaves)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: u * u_mul, updates)
            skipped = jaxstab.read_stats(opt_state).get(S.SKIP_SKIPPED)
            if skipped is not None:  # as jaxstab.train.fit: a skipped step keeps the statistics
                new_rest = jax.lax.cond(skipped > 0, lambda: rest, lambda: new_rest)
            return (optax.apply_updates(params, updates), opt_state, new_rest), None

        keys = jax.random.split(key, order.shape[0])
        inputs = (order, sched["g_mul"], sched["g_add"], sched["u_mul"], sched["x_nan"], keys)
        (params, _, rest), _ = jax.lax.scan(step, (params, opt_state, rest), inputs)
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        final = spec.eval_loss_jax(model, held)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        return final, finite

    return run


def optimizer(
    spec: specs.ModelSpec, variant: str, preset: str = "default"
) -> optax.GradientTransformation:
    """The stage optimizer of a JAX variant (``jax_none``, ``jax_guard``, ``jax_guard_noclip``)."""
    from jaxstab import plugin
    from jaxstab.train.stages import stage_optimizer

    entry = spec.model_entry()
    inner = plugin.inner_optimizer(entry, spec.run_config(SIZE, preset))
    trainable = entry.stage(spec.stage).trainable
    settings = {"jax_none": {"guard": False}, "jax_guard": {"clip": CLIP},
                "jax_guard_noclip": {"clip": None}}  # fmt: skip
    if variant not in settings:
        raise ValueError(f"unknown JAX variant {variant!r}; variants: {', '.join(settings)}")
    return stage_optimizer(inner, trainable, **settings[variant])


def run_jax(
    spec: specs.ModelSpec,
    variant: str,
    seeds: Iterable[int] | None = None,
    preset: str = "default",
) -> dict:
    """Final eval loss and parameter finiteness of every (seed, fault) run of one variant."""
    tx = optimizer(spec, variant, preset)
    runner, out = None, {}
    for seed in default_seeds(spec) if seeds is None else seeds:
        train, held = split(spec, seed)
        model, _ = spec.build_jax(SIZE, preset, seed)
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        runner = runner or _jax_runner(spec, tx, graphdef)
        order = jnp.asarray(_order(spec, seed, len(next(iter(train.values())))))
        data = {k: jnp.asarray(v) for k, v in train.items()}
        held_j = {k: jnp.asarray(v) for k, v in held.items()}
        for fault in FAULTS:
            sched = schedule(seed, fault, order.shape[0])
            s = {k: jnp.asarray(v) for k, v in sched.items() if k != "at"}
            final, finite = runner(params, rest, data, held_j, order, s, jax.random.key(seed))
            out[(seed, fault)] = (float(final), bool(finite))
    return out


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    import torch

    out = {}
    for k, v in arrays.items():
        t = torch.as_tensor(v)
        out[k] = t.long() if np.issubdtype(np.asarray(v).dtype, np.integer) else t
    return out


def run_torch(
    spec: specs.ModelSpec, seeds: Iterable[int] | None = None, preset: str = "default"
) -> dict:
    """The same runs with the PyTorch version, ``spec.seed_guards`` and the seed's guards."""
    import torch

    # One thread: on a small model, intra-op threading only adds contention (measured: 9×
    # slower with 2 threads on a loaded 2-core machine).
    torch.set_num_threads(1)
    trainable = spec.model_entry().stage(spec.stage).trainable
    cfg = spec.run_config(SIZE, preset)
    lr, weight_decay = float(cfg["lr"]), float(cfg["weight_decay"] or 0.0)
    out = {}
    for seed in default_seeds(spec) if seeds is None else seeds:
        train, held = split(spec, seed)
        n = len(next(iter(train.values())))
        spe = math.ceil(n / spec.size(SIZE)["batch_size"])
        order = torch.as_tensor(_order(spec, seed, n))
        data, held_t = _tensors(train), _tensors(held)
        for fault in FAULTS:
            sched = schedule(seed, fault, order.shape[0])
            model = spec.build_torch(SIZE, preset, seed, **spec.seed_guards)
            model.train()
            groups = [model] if trainable is None else [getattr(model, g) for g in trainable]
            params = [p for g in groups for p in g.parameters()]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            stop_epoch_at = -1
            for t in range(order.shape[0]):
                if t // spe == stop_epoch_at:
                    continue  # the seed's guard ended this epoch
                idx = order[t]
                batch = {k: v[idx] for k, v in data.items()}
                if sched["x_nan"][t]:
                    batch = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                             for k, v in batch.items()}  # fmt: skip
                loss = spec.torch_loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(float(sched["g_mul"][t]))
                    params[0].grad.view(-1)[0] += float(sched["g_add"][t])
                torch.nn.utils.clip_grad_norm_(params, max_norm=CLIP)
                if t % NAN_CHECK_INTERVAL == 0 and not torch.isfinite(loss):
                    stop_epoch_at = t // spe
                    continue
                for group in opt.param_groups:
                    group["lr"] = lr * float(sched["u_mul"][t])
                opt.step()
            model.eval()
            with torch.no_grad():
                final = spec.eval_loss_torch(model, held_t)
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            out[(seed, fault)] = (float(final), finite)
    return out


def summarize(raw: dict[tuple[int, str], tuple[float, bool]]) -> dict[str, Any]:
    """Survival fraction per fault (finite params, final loss within 5 % of the clean run).

    >>> raw = {(0, "clean"): (10.0, True), (0, "spike"): (10.4, True),
    ...        (1, "clean"): (10.0, True), (1, "spike"): (float("nan"), False)}
    >>> summarize(raw)["spike"]["survived"]
    0.5
    """
    seeds = sorted({s for s, _ in raw})
    out: dict[str, Any] = {}
    for fault in sorted({f for _, f in raw if f != "clean"}, key=FAULTS.index):
        ok, finite, ratios = 0, 0, []
        for s in seeds:
            clean, _ = raw[(s, "clean")]
            final, fin = raw[(s, fault)]
            ratio = final / clean if math.isfinite(final) and clean else math.nan
            good = fin and math.isfinite(final) and abs(final - clean) <= TOLERANCE * abs(clean)
            ok += good
            finite += fin
            ratios.append(ratio)
        r = np.asarray(ratios)
        out[fault] = {
            "survived": ok / len(seeds),
            "finite_params": finite / len(seeds),
            "median_loss_ratio": float(np.nanmedian(r)) if np.isfinite(r).any() else None,
        }
    clean = [raw[(s, "clean")][0] for s in seeds]
    out["clean_final_loss_mean"] = float(np.mean(clean))
    return out


def result_key(spec: specs.ModelSpec, preset: str) -> str:
    """``name`` for the default preset, ``name-<preset>`` for the others.

    >>> result_key(specs.get(specs.names()[0]), "original").endswith("-original")
    True
    """
    return spec.name if preset == "default" else f"{spec.name}-{preset}"


def check_preset(spec: specs.ModelSpec, preset: str) -> None:
    """``ValueError`` naming the spec's presets when ``preset`` is not one of them."""
    if preset not in spec.presets:
        known = ", ".join(spec.presets)
        raise ValueError(f"model {spec.name!r} has no preset {preset!r}; presets: {known}")


def run_model(
    spec: specs.ModelSpec,
    variants: Iterable[str] = VARIANTS,
    seeds: Iterable[int] | None = None,
    preset: str = "default",
) -> dict[str, Any]:
    """The survival table of one spec at one preset (seeds: :func:`default_seeds`): its
    setup, every variant's summary and wall time."""
    check_preset(spec, preset)
    seeds = default_seeds(spec) if seeds is None else tuple(seeds)
    cfg = spec.run_config(SIZE, preset)
    out: dict[str, Any] = {
        "stage": spec.stage,
        "preset": preset,
        "setup": {
            "size": SIZE,
            "settings": dict(spec.size(SIZE)),
            "epochs": epochs(spec),
            "seeds": len(seeds),
            "lr": cfg["lr"],
            "weight_decay": cfg["weight_decay"],
            "clip": CLIP,
            "torch_seed_guards": dict(spec.seed_guards),
            "spike": SPIKE,
            "lr_burst": [BURST, BURST_STEPS],
            "tolerance": TOLERANCE,
        },
        "variants": {},
        "seconds": {},
    }
    for variant in variants:
        start = time.perf_counter()
        if variant == "torch_seed":
            raw = run_torch(spec, seeds, preset)
        else:
            raw = run_jax(spec, variant, seeds, preset)
        out["seconds"][variant] = round(time.perf_counter() - start, 1)
        out["variants"][variant] = summarize(raw)
    return out


def run(
    models: Iterable[str] | None = None,
    presets: Iterable[str] = ("default",),
    seeds: int | None = None,
    variants: Iterable[str] = VARIANTS,
) -> dict[str, Any]:
    """Every spec's (or ``models``') survival table at each of ``presets``, keyed by
    :func:`result_key`; the runner writes the files. ``seeds`` (a count) replaces each spec's
    own (:func:`default_seeds`); ``variants`` selects among :data:`VARIANTS`."""
    chosen = specs.select(models)
    variants = tuple(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; variants: {', '.join(VARIANTS)}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be a positive count, got {seeds!r}")
    presets = tuple(dict.fromkeys(presets))
    for spec in chosen:  # refuse an unknown preset before any training
        for preset in presets:
            check_preset(spec, preset)
    return {
        "benchmark": "fault injection on each port's stage",
        "environment": environment(),
        "models": {
            result_key(spec, preset): run_model(
                spec, variants, None if seeds is None else range(seeds), preset=preset
            )
            for spec in chosen
            for preset in presets
        },
    }


def to_markdown(result: dict[str, Any]) -> str:
    """Survival fractions as markdown tables (rows: faults; columns: variants), one a model."""
    env = result["environment"]
    lines = [f"# Stability under injected faults ({env['platform']})", "", describe(env), ""]
    for name, res in result["models"].items():
        variants = list(res["variants"])
        setup = res["setup"]
        s = setup["settings"]
        lines += [
            f"## {name}, stage {res['stage']}, preset {res.get('preset', 'default')}",
            "",
            f"Size {setup['size']} ({size_examples(s)} examples, "
            f"{s.get('n_eval')} held out), "
            f"batch {s.get('batch_size')}, {setup['epochs']} epochs, {setup['seeds']} seeds. "
            "A run survives when its parameters end finite and its final held-out loss is "
            f'within {100 * setup["tolerance"]:.0f} % of the same seed\'s clean run; "loss" is '
            "the median ratio of the final held-out loss to the clean run's.",
            "",
            "| fault | " + " | ".join(variants) + " |",
            "|---|" + "---:|" * len(variants),
        ]
        for fault in FAULTS[1:]:
            cells = []
            for v in variants:
                r = res["variants"][v][fault]
                ratio = r["median_loss_ratio"]
                loss = "—" if ratio is None else f"{ratio:.2f}×"
                cells.append(f"{100 * r['survived']:.0f} % (finite "
                             f"{100 * r['finite_params']:.0f} %, loss {loss})")  # fmt: skip
            lines.append(f"| {fault} | " + " | ".join(cells) + " |")
        seconds = ", ".join(f"{k} {v}" for k, v in res["seconds"].items())
        lines += ["", f"Wall time per variant (s): {seconds}", ""]
    return "\n".join(lines)
