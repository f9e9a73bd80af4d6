"""The three report figures: ``diagnostics.png``, ``gradient_heatmap.png``,
``feature_changes.png`` (matplotlib ``Figure`` objects rendered with Agg).

Example:
  >>> import numpy as np, tempfile, os
  >>> from jaxstab.report.thresholds import Thresholds
  >>> t = {"step": np.arange(3), "loss": np.array([1.0, 0.5, 0.4]), "lr": np.full(3, 1e-3),
  ...      "total_grad_norm": np.array([1.0, 2.0, 3.0]), "max_grad_norm": np.ones(3),
  ...      "clipped": np.zeros(3), "skipped": np.zeros(3), "grad_norm:a": np.ones(3)}
  >>> p = os.path.join(tempfile.mkdtemp(), "d.png")
  >>> plot_diagnostics(t, Thresholds(), p)
  >>> os.path.getsize(p) > 0
  True
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np

# Figures are built without pyplot: no global backend state and no display needed.
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from jaxstab.report.thresholds import Thresholds

MAX_GROUP_LINES = 8
MAX_FEATURE_PANELS = 9


def _finite(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return np.where(np.isfinite(v), v, np.nan)


def _positive(v: np.ndarray) -> np.ndarray:
    v = _finite(v)
    return np.where(v > 0, v, np.nan)


def _mark_nonfinite(ax, steps: np.ndarray, v: np.ndarray, label: str) -> None:
    bad = ~np.isfinite(np.asarray(v, np.float64))
    if bad.any():
        for s in steps[bad]:
            ax.axvline(s, color="crimson", alpha=0.5, lw=1)
        ax.plot([], [], color="crimson", label=label)


def _group_columns(table: Mapping[str, np.ndarray]) -> list[str]:
    return [c for c in table if c.startswith("grad_norm:")]


_SEVERITY_COLOURS = {"info": "tab:blue", "warning": "orange", "critical": "red"}


def _mark_findings(axes: Sequence[Any], findings: Sequence[Mapping[str, Any]]) -> None:
    # A finding with a step in its evidence is a vertical line on every panel, labelled on the
    # norm panel; every finding is listed in a box on the loss panel.
    for f in findings:
        step = f.get("evidence", {}).get("step")
        colour = _SEVERITY_COLOURS.get(f["severity"], "grey")
        if step is None:
            continue
        for ax in axes:
            ax.axvline(step, color=colour, ls="-.", lw=1.0, alpha=0.8)
        axes[1].annotate(f["code"], (step, 1.0), xycoords=("data", "axes fraction"),
                         rotation=90, va="top", ha="right", fontsize=7, color=colour)  # fmt: skip
    if findings:
        text = "\n".join(f"{f['severity']}: {f['code']}" for f in findings)
        axes[0].text(0.01, 0.97, "findings\n" + text, transform=axes[0].transAxes, va="top",
                     fontsize=7, bbox={"facecolor": "white", "alpha": 0.8})  # fmt: skip


def plot_diagnostics(
    table: Mapping[str, np.ndarray],
    thresholds: Thresholds,
    path: str | os.PathLike,
    findings: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Four panels: loss; global norm with warning/danger lines; per-group norms with the
    largest highlighted; learning rate with clip and skip events. ``findings`` (the report's)
    are listed on the loss panel and those with a ``step`` marked on every panel."""
    steps = np.asarray(table["step"])
    fig = Figure(figsize=(11, 13))
    axes = fig.subplots(4, 1, sharex=True)

    ax = axes[0]
    loss = np.asarray(table["loss"], np.float64)
    use_log = np.nanmin(_finite(loss)) > 0 if np.isfinite(loss).any() else False
    ax.plot(steps, _finite(loss), color="tab:blue", lw=1.2, label="loss")
    _mark_nonfinite(ax, steps, loss, "non-finite loss")
    ax.set_yscale("log" if use_log else "linear")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend(loc="upper right")

    ax = axes[1]
    total = np.asarray(table["total_grad_norm"], np.float64)
    ax.plot(steps, _positive(total), color="black", lw=1.2, label="total grad norm")
    ax.axhline(thresholds.total_warning, color="orange", ls="--", label="warning")
    ax.axhline(thresholds.total_danger, color="red", ls="--", label="danger")
    ax.axhline(thresholds.explosion, color="darkred", ls=":", label="explosion")
    _mark_nonfinite(ax, steps, total, "non-finite norm")
    ax.set_yscale("log")
    ax.set_ylabel("L2 norm")
    ax.set_title("Global gradient norm")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[2]
    cols = _group_columns(table)
    peak = {c: np.nanmax(_finite(table[c])) if np.isfinite(table[c]).any() else 0 for c in cols}
    for c in sorted(cols, key=lambda c: -peak[c])[:MAX_GROUP_LINES]:
        ax.plot(steps, _positive(table[c]), lw=0.9, label=c.split(":", 1)[1])
    ax.plot(steps, _positive(table["max_grad_norm"]), color="black", lw=1.6, label="max")
    ax.axhline(thresholds.group_warning, color="orange", ls="--")
    ax.axhline(thresholds.group_danger, color="red", ls="--")
    ax.set_yscale("log")
    ax.set_ylabel("group norm")
    ax.set_title("Per-group gradient norm (largest groups)")
    ax.legend(loc="upper right", fontsize=7, ncol=2)

    ax = axes[3]
    ax.plot(steps, _finite(table["lr"]), color="tab:green", label="learning rate")
    clipped = np.asarray(table["clipped"]) > 0
    skipped = np.asarray(table["skipped"]) > 0
    lr = _finite(table["lr"])
    ax.scatter(steps[clipped], lr[clipped], marker="|", s=80, color="orange", label="clipped")
    ax.scatter(steps[skipped], lr[skipped], marker="x", s=40, color="red", label="skipped")
    ax.set_ylabel("lr")
    ax.set_xlabel("step")
    ax.set_title("Learning rate, clip and skip events")
    ax.legend(loc="upper right", fontsize=8)
    _mark_findings(axes, findings)

    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_heatmap(table: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Groups × steps, colour = log10 of the group's gradient norm; non-finite in magenta."""
    cols = _group_columns(table)
    fig = Figure(figsize=(11, 1.5 + 0.35 * max(len(cols), 1)))
    ax = fig.subplots()
    if cols:
        norms = np.stack([np.asarray(table[c], np.float64) for c in cols])
        with np.errstate(divide="ignore", invalid="ignore"):
            logn = np.log10(np.where(np.isfinite(norms) & (norms > 0), norms, np.nan))
        cmap = matplotlib.colormaps["inferno"].copy()
        cmap = cmap.with_extremes(bad="lightgrey")  # zero gradient: a group with none
        im = ax.imshow(
            np.ma.masked_invalid(logn), aspect="auto", cmap=cmap, interpolation="nearest"
        )
        bad = np.ma.masked_where(np.isfinite(norms), np.ones_like(norms))
        ax.imshow(bad, aspect="auto", cmap=ListedColormap(["magenta"]), interpolation="nearest")
        ax.set_yticks(range(len(cols)), [c.split(":", 1)[1] for c in cols], fontsize=8)
        fig.colorbar(im, ax=ax, label="log10 gradient norm")
    else:
        ax.text(0.5, 0.5, "no per-group norms recorded", ha="center", va="center")
    ax.set_xlabel("step")
    ax.set_title("Gradient norm per group (magenta: NaN/Inf, grey: zero)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _families(names: Sequence[str]) -> dict[str, list[str]]:
    fam: dict[str, list[str]] = {}
    for n in names:
        base = n.rsplit("_", 1)[0] if n.rsplit("_", 1)[-1] in ("min", "max", "mean", "std") else n
        fam.setdefault(base, []).append(n)
    return fam


def plot_features(table: Mapping[str, np.ndarray | list[str]], path: str | os.PathLike) -> None:
    """One panel per input column (min/max/mean/std over steps), anomalies marked in red."""
    steps = np.asarray(table["step"])
    names = [c for c in table if c not in ("step", "epoch", "suspicious_features")]
    flags = [set(s.split(";")) - {""} for s in table["suspicious_features"]]
    fam = list(_families(names).items())[:MAX_FEATURE_PANELS]
    n = max(len(fam), 1)
    ncol = min(3, n)
    nrow = -(-n // ncol)
    fig = Figure(figsize=(4.2 * ncol, 3 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    if not fam:
        axes[0, 0].text(0.5, 0.5, "no input statistics recorded", ha="center", va="center")
    for ax, (base, members) in zip(axes.flat, fam, strict=False):
        for m in members:
            v = np.asarray(table[m], np.float64)
            ax.plot(steps, _finite(v), lw=1, label=m[len(base) + 1 :] or m)
            bad = np.array([m in f for f in flags], dtype=bool)
            if bad.any():
                y = np.where(
                    np.isfinite(v[bad]),
                    v[bad],
                    np.nanmax(_finite(v)) if np.isfinite(v).any() else 0.0,
                )
                ax.scatter(steps[bad], y, color="red", marker="o", s=18, zorder=3)
        ax.set_title(base, fontsize=9)
        ax.legend(fontsize=6, loc="upper right")
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle("Input statistics per step (red: suspicious)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
