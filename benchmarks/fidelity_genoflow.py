"""Fidelity of the port ``jaxstab.models.genoflow`` to the ORIGINAL GenoFlow code
(``causal_genoflow`` 1.0.0, GitHub Shuai1Wen/yanzhen).

``python -m benchmarks.fidelity_genoflow --original PATH`` (or ``GENOFLOW_ORIGINAL=PATH``)
imports ``causal_genoflow`` from a checkout at ``PATH`` that whoever runs it fetched, records
its commit (``git -C PATH rev-parse HEAD``, else the file ``PATH/COMMIT``) and writes
``benchmarks/results/fidelity_genoflow-<device>.json`` and ``.md``: the max relative error
``max|ours - original| / max|original|`` of every quantity in float32 (tolerance 1e-5) and
float64 (1e-9), the trajectories (1e-3: two adaptive solvers), the OT pairing and facts of
the original found by running it. Nothing of the original is
contained here. The files: this driver (run, report), ``fidelity_genoflow_original`` (the
original's side: import, fixed noise, adapter, facts), ``fidelity_genoflow_port`` (the port's
side), ``fidelity_genoflow_compare`` (values and gradients) and ``fidelity_genoflow_dynamics``
(trajectories, OT pairing).

Steps (all noise drawn here with NumPy and given to both sides):

1. Data: ``jaxstab.models.genoflow.simulate`` (3 time points x 64 cells x 200 genes, 2
   conditions) read by ``load_anndata``. The original gets the counts ``x``, the one-hot ``c``
   of its ``ConditionDataLoader.one_hot_encode``, the library ``L`` of its
   ``DataPreprocessor.compute_library_sizes`` (row sums; checked equal to the loader's, and
   its ``encode_conditions`` order to the loader's codes) and the loader's gene graph as a
   long tensor ``[2, E]``.
2. Weights: the original ``CausalGenoFlow(200, 16, 2, edge_index, beta=1.0, lambda_adv=0.1)``
   under ``torch.manual_seed(seed)``, noise N(0, 0.1) on every bias and BatchNorm scale, the
   running statistics from one encoder pass over the cells of the last time point. Its
   ``state_dict()`` goes onto the port at ``GenoFlowConfig.original()`` with the same graph
   (``benchmarks.torch_ref.genoflow.torch_state_dict_to_nnx``: parameters and running
   statistics; ``num_batches_tracked`` and the buffer ``vector_field.edge_index`` have no
   counterpart, the graph is checked to be the port's without its self loops; the spec's
   ``SPEC.convert`` is checked to give the same parameters).
3. Values in eval mode: encoder ``mu``, ``logvar`` (input ``log1p x``, ``c``); the
   reparameterised ``z`` (the original's ``randn_like`` hands out the fixed ``eps``); decoder
   mean and ``theta`` on it (and on the original's ``z``).
4. VAE: the original's ``vae_forward`` loss (``CombinedVAELoss``: NB recon + KL - 0.1 entropy)
   against ``vae_terms(...)[1]["vae_total"]``, its recon and KL; the gradients of that loss on
   the encoder and decoder (the port's by ``nnx.grad`` of ``vae_total``, not of the total,
   which adds the discriminator's cross-entropy); that cross-entropy on the detached ``z``
   and its discriminator gradients. Again in train mode (BatchNorm batch statistics, every
   dropout rate 0 on both sides), with the running statistics after the pass.
5. Flow: GATv2 gene features, the velocity at fixed ``(t, z, c)`` and at ``t = 1``, the
   flow-matching loss as ``phase2_train`` computes it (``z_t = (1 - t) z0 + t z1``,
   ``flow_forward``: MSE against ``z1 - z0``) against ``flow_terms`` with ``tau0 = 0``,
   ``tau1 = 1``, and its vector-field gradients.
6. OT: ``TwoStageTrainer.compute_ot_coupling`` (POT ``ot.sinkhorn``, reg 0.01, Euclidean
   cost of z-scored latents) against ``pair_by_ot(..., epsilon=0.01, cost="euclidean",
   ddof=1)`` on the original's latent means of time points 0 and 1; both against a converged
   log-domain plan (POT ``sinkhorn_log`` in float64).
7. Trajectories: ``ODEIntegrator(model).simulate_trajectory(z0, c, t_span=linspace(0, 1, 11))``
   against ``integrate_latent`` over the same flow times (+ the decoder at library 1e4) and
   ``simulate_trajectory`` from the counts, with the data's 3 time points and with time points
   (0, 1); in float64 also both at rtol = atol = 1e-10.
8. float64: steps 3 to 7 again with the original ``.double()`` (torch default dtype float64)
   and the port's parameters, inputs and noise in float64 under ``jax.enable_x64``.
9. Facts: the original's training loop, dropout, BatchNorm and integrator behaviours measured
   by running them (``fidelity_genoflow_original.probe_facts``), and what its OT call did.

``tests/benchmarks/test_fidelity_genoflow.py`` drives the same comparison with an adapter over
``benchmarks/torch_ref/genoflow.py``.

Example:
  >>> print(table({"kl": 2e-7, "velocity": 0.2}, 1e-5), end="")
  | quantity | max rel. error | tolerance | ok |
  |---|---|---|---|
  | kl | 2.000e-07 | 1e-05 | yes |
  | velocity | 2.000e-01 | 1e-05 | NO |
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import fidelity_genoflow_compare as cmp
from benchmarks import fidelity_genoflow_dynamics as dyn
from benchmarks import fidelity_genoflow_original as og
from benchmarks import fidelity_genoflow_port as ports
from benchmarks.fidelity_cfmvc import markdown_table


# ---------------------------------------------------------------------------- reporting
def table(
    errors: Mapping[str, float],
    tolerance: float | Mapping[str, float],
    floor: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """:func:`~benchmarks.fidelity_cfmvc.markdown_table` rows (one tolerance, or one per row;
    ``floor``: its float32-rounding note)."""
    tols = tolerance if isinstance(tolerance, Mapping) else dict.fromkeys(errors, tolerance)
    lines = markdown_table({}, 0.0).splitlines()
    for name, err in errors.items():
        lines.append(markdown_table({name: err}, tols[name], floor=floor or {}).splitlines()[-1])
    return "\n".join(lines) + "\n"


def _floor_lines(sc: Mapping[str, Any]) -> list[str]:
    lines = []
    for k, f in sc.get("float32_floor", {}).items():
        verdict = (
            "within 4x: float32 rounding, not a formula difference"
            if k in sc.get("explained_by_float32_rounding", ())
            else "beyond 4x of it"
        )
        lines.append(
            f"- {k}: against the original run in float64 (same weights, inputs and noise) the "
            f"original in float32 is off by {f['original_f32_vs_f64']:.2e} and the port by "
            f"{f['port_vs_f64']:.2e} ({verdict})"
        )
    return [*lines, ""] if lines else lines


def _g(v: Any) -> str:
    return "-" if v is None else f"{v:.3e}" if isinstance(v, float) else str(v)


def _ot_rows(ot: Mapping[str, Any]) -> list[tuple[str, str]]:
    o, p, r = ot["original"], ot["port"], ot["reference"]
    return [
        ("cells (source -> target)", f"{ot['n_source']} -> {ot['n_target']}"),
        ("original: cost dtype / POT method", f"{o['cost_dtype']} / {o['method']}"),
        ("original: NaN in plan / all-zero plan", f"{o['nan_in_plan']} / {o['all_zero_plan']}"),
        ("original: POT warnings", "; ".join(o["warnings"]) or "none"),
        (
            "original: iterations / last error / converged",
            f"{o['iterations']} / {_g(o['last_error'])} / {o['converged']}",
        ),
        ("port: iterations / converged", f"{p['iterations']} / {p['converged']}"),
        (
            "marginal error: original / port / reference",
            f"{_g(o['marginal_error'])} / {_g(p['marginal_error'])} / {_g(r['marginal_error'])}",
        ),
        ("distinct targets: original / port", f"{o['distinct_targets']} / {p['distinct_targets']}"),
        (
            "plan max abs diff port vs original (plan max)",
            f"{_g(ot['plan_max_abs_diff'])} ({_g(ot['plan_max'])})",
        ),
        ("identical argmax pairs port vs original", f"{ot['argmax_agreement']:.3f}"),
        (
            "reference: iterations / last error / converged",
            f"{r['iterations']} / {_g(r['last_error'])} / {r['converged']}",
        ),
        (
            "plan max abs diff to the reference: original / port",
            f"{_g(r['original_plan_max_abs_diff'])} / {_g(r['port_plan_max_abs_diff'])}",
        ),
        (
            "argmax pairs equal to the reference's: original / port",
            f"{r['original_argmax_agreement']:.3f} / {r['port_argmax_agreement']:.3f}",
        ),
    ]


def to_markdown(result: Mapping[str, Any]) -> str:
    """The benchmark's markdown: header, the float32 and float64 tables, trajectories, OT
    and the facts of the original."""
    r = result
    lines = [
        "# GenoFlow fidelity: Flax port (GenoFlowConfig.original()) vs the original PyTorch code",
        "",
        f"- original: {r.get('original', '?')} at commit `{r.get('original_commit')}`",
        f"- torch {r.get('torch')}, torch_geometric {r.get('torch_geometric')}, POT "
        f"{r.get('pot')}, torchdiffeq {r.get('torchdiffeq')}; jax {r.get('jax')}, flax "
        f"{r.get('flax')}, device {r.get('device')}",
        f"- data: {r.get('data')}",
        f"- weights: {r.get('weights')}",
        f"- checks: {r.get('checks')}",
        f"- all within tolerance: float32 {r.get('all_ok')}, float64 {r.get('all_ok_float64')}; "
        f"all within tolerance or (float32) explained by float32 rounding: float32 "
        f"{r.get('all_ok_or_rounding')}, float64 {r.get('all_ok_or_rounding_float64')}",
        "",
    ]
    for precision in ("float32", "float64"):
        sc = r[precision]
        lines += [
            f"## {precision} (eval mode unless 'train:')",
            "",
            table(sc["max_relative_error"], sc["tolerance"], sc.get("float32_floor")),
            *_floor_lines(sc),
            f"Worst gradient tensors: {sc['worst_gradient']}",
            "",
        ]
    lines += ["## Trajectories: ODEIntegrator (torchdiffeq dopri5) vs integrate_latent", ""]
    for precision, tr in r["trajectory"].items():
        lines += [
            f"### {precision}",
            "",
            table(tr["max_relative_error"], tr["tolerance"]),
            f"Steps: {tr['steps']}",
            "",
        ]
    names = list(r["ot"])
    rows = {n: _ot_rows(r["ot"][n]) for n in names}
    lines += [
        "## OT pairing: compute_ot_coupling (POT ot.sinkhorn, reg 0.01) vs pair_by_ot",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for i, (label, _) in enumerate(rows[names[0]]):
        lines.append(f"| {label} | " + " | ".join(rows[n][i][1] for n in names) + " |")
    lines += ["", "## Facts of the original (measured by running it)", ""]
    lines += [f"- {f['fact']}. Measured: {f['measured']}" for f in r["facts"]]
    return "\n".join(lines) + "\n"


def ot_facts(ot: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the original's OT pairing did, per precision."""
    out = []
    for p, r in ot.items():
        o = r["original"]
        head = (
            f"compute_ot_coupling in {p} (POT ot.sinkhorn, method {o['method']!r}, reg "
            f"{dyn.OT_EPSILON}, cost matrix {o['cost_dtype']})"
        )
        if o["all_zero_plan"]:
            what = (
                "the kernel exp(-M / reg) underflows, POT stops at its numerical-error check and "
                "returns an all-zero plan, whose row argmax pairs every source cell with target 0"
            )
        else:
            what = f"a finite plan after {o['iterations']} iterations, converged {o['converged']}"
        keys = ("warnings", "nan_in_plan", "all_zero_plan", "distinct_targets", "iterations")
        measured = {k: o[k] for k in keys} | {"marginal_error": o["marginal_error"]}
        out.append({"fact": f"{head}: {what}", "measured": measured})
    return out


