"""One entry point for the benchmark suites.

``python -m benchmarks.run --suite {numerics,parity,speed,overhead,stability} [--model NAME]``
runs the suite's ``run(write=False)``, then writes ``benchmarks/results/<suite>-<device>.json``
and a markdown table next to it (``.md``), where ``<device>`` is JAX's default platform
(``cpu``, ``gpu``, ``tpu``; the speed suite's file is ``models-<device>``, as
``python -m benchmarks.bench_models`` names it). Suite modules are imported only when asked for.

The per-model suites (those whose ``run`` takes ``models``: parity, speed, stability) loop over
the specs of :mod:`benchmarks.specs`; ``--model NAME`` (repeatable) restricts them to those
models and keeps the other models' entries of the existing results file. An unknown name exits
with status 2 and lists the known ones. The other suites (numerics, overhead) have no model
part and ignore ``--model``. ``--preset NAME`` (repeatable) goes to the suites whose ``run``
takes ``presets`` (stability; default: the suite's own) and is ignored, with a note, by the
others.

``--suite gpu`` runs the device suites (numerics, overhead, speed for every port, stability for
every port) with the settings of one large GPU (:data:`GPU_SETTINGS`), planned to take under
8 minutes on an H100 or H200, and writes every ``*-gpu.json`` and ``.md`` plus
``gpu_suite-gpu.json`` (each suite's wall time). It refuses to run on a CPU; ``--dry-run`` runs
the same suites and code paths at tiny sizes (:data:`DRY_RUN_SETTINGS`, one model) on any
device, into ``--out`` (default: a new temporary folder).

Example:
  >>> sorted(SUITES)
  ['numerics', 'overhead', 'parity', 'speed', 'stability']
  >>> print(generic_markdown("demo", {"a": {"x": 1.5, "y": "ok"}}))
  # demo
  <BLANKLINE>
  | key | value |
  |---|---|
  | a.x | 1.5 |
  | a.y | ok |
  <BLANKLINE>
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# suite -> (module, function name).
SUITES: dict[str, tuple[str, str]] = {
    "numerics": ("benchmarks.bench_numerics", "run"),
    "overhead": ("benchmarks.bench_overhead", "run"),
    "parity": ("benchmarks.parity", "run"),
    "speed": ("benchmarks.bench_models", "run"),
    "stability": ("benchmarks.stability", "run"),
}
# The file name of a suite's results where it is not the suite's name (the speed suite is the
# one ``python -m benchmarks.bench_models`` writes).
RESULT_NAMES: dict[str, str] = {"speed": "models"}

# ``--suite gpu``: the device suites, each with the settings of one large accelerator (an H100
# or H200), planned to fit in GPU_BUDGET_S together. Overhead configs are bench_overhead's
# (hidden widths, batch, per-step repeats, steps per scan, scan repeats).
GPU_SUITES: tuple[str, ...] = ("numerics", "overhead", "speed", "stability")
GPU_BUDGET_S = 480.0
GPU_SETTINGS: dict[str, dict[str, Any]] = {
    "numerics": {},
    "overhead": {
        "configs": {
            "mlp-1M": ([256, 512, 512, 512, 512, 256], 64, 200, 50, 10),
            "mlp-50M": ([1024, 3584, 3584, 3584, 3584, 1024], 64, 50, 20, 5),
        }
    },
    "speed": {"epochs": 3},
    "stability": {"seeds": 3},
}
# ``--dry-run``: the same suites and code paths at tiny sizes, for the first spec (unless
# ``--model`` names others), on any device, in about a minute of CPU (a test runs it), so that
# the GPU run cannot fail on a typo.
DRY_RUN_SETTINGS: dict[str, dict[str, Any]] = {
    "numerics": {"repeats": 7, "accuracy_n": 1_000},
    "overhead": {"configs": {"mlp-tiny": ([16, 32, 16], 8, 2, 2, 1)}},
    "speed": {"epochs": 1, "size": "small", "variants": ("jax_scan", "torch_eager")},
    "stability": {"seeds": 1, "variants": ("jax_guard", "torch_seed")},
}


def _flatten(prefix: str, obj: Any, rows: list[tuple[str, str]]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    else:
        rows.append((prefix, f"{obj:.4g}" if isinstance(obj, float) else str(obj)))


def generic_markdown(title: str, result: Mapping[str, Any]) -> str:
    """A two-column markdown table of every leaf of ``result`` (dotted keys)."""
    rows: list[tuple[str, str]] = []
    _flatten("", result, rows)
    lines = [f"# {title}", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _resolve(suite: str) -> tuple[Callable[..., dict], Callable[[dict], str] | None]:
    module_name, fn_name = SUITES[suite]
    module = importlib.import_module(module_name)
    # A module serving several suites may expose run_<suite> or run(suite=...).
    for name in (fn_name, f"run_{suite}"):
        fn = getattr(module, name, None)
        if callable(fn):
            break
    else:
        run = getattr(module, "run", None)
        if run is None or "suite" not in inspect.signature(run).parameters:
            raise ImportError(f"{module_name} has no {fn_name}() or run_{suite}() for this suite")
        fn = functools.partial(run, suite=suite)

    md = getattr(module, f"{suite}_markdown", None) or getattr(module, "to_markdown", None)
    return fn, md


def device_name() -> str:
    """JAX's default platform: ``cpu``, ``gpu`` or ``tpu``."""
    import jax

    return jax.devices()[0].platform


