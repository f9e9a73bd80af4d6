"""The ``jaxstab diagnose`` and ``jaxstab train`` runs behind the command line.

:func:`prepare` resolves the model, loads and validates the data and checks the output
directory, all before anything is written. :func:`diagnose` then trains with every step
recorded, builds the report in a temporary directory next to the output directory and moves
it into place only when every file is complete.

Example:
  >>> import tempfile, os
  >>> from jaxstab import registry
  >>> job = prepare("cfmvc", None, os.path.join(tempfile.mkdtemp(), "run"),
  ...               {"epochs": 1, "batch_size": 128})
  >>> job.config["epochs"], job.entry.name
  (1, 'cfmvc')
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from rich.console import Console

import jaxstab
from jaxstab import plugin, registry, rundir
from jaxstab import tree as tree_lib
from jaxstab.plugin import Dataset, ModelEntry, check_settings
from jaxstab.report import artifacts, findings, report_json, tables
from jaxstab.report.thresholds import Thresholds
from jaxstab.train import FitResult, fit
from jaxstab.train.checkpoint import CheckpointError
from jaxstab.train.mesh import sync_processes
from jaxstab.train.stages import gate_gradient_flow, stage_optimizer

ARTIFACTS = (
    "gradient_stats.csv",
    "input_features.csv",
    "diagnosis_report.json",
    "diagnostics.png",
    "gradient_heatmap.png",
    "feature_changes.png",
    "checkpoints",
    rundir.MARKER,
)
EVAL_FRACTION, MIN_EVAL_SIZE = 0.1, 50


class Job(NamedTuple):
    """A validated run: model entry, data, merged config and the output directory."""

    entry: ModelEntry
    dataset: Dataset
    config: dict[str, Any]
    output_dir: str
    overwrite: bool = False
    data_fingerprint: str = ""


def prepare(
    model: str | ModelEntry,
    data: str | None,
    output_dir: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    preset: str | None = None,
    sets: Sequence[str] = (),
    stage: str | None = None,
    command: str = "diagnose",
    resume: bool = False,
    overwrite: bool = False,
    control: str | None = None,
) -> Job:
    """Resolves and validates everything a run needs; writes nothing.

    ``model`` is a :class:`~jaxstab.plugin.ModelEntry` or what ``--model`` takes (see
    :func:`jaxstab.registry.get`). The run config is :func:`jaxstab.plugin.run_config`:
    training defaults < the ``preset``'s config < ``sets`` (``"key=value"``) < ``overrides``
    (``None`` values skipped), plus the run's ``model``, ``data``, ``preset`` and ``stage``.

    The output folder is checked by :func:`jaxstab.rundir.claim` (someone else's files,
    an existing run without ``overwrite``, ``resume`` without a train run, no write access:
    ``RunDirError``); hidden temporary folders of a killed earlier run are removed. With
    ``resume`` :func:`train` then checks that the data and settings are those the run
    started with (see :data:`jaxstab.rundir.RESUMABLE`). ``control`` names the control
    label of a ``data`` file for loaders that take one.

    Raises ``KeyError`` (unknown model), ``FileNotFoundError``/``OSError`` (unreadable data),
    ``ValueError``/``TypeError`` (data failing validation, bad options, a refused folder).
    """
    entry = model if isinstance(model, ModelEntry) else registry.get(model)
    config = plugin.run_config(entry, preset=preset, sets=sets, overrides=overrides)
    config |= {
        "model": model if isinstance(model, str) else entry.name,
        "data": data,
        "preset": preset or "default",
        "stage": entry.stage(stage).name,
    }
    out = os.path.abspath(output_dir)
    claimed = rundir.claim(out, command, resume=resume, overwrite=overwrite)
    for name in claimed.cleaned:
        warnings.warn(f"removed {name}, left beside {out} by a run that was killed", stacklevel=2)
    if control is not None and data is None:
        raise ValueError("--control names the control label of a --data file")
    if data is not None:
        if entry.load_data is None:
            raise ValueError(f"model {entry.name!r} reads no --data files (it has no load_data)")
        if not os.path.exists(data):
            raise FileNotFoundError(f"data file not found: {data}")
        if not os.access(data, os.R_OK):
            raise PermissionError(f"data file not readable: {data}")
        options = {}
        if control is not None:
            if "control" not in inspect.signature(entry.load_data).parameters:
                raise ValueError(f"model {entry.name!r}'s data loader takes no --control")
            options["control"] = control
        dataset = entry.load_data(data, **options)
    else:
        dataset = entry.default_data(int(config["seed"]))
    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        raise ValueError(f"model {entry.name!r} returned no training data")
    return Job(entry, dataset, config, out, overwrite, rundir.fingerprint(dataset.arrays))


def _marker(job: Job, command: str, config: Mapping[str, Any]) -> dict[str, Any]:
    return report_json.jsonable(
        {
            "command": command,
            "model": config.get("model"),
            "config": dict(config),
            "data_fingerprint": job.data_fingerprint,
            "data_warnings": list(job.dataset.meta.get("warnings", ())),
            "jaxstab_version": jaxstab.__version__,
        }
    )


# Run keys the optimizer never reads; left out of the cache key below.
_LOOP_KEYS = frozenset({"epochs", "batch_size", "seed", "data", "explosion_norm", "thresholds"})
_OPTIMIZERS: dict[tuple, optax.GradientTransformation] = {}


def optimizer(entry: ModelEntry, config: Mapping[str, Any], *, guard: bool, record: bool = False):
    """The run's optimizer: :func:`jaxstab.train.stages.stage_optimizer` of the entry's inner
    optimizer for the run's stage, guarded with the run's ``grad_clip`` (or only recording).
    With ``record`` (``jaxstab diagnose``) :func:`jaxstab.log_update_ratio` follows it, for
    the report's ``lr_too_high`` finding.

    The same transformation object is returned for the same model and optimizer settings, so
    repeated runs in one process (seeds, a resumed run) reuse ``fit``'s compiled step.

    >>> from jaxstab import registry
    >>> entry = registry.get("cfmvc")
    >>> cfg = plugin.run_config(entry) | {"stage": "vae"}
    >>> tx = optimizer(entry, cfg, guard=True)
    >>> tx is optimizer(entry, {**cfg, "epochs": 3}, guard=True)
    True
    """
    settings = {k: v for k, v in config.items() if k not in _LOOP_KEYS}
    key = (id(entry), guard, record, json.dumps(report_json.jsonable(settings), sort_keys=True))
    if key not in _OPTIMIZERS:
        clip = config.get("grad_clip")
        tx = stage_optimizer(
            plugin.inner_optimizer(entry, config),
            entry.stage(config.get("stage")).trainable,
            guard=guard,
            clip=float(clip) if clip else None,
        )
        _OPTIMIZERS[key] = optax.chain(tx, jaxstab.log_update_ratio()) if record else tx
    return _OPTIMIZERS[key]


def split_eval(dataset: Dataset, seed: int) -> tuple[dict, dict | None]:
    """Holds out 10 % of the examples for evaluation when there are at least 50."""
    n = len(dataset)
    arrays = {k: np.asarray(v) for k, v in dataset.arrays.items()}
    if n < MIN_EVAL_SIZE:
        return arrays, None
    order = np.random.default_rng(seed).permutation(n)
    n_eval = max(1, math.floor(EVAL_FRACTION * n))
    ev, tr = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return {k: v[tr] for k, v in arrays.items()}, {k: v[ev] for k, v in arrays.items()}


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {name: np.asarray(v) for name, v in tree_lib.flat_dict(pure).items()}


def build_model(job: Job) -> nnx.Module:
    """The job's model, built by its entry from the run config at the run's seed."""
    cfg = job.config
    return job.entry.build_model(
        job.dataset, plugin.model_config(job.entry, cfg), nnx.Rngs(int(cfg["seed"]))
    )


def _stage_inputs(job: Job, model: nnx.Module) -> tuple[Any, Any, dict, dict | None]:
    # The run's stage, its loss and the training and evaluation data it trains on.
    stage = job.entry.stage(job.config.get("stage"))
    loss_fn = stage.loss_fn or job.entry.loss_fn
    train_data, eval_data = split_eval(stage.data(model, job.dataset), int(job.config["seed"]))
    return stage, loss_fn, train_data, eval_data


def locate_origin(job: Job, result: FitResult, loss_fn: Any, train_data: Mapping) -> Any:
    """Where the NaN/Inf of a run that stopped ``'nonfinite'`` was born: its stopping step
    (the parameters ``result.model`` holds, that step's batch and key) run once more under
    :func:`jaxstab.checks.locate_nonfinite` with :func:`jaxstab.train.replay.replay_step`.

    ``loss_fn`` and ``train_data``: the stage's loss and the training data the run used.
    Returns the :class:`jaxstab.checks.NonFiniteReport`, or ``None`` when the run did not stop
    on a non-finite value or the replay found none; a replay that fails warns and returns
    ``None`` (the report is written without the origin).
    """
    from jaxstab.train.replay import replay_step

    if result.status != "nonfinite":
        return None
    try:
        # On one device: the replay is one step, and a run on a mesh holds sharded arrays.
        graphdef, state = nnx.split(result.model)
        state = jax.device_put(state, jax.local_devices()[0])
        return replay_step(
            nnx.merge(graphdef, state),
            loss_fn,
            train_data,
            key=jax.random.key(int(job.config["seed"])),
            step=int(result.steps),
            batch_size=int(job.config["batch_size"]),
        )
    except Exception as e:  # the report must still be written
        warnings.warn(f"replaying the non-finite step failed: {e}", stacklevel=2)
        return None


def _train(
    job: Job,
    *,
    guard: bool,
    record: bool,
    checkpoint_dir: str,
    progress: bool,
    steps_per_call: int | None,
    resume: bool = False,
    model: nnx.Module | None = None,
    mesh: Mesh | None = None,
    shard_params: bool = False,
    inputs: tuple | None = None,
) -> FitResult:
    # ``inputs``: the :func:`_stage_inputs` of ``model``, when the caller already has them.
    cfg = job.config
    if model is None:
        model = build_model(job)
    stage, loss_fn, train_data, eval_data = inputs or _stage_inputs(job, model)
    batch_size = int(cfg["batch_size"])
    if stage.trainable is not None and stage.check_flow:  # gradient must reach what trains
        key = jax.random.key(int(cfg["seed"]))
        gate_gradient_flow(model, stage, loss_fn, train_data, batch_size, key)
    explosion = cfg.get("explosion_norm")
    return fit(
        model,
        optimizer(job.entry, cfg, guard=guard, record=record),
        loss_fn,
        train_data,
        batch_size=batch_size,
        epochs=int(cfg["epochs"]),
        key=jax.random.key(int(cfg["seed"])),
        steps_per_call=steps_per_call,
        eval_data=eval_data,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        explosion_norm=float(explosion) if explosion else None,
        record=record,
        progress=progress,
        batch_stats_fn=job.entry.feature_stats if record else None,
        mesh=mesh,
        shard_params=shard_params,
    )


def _frozen_groups(params: Mapping[str, np.ndarray], trainable: Sequence[str] | None) -> list:
    # Top-level parameter groups that no trainable path reaches (none when all train).
    if trainable is None:
        return []
    tops = dict.fromkeys(name.split("/")[0] for name in params)
    reached = {t.split("/")[0] for t in trainable}
    return [g for g in tops if g not in reached]


def write_artifacts(
    directory: str,
    result: FitResult,
    *,
    config: Mapping[str, Any],
    thresholds: Thresholds,
    params_before: Mapping[str, np.ndarray],
    trainable: Sequence[str] | None = None,
    origin: Any = None,
) -> dict[str, Any]:
    """Writes the six report files of a recorded run into ``directory`` with
    :func:`jaxstab.report.artifacts.write_artifacts` (the same writer as
    :class:`jaxstab.Recorder`'s), findings included; returns the report. ``origin``: the
    :func:`locate_origin` of the run (the ``nonfinite_origin`` finding)."""
    h = result.history
    after = _flat_params(result.model)
    clip = config.get("grad_clip") if config.get("guard", True) else None
    return artifacts.write_artifacts(
        directory,
        h,
        status=result.status,
        config=config,
        thresholds=thresholds,
        steps_per_epoch=result.steps_per_epoch,
        lr=np.full(tables.n_steps(h), float(config.get("lr", np.nan))),
        params_before=params_before,
        params_after=after,
        clip=float(clip) if clip else None,
        trainable=trainable,
        frozen=_frozen_groups(params_before, trainable),
        origin=origin,
        origin_loss_finite=bool(np.isfinite(h["loss"][-1])) if origin is not None else None,
        extra={
            "steps_applied": result.steps,
            "epochs_completed": result.epochs,
            "steps_per_epoch": result.steps_per_epoch,
            "epoch_history": result.epoch_history,
            "best_metric": result.best_metric,
            "artifacts": list(ARTIFACTS),
            "data_warnings": list(config.get("data_warnings") or ()),
        },
    )


def diagnose(
    job: Job,
    *,
    guard: bool = True,
    thresholds: Thresholds | None = None,
    steps_per_call: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    mesh: Mesh | None = None,
    shard_params: bool = False,
) -> dict[str, Any]:
    """Trains with every step recorded and writes the report files; returns the report.

    ``mesh`` and ``shard_params`` go to :func:`jaxstab.train.fit` (data-parallel training).

    Everything is written into a hidden sibling folder and moved into ``job.output_dir`` only
    when complete, so an interrupted run leaves an earlier report as it was; the earlier
    run's files are replaced only with ``job.overwrite`` (checked by :func:`prepare`).
    """
    console = console or Console()
    thresholds = thresholds or plugin.thresholds(job.entry, job.config)
    warned = list(job.dataset.meta.get("warnings", ()))
    config = {**job.config, "guard": guard, **({"data_warnings": warned} if warned else {})}
    parent = os.path.dirname(job.output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=rundir.temp_prefix(job.output_dir, "tmp"), dir=parent)
    try:
        rundir.write_marker(tmp, _marker(job, "diagnose", config))
        run_job = job._replace(config=config)
        model = build_model(job)
        before = _flat_params(model)
        inputs = _stage_inputs(run_job, model)
        stage, loss_fn, train_data, _ = inputs
        result = _train(
            run_job,
            model=model,
            guard=guard,
            record=True,
            checkpoint_dir=os.path.join(tmp, "checkpoints"),
            progress=progress,
            steps_per_call=steps_per_call,
            mesh=mesh,
            shard_params=shard_params,
            inputs=inputs,
        )
        report = write_artifacts(
            tmp,
            result,
            config=config,
            thresholds=thresholds,
            params_before=before,
            trainable=stage.trainable,
            origin=locate_origin(run_job, result, loss_fn, train_data),
        )
        rundir.replace_contents(tmp, job.output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _print_outcome(console, report, job.output_dir)
    return report


def _print_outcome(console: Console, report: Mapping[str, Any], out: str) -> None:
    status = report["status"]
    summary = report["summary"]
    if status != "ok":
        groups = [g["group"] for g in report["offending_groups"][:5]]
        last = report["steps_recorded"] - 1
        console.print(f"[bold red]Step {last}: {status} detected[/] — stopped early.")
        console.print(f"  offending groups: {groups}")
        console.print(f"  total grad norm: {summary['max_total_grad_norm']}")
    else:
        console.print(f"[green]Finished {report['steps_recorded']} steps without explosion.[/]")
    if report["first_anomaly_step"] is not None:
        console.print(f"  first anomaly (danger level) at step {report['first_anomaly_step']}")
    console.print(
        f"  final loss {summary['final_loss']}, clipped steps {summary['clipped_steps']}, "
        f"skipped steps {summary['skipped_steps']}"
    )
    found = report.get("findings") or []
    if found:
        console.print("Findings:")
        for f in found:
            console.print(f"  {findings.finding_line(f)}", markup=False)
    console.print(f"Report written to {out}/")


def train(
    job: Job,
    *,
    guard: bool = True,
    steps_per_call: int | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    mesh: Mesh | None = None,
    shard_params: bool = False,
) -> dict[str, Any]:
    """Trains without per-step recording; keeps orbax checkpoints and ``train_summary.json``.

    ``mesh`` and ``shard_params`` go to :func:`jaxstab.train.fit` (data-parallel training;
    a run may resume on another number of devices).

    The run marker ``jaxstab_run.json`` is written before the first step, so a killed run can
    be continued with ``resume=True``: other data or another setting than the first run's
    raise ``RunDirError`` naming it, no verified checkpoint raises ``CheckpointError``.
    ``job.overwrite`` first removes the files an earlier run wrote (and only those).
    """
    console = console or Console()
    config = {**job.config, "guard": guard}
    check_settings({"steps_per_call": steps_per_call})
    if resume and not os.path.isdir(job.output_dir):
        raise CheckpointError(f"nothing to resume: {job.output_dir} does not exist")
    if resume:
        first = rundir.read_marker(job.output_dir) or {}
        rundir.check_resume(first, report_json.jsonable(config), job.data_fingerprint)
    # With several processes (jax.distributed) process 0 alone writes the run's own files;
    # orbax coordinates the checkpoints.
    primary = jax.process_index() == 0
    if job.overwrite and not resume and os.path.isdir(job.output_dir) and primary:
        rundir.remove_owned(job.output_dir)
    os.makedirs(job.output_dir, exist_ok=True)
    if not resume and primary:
        rundir.write_marker(job.output_dir, _marker(job, "train", config))
    sync_processes("jaxstab train: run directory ready")
    result = _train(
        job._replace(config=config),
        guard=guard,
        record=False,
        checkpoint_dir=os.path.join(job.output_dir, "checkpoints"),
        progress=progress,
        steps_per_call=steps_per_call,
        resume=resume,
        mesh=mesh,
        shard_params=shard_params,
    )
    summary = report_json.jsonable(
        {
            "status": result.status,
            "steps": result.steps,
            "epochs_completed": result.epochs,
            "epoch_history": result.epoch_history,
            "best_metric": result.best_metric,
            "final_loss": result.history["loss"][-1]
            if len(result.history.get("loss", []))
            else None,
            "config": config,
        }
    )
    if primary:
        tmp = os.path.join(job.output_dir, ".train_summary.json.tmp")
        report_json.write_report(tmp, summary)
        os.replace(tmp, os.path.join(job.output_dir, "train_summary.json"))
    console.print(
        f"{result.status}: {result.steps} steps, {result.epochs} epochs, "
        f"best metric {result.best_metric:.4g}; checkpoints in {job.output_dir}/checkpoints"
    )
    return summary
