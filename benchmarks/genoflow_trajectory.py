"""GenoFlow's trajectory accuracy: leave one time point out, predict it, measure the distance.

The standard test of trajectory models (as in the OT-CFM and TrajectoryNet papers): train both
stages without the cells of one intermediate time point k, integrate the learned flow from the
cells of time point k − 1 to the time of k, and compare the predicted cells with the held-out
ones by the Wasserstein-1 distance (exact, POT's ``emd2`` on Euclidean costs).

The comparison space is the same for every model and baseline: the first ``n_pcs`` principal
components of log1p(counts per 10⁴) fitted on the training cells. A predicted cell is made the
way a real one is: its latent state is decoded to NB means at its source cell's library size,
counts are drawn from the NB with the decoder's dispersion, then normalised and projected.
Baselines, in the same space:

- ``previous``: the cells of time point k − 1 unchanged;
- ``linear``: the cells of k − 1 paired with those of k + 1 by exact OT (Euclidean cost in PCA
  space), each pair interpolated linearly at the real time of k;
- ``roundtrip`` (the model's own floor): the held-out cells encoded, decoded and sampled the
  same way, which no prediction through this VAE can beat.

Run ``python -m benchmarks.genoflow_trajectory [--configs default,original,...] [--seeds 2]``;
writes ``benchmarks/results/genoflow_trajectory-<device>.json`` and ``.md``. The configs are
presets (``default``, ``original``) and single deviations (``default+kl=clamp``: the default
with one field of :data:`jaxstab.models.genoflow.DEVIATIONS` set to the original's value).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import meta
from benchmarks.experiments import PartialRuns, compile_cache, finish_run

RESULTS = Path(__file__).parent / "results"
METRICS = ("model", "previous", "linear", "roundtrip")
CONFIGS = ("default", "original", "default+kl=clamp", "default+nb=original",
           "default+recon=gene_mean", "default+flow_time=interval")  # fmt: skip


def config_of(name: str) -> Any:
    """A config named ``preset`` or ``preset+field=value[+...]``.

    >>> config_of("default+flow_time=interval").flow_time
    'interval'
    """
    from jaxstab.models.genoflow import GenoFlowConfig

    preset, *changes = name.split("+")
    cfg = getattr(GenoFlowConfig, preset)()
    for change in changes:
        field, _, value = change.partition("=")
        like = getattr(cfg, field)
        cfg = cfg.replace(**{field: type(like)(value) if not isinstance(like, str) else value})
    return cfg


def _normalise(counts: np.ndarray) -> np.ndarray:
    lib = np.maximum(counts.sum(1, keepdims=True), 1.0)
    return np.log1p(counts / lib * 1e4)


class Space:
    """PCA of log1p(counts per 10⁴) fitted on ``counts``."""

    def __init__(self, counts: np.ndarray, n_pcs: int) -> None:
        y = _normalise(counts)
        self.mean = y.mean(0)
        _, _, vt = np.linalg.svd(y - self.mean, full_matrices=False)
        self.components = vt[:n_pcs].T

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        return (_normalise(counts) - self.mean) @ self.components


def w1(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Wasserstein-1 distance between two point clouds with uniform weights.

    >>> round(w1(np.zeros((3, 2)), np.ones((4, 2))), 6)
    1.414214
    """
    import ot

    m = ot.dist(a, b, metric="euclidean")
    return float(ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), m))


def linear_baseline(p0: np.ndarray, p2: np.ndarray, frac: float) -> np.ndarray:
    """Cells of the earlier time point paired with the later ones by exact OT and interpolated
    at ``frac`` of the way (each earlier cell once, with its largest-mass partner)."""
    import ot

    plan = ot.emd(np.full(len(p0), 1 / len(p0)), np.full(len(p2), 1 / len(p2)),
                  ot.dist(p0, p2, metric="euclidean"))  # fmt: skip
    partner = plan.argmax(1)
    return (1 - frac) * p0 + frac * p2[partner]


def sample_counts(model: Any, z: Any, cond: np.ndarray, library: np.ndarray,
                  seed: int) -> np.ndarray:  # fmt: skip
    """NB counts drawn from the decoder's means and dispersion at latent states ``z``."""
    import jax.numpy as jnp

    lib = jnp.asarray(library)
    mean, theta = model.decoder(z, jnp.asarray(cond), lib)
    theta = np.clip(np.asarray(theta, np.float64), *model.config.theta_bounds)
    mean = np.asarray(mean, np.float64)
    rng = np.random.default_rng(seed)
    return rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)


def predict_counts(model: Any, x_prev: np.ndarray, cond: np.ndarray, tau: tuple[float, float],
                   seed: int) -> np.ndarray:  # fmt: skip
    """Counts sampled at flow time ``tau[1]`` for the cells ``x_prev`` at ``tau[0]``."""
    from jaxstab.models.genoflow import simulate_trajectory

    traj = simulate_trajectory(model, x_prev, cond.astype(int), n_save=2, t_span=tau)
    return sample_counts(model, traj.latent[-1], cond, x_prev.sum(1), seed)


def roundtrip_counts(model: Any, x: np.ndarray, cond: np.ndarray, seed: int) -> np.ndarray:
    """The cells ``x`` encoded to their posterior means, decoded and sampled."""
    from jaxstab.models.genoflow.train import encode_means

    return sample_counts(model, encode_means(model, x, cond), cond, x.sum(1), seed)


