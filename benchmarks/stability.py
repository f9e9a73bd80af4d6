"""Stability under injected faults: CFM-VC stage 1 (NB-VAE) with and without the guard.

For each seed, each variant trains once cleanly and once per fault:

- ``nan_batch``: one batch of counts replaced by NaN;
- ``inf_grad``: +Inf added to one gradient entry at one step;
- ``spike``: every gradient multiplied by 1e4 at one step;
- ``lr_burst``: the update multiplied by 100 for 5 steps (a learning-rate burst).

A run *survives* when every parameter ends finite and its final evaluation loss (posterior
means, eval mode, a fixed held-out set) is within 5 % of the same seed's clean run.

Variants: ``jax_none`` (``optax.adamw``), ``jax_guard``
(``jaxstab.stability_guard(optax.adamw, clip=1.0)``), ``jax_guard_noclip`` (the same with
``clip=None``: skipping only, which separates the clip's effect) and ``torch_seed`` (the
PyTorch version ``benchmarks/torch_ref/cfmvc.py`` with the seed's guards: ``clamp`` bounds,
``clip_grad_norm_(1.0)`` and the ``isfinite`` check every 10 batches that ends the epoch on a
non-finite loss). The JAX runs are one jitted ``lax.scan`` per run whose fault schedule is an
argument, so each variant compiles once.

Run ``python -m benchmarks.run --suite stability``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxstab

N_CELLS, N_GENES, N_EVAL = 256, 100, 128
BATCH, EPOCHS = 32, 8
SEEDS = tuple(range(10))
LR, WEIGHT_DECAY, CLIP = 1e-3, 1e-5, 1.0
MODEL_KW = {"dim_int": 8, "dim_tech": 4, "hidden_vae": 32, "hidden_ctx": 16,
            "hidden_flow": 16, "n_basis": 4, "dropout": 0.0}  # fmt: skip
FAULTS = ("clean", "nan_batch", "inf_grad", "spike", "lr_burst")
SPIKE, BURST, BURST_STEPS, TOLERANCE = 1e4, 100.0, 5, 0.05
VARIANTS = ("jax_none", "jax_guard", "jax_guard_noclip", "torch_seed")


def _data(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    from jaxstab.models.cfmvc.data import load_anndata, simulate

    ds = load_anndata(simulate(N_CELLS + N_EVAL, N_GENES, n_perturbations=3, seed=seed))
    arrays = {k: np.asarray(ds.arrays[k]) for k in ("x", "batch", "cell_type")}
    train = {k: v[:N_CELLS] for k, v in arrays.items()}
    held = {k: v[N_CELLS:] for k, v in arrays.items()}
    return train, held, dict(ds.meta)


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


def batch_order(seed: int, steps_per_epoch: int) -> np.ndarray:
    """``[steps, BATCH]`` example indices: a permutation per epoch, the last batch wrapping."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(EPOCHS):
        perm = rng.permutation(N_CELLS)
        for i in range(steps_per_epoch):
            rows.append(perm[np.arange(i * BATCH, (i + 1) * BATCH) % N_CELLS])
    return np.stack(rows)


def _jax_runner(tx: optax.GradientTransformation, graphdef: nnx.GraphDef):
    from jaxstab.models.cfmvc import losses

    def loss_fn(params, rest, batch, key):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return losses.vae_loss(model, batch, key)[0]

    @jax.jit
    def run(params, rest, data, held, order, sched, key):
        opt_state = tx.init(params)

        def step(carry, inp):
            params, opt_state = carry
            idx, g_mul, g_add, u_mul, x_nan, k = inp
            batch = {name: v[idx] for name, v in data.items()}
            batch["x"] = jnp.where(x_nan, jnp.nan, batch["x"])
            grads = jax.grad(loss_fn)(params, rest, batch, k)
            paths, treedef = jax.tree_util.tree_flatten_with_path(grads)
            leaves = [g * g_mul for _, g in paths]
            # The Inf goes into the encoder's first parameter, as in the PyTorch runs.
            i = next(
                j
                for j, (p, _) in enumerate(paths)
                if jax.tree_util.keystr(p).startswith("['encoder']")
            )
            leaves[i] = leaves[i].at[(0,) * leaves[i].ndim].add(g_add)
            grads = jax.tree.unflatten(treedef, leaves)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: u * u_mul, updates)
            return (optax.apply_updates(params, updates), opt_state), None

        keys = jax.random.split(key, order.shape[0])
        inputs = (order, sched["g_mul"], sched["g_add"], sched["u_mul"], sched["x_nan"], keys)
        (params, _), _ = jax.lax.scan(step, (params, opt_state), inputs)
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        n = held["x"].shape[0]
        zeros_i, zeros_t = jnp.zeros((n, model.dim_int)), jnp.zeros((n, model.dim_tech))
        final = losses.vae_terms(model, held, zeros_i, zeros_t, deterministic=True)[0]
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        return final, finite

    return run


