"""A rich progress bar for the training loop: loss, global gradient norm, skips, ETA.

Example:
  >>> bar = TrainProgress(total_steps=10, enabled=False)
  >>> bar.update(5, {"loss": 0.5, "grad/global_norm": 1.0})
  >>> bar.close()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from jaxstab import stat_names as S


class TrainProgress:
    """A step counter drawn on stderr; a no-op when ``enabled`` is False.

    >>> TrainProgress(3, enabled=False).update(1, {})
    """

    def __init__(self, total_steps: int, *, enabled: bool = True, completed: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=completed, metrics=""
        )
        self._progress.start()

    def update(self, advance: int, last: Mapping[str, Any], epoch: int | None = None) -> None:
        """Advances by ``advance`` steps and shows the latest step's values."""
        if not self.enabled:
            return
        parts = []
        if epoch is not None:
            parts.append(f"epoch {epoch}")
        if S.LOSS in last:
            parts.append(f"loss {float(last[S.LOSS]):.4g}")
        if S.GLOBAL_NORM in last:
            parts.append(f"|g| {float(last[S.GLOBAL_NORM]):.3g}")
        if S.SKIP_TOTAL in last:
            parts.append(f"skips {int(last[S.SKIP_TOTAL])}")
        self._progress.update(self._task, advance=advance, metrics="  ".join(parts))

    def close(self) -> None:
        if self.enabled:
            self._progress.stop()
