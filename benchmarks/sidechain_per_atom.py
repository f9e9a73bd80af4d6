"""Seed 003's story as an experiment: the error of a side-chain atom grows with its distance
from the backbone; do the seed's remedies bring the distal atoms down, and at what cost?

Each variant trains the side-chain port (``jaxstab.models.sidechain.train_sidechain``: AdamW
under the library's guard) on the 40 bundled training chains, the same steps and seeds, and
is scored on the 10 validation chains, whole (no crop), with one fixed design mask
(``benchmarks.specs.sidechain.fixed_design``: a fixed key, 50–100 % of each chain designed):
the per-atom MSE ``atom04_mse`` … ``atom13_mse`` (Å², unweighted, designed residues, atoms
present), their mean, and the sequence recovery.

Studies (``--study``):

- ``remedies`` (the default): ``baseline`` (``SideChainConfig.small()`` at the study's
  settings), ``linear`` and ``exp`` per-atom loss weights (``atom_weights``),
  ``per_atom_gaussians``, ``thickness_x2`` (``thickness_scale=2``) and ``w_nll_x10``;
- ``deviations``: ``baseline`` and each field of ``DEVIATIONS`` switched to the original's
  value alone, then ``original`` (all of them): the measured effect of each deviation of
  ``default()``.

``python -m benchmarks.sidechain_per_atom [--study S] [--epochs E] [--seeds N] [--resume]``
writes ``benchmarks/results/sidechain_<study>-<device>.json`` (remedies: ``sidechain_per_atom``)
and, for the remedies, a plot ``.png`` of the per-atom error by variant. Finished runs are
kept in a partial file (``--resume``); seeds of one variant share their compiled step.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.experiments import PartialRuns, compile_cache, finish_run

# The study's model: small widths (a CPU trains 15 runs in well under an hour), windows of
# 48 residues, batch 4, AdamW at 1e-3 (the original's 1e-4 barely moves in 80 steps).
SETTINGS: dict[str, Any] = {"max_len": 48, "batch_size": 4, "lr": 1e-3}
REMEDIES: dict[str, dict[str, Any]] = {
    "baseline": {},
    "linear": {"atom_weights": "linear"},
    "exp": {"atom_weights": "exp"},
    "per_atom_gaussians": {"per_atom_gaussians": True},
    "thickness_x2": {"thickness_scale": 2.0},
    "w_nll_x10": {"w_nll": 3e-3},
}
ATOMS = tuple(f"atom{k:02d}_mse" for k in range(4, 14))
NEAR, DISTAL = ATOMS[:3], ATOMS[-4:]  # CB, CG*, CD*; the four slots farthest along the chain


def variants(study: str) -> dict[str, dict[str, Any]]:
    """``{variant: config changes}`` of ``study``.

    >>> list(variants("deviations"))[:2]
    ['baseline', 'gaussian_atoms']
    """
    if study == "remedies":
        return dict(REMEDIES)
    if study == "deviations":
        from jaxstab.models.sidechain.config import DEVIATIONS

        out: dict[str, dict[str, Any]] = {"baseline": {}}
        out.update({name: {name: pair[1]} for name, pair in DEVIATIONS.items()})
        out["original"] = {name: pair[1] for name, pair in DEVIATIONS.items()}
        return out
    raise ValueError(f"unknown study {study!r}; studies: remedies, deviations")


def config(changes: dict[str, Any]) -> Any:
    """The study's config with ``changes``."""
    from jaxstab.models.sidechain import SideChainConfig

    return SideChainConfig.small().replace(**SETTINGS, **changes)