def run_jax(variant: str) -> dict[str, Any]:
    """Final eval loss and parameter finiteness of every (seed, fault) run of one variant."""
    from jaxstab.models.cfmvc.model import CFMVC

    inner = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    txs = {
        "jax_none": inner,
        "jax_guard": jaxstab.stability_guard(inner, clip=CLIP),
        "jax_guard_noclip": jaxstab.stability_guard(inner, clip=None),
    }
    tx = txs[variant]
    runner, out = None, {}
    for seed in SEEDS:
        train, held, meta = _data(seed)
        model = CFMVC(meta["n_genes"], meta["n_batches"], meta["n_cell_types"],
                      meta["n_perturbations"], rngs=nnx.Rngs(seed), **MODEL_KW)  # fmt: skip
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        runner = runner or _jax_runner(tx, graphdef)
        spe = math.ceil(N_CELLS / BATCH)
        order = jnp.asarray(batch_order(seed, spe))
        data = {k: jnp.asarray(v) for k, v in train.items()}
        held_j = {k: jnp.asarray(v) for k, v in held.items()}
        for fault in FAULTS:
            sched = schedule(seed, fault, order.shape[0])
            s = {k: jnp.asarray(v) for k, v in sched.items() if k != "at"}
            final, finite = runner(params, rest, data, held_j, order, s, jax.random.key(seed))
            out[(seed, fault)] = (float(final), bool(finite))
    return out


def run_torch() -> dict[str, Any]:
    """The same runs with the PyTorch version and the seed's guards."""
    import torch

    from benchmarks.torch_ref.cfmvc import CFMVCModel

    # One thread: on a small model, intra-op threading only adds contention (measured: 9×
    # slower with 2 threads on a loaded 2-core machine).
    torch.set_num_threads(1)
    out = {}
    for seed in SEEDS:
        train, held, meta = _data(seed)
        spe = math.ceil(N_CELLS / BATCH)
        order = torch.as_tensor(batch_order(seed, spe))
        x = torch.as_tensor(train["x"])
        b = torch.as_tensor(train["batch"], dtype=torch.long)
        c = torch.as_tensor(train["cell_type"], dtype=torch.long)
        for fault in FAULTS:
            sched = schedule(seed, fault, order.shape[0])
            torch.manual_seed(seed)
            model = CFMVCModel(meta["n_genes"], meta["n_batches"], meta["n_cell_types"],
                               meta["n_perturbations"], logvar_bound="clip", mean_bound="clip",
                               **MODEL_KW)  # fmt: skip
            model.train()
            params = list(model.encoder.parameters()) + list(model.decoder.parameters())
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
            stop_epoch_at = -1
            for t in range(order.shape[0]):
                if t // spe == stop_epoch_at:
                    continue  # the seed's guard ended this epoch
                idx = order[t]
                xb = x[idx]
                if sched["x_nan"][t]:
                    xb = torch.full_like(xb, float("nan"))
                loss, _, _ = model.vae_forward(xb, b[idx], c[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(float(sched["g_mul"][t]))
                    params[0].grad.view(-1)[0] += float(sched["g_add"][t])
                torch.nn.utils.clip_grad_norm_(params, max_norm=CLIP)
                if t % 10 == 0 and not torch.isfinite(loss):
                    stop_epoch_at = t // spe
                    continue
                for group in opt.param_groups:
                    group["lr"] = LR * float(sched["u_mul"][t])
                opt.step()
            model.eval()
            with torch.no_grad():
                n = held["x"].shape[0]
                final, _, _ = model.vae_forward(
                    torch.as_tensor(held["x"]),
                    torch.as_tensor(held["batch"], dtype=torch.long),
                    torch.as_tensor(held["cell_type"], dtype=torch.long),
                    eps_int=torch.zeros(n, MODEL_KW["dim_int"]),
                    eps_tech=torch.zeros(n, MODEL_KW["dim_tech"]),
                )
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


def run(write: bool = False) -> dict[str, Any]:
    """Runs every variant; returns the survival table (the runner writes the files)."""
    result: dict[str, Any] = {
        "benchmark": "fault injection on CFM-VC stage 1 (NB-VAE)",
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "setup": {
            "cells": N_CELLS,
            "genes": N_GENES,
            "eval_cells": N_EVAL,
            "batch": BATCH,
            "epochs": EPOCHS,
            "seeds": len(SEEDS),
            "lr": LR,
            "clip": CLIP,
            "model": MODEL_KW,
            "spike": SPIKE,
            "lr_burst": [BURST, BURST_STEPS],
            "tolerance": TOLERANCE,
        },
        "variants": {},
        "seconds": {},
    }
    for variant in VARIANTS:
        start = time.perf_counter()
        raw = run_torch() if variant == "torch_seed" else run_jax(variant)
        result["seconds"][variant] = round(time.perf_counter() - start, 1)
        result["variants"][variant] = summarize(raw)
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """Survival fractions as a markdown table (rows: faults; columns: variants)."""
    variants = list(result["variants"])
    setup = result["setup"]
    lines = [
        f"# Stability under injected faults ({result['platform']})",
        "",
        f"CFM-VC stage 1, {setup['cells']} cells × {setup['genes']} genes, batch "
        f"{setup['batch']}, {setup['epochs']} epochs, {setup['seeds']} seeds; "
        f"{result['device_kind']}, {result['cpu_count']} CPUs. A run survives when its "
        f"parameters end finite and its final held-out loss is within "
        f'{100 * setup["tolerance"]:.0f} % of the same seed\'s clean run; "loss" is the '
        "median ratio of the final held-out loss to the clean run's.",
        "",
        "| fault | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for fault in FAULTS[1:]:
        cells = []
        for v in variants:
            r = result["variants"][v][fault]
            ratio = r["median_loss_ratio"]
            loss = "—" if ratio is None else f"{ratio:.2f}×"
            cells.append(f"{100 * r['survived']:.0f} % (finite {100 * r['finite_params']:.0f} %, "
                         f"loss {loss})")  # fmt: skip
        lines.append(f"| {fault} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wall time per variant (s): " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()),
    ]
    return "\n".join(lines) + "\n"