def per_model(suite: str) -> bool:
    """Whether ``suite`` runs per model (its ``run`` takes ``models``)."""
    fn, _ = _resolve(suite)
    return "models" in inspect.signature(fn).parameters


def takes_presets(suite: str) -> bool:
    """Whether ``suite``'s ``run`` takes ``presets`` (config presets of the specs)."""
    fn, _ = _resolve(suite)
    return "presets" in inspect.signature(fn).parameters


def merge_models(name: str, result: Mapping[str, Any], out_dir: Path | None = None) -> dict:
    """``result`` with the other models of the existing ``<name>-<device>.json`` kept.

    A per-model suite run for some models (``--model``) replaces their entries and keeps the
    rest; each kept entry carries the ``environment`` it was measured in (when it differs
    from this run's). A file without a ``models`` mapping is replaced whole.
    """
    path = (RESULTS if out_dir is None else out_dir) / f"{name}-{device_name()}.json"
    if not path.exists() or not isinstance(result.get("models"), Mapping):
        return dict(result)
    old = json.loads(path.read_text())
    if not isinstance(old.get("models"), Mapping):
        return dict(result)
    models = {}
    for key, entry in old["models"].items():
        if key in result["models"]:
            continue
        entry = dict(entry)
        if old.get("environment") != result.get("environment"):
            entry.setdefault("environment", old.get("environment"))
        models[key] = entry
    return {**result, "models": {**models, **result["models"]}}