# ---------------------------------------------------------------------------- the benchmark
def conversion_checks(adapter: Any, config: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict's entries the conversion uses, and ``SPEC.convert`` (the suites'
    converter, parameters only) giving the same parameters."""
    import jax
    from flax import nnx

    from benchmarks.specs.genoflow import SPEC
    from benchmarks.torch_ref.genoflow import optional_key

    state = adapter.state_dict()
    port = ports.build_port(config, state, meta)
    ours = nnx.state(port, nnx.Param)
    same = jax.tree.map(lambda a, b: bool((a == b).all()), SPEC.convert(state, port), ours)
    return {
        "state_dict_entries": len(state),
        "converted_parameters": len(jax.tree.leaves(ours)),
        "converted_batch_stats": len(jax.tree.leaves(nnx.state(port, nnx.BatchStat))),
        "without_counterpart": sorted(k for k in state if optional_key(k)),
        "spec_convert_gives_the_same_parameters": all(jax.tree.leaves(same)),
    }


def versions() -> dict[str, str]:
    import flax
    import jax
    import ot
    import torch
    import torch_geometric
    import torchdiffeq

    return {
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "pot": ot.__version__,
        "torchdiffeq": torchdiffeq.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "device": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
    }


def run(original: str, n_cells: int = 64, n_genes: int = 200, seed: int = 0) -> dict[str, Any]:
    """Runs the comparison against the original at ``original``; returns the result dict."""
    from jaxstab.models.genoflow import GenoFlowConfig

    mods = og.import_original(original)
    inputs = ports.make_inputs(n_cells, n_genes, seed)
    meta, x, codes = inputs["meta"], inputs["x"], inputs["condition"]
    pre = mods["data"].DataPreprocessor()
    library = pre.compute_library_sizes(x)
    onehot, labels = pre.encode_conditions(inputs["labels"])
    same_inputs = bool(
        np.array_equal(library, inputs["library"])
        and np.array_equal(np.argmax(onehot, 1), codes)
        and list(labels) == list(meta["conditions"])
    )
    model = og.build_original(mods, n_genes, meta["n_conditions"], meta["gene_graph"], seed)
    last = inputs["time"] == inputs["time"].max()
    og.init_weights(model, seed, np.log1p(x[last]), onehot[last].astype(np.float32))
    adapter = og.OriginalAdapter(mods, model)
    config = GenoFlowConfig.original()
    noise = ports.make_noise(len(x), og.N_LATENT, seed)
    checks = {"original_preprocessing_matches_inputs": same_inputs}
    checks |= conversion_checks(adapter, config, meta)
    n_edges = np.shape(meta["gene_graph"])[1]
    result: dict[str, Any] = {
        "original": "Shuai1Wen/yanzhen causal_genoflow "
        + str(getattr(sys.modules.get("causal_genoflow"), "__version__", "?")),
        "original_path": str(Path(original).resolve()),
        "original_commit": og.orig.original_commit(original),
        **versions(),
        "tolerance": cmp.TOLERANCE,
        "tolerance_float64": cmp.FLOAT64_TOLERANCE,
        "tolerance_trajectory": dyn.TRAJECTORY_TOLERANCE,
        "data": f"simulate({n_cells} cells x {meta['n_time_points']} time points, {n_genes} "
        f"genes, 2 conditions, seed {seed}); gene graph {n_edges} edges (+ {n_genes} self loops "
        f"in the GATv2); VAE rows on all {len(x)} cells, flow rows on {len(noise['z0'])} noise "
        f"pairs, trajectories of {dyn.N_TRAJECTORY_CELLS} cells of time point 0",
        "weights": f"CausalGenoFlow({n_genes}, 16, 2, edge_index, beta=1.0, lambda_adv=0.1) "
        f"under torch.manual_seed({seed}); biases and BatchNorm scales + N(0, 0.1); running "
        "statistics of one pass over the last time point's cells",
        "config": {k: v for k, v in config.to_dict().items() if k != "thresholds"},
        "checks": checks,
    }
    for p, f64 in (("float32", False), ("float64", True)):
        result[p] = cmp.compare(adapter, config, inputs, noise, float64=f64)
    result["trajectory"] = {
        p: dyn.compare_trajectory(adapter, config, inputs, float64=f64)
        for p, f64 in (("float32", False), ("float64", True))
    }
    result["ot"] = {
        p: dyn.compare_ot(adapter, inputs, float64=f64)
        for p, f64 in (("float32", False), ("float64", True))
    }
    facts = og.probe_facts(adapter, x, codes, library, noise["eps"])
    result["facts"] = facts + ot_facts(result["ot"])
    conv_ok = same_inputs and checks["spec_convert_gives_the_same_parameters"]
    for p, suffix in (("float32", ""), ("float64", "_float64")):
        sc, tr = result[p], result["trajectory"][p]
        result["all_ok" + suffix] = conv_ok and sc["ok"] and tr["ok"]
        result["all_ok_or_rounding" + suffix] = conv_ok and sc["ok_or_rounding"] and tr["ok"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fidelity_genoflow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--original",
        default=os.environ.get("GENOFLOW_ORIGINAL"),
        help="path of the original's checkout (default: $GENOFLOW_ORIGINAL)",
    )
    parser.add_argument("--cells", type=int, default=64, help="cells per time point")
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.original:
        parser.error("--original PATH (or GENOFLOW_ORIGINAL) is required")
    from benchmarks.run import write_results

    result = run(args.original, args.cells, args.genes, args.seed)
    json_path, md_path = write_results("fidelity_genoflow", result, to_markdown(result))
    print(to_markdown(result))
    print(f"wrote {json_path} and {md_path}")
    ok = result["all_ok_or_rounding"] and result["all_ok_or_rounding_float64"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
