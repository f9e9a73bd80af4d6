"""Seed 000/001's story as an experiment: a deep E3 GNN without LayerNorm, three safeguards.

The seed notes say the encoder "always NaNs without LayerNorm" and that branch weights
``exp(clamp(raw, -5, 5))`` stop learning once ``raw`` leaves ±5 (gradient exactly 0). Here:
``num_layers`` 6, ``use_layer_norm=False``, batch 8, on RDKit's EGFR molecules, for each
learning rate (2e-3, then 5e-4) and seed:

- ``torch_seed``: the PyTorch version (``benchmarks.torch_ref.e3gnn``) with ``exp_clamp``
  weights and the seed's loop guards (``clip_grad_norm_(1.0)``, per-parameter gradient norms
  every 10 batches, a non-finite loss skipped);
- ``jax_exp_clamp``: the port with ``exp_clamp`` weights under ``jaxstab.stability_guard``
  (clip 1.0, non-finite steps skipped);
- ``jax_bounded``: the port with ``bounded`` weights (``jaxstab.numerics.bounded_positive``)
  under the same guard;
- ``jax_exp_clamp_torch_init``: ``jax_exp_clamp`` started from the PyTorch version's initial
  weights of the same seed (converted by the spec's name map), so that a gap between
  ``torch_seed`` and ``jax_exp_clamp`` can be told apart into initialisation (this variant
  near ``torch_seed``) and optimiser chain (near ``jax_exp_clamp``).

Reported per run: the first step whose loss is not finite (``None``: none), the final cosine
loss on the training molecules (eval mode), and the branch weights whose gradient is exactly
zero at the end (on the first batch), with their effective values.

``python -m benchmarks.e3gnn_layernorm [--widths small|full] [--molecules N] [--epochs E]
[--seeds S]`` writes ``benchmarks/results/e3gnn_layernorm-<device>.json``. JAX's persistent
compilation cache (a temporary folder) lets the runs of one variant and learning rate share
their compiled training step across seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

LRS = (2e-3, 5e-4)
VARIANTS = ("torch_seed", "jax_exp_clamp", "jax_bounded", "jax_exp_clamp_torch_init")
BATCH = 8


def _config(widths: str, weight_param: str, lr: float) -> Any:
    from jaxstab.models.e3gnn import E3GNNConfig

    base = E3GNNConfig.seed() if widths == "full" else E3GNNConfig.small(E3GNNConfig.seed())
    return base.replace(num_layers=6, use_layer_norm=False, weight_param=weight_param, lr=lr,
                        batch_size=BATCH, grad_clip=1.0, dropout=0.1)  # fmt: skip


def _first_nonfinite(losses: Any) -> int | None:
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses, np.float64)))
    return int(bad[0]) if bad.size else None


def _torch_init(arrays: dict, config: Any, seed: int) -> Any:
    """The port holding the PyTorch version's initial weights for ``seed``."""
    import torch
    from flax import nnx

    from benchmarks.specs.e3gnn import SPEC
    from benchmarks.torch_ref.e3gnn import E3GNNTorch
    from jaxstab.models.e3gnn import build_model

    torch.manual_seed(seed)
    reference = E3GNNTorch(config)
    model = build_model(arrays, config, nnx.Rngs(params=seed, dropout=seed + 1))
    nnx.update(model, SPEC.convert(reference.state_dict(), model))
    return model


def run_jax(
    arrays: dict, config: Any, seed: int, epochs: int, torch_init: bool = False
) -> dict[str, Any]:
    import jax
    from flax import nnx

    from jaxstab.models.e3gnn import embed, train_e3gnn
    from jaxstab.models.e3gnn.losses import embedding_loss

    t0 = time.perf_counter()
    model = _torch_init(arrays, config, seed) if torch_init else None
    res = train_e3gnn(arrays, key=jax.random.key(seed), config=config, model=model,
                      epochs=epochs).fit  # fmt: skip
    model = res.model
    pred = embed(model, arrays, batch_size=BATCH)
    final = float(embedding_loss(pred, arrays["target"], config)[1]["cosine"])
    batch = {k: v[:BATCH] for k, v in arrays.items()}
    model.eval()
    grads = nnx.grad(lambda m: embedding_loss(m(batch), batch["target"], m.config)[0])(model)
    zero = {name: float(model.branch_weight(name)) for name in model.branch_names()
            if float(getattr(grads, f"{name}_weight")[...]) == 0.0}  # fmt: skip
    return {
        "status": res.status,
        "steps": int(res.steps),
        "first_nonfinite_step": _first_nonfinite(res.history["loss"]),
        "final_cosine_loss": final,
        "zero_gradient_branch_weights": zero,
        "branch_weights": {n: float(model.branch_weight(n)) for n in model.branch_names()},
        "seconds": time.perf_counter() - t0,
    }