def run_suite(
    suite: str,
    out_dir: Path | None = None,
    models: Sequence[str] | None = None,
    presets: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Runs one suite and writes its JSON and markdown (in ``out_dir``, default
    :data:`RESULTS`); returns both paths.

    ``models`` (spec names; ``None``: all) goes to a per-model suite, is ignored by the others;
    ``presets`` (``None``: the suite's default) likewise to a suite that takes them.
    ``settings`` are more keyword arguments of the suite's ``run`` (sizes, repeats); one that
    it does not take is a ``TypeError`` before anything runs.
    """
    fn, to_md = _resolve(suite)
    params = inspect.signature(fn).parameters
    unknown = sorted(set(settings or {}) - set(params))
    if unknown:
        raise TypeError(f"suite {suite!r} takes no setting {unknown[0]!r}; it takes "
                        f"{', '.join(params)}")  # fmt: skip
    kwargs: dict[str, Any] = {"write": False} if "write" in params else {}
    if "models" in params and models is not None:
        kwargs["models"] = list(models)
    if "presets" in params and presets is not None:
        kwargs["presets"] = list(presets)
    kwargs.update(settings or {})
    result = fn(**kwargs)
    name = RESULT_NAMES.get(suite, suite)
    if models is not None:
        result = merge_models(name, result, out_dir)
    markdown = to_md(result) if to_md else generic_markdown(suite, result)
    return write_results(name, result, markdown, out_dir)


def write_results(
    name: str, result: Mapping[str, Any], markdown: str, out_dir: Path | None = None
) -> tuple[Path, Path]:
    """Writes ``<name>-<device>.json`` (atomically) and ``.md`` in ``out_dir`` (default
    :data:`RESULTS`); returns both."""
    out_dir = RESULTS if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}-{device_name()}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(json_path)
    md_path.write_text(markdown)
    return json_path, md_path


def run_gpu(
    out_dir: Path | None = None, models: Sequence[str] | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Every suite of :data:`GPU_SUITES` with :data:`GPU_SETTINGS` (``dry_run``:
    :data:`DRY_RUN_SETTINGS` and the first spec unless ``models`` names others),
    each suite's files written as :func:`run_suite` writes them, then a summary
    ``gpu_suite-<device>.json`` with each suite's wall time against :data:`GPU_BUDGET_S`."""
    table = DRY_RUN_SETTINGS if dry_run else GPU_SETTINGS
    if dry_run and models is None:
        from benchmarks import specs

        models = specs.names()[:1]
    summary: dict[str, Any] = {"dry_run": dry_run, "budget_s": GPU_BUDGET_S, "suites": {}}
    start = time.perf_counter()
    for suite in GPU_SUITES:
        t0 = time.perf_counter()
        paths = run_suite(suite, out_dir, models=models, settings=table[suite])
        summary["suites"][suite] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "files": [p.name for p in paths],
            "settings": table[suite],
        }
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["within_budget"] = summary["seconds"] <= GPU_BUDGET_S
    lines = [f"# GPU suite ({device_name()}{', dry run' if dry_run else ''})", "",
             f"{summary['seconds']:.0f} s in all (budget {GPU_BUDGET_S:.0f} s).", "",
             "| suite | seconds | files |", "|---|---:|---|"]  # fmt: skip
    for suite, r in summary["suites"].items():
        lines.append(f"| {suite} | {r['seconds']:.0f} | {', '.join(r['files'])} |")
    write_results("gpu_suite", summary, "\n".join(lines) + "\n", out_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument(
        "--suite",
        required=True,
        choices=[*sorted(SUITES), "gpu"],
        action="append",
        help="suite to run (repeat for several); gpu: every device suite at GPU sizes",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --suite gpu: the same suites at tiny sizes on any device, written to --out",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default benchmarks/results; with --dry-run a new temporary one)",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="model for the per-model suites (repeat for several; default: every spec)",
    )
    parser.add_argument(
        "--preset",
        action="append",
        metavar="NAME",
        help="config preset for the suites that take one (repeat for several; default: theirs)",
    )
    args = parser.parse_args(argv)
    from benchmarks import specs

    try:
        models = None if args.model is None else [s.name for s in specs.select(args.model)]
    except specs.UnknownModel as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    for spec in specs.select(models):
        unknown = [p for p in args.preset or () if p not in spec.presets]
        if unknown:
            known = ", ".join(spec.presets)
            print(f"benchmarks: model {spec.name!r} has no preset {unknown[0]!r}; presets: "
                  f"{known}", file=sys.stderr)  # fmt: skip
            return 2
    if "gpu" in args.suite:
        if args.suite != ["gpu"]:
            print("benchmarks: --suite gpu runs alone", file=sys.stderr)
            return 2
        if not args.dry_run and device_name() == "cpu":
            print("benchmarks: --suite gpu needs an accelerator (JAX sees only the CPU); "
                  "--dry-run runs it at tiny sizes", file=sys.stderr)  # fmt: skip
            return 2
        out = args.out
        if out is None and args.dry_run:
            out = Path(tempfile.mkdtemp(prefix="jaxstab-gpu-dry-run-"))
        summary = run_gpu(out, models=models, dry_run=args.dry_run)
        print(f"gpu: {summary['seconds']:.0f} s (budget {GPU_BUDGET_S:.0f} s); wrote "
              f"{', '.join(f for r in summary['suites'].values() for f in r['files'])} in "
              f"{out or RESULTS}")  # fmt: skip
        return 0
    if args.dry_run:
        print("benchmarks: --dry-run applies to --suite gpu only", file=sys.stderr)
        return 2
    for suite in args.suite:
        if models is not None and not per_model(suite):
            print(
                f"benchmarks: suite {suite!r} has no model part; --model ignored", file=sys.stderr
            )
        if args.preset is not None and not takes_presets(suite):
            print(f"benchmarks: suite {suite!r} takes no preset; --preset ignored", file=sys.stderr)
        try:
            json_path, md_path = run_suite(
                suite, out_dir=args.out, models=models, presets=args.preset
            )
        except ImportError as e:
            print(f"benchmarks: suite {suite!r} is not available: {e}", file=sys.stderr)
            return 2
        print(f"{suite}: wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
