"""What each deviation of ``CFMVCConfig.default()`` from ``original()`` buys, measured.

Every configuration trains stages 1 + 2 on simulated data (the effect-recovery protocol of
:mod:`benchmarks.effect_recovery`, dropout 0 in all of them), once per seed: the data, the
held-out split, the initialisation and the batches all come from that seed. Each run is
scored by:

- ``pearson``: the effect-recovery statistic (predicted vs true per-gene log fold change);
- ``heldout_nll``: the exact NB negative log-likelihood per cell of 10 % held-out cells at
  the posterior mean (``jaxstab.numerics.nb_log_prob``, whatever likelihood was trained);
- stage-1 stability: the status, the share of steps clipped, the median and largest raw
  gradient norm and the number of non-finite gradient steps. The loop's explosion stop is
  off (``explosion_norm=1e30``) so that every variant trains its epochs under the same guard
  and its norms are seen, not cut short (raw-count input passes CFM-VC's default stop of
  1e5 at its first step).

Each configuration's summary is the mean, standard deviation, minimum and maximum of every
score over its seeds.

The configurations are ``default``, ``original``, ``original(straight_through=True)`` and
``default`` with one field set to the original's value at a time (``input_transform=none``,
``logvar_bound=clip`` etc.), so each such row is one deviation's effect on its own.

Example:
  >>> [name for name, _ in variants()][:4]
  ['default', 'original', 'original(straight_through=True)', 'input_transform=none']

Run: ``python -m benchmarks.deviations_cfmvc [--seeds 0 1 2] [--first-seed-only NAME ...]
[--resume]``; writes ``benchmarks/results/deviations_cfmvc-<platform>.json`` and ``.md`` after
every run, so an interrupted run leaves what it finished, and ``--resume`` trains only the
(configuration, seed) runs that the JSON file lacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
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
STRAIGHT = "original(straight_through=True)"
SCORES = ("pearson", "heldout_nll", "median_grad_norm", "max_grad_norm", "clipped_share",
          "nonfinite_steps")  # fmt: skip
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
    straight = CFMVCConfig.original(straight_through=True).replace(control_column=control_column)
    out = [
        ("default", default),
        ("original", original.replace(epochs=default.epochs)),
        (STRAIGHT, straight.replace(epochs=default.epochs)),
    ]
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


def _score(row: dict[str, Any], name: str) -> float | None:
    value = row[name] if name in ("pearson", "heldout_nll") else row["stage1"][name]
    return None if value is None else float(value)


def summarize(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd (``ddof=0``), min and max over seeds of each score (``None``s dropped).

    >>> rows = {s: {"pearson": p, "heldout_nll": 9.0, "stage1": {"status": "ok",
    ...         "median_grad_norm": 1.0, "max_grad_norm": 2.0, "clipped_share": 1.0,
    ...         "nonfinite_steps": 0}}
    ...         for s, p in [(0, 0.2), (1, 0.4)]}
    >>> s = summarize(rows)["pearson"]
    >>> round(s["mean"], 3), round(s["sd"], 3), s["min"], s["max"], s["n"]
    (0.3, 0.1, 0.2, 0.4, 2)
    """
    out: dict[str, Any] = {}
    for name in SCORES:
        values = [v for r in per_seed.values() if (v := _score(r, name)) is not None]
        a = np.asarray(values, np.float64)
        out[name] = {
            "mean": float(a.mean()) if a.size else None,
            "sd": float(a.std()) if a.size else None,
            "min": float(a.min()) if a.size else None,
            "max": float(a.max()) if a.size else None,
            "n": int(a.size),
        }
    out["statuses"] = sorted({r["stage1"]["status"] for r in per_seed.values()})
    return out