def evaluate(model: Any, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-atom MSE, their mean, the weighted loss and the sequence recovery on ``arrays``
    (whole chains) with the fixed design mask."""
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.specs.sidechain import fixed_design
    from jaxstab.models.sidechain import loss_terms

    c = model.config
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    batch["design_mask"] = fixed_design(batch["residue_mask"], c.mask_min, c.mask_max)
    model.eval()
    loss, metrics = nnx.jit(lambda m, b: loss_terms(m(b), b, m.config))(model, batch)
    out = {k: float(metrics[k]) for k in ATOMS}
    out["mean_atom_mse"] = float(np.mean([out[k] for k in ATOMS]))
    out["seq_recovery"] = float(metrics["seq_recovery"])
    out["loss"] = float(loss)
    return out


def run_one(changes: dict[str, Any], seed: int, epochs: int, train: Any, val: dict) -> dict:
    import jax

    from jaxstab.models.sidechain import train_sidechain

    t0 = time.perf_counter()
    res = train_sidechain(train, key=jax.random.key(seed), config=config(changes), epochs=epochs)
    out = evaluate(res.fit.model, val)
    losses = np.asarray(res.fit.history["loss"], np.float64)
    out.update(status=res.fit.status, steps=int(res.fit.steps),
               final_train_loss=float(np.mean(losses[-10:])),
               seconds=time.perf_counter() - t0)  # fmt: skip
    return out


def summarize(runs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Median over seeds of every score, per variant, and the distal/near ratios."""
    out: dict[str, Any] = {}
    for name in names:
        rows = [v for k, v in runs.items() if k.split("/")[0] == name]
        if not rows:
            continue
        keys = [*ATOMS, "mean_atom_mse", "seq_recovery", "loss", "final_train_loss"]
        med = {k: float(np.median([r[k] for r in rows])) for k in keys}
        med["near_mse"] = float(np.mean([med[k] for k in NEAR]))
        med["distal_mse"] = float(np.mean([med[k] for k in DISTAL]))
        med["runs"] = len(rows)
        med["nonfinite_runs"] = sum(r["status"] != "ok" for r in rows)
        out[name] = med
    base = out.get("baseline")
    if base:
        for med in out.values():
            med["near_vs_baseline"] = med["near_mse"] / base["near_mse"]
            med["distal_vs_baseline"] = med["distal_mse"] / base["distal_mse"]
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    """Median per-atom MSE against the atom's typical distance from CA, one line a variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxstab.models.sidechain.config import TYPICAL_CA_DISTANCE

    order = np.argsort(TYPICAL_CA_DISTANCE)
    d = np.asarray(TYPICAL_CA_DISTANCE)[order]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, med in summary.items():
        y = np.asarray([med[k] for k in ATOMS])[order]
        ax.plot(d, y, marker="o", label=name, lw=3.0 if name == "baseline" else 1.2,
                alpha=0.6 if name == "baseline" else 1.0)  # fmt: skip
    ax.set_yscale("log")  # CB is ~0.1 Å², the last slots ~25
    ax.set_xlabel("typical distance of the atom14 slot from CA (Å)")
    ax.set_ylabel("validation MSE (Å², median over seeds)")
    ax.set_title("Side-chain atom error by distance from the backbone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    study: str, epochs: int, seeds: int, store: PartialRuns, only: tuple[str, ...] = ()
) -> dict[str, Any]:
    from benchmarks.meta import environment
    from jaxstab.models.sidechain import default_data

    train = default_data("train")
    val = {k: np.asarray(v) for k, v in default_data("val").arrays.items()}
    chosen = variants(study)
    if only:
        chosen = {name: chosen[name] for name in only}
    for name, changes in chosen.items():
        for seed in range(seeds):
            key = f"{name}/seed={seed}"
            if key in store:
                continue
            store.add(key, run_one(changes, seed, epochs, train, val))
            print(key, {k: round(v, 4) for k, v in store[key].items() if isinstance(v, float)},
                  flush=True)  # fmt: skip
            finish_run()
    steps = math.ceil(len(train) / SETTINGS["batch_size"]) * epochs
    return {
        "environment": environment(),
        "settings": {
            "study": study,
            "epochs": epochs,
            "seeds": seeds,
            "steps": steps,
            "train_chains": len(train),
            "val_chains": len(val["aatype"]),
            "base": "SideChainConfig.small()",
            **SETTINGS,
            "variants": chosen,
        },
        "summary": summarize(store.runs, list(chosen)),
        "runs": store.runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sidechain_per_atom",
                                     description=__doc__)  # fmt: skip
    parser.add_argument("--study", choices=("remedies", "deviations"), default="remedies")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--variant", action="append", default=[],
                        help="run only these variants (repeatable; default all)")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of an interrupted run (same settings)")  # fmt: skip
    args = parser.parse_args(argv)
    import json

    import jax

    stem = "sidechain_per_atom" if args.study == "remedies" else f"sidechain_{args.study}"
    path = Path(args.out) / f"{stem}-{jax.devices()[0].platform}.json"
    settings = {"study": args.study, "epochs": args.epochs, **SETTINGS}
    store = PartialRuns(path, settings, resume=args.resume)
    with compile_cache():
        result = run(args.study, args.epochs, args.seeds, store, tuple(args.variant))
    store.finish(result)
    if args.study == "remedies":
        plot(result["summary"], path.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
