"""Stage-1 training speed and peak memory of the model ports against their PyTorch versions.

``python -m benchmarks.bench_models --model cfmvc`` runs the seed-002 configuration (10 000
simulated cells × 2000 genes, batch 64, 157 steps per epoch) for five variants, each in its
own subprocess so that peak memory is per variant:

- ``jax_scan``: ``jaxstab.train.fit`` with one jitted ``lax.scan`` per epoch;
- ``jax_scan_unguarded``: the same with plain AdamW instead of ``stability_guard`` (the
  guard's cost on this model);
- ``jax_step``: ``fit`` with ``steps_per_call=1`` (one jitted call per step);
- ``torch_eager``: the PyTorch version's stage-1 loop (seed guards included);
- ``torch_compile``: the same with ``torch.compile`` on the loss.

Seconds per epoch exclude compilation: for JAX, a first one-epoch ``fit`` call compiles
(``first epoch incl. compile``) and a second call with the same optimizer object, which reuses
the compiled step, is timed over ``E`` epochs; for PyTorch the first epoch is dropped. Peak
memory on CPU is the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so it includes the Python runtime, the framework
and the data. Writes ``benchmarks/results/models-<platform>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("jax_scan", "jax_scan_unguarded", "jax_step", "torch_eager", "torch_compile")
CFMVC = {"n_cells": 10_000, "n_genes": 2000, "n_perturbations": 10, "batch_size": 64}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cfmvc_variant(variant: str, epochs: int, seed: int = 0) -> dict[str, Any]:
    from jaxstab.models.cfmvc import load_anndata, simulate

    data = load_anndata(
        simulate(CFMVC["n_cells"], CFMVC["n_genes"], CFMVC["n_perturbations"], seed=seed)
    )
    meta = data.meta
    sizes = (meta["n_genes"], meta["n_batches"], meta["n_cell_types"], meta["n_perturbations"])
    bs = CFMVC["batch_size"]
    if variant.startswith("jax"):
        import jax
        import optax
        from flax import nnx

        from jaxstab.models.cfmvc.losses import vae_loss
        from jaxstab.models.cfmvc.model import CFMVC as Model
        from jaxstab.models.cfmvc.train import (
            EXPLOSION_NORM,
            STAGES,
            freeze_except,
            stage_optimizer,
        )
        from jaxstab.train import fit

        model = Model(*sizes, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        spc = 1 if variant == "jax_step" else None

        # One optimizer object: fit caches the compiled step per optimizer, so the second
        # call below runs without compiling and times the epochs alone.
        tx = stage_optimizer(STAGES["vae"].trainable)
        if variant == "jax_scan_unguarded":  # the guard's cost on this model
            tx = freeze_except(optax.adamw(1e-3, weight_decay=1e-5), STAGES["vae"].trainable)

        def timed(n_epochs: int) -> tuple[float, Any]:
            start = time.perf_counter()
            res = fit(model, tx, vae_loss, data.arrays, batch_size=bs, epochs=n_epochs,
                      key=jax.random.key(seed), steps_per_call=spc,
                      explosion_norm=EXPLOSION_NORM)  # fmt: skip
            jax.block_until_ready(nnx.state(res.model))
            return time.perf_counter() - start, res

        t1, _ = timed(1)
        tn, res = timed(epochs)
        per_epoch = tn / epochs
        final = float(res.epoch_history["train_loss"][-1])
        steps = res.steps_per_epoch
        first_call = t1
    else:
        import torch

        from benchmarks.torch_ref.cfmvc import CFMVCModel, train_stage1

        torch.manual_seed(seed)
        model = CFMVCModel(*sizes)
        start = time.perf_counter()
        hist = train_stage1(model, data.arrays, epochs=1 + epochs, batch_size=bs, seed=seed,
                            compile=variant == "torch_compile")  # fmt: skip
        del start
        per_epoch = sum(hist["epoch_seconds"][1:]) / epochs
        first_call = hist["epoch_seconds"][0]
        steps = -(-CFMVC["n_cells"] // bs)
        final = float(sum(hist["loss"][-steps:]) / steps)
    return {
        "variant": variant,
        "seconds_per_epoch": per_epoch,
        "first_epoch_seconds_incl_compile": first_call,
        "steps_per_epoch": steps,
        "timed_epochs": epochs,
        "final_epoch_loss": final,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _device() -> str:
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def run(model: str = "cfmvc", epochs: int = 2, variants: tuple[str, ...] = VARIANTS) -> dict:
    """Runs every variant in a subprocess and returns the combined result dictionary."""
    if model != "cfmvc":
        raise ValueError(f"unknown model {model!r}; this benchmark knows: cfmvc")
    rows = []
    for variant in variants:
        cmd = [sys.executable, "-m", "benchmarks.bench_models", "--model", model,
               "--variant", variant, "--epochs", str(epochs)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows.append({"variant": variant, "error": proc.stderr[-2000:]})
        else:
            rows.append(json.loads(lines[-1]))
    return {
        "model": model,
        "stage": "stage 1 (VAE)",
        "device": _device(),
        "config": CFMVC,
        "memory": "peak resident set size of the variant's process (getrusage ru_maxrss)",
        "results": rows,
    }


def to_markdown(result: dict) -> str:
    """A results table in Markdown."""
    cfg = result["config"]
    lines = [
        f"# {result['model']} {result['stage']}: {cfg['n_cells']} cells × {cfg['n_genes']} "
        f"genes, batch {cfg['batch_size']}",
        "",
        f"Device: {result['device']}. Memory: {result['memory']}.",
        "",
        "| variant | s / epoch | first epoch incl. compile (s) | peak RSS (MiB) | final loss |",
        "|---|---|---|---|---|",
    ]
    for r in result["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['seconds_per_epoch']:.2f} | "
            f"{r['first_epoch_seconds_incl_compile']:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{r['final_epoch_loss']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cfmvc")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per variant")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(_cfmvc_variant(args.variant, args.epochs)), flush=True)
        return
    result = run(args.model, args.epochs)
    from benchmarks.run import write_results

    write_results("models", result, to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
