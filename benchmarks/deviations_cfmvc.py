"""What each deviation of ``CFMVCConfig.default()`` from ``original()`` buys, measured.

Every configuration trains stages 1 + 2 on the same simulated data with the same seed (the
effect-recovery protocol of :mod:`benchmarks.effect_recovery`, dropout 0 in all of them) and
is scored by:

- ``pearson``: the effect-recovery statistic (predicted vs true per-gene log fold change);
- ``heldout_nll``: the exact NB negative log-likelihood per cell of 10 % held-out cells at
  the posterior mean (``jaxstab.numerics.nb_log_prob``, whatever likelihood was trained);
- stage-1 stability: the status, the share of steps clipped, the median and largest raw
  gradient norm and the number of non-finite gradient steps. The loop's explosion stop is
  off (``explosion_norm=1e30``) so that every variant trains its epochs under the same guard
  and its norms are seen, not cut short (raw-count input passes CFM-VC's default stop of
  1e5 at its first step).

The configurations are ``default``, ``original`` and ``default`` with one field set to the
original's value at a time (``input_transform=none`` etc.), so each row is one deviation's
effect on its own.

Example:
  >>> [name for name, _ in variants()][:3]
  ['default', 'original', 'input_transform=none']

Run: ``python -m benchmarks.deviations_cfmvc``; writes
``benchmarks/results/deviations_cfmvc-<platform>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import effect_recovery
from benchmarks.meta import environment
from jaxstab import numerics
from jaxstab import stat_names as S
from jaxstab.models.cfmvc import CFMVCConfig, load_anndata, simulate

RESULTS = Path(__file__).resolve().parent / "results"
NO_STOP = 1e30
FUNCTION_FIELDS = (
    "input_transform",
    "logvar_bound",
    "mean_bound",
    "theta_bound",
    "flow_target",
    "control_encoding",
    "nb_likelihood",
    "alpha_gating",
)


def variants(control_column: int = 0) -> list[tuple[str, CFMVCConfig]]:
    """``(name, config)``: default, original, and default with one original field each."""
    default = CFMVCConfig.default()
    original = CFMVCConfig.original().replace(control_column=control_column)
    out = [("default", default), ("original", original.replace(epochs=default.epochs))]
    for field in FUNCTION_FIELDS:
        value = getattr(original, field)
        if value != getattr(default, field):
            changes = {field: value}
            if field == "control_encoding":
                changes["control_column"] = control_column
            out.append((f"{field}={value}", default.replace(**changes)))
    return out


@nnx.jit
def _heldout_nll(model: Any, x: jax.Array, batch: jax.Array, cell_type: jax.Array) -> jax.Array:
    enc = model.encoder(x, batch, cell_type, deterministic=True)
    mean, theta = model.decoder(enc.int_mean, enc.tech_mean, deterministic=True)
    return -jnp.mean(jnp.sum(numerics.nb_log_prob(x, mean, theta), -1))


def _stage1_stats(fit: Any) -> dict[str, Any]:
    h = fit.history
    norms = np.asarray(h.get(S.GLOBAL_NORM, []), np.float64)
    clipped = np.asarray(h.get(S.CLIP_CLIPPED, []), np.float64)
    nonfinite = int(np.sum(~np.isfinite(norms)))
    finite = norms[np.isfinite(norms)]
    return {
        "status": fit.status,
        "steps": int(fit.steps),
        "clipped_share": float(clipped.mean()) if clipped.size else None,
        "max_grad_norm": float(finite.max()) if finite.size else None,
        "median_grad_norm": float(np.median(finite)) if finite.size else None,
        "nonfinite_steps": nonfinite,
    }


def run(
    *,
    n_cells: int = 3000,
    n_genes: int = 500,
    n_perturbations: int = 4,
    epochs_vae: int = 6,
    epochs_flow: int = 6,
    n_generate: int = 1000,
    seed: int = 0,
    only: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Trains every variant (or those named in ``only``) and returns the scores."""
    adata = simulate(n_cells, n_genes, n_perturbations=n_perturbations, seed=seed)
    full = load_anndata(adata)
    labels = sorted([full.meta["control"], *full.meta["perturbations"]])
    control_column = labels.index(full.meta["control"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(full))
    n_held = len(full) // 10
    held, kept = order[:n_held], np.sort(order[n_held:])
    train = dataclasses.replace(full, arrays={k: v[kept] for k, v in full.arrays.items()})
    rows = {}
    for name, config in variants(control_column):
        if only and name not in only:
            continue
        config = config.replace(explosion_norm=NO_STOP)
        res = effect_recovery.run(
            epochs_vae=epochs_vae,
            epochs_flow=epochs_flow,
            n_generate=n_generate,
            seed=seed,
            dropout=0.0,
            config=config,
            data=train,
        )
        fits = res.pop("fits")
        model = fits[list(fits)[-1]].model
        arrays = {k: jnp.asarray(v[held]) for k, v in full.arrays.items()}
        nll = float(_heldout_nll(model, arrays["x"], arrays["batch"], arrays["cell_type"]))
        rows[name] = {
            "pearson": res["mean_pearson"],
            "vae_reconstruction_pearson": res["mean_vae_reconstruction_pearson"],
            "heldout_nll": nll,
            "stage1": _stage1_stats(fits["vae"]),
            "flow_status": fits["flow"].status if "flow" in fits else None,
            "train_seconds": res["train_seconds"],
        }
        print(name, json.dumps({k: rows[name][k] for k in ("pearson", "heldout_nll")}))
    return {
        "model": "cfmvc",
        "environment": environment(),
        "config": {
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_perturbations": n_perturbations,
            "epochs": {"vae": epochs_vae, "flow": epochs_flow},
            "n_generate": n_generate,
            "seed": seed,
            "dropout": 0.0,
            "heldout_cells": int(n_held),
        },
        "variants": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """The README table of :func:`run`'s result.

    >>> r = {"environment": {"platform": "cpu"}, "config": {"n_cells": 10, "n_genes": 5},
    ...      "variants": {"default": {"pearson": 0.9, "heldout_nll": 100.0,
    ...       "stage1": {"status": "ok", "clipped_share": 1.0, "median_grad_norm": 50.0,
    ...                  "max_grad_norm": 80.0, "nonfinite_steps": 0}}}}
    >>> print(markdown(r).splitlines()[-1])
    | default | 0.900 | 100.0 | ok | 100 % | 50 / 80 | 0 |
    """
    c = result["config"]
    where = result["environment"]["platform"]
    lines = [
        f"# CFM-VC: what each deviation from the original does ({where})",
        "",
        f"{c['n_cells']} simulated cells x {c['n_genes']} genes; stages 1 + 2; same seed.",
        "",
        "| configuration | effect Pearson | held-out NLL / cell | stage 1 | clipped | "
        "median / max grad norm | non-finite steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["variants"].items():
        s = r["stage1"]
        clipped = "—" if s["clipped_share"] is None else f"{100 * s['clipped_share']:.0f} %"
        med = "—" if s["median_grad_norm"] is None else f"{s['median_grad_norm']:.3g}"
        if s.get("max_grad_norm") is not None:
            med += f" / {s['max_grad_norm']:.3g}"
        lines.append(
            f"| {name} | {r['pearson']:.3f} | {r['heldout_nll']:.1f} | {s['status']} | "
            f"{clipped} | {med} | {s['nonfinite_steps']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=3000)
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--epochs-vae", type=int, default=6)
    parser.add_argument("--epochs-flow", type=int, default=6)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args(argv)
    result = run(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        epochs_vae=args.epochs_vae,
        epochs_flow=args.epochs_flow,
        only=tuple(args.only) if args.only else None,
    )
    stem = RESULTS / f"deviations_cfmvc-{jax.default_backend()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