def _split(n_cells: int, n_genes: int, n_perturbations: int, seed: int) -> tuple[Any, ...]:
    adata = simulate(n_cells, n_genes, n_perturbations=n_perturbations, seed=seed)
    full = load_anndata(adata)
    labels = sorted([full.meta["control"], *full.meta["perturbations"]])
    control_column = labels.index(full.meta["control"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(full))
    n_held = len(full) // 10
    held, kept = order[:n_held], np.sort(order[n_held:])
    train = dataclasses.replace(full, arrays={k: v[kept] for k, v in full.arrays.items()})
    held_arrays = {k: jnp.asarray(v[held]) for k, v in full.arrays.items()}
    return train, held_arrays, control_column, n_held


def run_one(
    config: CFMVCConfig,
    train: Any,
    held: dict[str, jax.Array],
    *,
    seed: int,
    epochs_vae: int,
    epochs_flow: int,
    n_generate: int,
) -> dict[str, Any]:
    """One configuration at one seed: its scores (see the module docstring)."""
    res = effect_recovery.run(
        epochs_vae=epochs_vae,
        epochs_flow=epochs_flow,
        n_generate=n_generate,
        seed=seed,
        dropout=0.0,
        config=config.replace(explosion_norm=NO_STOP),
        data=train,
    )
    fits = res.pop("fits")
    model = fits[list(fits)[-1]].model
    nll = float(_heldout_nll(model, held["x"], held["batch"], held["cell_type"]))
    return {
        "pearson": res["mean_pearson"],
        "vae_reconstruction_pearson": res["mean_vae_reconstruction_pearson"],
        "heldout_nll": nll,
        "stage1": _stage1_stats(fits["vae"]),
        "flow_status": fits["flow"].status if "flow" in fits else None,
        "train_seconds": res["train_seconds"],
    }


def run(
    *,
    n_cells: int = 3000,
    n_genes: int = 500,
    n_perturbations: int = 4,
    epochs_vae: int = 6,
    epochs_flow: int = 6,
    n_generate: int = 1000,
    seeds: tuple[int, ...] = (0,),
    only: tuple[str, ...] | None = None,
    first_seed_only: tuple[str, ...] = (),
    progress: Callable[[dict[str, Any]], None] | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains every variant (or those in ``only``) at every seed; ``first_seed_only``
    variants at ``seeds[0]`` alone. ``progress`` gets the partial result after each run.

    ``previous`` (an earlier result of the same sizes, e.g. the JSON file) supplies the
    (configuration, seed) runs it already has; they are kept, not trained again.
    """
    names = [n for n, _ in variants()]
    unknown = sorted((set(only or ()) | set(first_seed_only)) - set(names))
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; known: {', '.join(names)}")
    result: dict[str, Any] = {
        "model": "cfmvc",
        "environment": environment(),
        "config": {
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_perturbations": n_perturbations,
            "epochs": {"vae": epochs_vae, "flow": epochs_flow},
            "n_generate": n_generate,
            "seeds": list(seeds),
            "first_seed_only": list(first_seed_only),
            "dropout": 0.0,
        },
        "variants": {},
    }
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    if previous is not None:
        sizes = ("n_cells", "n_genes", "n_perturbations", "epochs", "n_generate", "dropout")
        theirs = {k: previous["config"].get(k) for k in sizes}
        if theirs != {k: result["config"][k] for k in sizes}:
            raise ValueError(f"the previous result has other sizes: {theirs}")
        for n, r in previous["variants"].items():
            per_seed[n] = {int(seed): row for seed, row in r["seeds"].items()}
    for i, seed in enumerate(seeds):
        train, held, control_column, n_held = _split(n_cells, n_genes, n_perturbations, seed)
        result["config"]["heldout_cells"] = int(n_held)
        for name, config in variants(control_column):
            skip = (only and name not in only) or (i > 0 and name in first_seed_only)
            if skip or seed in per_seed.get(name, {}):
                continue
            row = run_one(config, train, held, seed=seed, epochs_vae=epochs_vae,
                          epochs_flow=epochs_flow, n_generate=n_generate)  # fmt: skip
            per_seed.setdefault(name, {})[seed] = row
            print(name, seed, json.dumps({k: row[k] for k in ("pearson", "heldout_nll")}))
            result["variants"] = {
                n: {"summary": summarize(per_seed[n]), "seeds": per_seed[n]}
                for n in names
                if n in per_seed
            }
            if progress is not None:
                progress(result)
    return result


def _spread(s: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
    if s["mean"] is None:
        return "—"
    mean = format(scale * s["mean"], fmt)
    if s["n"] < 2:
        return mean
    return f"{mean} ({format(scale * s['min'], fmt)}–{format(scale * s['max'], fmt)})"


def markdown(result: dict[str, Any]) -> str:
    """The README table of :func:`run`'s result: mean (min–max) over the seeds.

    >>> one = {"pearson": 0.9, "heldout_nll": 100.0, "stage1": {"status": "ok",
    ...        "clipped_share": 1.0, "median_grad_norm": 50.0, "max_grad_norm": 80.0,
    ...        "nonfinite_steps": 0}}
    >>> r = {"environment": {"platform": "cpu"}, "config": {"n_cells": 10, "n_genes": 5,
    ...      "seeds": [0], "epochs": {"vae": 1, "flow": 1}},
    ...      "variants": {"default": {"summary": summarize({0: one}), "seeds": {0: one}}}}
    >>> print(markdown(r).splitlines()[-3])
    | default | 1 | 0.900 | 100.0 | ok | 100 % | 50 | 80 | 0 |
    """
    c = result["config"]
    where = result["environment"]["platform"]
    seeds = ", ".join(map(str, c["seeds"]))
    lines = [
        f"# CFM-VC: what each deviation from the original does ({where})",
        "",
        f"{c['n_cells']} simulated cells x {c['n_genes']} genes; stages 1 + 2 "
        f"({c['epochs']['vae']} + {c['epochs']['flow']} epochs); seeds {seeds} (data, "
        "held-out split, initialisation and batches from each seed). Each cell is the mean "
        "over the seeds, (min–max) when there are several. Stage 1 has the guard (clip 1.0) "
        "and no explosion stop.",
        "",
        "| configuration | seeds | effect Pearson | held-out NLL / cell | stage 1 | clipped | "
        "median grad norm | max grad norm | non-finite steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["variants"].items():
        s = r["summary"]
        lines.append(
            f"| {name} | {s['pearson']['n']} | {_spread(s['pearson'], '.3f')} | "
            f"{_spread(s['heldout_nll'], '.1f')} | {', '.join(s['statuses'])} | "
            f"{_spread(s['clipped_share'], '.0f', 100)}{' %' if s['clipped_share']['n'] else ''}"
            f" | {_spread(s['median_grad_norm'], '.3g')} | {_spread(s['max_grad_norm'], '.3g')}"
            f" | {_spread(s['nonfinite_steps'], '.0f')} |"
        )
    fewer = []
    for name, r in result["variants"].items():
        ran = sorted(int(seed) for seed in r["seeds"])
        if len(ran) < len(c["seeds"]):
            fewer.append(f"{name} (seed {', '.join(map(str, ran))})")
    if fewer:
        lines += ["", f"Run at fewer seeds (for time): {'; '.join(fewer)}."]
    lines += ["", "Per-seed values: the JSON file next to this one.", ""]
    return "\n".join(lines)


def write(result: dict[str, Any]) -> Path:
    """Writes ``deviations_cfmvc-<platform>.json`` and ``.md``; returns the JSON path."""
    stem = RESULTS / f"deviations_cfmvc-{jax.default_backend()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(markdown(result))
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=3000)
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--epochs-vae", type=int, default=6)
    parser.add_argument("--epochs-flow", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--first-seed-only", nargs="*", default=[], metavar="NAME",
                        help="configurations to run at the first seed alone")  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true", help="keep the results file's runs; train the rest"
    )
    args = parser.parse_args(argv)
    stem = RESULTS / f"deviations_cfmvc-{jax.default_backend()}"
    previous = None
    if args.resume and stem.with_suffix(".json").exists():
        previous = json.loads(stem.with_suffix(".json").read_text())
    result = run(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        epochs_vae=args.epochs_vae,
        epochs_flow=args.epochs_flow,
        seeds=tuple(args.seeds),
        only=tuple(args.only) if args.only else None,
        first_seed_only=tuple(args.first_seed_only),
        progress=write,
        previous=previous,
    )
    write(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