def run_torch(arrays: dict, config: Any, seed: int, epochs: int) -> dict[str, Any]:
    import torch

    from benchmarks.torch_ref.e3gnn import E3GNNTorch, batch_to_graph, cosine_loss, train

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = E3GNNTorch(config)
    out = train(model, arrays, epochs=epochs, batch_size=BATCH, seed=seed, lr=config.lr,
                weight_decay=config.weight_decay, clip=1.0)  # fmt: skip
    model.eval()
    target = torch.as_tensor(np.array(arrays["target"]))
    with torch.no_grad():
        preds = [model(batch_to_graph({k: v[i : i + BATCH] for k, v in arrays.items()}))
                 for i in range(0, len(target), BATCH)]  # fmt: skip
        final = float(cosine_loss(torch.cat(preds), target))
    model.zero_grad()
    batch = {k: v[:BATCH] for k, v in arrays.items()}
    cosine_loss(model(batch_to_graph(batch)), target[:BATCH]).backward()
    weights = {k: float(v) for k, v in model.branch_weights().items()}
    zero = {n: weights[n] for n in weights
            if getattr(model, f"{n}_weight").grad is not None
            and float(getattr(model, f"{n}_weight").grad) == 0.0}  # fmt: skip
    return {
        "status": "ok" if out["first_nonfinite_step"] is None else "nonfinite",
        "steps": len(out["loss"]),
        "first_nonfinite_step": out["first_nonfinite_step"],
        "final_cosine_loss": final,
        "zero_gradient_branch_weights": zero,
        "branch_weights": weights,
        "seconds": time.perf_counter() - t0,
    }


def run(widths: str = "small", molecules: int = 365, epochs: int = 5, seeds: int = 5,
        variants: tuple[str, ...] = VARIANTS, done: dict[str, Any] | None = None,
        on_run: Any = None) -> dict[str, Any]:  # fmt: skip
    """Every variant at both learning rates for ``seeds`` seeds.

    ``done`` holds runs already measured (by key, e.g. from an interrupted run's partial
    file), which are kept and not repeated; ``on_run(runs)`` is called after each new run.
    """
    import jax

    from benchmarks.meta import environment
    from jaxstab.models.e3gnn import default_data

    arrays = {k: np.asarray(v[:molecules]) for k, v in default_data().arrays.items()}
    runs: dict[str, Any] = {}
    for lr in LRS:
        for variant in variants:
            param = "bounded" if variant == "jax_bounded" else "exp_clamp"
            config = _config(widths, param, lr)
            for seed in range(seeds):
                key = f"lr={lr:g}/{variant}/seed={seed}"
                if done and key in done:
                    runs[key] = done[key]
                    continue
                if variant == "torch_seed":
                    runs[key] = run_torch(arrays, config, seed, epochs)
                else:
                    runs[key] = run_jax(arrays, config, seed, epochs, variant.endswith("init"))
                print(key, json.dumps(runs[key]), flush=True)
                # Drop this run's executables (the persistent cache keeps them on disk): a
                # process that holds every run's runs out of memory mappings after ~17 runs.
                jax.clear_caches()
                if on_run is not None:
                    on_run(runs)
    summary = {}
    for lr in LRS:
        for variant in variants:
            rows = [v for k, v in runs.items() if k.startswith(f"lr={lr:g}/{variant}/")]
            nonfinite = [r["first_nonfinite_step"] for r in rows]
            summary[f"lr={lr:g}/{variant}"] = {
                "runs": len(rows),
                "runs_with_nonfinite_loss": sum(s is not None for s in nonfinite),
                "first_nonfinite_steps": nonfinite,
                "final_cosine_loss_median": float(
                    np.median([r["final_cosine_loss"] for r in rows])
                ),
                "runs_with_zero_gradient_branch_weight": sum(
                    bool(r["zero_gradient_branch_weights"]) for r in rows
                ),
            }
    return {
        "environment": environment(),
        "settings": {
            "widths": widths,
            "molecules": molecules,
            "epochs": epochs,
            "seeds": seeds,
            "batch_size": BATCH,
            "num_layers": 6,
            "use_layer_norm": False,
            "lrs": list(LRS),
            "steps_per_epoch": math.ceil(molecules / BATCH),
        },
        "summary": summary,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e3gnn_layernorm",
                                     description=__doc__)  # fmt: skip
    parser.add_argument("--widths", choices=("small", "full"), default="small")
    parser.add_argument("--molecules", type=int, default=365)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--variant", action="append", choices=VARIANTS,
                        help="run only these variants (repeatable; default all)")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of an interrupted run (same settings)")  # fmt: skip
    args = parser.parse_args(argv)
    import jax

    from benchmarks.experiments import PartialRuns, compile_cache

    path = Path(args.out) / f"e3gnn_layernorm-{jax.devices()[0].platform}.json"
    settings = {"widths": args.widths, "molecules": args.molecules, "epochs": args.epochs}
    store = PartialRuns(path, settings, resume=args.resume)

    def save(runs: dict[str, Any]) -> None:
        for key, value in runs.items():
            if key not in store:
                store.add(key, value)

    with compile_cache():
        result = run(args.widths, args.molecules, args.epochs, args.seeds,
                     tuple(args.variant or VARIANTS), dict(store.runs), save)  # fmt: skip
    store.finish(result)
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
