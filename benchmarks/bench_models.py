"""Training speed and peak memory of one stage of each port against its PyTorch version.

``python -m benchmarks.run --suite speed [--model NAME]`` (or ``python -m
benchmarks.bench_models``) trains, for every spec of :mod:`benchmarks.specs` (or the ones
named) at its ``"speed"`` size if it has one, else its ``"full"`` size (CFM-VC: 10 000
simulated cells x 2000 genes, batch 64, 157 steps per epoch; E3 GNN: the full-width model on 32
EGFR molecules, batch 8), the spec's stage with five variants, each in its own subprocess so
that peak memory is per variant:

- ``jax_scan``: ``jaxstab.train.fit`` with one jitted ``lax.scan`` per epoch and the stage's
  optimizer ``jaxstab.train.stages.stage_optimizer(inner, trainable)`` (the guard inside the
  freezing; ``inner`` the port's, e.g. AdamW with the config's ``lr`` and ``weight_decay``);
- ``jax_scan_unguarded``: the same with ``stage_optimizer(..., guard=False)``, which only
  records norms (the guard's cost on this model);
- ``jax_step``: ``fit`` with ``steps_per_call=1`` (one jitted call per step);
- ``torch_eager``: the PyTorch version's own loop (``spec.train_torch``, seed guards included);
- ``torch_compile``: the same with ``torch.compile`` on the loss.

Seconds per epoch exclude compilation: for JAX, a first one-epoch ``fit`` call compiles
(``first epoch incl. compile``) and a second call with the same optimizer object, which reuses
the compiled step, is timed over ``E`` epochs; for PyTorch the first epoch is dropped. Peak
memory on CPU is the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so it includes the Python runtime, the framework
and the data. Run directly, writes ``benchmarks/results/models-<platform>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks import specs
from benchmarks.meta import describe, environment
from benchmarks.specs.base import size_examples

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("jax_scan", "jax_scan_unguarded", "jax_step", "torch_eager", "torch_compile")
SIZE = "full"


def speed_size(spec: specs.ModelSpec) -> str:
    """The size the suite trains ``spec`` at: ``"speed"`` where the spec has it, else
    :data:`SIZE`."""
    return "speed" if "speed" in spec.sizes else SIZE


MEMORY = "peak resident set size of the variant's process (getrusage ru_maxrss)"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def jax_setup(spec: specs.ModelSpec, variant: str, size: str = SIZE, seed: int = 0):
    """``(model, dataset, tx, loss_fn, run config)`` of a JAX variant: the spec's stage with
    ``stage_optimizer(inner, trainable, guard=variant != "jax_scan_unguarded")``."""
    from jaxstab import plugin
    from jaxstab.train.stages import stage_optimizer

    entry = spec.model_entry()
    stage = entry.stage(spec.stage)
    cfg = spec.run_config(size)
    model, dataset = spec.build_jax(size, "default", seed)
    inner = plugin.inner_optimizer(entry, cfg)
    tx = stage_optimizer(inner, stage.trainable, guard=variant != "jax_scan_unguarded",
                         clip=cfg["grad_clip"] or None)  # fmt: skip
    return model, dataset, tx, stage.loss_fn or entry.loss_fn, cfg


def _jax_variant(spec: specs.ModelSpec, variant: str, epochs: int, size: str, seed: int):
    import jax
    from flax import nnx

    from jaxstab.train import fit

    # One optimizer object: fit caches the compiled step per optimizer, so the second call
    # below runs without compiling and times the epochs alone.
    model, dataset, tx, loss_fn, cfg = jax_setup(spec, variant, size, seed)
    steps_per_call = 1 if variant == "jax_step" else None

    def timed(n_epochs: int) -> tuple[float, Any]:
        start = time.perf_counter()
        res = fit(model, tx, loss_fn, dataset.arrays, batch_size=spec.size(size)["batch_size"],
                  epochs=n_epochs, key=jax.random.key(seed), steps_per_call=steps_per_call,
                  explosion_norm=cfg["explosion_norm"])  # fmt: skip
        jax.block_until_ready(nnx.state(res.model))
        return time.perf_counter() - start, res

    first, _ = timed(1)
    seconds, res = timed(epochs)
    stats = jax.devices()[0].memory_stats() or {}  # None on the CPU
    return {
        "seconds_per_epoch": seconds / epochs,
        "first_epoch_seconds_incl_compile": first,
        "steps_per_epoch": res.steps_per_epoch,
        "final_epoch_loss": float(res.epoch_history["train_loss"][-1]),
        "status": res.status,
        "peak_device_mib": stats["peak_bytes_in_use"] / 2**20 if stats else None,
    }


def torch_device() -> str:
    """Where the PyTorch variants run: ``"cuda"`` when PyTorch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_variant(spec: specs.ModelSpec, variant: str, epochs: int, size: str, seed: int):
    import torch

    device = torch_device()
    # The PyTorch versions create their tensors without a device argument, so the default
    # device puts the model, the data and every step on the GPU where there is one.
    torch.set_default_device(device)
    bs = spec.size(size)["batch_size"]
    dataset = spec.data(size, seed)
    model = spec.build_torch(size, "default", seed)
    hist = spec.train_torch(model, dataset, epochs=1 + epochs, batch_size=bs, seed=seed,
                            compile=variant == "torch_compile")  # fmt: skip
    steps = -(-len(dataset) // bs)
    return {
        "seconds_per_epoch": sum(hist["epoch_seconds"][1:]) / epochs,
        "first_epoch_seconds_incl_compile": hist["epoch_seconds"][0],
        "steps_per_epoch": steps,
        "final_epoch_loss": float(sum(hist["loss"][-steps:]) / steps),
        "torch_device": device,
        "peak_device_mib": (
            torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        ),
    }


def run_variant(
    model: str, variant: str, epochs: int, size: str = SIZE, seed: int = 0
) -> dict[str, Any]:
    """One variant in this process: seconds per epoch, compile time, final loss, peak RSS."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    spec = specs.get(model)
    run_one = _jax_variant if variant.startswith("jax") else _torch_variant
    row = run_one(spec, variant, epochs, size, seed)
    return {"variant": variant, **row, "timed_epochs": epochs, "peak_rss_mib": _peak_rss_mib()}


def _subprocess(model: str, variant: str, epochs: int, size: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_models", "--model", model,
           "--variant", variant, "--epochs", str(epochs), "--size", size]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "error": proc.stderr[-2000:]}
    return json.loads(lines[-1])


def run(
    models: Iterable[str] | None = None,
    epochs: int = 2,
    variants: Iterable[str] = VARIANTS,
    size: str | None = None,
) -> dict[str, Any]:
    """Every variant of every spec (or of ``models``), each in a subprocess, at ``size``
    (default: :func:`speed_size`)."""
    out: dict[str, Any] = {}
    for spec in specs.select(models):
        at = size or speed_size(spec)
        out[spec.name] = {
            "stage": spec.stage,
            "size": at,
            "settings": dict(spec.size(at)),
            "results": [_subprocess(spec.name, v, epochs, at) for v in variants],
        }
    return {"environment": environment(), "memory": MEMORY, "models": out}


def to_markdown(result: dict[str, Any]) -> str:
    """One results table per model (a device-memory column where a variant measured one)."""
    lines = ["# Stage training speed against the PyTorch versions", ""]
    lines += [f"{describe(result['environment'])}. Memory: {result['memory']}.", ""]
    for name, res in result["models"].items():
        s = res["settings"]
        device = any(r.get("peak_device_mib") is not None for r in res["results"])
        extra = " peak device memory (MiB) |" if device else ""
        lines += [
            f"## {name}, stage {res['stage']} (size {res['size']}: "
            f"{size_examples(s)} "
            f"examples, batch {s.get('batch_size')})",
            "",
            "| variant | s / epoch | first epoch incl. compile (s) | peak RSS (MiB) | final loss |"
            + extra,
            "|---|---|---|---|---|" + ("---|" if device else ""),
        ]
        for r in res["results"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed | | | |" + (" |" if device else ""))
                continue
            row = (
                f"| {r['variant']} | {r['seconds_per_epoch']:.2f} | "
                f"{r['first_epoch_seconds_incl_compile']:.1f} | {r['peak_rss_mib']:.0f} | "
                f"{r['final_epoch_loss']:.1f} |"
            )
            if device:
                mib = r.get("peak_device_mib")
                row += " — |" if mib is None else f" {mib:.0f} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a spec name (repeat; default all)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per variant")
    parser.add_argument("--size", help="the specs' size preset (default: speed, else full)")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    args = parser.parse_args(argv)
    try:
        chosen = [s.name for s in specs.select(args.model)]
    except specs.UnknownModel as e:
        parser.error(str(e))
    if args.variant:
        if len(chosen) != 1:
            parser.error("--variant needs exactly one --model")
        size = args.size or speed_size(specs.get(chosen[0]))
        print(json.dumps(run_variant(chosen[0], args.variant, args.epochs, size)), flush=True)
        return 0
    result = run(chosen, args.epochs, size=args.size)
    from benchmarks.run import merge_models, write_results

    if args.model:
        result = merge_models("models", result)
    write_results("models", result, to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
