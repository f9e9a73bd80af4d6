"""``jaxstab.Recorder``: the diagnosis report from a user's own training loop.

Record what ``jax.device_get(jaxstab.read_stats(opt_state))`` returns after each jitted call
(one host transfer per call; a ``lax.scan`` chunk's statistics stacked along a leading axis
are taken as they are), check :attr:`Recorder.should_stop`, and close the recorder (or leave
its ``with`` block, also by an exception): it writes the six files that ``jaxstab diagnose``
writes (:data:`jaxstab.report.artifacts.FILES`), into a hidden sibling folder first and moved
into place when complete, so a crash never leaves half a report.

Example:
  >>> import os, tempfile
  >>> import jax, jax.numpy as jnp, optax, jaxstab
  >>> tx = jaxstab.stability_guard(optax.sgd(0.1))
  >>> params = {"w": jnp.ones(3)}
  >>> state = tx.init(params)
  >>> out = os.path.join(tempfile.mkdtemp(), "run")
  >>> with jaxstab.Recorder(out) as rec:
  ...     for step in range(12):
  ...         loss, g = jax.value_and_grad(lambda p: jnp.sum(p["w"] ** 2))(params)
  ...         updates, state = tx.update(g, state, params)
  ...         params = optax.apply_updates(params, updates)
  ...         rec.record(step, jax.device_get(jaxstab.read_stats(state)), loss=loss,
  ...                    params=params)
  >>> rec.report["status"], rec.report["steps_recorded"], len(os.listdir(out))
  ('ok', 12, 7)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

import jaxstab
from jaxstab import rundir
from jaxstab import stat_names as S
from jaxstab import tree as tree_lib
from jaxstab.report import artifacts, report_json
from jaxstab.report.thresholds import Thresholds

COMMAND = "record"
LR = "train/lr"  # the learning rate passed to record(), kept beside the statistics


def _flat(params: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree_lib.flat_dict(jax.device_get(params)).items()}


class Recorder:
    """Records a training loop's statistics and writes its diagnosis report on close.

    Args:
      output_dir: the run folder (the rules of :func:`jaxstab.rundir.claim`: a folder holding
        an earlier report is replaced only with ``overwrite=True``; one holding files
        jaxstab did not write is refused).
      thresholds: the report's levels; ``thresholds.explosion`` is the global-norm level
        that sets :attr:`should_stop` (default :class:`jaxstab.report.thresholds.Thresholds`).
      record_every: keep every ``k``-th step (by step number); the stop checks see every step.
      config: settings copied into the report (``clip``, ``trainable`` and ``frozen`` are
        read by the findings when not given below).
      clip: the fixed global-norm clip of the optimizer, for the ``always_clipped`` finding
        (default: read off ``clip/pre_norm`` and ``clip/scale`` when they are recorded).
      trainable: the groups that train (default all); ``frozen``: groups that must not move.
      replay: called once, under :func:`jaxstab.checks.locate_nonfinite`, with the
        ``replay_args`` of the first step whose loss or gradient is not finite (the
        ``nonfinite_origin`` finding): e.g. ``jax.value_and_grad(loss_fn)`` with
        ``replay_args=(params, batch)``, the step's inputs.
      overwrite: replace an earlier report in ``output_dir``.
      steps_per_epoch: for the tables' ``epoch`` column.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        thresholds: Thresholds | None = None,
        record_every: int = 1,
        *,
        config: Mapping[str, Any] | None = None,
        clip: float | None = None,
        trainable: Sequence[str] | None = None,
        frozen: Sequence[str] | None = None,
        replay: Callable[..., Any] | None = None,
        overwrite: bool = False,
        steps_per_epoch: int | None = None,
    ) -> None:
        if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
            raise ValueError(f"record_every must be a positive integer, got {record_every!r}")
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        rundir.claim(self.output_dir, COMMAND, overwrite=overwrite)
        self.thresholds = thresholds or Thresholds()
        self.record_every = record_every
        self.config = dict(config or {})
        self.clip = self.config.get("clip") if clip is None else clip
        self.trainable = trainable if trainable is not None else self.config.get("trainable")
        self.frozen = frozen if frozen is not None else self.config.get("frozen")
        self.replay = replay
        self.steps_per_epoch = steps_per_epoch
        self.status = "ok"
        self.stop_step: int | None = None
        self.report: dict[str, Any] | None = None
        self._chunks: dict[str, list[np.ndarray]] = {}
        self._steps: list[np.ndarray] = []
        self._before: dict[str, np.ndarray] | None = None
        self._after: Any = None
        self._replay_args: tuple[Any, ...] | None = None
        self._origin: Any = None
        self._stop_loss_finite: bool | None = None
        self._closed = False

    @property
    def should_stop(self) -> bool:
        """Whether a recorded step reached the explosion level or had a non-finite loss."""
        return self.status != "ok"

    def record(
        self,
        step: int,
        stats: Mapping[str, Any],
        *,
        loss: Any,
        lr: Any = None,
        inputs: Mapping[str, Any] | None = None,
        params: Any = None,
        replay_args: Sequence[Any] | None = None,
    ) -> None:
        """Records one step, or ``k`` steps ``step .. step + k - 1`` when ``loss`` has shape
        ``[k]`` (a ``lax.scan`` chunk; every statistic then has a leading axis ``k``).

        ``stats`` must hold ``grad/global_norm``; any other statistic of
        :func:`jaxstab.read_stats` is used where present. ``inputs`` maps input-statistic
        names to values (as ``loss``); ``params`` (the parameters after the step; the first
        call's are the "before" of the weight changes) and ``replay_args`` (the inputs of
        this step for ``replay``) are kept by reference, not copied to the host, until needed.
        """
        if self._closed:
            raise RuntimeError("this Recorder is closed")
        host = jax.device_get({"stats": dict(stats), "loss": loss, "lr": lr,
                               "inputs": dict(inputs or {})})  # fmt: skip
        loss_v = np.asarray(host["loss"], np.float64)
        if loss_v.ndim > 1:
            raise ValueError(f"loss must be a scalar or one value per step, got {loss_v.shape}")
        k = 1 if loss_v.ndim == 0 else loss_v.shape[0]
        if S.GLOBAL_NORM not in host["stats"]:
            raise ValueError(
                f"stats has no {S.GLOBAL_NORM!r}: record what jaxstab.read_stats returns for "
                "an optimizer with jaxstab.log_norms or jaxstab.stability_guard"
            )
        columns: dict[str, np.ndarray] = {S.LOSS: loss_v.reshape(k)}
        named = [*host["stats"].items(), *((S.INPUT + n, v) for n, v in host["inputs"].items())]
        if host["lr"] is not None:
            named.append((LR, host["lr"]))
        for name, value in named:
            v = np.asarray(value)
            if v.ndim == 0 and k == 1:
                v = v.reshape(1)
            if v.shape != (k,):
                want = "a scalar" if k == 1 else f"shape ({k},) like the loss"
                raise ValueError(f"statistic {name!r} must be {want}, got shape {v.shape}")
            columns[name] = v
        steps = int(step) + np.arange(k)
        self._check_stop(steps, columns, replay_args)
        keep = steps % self.record_every == 0
        if self.stop_step is not None:  # keep the stopping step itself, drop what follows
            keep = (keep | (steps == self.stop_step)) & (steps <= self.stop_step)
        if keep.any():
            self._steps.append(steps[keep])
            for name, v in columns.items():
                self._chunks.setdefault(name, []).append(v[keep])
        if params is not None:
            if self._before is None:
                self._before = _flat(params)
            self._after = params

    def _check_stop(
        self, steps: np.ndarray, columns: Mapping[str, np.ndarray], replay_args: Any
    ) -> None:
        if self.stop_step is not None:
            return
        loss = columns[S.LOSS]
        norm = np.asarray(columns[S.GLOBAL_NORM], np.float64)
        nonfinite = ~np.isfinite(loss) | ~np.isfinite(norm)
        explosion = np.isfinite(norm) & (norm > self.thresholds.explosion)
        bad = np.nonzero(nonfinite | explosion)[0]
        if bad.size:
            i = int(bad[0])
            self.stop_step = int(steps[i])
            self.status = "nonfinite" if nonfinite[i] else "explosion"
            self._stop_loss_finite = bool(np.isfinite(loss[i]))
            if self.status == "nonfinite" and replay_args is not None:
                self._replay_args = tuple(replay_args)

    def _locate(self) -> Any:
        if self.replay is None or self._replay_args is None:
            return None
        from jaxstab.checks import locate_nonfinite

        try:
            return locate_nonfinite(self.replay, *self._replay_args)
        except Exception as e:  # the report must still be written
            warnings.warn(f"replaying the non-finite step failed: {e}", stacklevel=3)
            return None

    def history(self) -> dict[str, np.ndarray]:
        """Every recorded statistic over the kept steps (missing values of a statistic that
        some calls did not report are NaN)."""
        n = sum(len(s) for s in self._steps)
        out: dict[str, np.ndarray] = {}
        for name, chunks in self._chunks.items():
            v = np.concatenate(chunks)
            if len(v) != n:
                raise ValueError(f"statistic {name!r} was not recorded at every step")
            out[name] = v
        return out

    def close(self, error: BaseException | None = None) -> dict[str, Any]:
        """Writes the report files (once; later calls return the same report)."""
        if self._closed and self.report is not None:
            return self.report
        self._closed = True
        history = self.history()
        if S.LOSS not in history:
            history = {S.LOSS: np.zeros(0), S.GLOBAL_NORM: np.zeros(0)}
        self._origin = self._locate()
        steps = np.concatenate(self._steps) if self._steps else np.zeros(0, np.int64)
        extra: dict[str, Any] = {
            "command": COMMAND,
            "recorded_steps": steps,
            "stop_step": self.stop_step,
            "record_every": self.record_every,
        }
        if error is not None:
            extra["error"] = f"{type(error).__name__}: {error}"
        parent = os.path.dirname(self.output_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=rundir.temp_prefix(self.output_dir, "tmp"), dir=parent)
        try:
            marker = {"command": COMMAND, "config": self.config,
                      "jaxstab_version": jaxstab.__version__}  # fmt: skip
            rundir.write_marker(tmp, report_json.jsonable(marker))
            after = None if self._after is None else _flat(self._after)
            self.report = artifacts.write_artifacts(
                tmp,
                history,
                status=self.status,
                config=self.config,
                thresholds=self.thresholds,
                steps_per_epoch=self.steps_per_epoch,
                lr=history.get(LR),
                params_before=self._before,
                params_after=after,
                clip=self.clip,
                trainable=self.trainable,
                frozen=self.frozen,
                origin=self._origin,
                origin_loss_finite=self._stop_loss_finite,
                extra=extra,
            )
            rundir.replace_contents(tmp, self.output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.report

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(error=exc)

    def __repr__(self) -> str:
        n = sum(len(s) for s in self._steps)
        stop = "" if self.stop_step is None else f", stopped at step {self.stop_step}"
        return f"Recorder({self.output_dir!r}, {n} steps, status {self.status!r}{stop})"
