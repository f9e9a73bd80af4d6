"""The ``jaxstab`` command line: ``diagnose``, ``train`` and ``compare``.

Example:
  >>> main(["--version"])  # doctest: +SKIP
  jaxstab 0.1.0
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from jaxstab import __version__

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNSTABLE = 2, 1, 3
EPILOG = (
    "exit codes: 0 ok; 1 other failure; 2 bad input or refused (nothing trained); "
    "3 explosion or non-finite loss detected"
)


def _run_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--model",
        required=True,
        help="a registered model name (e.g. cfmvc), package.module:ATTR or path/to/file.py:ATTR "
        "naming a jaxstab.ModelEntry",
    )
    p.add_argument("--preset", help="the model's config preset (e.g. small; default: default)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field of the model's config or a training setting (repeatable; "
        "an unknown key is an error that lists the valid ones)",
    )
    p.add_argument("--stage", help="the model's training stage (default: its first)")
    p.add_argument("--data", help="data file for the model's loader (default: bundled data)")
    p.add_argument("--epochs", type=int, help="passes over the data (default: model's)")
    p.add_argument("--batch-size", type=int, help="examples per step (default: model's)")
    p.add_argument("--lr", type=float, help="learning rate (default: model's)")
    p.add_argument("--grad-clip", type=float, help="global-norm clip of the guard (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and batches")
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="plain optimizer: no clipping or skipping (norms still recorded)",
    )
    p.add_argument(
        "--explosion-norm",
        type=float,
        help="stop when the global gradient norm exceeds this (default: model's, else 100)",
    )
    p.add_argument(
        "--steps-per-call",
        type=int,
        help="training steps fused per jitted call (default: one epoch)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--devices",
        metavar="N",
        help="data-parallel training on N devices, or 'all' (every local device; with "
        "--distributed every device of every process): each batch is split evenly over "
        "them, so --batch-size must divide by N (default: 1; with --distributed: all)",
    )
    p.add_argument(
        "--shard-params",
        action="store_true",
        help="with --devices, shard parameters and optimizer state over the devices "
        "(FSDP-style) instead of replicating them",
    )
    p.add_argument(
        "--control",
        metavar="LABEL",
        help="the control (unperturbed) label of the --data file (default: recognised by "
        "name — control, ctrl, non-targeting, ... — or none)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --output-dir (only the files jaxstab wrote are removed)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxstab",
        description="Training-stability tools for JAX/Flax: diagnose exploding and NaN gradients.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"jaxstab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = _run_options()

    d = sub.add_parser(
        "diagnose",
        parents=[run],
        help="train with full recording and write a report",
        description="Train with every step recorded; stop on explosion or a non-finite loss; "
        "write gradient_stats.csv, input_features.csv, diagnosis_report.json, "
        "diagnostics.png, gradient_heatmap.png, feature_changes.png and checkpoints/.",
    )
    d.add_argument("--output-dir", help="report directory (default: runs/<model>-diagnosis)")
    th = "(default: the model's 'thresholds' config, else %s)"
    d.add_argument("--warn-norm", type=float, help="total-norm warning level " + th % 5)
    d.add_argument("--danger-norm", type=float, help="total-norm danger level " + th % 10)
    d.add_argument("--group-warn-norm", type=float, help="group-norm warning " + th % 3)
    d.add_argument("--group-danger-norm", type=float, help="group-norm danger " + th % 10)

    t = sub.add_parser(
        "train",
        parents=[run],
        help="train with checkpoints, no per-step recording",
        description="Train with orbax checkpoints (best and latest) and a progress bar.",
    )
    t.add_argument("--output-dir", help="run directory (default: runs/<model>-train)")
    t.add_argument(
        "--distributed",
        action="store_true",
        help="one process per host: call jax.distributed.initialize() first (it finds the "
        "cluster on Cloud TPU, Slurm, Open MPI and Kubernetes; elsewhere give "
        "--coordinator, --num-processes and --process-id); run the same command on every host, "
        "with an --output-dir that every host sees",
    )
    t.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed: process 0")
    t.add_argument("--num-processes", type=int, help="with --distributed: how many processes")
    t.add_argument("--process-id", type=int, help="with --distributed: this process's rank")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest verified checkpoint (an error when there is none); "
        "only --epochs, --steps-per-call, --no-progress and the device options (--devices, "
        "--shard-params, --distributed) may differ from the first run",
    )

    c = sub.add_parser(
        "compare",
        help="compare diagnosis runs side by side",
        description="Print runs side by side and write comparison.png.",
    )
    c.add_argument("dirs", nargs="+", metavar="DIR", help="directories written by diagnose")
    c.add_argument("--output", default="comparison.png", help="figure path")
    return parser


def _error(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"jaxstab: error: {message}", file=sys.stderr)
    return code


def _overrides(args: argparse.Namespace) -> dict:
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "grad_clip": args.grad_clip,
        "seed": args.seed,
        "explosion_norm": args.explosion_norm,
    }


def _mesh(devices: int | str, batch_size: int, shard_params: bool):
    """The run's data mesh, or ``None`` for one device; ``ValueError`` when the batch does not
    divide by the device count (checked before the devices are looked at) or when there are
    too few devices."""
    import jax

    from jaxstab.train import mesh as placement

    if isinstance(devices, int) and batch_size % devices:
        raise ValueError(
            f"--batch-size {batch_size} does not divide by --devices {devices}: every device "
            "takes an equal share of each batch"
        )
    if jax.process_count() > 1 and devices not in ("all", jax.device_count()):
        raise ValueError(
            f"--devices {devices}: with --distributed every process trains on all "
            f"{jax.device_count()} devices together; use --devices all"
        )
    if devices == 1 or (devices == "all" and jax.device_count() == 1 and not shard_params):
        return None
    mesh = placement.data_mesh(devices)
    placement.check_mesh(mesh, batch_size)
    return mesh


def _initialize_distributed(args: argparse.Namespace) -> None:
    import jax

    options = {
        "coordinator_address": args.coordinator,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    jax.distributed.initialize(**{k: v for k, v in options.items() if v is not None})


def _run(args: argparse.Namespace) -> int:
    # Imported here so that --help and --version stay fast.
    from jaxstab import diagnose as diag
    from jaxstab import plugin, registry
    from jaxstab.rundir import RunDirError
    from jaxstab.train import mesh as placement

    flags = {
        "total_warning": getattr(args, "warn_norm", None),
        "total_danger": getattr(args, "danger_norm", None),
        "group_warning": getattr(args, "group_warn_norm", None),
        "group_danger": getattr(args, "group_danger_norm", None),
    }
    try:
        plugin.check_settings({"steps_per_call": args.steps_per_call, **flags})
        distributed = getattr(args, "distributed", False)
        devices = placement.parse_devices(args.devices or ("all" if distributed else "1"))
        if args.shard_params and devices == 1:
            raise ValueError("--shard-params needs --devices N (N > 1) or --devices all")
        entry = registry.get(args.model)
        suffix = "diagnosis" if args.command == "diagnose" else "train"
        out = args.output_dir or os.path.join("runs", f"{entry.name}-{suffix}")
        job = diag.prepare(
            entry,
            args.data,
            out,
            _overrides(args),
            preset=args.preset,
            sets=args.sets,
            stage=args.stage,
            command=args.command,
            resume=getattr(args, "resume", False),
            overwrite=args.overwrite,
            control=args.control,
        )
        mesh = _mesh(devices, int(job.config["batch_size"]), args.shard_params)
    except RunDirError as e:
        return _error(str(e))
    except KeyError as e:
        return _error(e.args[0] if e.args else str(e))
    except (OSError, ValueError, TypeError) as e:
        return _error(f"{type(e).__name__}: {e}")
    # Every process has checked the output folder before process 0 writes into it.
    placement.sync_processes("jaxstab: output folder checked")
    for message in job.dataset.meta.get("warnings", ()):
        print(f"jaxstab: warning: {message}", file=sys.stderr)
    common = {
        "guard": not args.no_guard,
        "steps_per_call": args.steps_per_call,
        "progress": not args.no_progress,
        "mesh": mesh,
        "shard_params": args.shard_params,
    }
    if args.command == "diagnose":
        th = plugin.thresholds(job.entry, job.config, **flags)
        report = diag.diagnose(job, thresholds=th, **common)
        return 0 if report["status"] == "ok" else EXIT_UNSTABLE
    from jaxstab.train.checkpoint import CheckpointError

    try:
        summary = diag.train(job, resume=args.resume, **common)
    except (CheckpointError, RunDirError) as e:
        return _error(str(e))
    return 0 if summary["status"] == "ok" else EXIT_UNSTABLE


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"jaxstab: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "compare":
        from jaxstab.report.compare import compare

        try:
            compare(args.dirs, args.output)
        except (OSError, ValueError) as e:
            return _error(str(e))
        return 0
    explicit = [getattr(args, k, None) for k in ("coordinator", "num_processes", "process_id")]
    distributed = getattr(args, "distributed", False)
    if not distributed and any(v is not None for v in explicit):
        return _error("--coordinator, --num-processes and --process-id need --distributed")
    if distributed:  # before anything touches a JAX backend
        try:
            _initialize_distributed(args)
        except (RuntimeError, ValueError, TypeError) as e:
            return _error(f"--distributed: {e}".replace("\n", " "))
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(args)


if __name__ == "__main__":
    sys.exit(main())