def one_run(config_name: str, held: int, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Trains without time point ``held`` and scores its prediction and the baselines."""
    import jax

    from jaxstab.models.genoflow import load_anndata, simulate, train_genoflow

    adata = simulate(settings["cells_per_time"], settings["n_genes"],
                     n_time_points=settings["n_time_points"], seed=seed)  # fmt: skip
    time_values = np.asarray(adata.obs["time"], float)
    times = np.unique(time_values)
    t_held = times[held]
    train = adata[time_values != t_held].copy()
    counts = np.asarray(adata.layers["counts"], np.float32)
    data = load_anndata(train)
    space = Space(np.asarray(train.layers["counts"], np.float32), settings["n_pcs"])
    cond_all = np.asarray(adata.obs["condition"].cat.codes, np.int32)
    prev, nxt, target = (time_values == times[held - 1], time_values == times[held + 1],
                         time_values == t_held)  # fmt: skip
    frac = (t_held - times[held - 1]) / (times[held + 1] - times[held - 1])

    start = time.perf_counter()
    out = train_genoflow(data, config=config_of(config_name), key=jax.random.key(seed),
                         epochs={"vae": settings["vae_epochs"], "flow": settings["flow_epochs"]},
                         progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    status = {k: r.fit.status for k, r in out.stages.items()}
    ft = out.model.flow_times()
    j = int(np.searchsorted(np.asarray(data.meta["time_points"]), times[held - 1]))
    tau = (ft[j], ft[j] + frac * (ft[j + 1] - ft[j]))
    pred = predict_counts(out.model, counts[prev], cond_all[prev], tau, seed)
    p_target = space(counts[target])
    finish_run()
    return {
        "status": status,
        "train_seconds": seconds,
        "model": w1(space(pred), p_target),
        "previous": w1(space(counts[prev]), p_target),
        "roundtrip": w1(
            space(roundtrip_counts(out.model, counts[target], cond_all[target], seed)), p_target
        ),
        "linear": w1(linear_baseline(space(counts[prev]), space(counts[nxt]), frac), p_target),
        "final_loss": {
            k: float(np.asarray(r.fit.history["loss"])[-1]) for k, r in out.stages.items()
        },
    }


def summarise(runs: dict[str, Any], configs: list[str], held: list[int]) -> dict[str, Any]:
    """Median W1 per (config, held-out time point) and overall, with each baseline."""
    table: dict[str, Any] = {}
    for name in configs:
        rows = {k: [r for key, r in runs.items() if key.startswith(f"{name}/held={k}/")]
                for k in held}  # fmt: skip
        table[name] = {
            str(k): {m: float(np.median([r[m] for r in rs])) for m in
                     METRICS}
            for k, rs in rows.items() if rs
        }  # fmt: skip
        every = [r for rs in rows.values() for r in rs]
        if every:
            table[name]["all"] = {m: float(np.median([r[m] for r in every])) for m in
                                  METRICS}  # fmt: skip
    return table


def markdown(result: dict[str, Any]) -> str:
    """The README table: W1 per held-out time point, the model against the baselines."""
    s = result["settings"]
    held = [str(k) for k in s["held_out"]]
    lines = [
        f"Leave-one-time-point-out W1 (lower is better), {s['n_time_points']} time points x "
        f"{s['cells_per_time']} cells x {s['n_genes']} genes, {len(s['seeds'])} seeds (median); "
        f"{meta.describe(result['environment'])}",
        "",
        "| | " + " | ".join(f"t{k} held out" for k in held) + " | all |",
        "|---|" + "---|" * (len(held) + 1),
    ]
    table = result["table"]
    first = next(iter(table.values()))
    for base in ("previous", "linear"):
        label = {
            "previous": "previous time point unchanged",
            "linear": "linear interpolation of the OT pairing",
        }[base]
        lines.append(f"| {label} | " + " | ".join(f"{first[k][base]:.2f}" for k in held)
                     + f" | {first['all'][base]:.2f} |")  # fmt: skip
    for name, row in table.items():
        lines.append(f"| VAE round trip of the held-out cells, `{name}` | "
                     + " | ".join(f"{row[k]['roundtrip']:.2f}" for k in held)
                     + f" | {row['all']['roundtrip']:.2f} |")  # fmt: skip
    for name, row in table.items():
        lines.append(f"| GenoFlow `{name}` | " + " | ".join(f"{row[k]['model']:.2f}" for k in held)
                     + f" | {row['all']['model']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--cells-per-time", type=int, default=300)
    p.add_argument("--n-genes", type=int, default=200)
    p.add_argument("--n-time-points", type=int, default=5)
    p.add_argument("--vae-epochs", type=int, default=50)
    p.add_argument("--flow-epochs", type=int, default=100)
    p.add_argument("--n-pcs", type=int, default=10)
    p.add_argument("--held", default=None, help="held-out time points, e.g. 2 (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    held = list(range(1, args.n_time_points - 1))
    if args.held:
        held = [int(k) for k in args.held.split(",")]
    settings = {"cells_per_time": args.cells_per_time, "n_genes": args.n_genes,
                "n_time_points": args.n_time_points, "vae_epochs": args.vae_epochs,
                "flow_epochs": args.flow_epochs, "n_pcs": args.n_pcs, "held_out": held,
                "seeds": list(range(args.seeds)), "configs": configs}  # fmt: skip
    env = meta.environment()
    path = args.out / f"genoflow_trajectory-{env['platform']}.json"
    runs = PartialRuns(path, settings, resume=args.resume)
    with compile_cache():
        for name in configs:
            for k in held:
                for seed in settings["seeds"]:
                    key = f"{name}/held={k}/seed={seed}"
                    if key in runs:
                        continue
                    run = one_run(name, k, seed, settings)
                    scores = {m: round(run[m], 3) for m in METRICS}
                    print(key, scores, run["status"], f"{run['train_seconds']:.0f}s", flush=True)
                    runs.add(key, run)
    result = {"settings": settings, "environment": env, "runs": runs.runs,
              "table": summarise(runs.runs, configs, held)}  # fmt: skip
    runs.finish(result)
    md = markdown(result)
    path.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
