"""``jaxstab compare``: several diagnosis runs side by side (rich table + ``comparison.png``).

Example:
  >>> import tempfile
  >>> try:
  ...     load_run(tempfile.mkdtemp())
  ... except FileNotFoundError as e:
  ...     print("not a run")
  not a run
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from jaxstab.report import findings as findings_lib

REPORT, STATS = "diagnosis_report.json", "gradient_stats.csv"


class Run(NamedTuple):
    """One diagnosis directory: its name, report and per-step columns."""

    name: str
    report: dict[str, Any]
    columns: dict[str, np.ndarray]


def read_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a numeric CSV written by the report into float columns.

    >>> import tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "a.csv")
    >>> _ = open(p, "w").write("step,loss\\n0,1.5\\n1,nan\\n")
    >>> read_csv(p)["loss"].tolist()
    [1.5, nan]
    """
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header, body = rows[0], rows[1:]
    cols = {}
    for j, name in enumerate(header):
        try:
            cols[name] = np.array([float(r[j]) for r in body], dtype=np.float64)
        except ValueError:
            continue  # non-numeric column
    return cols


def load_run(directory: str | os.PathLike) -> Run:
    """Reads a run directory; ``FileNotFoundError`` if it holds no diagnosis report."""
    report_path = os.path.join(directory, REPORT)
    stats_path = os.path.join(directory, STATS)
    for p in (report_path, stats_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{directory}: no {os.path.basename(p)} (not a diagnose run)")
    with open(report_path) as f:
        report = json.load(f)
    return Run(os.path.basename(os.path.normpath(directory)), report, read_csv(stats_path))


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def comparison_table(runs: Sequence[Run]) -> Table:
    """A rich table: one column per run, one row per headline number."""
    table = Table(title="jaxstab runs")
    table.add_column("")
    for r in runs:
        table.add_column(r.name)
    summary = [r.report.get("summary", {}) for r in runs]
    config = [r.report.get("config", {}) for r in runs]
    rows = [
        ("status", [r.report.get("status") for r in runs]),
        ("steps", [r.report.get("steps_recorded") for r in runs]),
        ("lr", [c.get("lr") for c in config]),
        ("grad clip", [c.get("grad_clip") for c in config]),
        ("guard", [c.get("guard") for c in config]),
        ("final loss", [s.get("final_loss") for s in summary]),
        ("max total norm", [s.get("max_total_grad_norm") for s in summary]),
        ("first anomaly step", [r.report.get("first_anomaly_step") for r in runs]),
        ("warning steps", [s.get("warning_steps") for s in summary]),
        ("danger steps", [s.get("danger_steps") for s in summary]),
        ("clipped steps", [s.get("clipped_steps") for s in summary]),
        ("skipped steps", [s.get("skipped_steps") for s in summary]),
        (
            "top offending group",
            [(r.report.get("offending_groups") or [{}])[0].get("group") for r in runs],
        ),
    ]
    for label, values in rows:
        table.add_row(label, *[_fmt(v) for v in values])
    # Every finding code that any run has, one row each: its severity in the runs that have it.
    codes = list(dict.fromkeys(f["code"] for r in runs for f in r.report.get("findings", ())))
    for code in codes:
        cells = []
        for r in runs:
            hits = [f["severity"] for f in r.report.get("findings", ()) if f["code"] == code]
            cells.append(", ".join(hits) if hits else "-")
        table.add_row(f"finding: {code}", *cells)
    return table


def findings_text(runs: Sequence[Run]) -> str:
    """Each run's findings as plain sentences, run by run (a report of an older jaxstab,
    without findings, says so).

    >>> run = Run("a", {"findings": [{"code": "dead_group", "severity": "warning",
    ...                               "message": "Group 'b' does not train."}]}, {})
    >>> print(findings_text([run, Run("b", {}, {})]))
    a:
      [warning] dead_group: Group 'b' does not train.
    b:
      (no findings recorded)
    """
    lines = []
    for r in runs:
        lines.append(f"{r.name}:")
        found = r.report.get("findings")
        if found is None:
            lines.append("  (no findings recorded)")
        elif not found:
            lines.append("  no findings")
        for f in found or ():
            lines.append(f"  {findings_lib.finding_line(f)}")
    return "\n".join(lines)


def plot_comparison(runs: Sequence[Run], path: str | os.PathLike) -> None:
    """Loss and global gradient norm of every run on shared axes."""
    fig = Figure(figsize=(11, 7))
    ax_loss, ax_norm = fig.subplots(2, 1, sharex=True)
    for r in runs:
        steps = r.columns["step"]
        loss = np.where(np.isfinite(r.columns["loss"]), r.columns["loss"], np.nan)
        norm = r.columns["total_grad_norm"]
        norm = np.where(np.isfinite(norm) & (norm > 0), norm, np.nan)
        ax_loss.plot(steps, loss, lw=1.2, label=f"{r.name} ({r.report.get('status')})")
        ax_norm.plot(steps, norm, lw=1.2, label=r.name)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.legend(fontsize=8)
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("total grad norm")
    ax_norm.set_xlabel("step")
    ax_norm.set_title("Global gradient norm")
    ax_norm.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def compare(
    directories: Sequence[str], output: str | os.PathLike, console: Console | None = None
) -> list[Run]:
    """Loads every run (all first, so a bad directory writes nothing), prints, plots."""
    runs = [load_run(d) for d in directories]
    console = console or Console()
    console.print(comparison_table(runs))
    console.print(findings_text(runs), markup=False, highlight=False)
    plot_comparison(runs, output)
    return runs
