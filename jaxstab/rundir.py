"""Run directories: what a jaxstab run folder holds and the rules that keep it from losing data.

A run folder holds the run marker ``jaxstab_run.json`` (command, model, config, data
fingerprint, jaxstab version; written when the run *starts*) and the files of
:data:`OWNED` that the command writes. :func:`claim` applies the rules before any step:

- a missing or empty folder starts a new run;
- a folder with files but no run marker (nor a report of an older jaxstab) is someone
  else's: refused, nothing touched;
- an existing run is never replaced silently: ``overwrite=True`` removes only the files of
  :data:`OWNED` (a user's ``notes.txt`` stays); ``resume=True`` continues a ``train`` run
  and is an error anywhere else;
- the folder (or the parent it will be made in) must be writable;
- hidden temporary folders (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) left beside it by a
  run that was killed (its process is gone) are removed, and their names returned.

Example:
  >>> import os, tempfile
  >>> d = os.path.join(tempfile.mkdtemp(), "run")
  >>> claim(d, "diagnose").state
  'new'
  >>> os.makedirs(d); open(os.path.join(d, "notes.txt"), "w").close()
  >>> claim(d, "diagnose")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxstab.rundir.RunDirError: output directory ... did not write (notes.txt); choose another...
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

MARKER = "jaxstab_run.json"
# Reports that mark a run of a jaxstab version from before the marker.
LEGACY_MARKERS = {"diagnosis_report.json": "diagnose", "train_summary.json": "train"}
# Every name jaxstab writes into a run folder (``--overwrite`` removes these and no other).
OWNED = frozenset(
    {
        MARKER,
        f".{MARKER}.tmp",
        "diagnosis_report.json",
        "train_summary.json",
        ".train_summary.json.tmp",
        "gradient_stats.csv",
        "input_features.csv",
        "diagnostics.png",
        "gradient_heatmap.png",
        "feature_changes.png",
        "checkpoints",
    }
)


class RunDirError(ValueError):
    """A run folder that the requested command may not use (one line; nothing was changed)."""


class Claim(NamedTuple):
    """What :func:`claim` found: ``state`` ``'new'`` or ``'run'``, the old marker, cleaned temps."""

    path: str
    state: str
    marker: dict[str, Any] | None
    cleaned: tuple[str, ...]


def read_marker(path: str) -> dict[str, Any] | None:
    """The run marker of folder ``path`` (``{"command": ...}`` for an older run), or ``None``.

    >>> read_marker(tempfile.mkdtemp()) is None
    True
    """
    file = os.path.join(path, MARKER)
    if os.path.isfile(file):
        try:
            with open(file) as f:
                marker = json.load(f)
        except (OSError, ValueError) as e:
            raise RunDirError(f"run marker {file} is unreadable ({e})") from None
        if isinstance(marker, dict):
            return marker
        raise RunDirError(f"run marker {file} is not a JSON object")
    for name, command in LEGACY_MARKERS.items():
        if os.path.isfile(os.path.join(path, name)):
            return {"command": command}
    return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temp_prefix(path: str, kind: str) -> str:
    """Prefix of the hidden sibling folders of run folder ``path`` (``kind``: tmp or old)."""
    return f".{os.path.basename(path)}.{kind}-{os.getpid()}-"


def clean_stale(path: str) -> tuple[str, ...]:
    """Removes the hidden temporary siblings of ``path`` whose process is gone; their names.

    >>> import os, tempfile
    >>> parent = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(parent, ".run.tmp-999999999-abc"))
    >>> clean_stale(os.path.join(parent, "run")), os.listdir(parent)
    (('.run.tmp-999999999-abc',), [])
    """
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return ()
    removed = []
    for name in sorted(os.listdir(parent)):
        for kind in ("tmp", "old"):
            head = f".{base}.{kind}-"
            if not name.startswith(head):
                continue
            pid = name[len(head) :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                removed.append(name)
    return tuple(removed)


def _check_writable(path: str) -> None:
    probe_dir = path
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir) or "."
    if not os.path.isdir(probe_dir):
        raise RunDirError(f"output directory {path}: {probe_dir} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxstab-write-check-", dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError:
        where = "" if probe_dir == path else f" (its parent {probe_dir} is not writable)"
        raise RunDirError(f"output directory {path} is not writable{where}") from None


def claim(path: str, command: str, *, resume: bool = False, overwrite: bool = False) -> Claim:
    """Checks that ``command`` may write run folder ``path``; changes nothing but stale temps.

    Raises :class:`RunDirError` (one line) when the folder is someone else's, holds a run
    that would be replaced without ``overwrite``, cannot be resumed, or is not writable.
    """
    path = os.path.abspath(path)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if resume and command != "train":
        raise RunDirError(f"--resume is for 'jaxstab train'; {command} starts afresh")
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"output directory {path} exists and is a file")
    marker = read_marker(path) if os.path.isdir(path) else None
    entries = os.listdir(path) if os.path.isdir(path) else []
    if entries and marker is None:
        names = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunDirError(
            f"output directory {path} holds files jaxstab did not write ({names}); "
            "choose another folder"
        )
    if resume:
        if not os.path.isdir(path):
            raise RunDirError(f"nothing to resume: {path} does not exist")
        if marker is None:
            raise RunDirError(f"nothing to resume: {path} is empty")
        if marker.get("command") != "train":
            raise RunDirError(
                f"nothing to resume: {path} holds a {marker.get('command')} run, not a train run"
            )
    elif marker is not None and not overwrite:
        was = marker.get("command", "jaxstab")
        hint = "--resume continues it, " if command == "train" and was == "train" else ""
        raise RunDirError(
            f"output directory {path} already holds a {was} run; {hint}--overwrite replaces "
            "it, or choose another folder"
        )
    _check_writable(path)
    return Claim(path, "run" if marker is not None else "new", marker, clean_stale(path))


def remove_owned(path: str, keep: Iterable[str] = ()) -> None:
    """Deletes the files and folders of :data:`OWNED` in ``path`` (but not those in ``keep``)."""
    for name in OWNED - set(keep):
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)


def replace_contents(staging: str, path: str) -> None:
    """Moves every entry of the finished ``staging`` folder into ``path``.

    An earlier run's files of :data:`OWNED` are first moved aside (into a hidden sibling,
    removed at the end); files that jaxstab did not write stay where they are.
    """
    if not os.path.exists(path):
        os.rename(staging, path)
        return
    parent = os.path.dirname(path)
    old = tempfile.mkdtemp(prefix=temp_prefix(path, "old"), dir=parent)
    for name in sorted(OWNED):
        if os.path.lexists(os.path.join(path, name)):
            os.rename(os.path.join(path, name), os.path.join(old, name))
    for name in sorted(os.listdir(staging)):
        os.rename(os.path.join(staging, name), os.path.join(path, name))
    shutil.rmtree(old, ignore_errors=True)
    os.rmdir(staging)


def fingerprint(arrays: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``arrays`` (sorted by name).

    >>> a = {"x": np.arange(3.0)}
    >>> fingerprint(a) == fingerprint({"x": np.arange(3.0)}) != fingerprint({"x": np.ones(3)})
    True
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        v = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}|{v.dtype.str}|{v.shape}|".encode())
        h.update(memoryview(v).cast("B"))
    return h.hexdigest()


def write_marker(directory: str, marker: Mapping[str, Any]) -> None:
    """Writes ``marker`` (plus the time) as ``directory/jaxstab_run.json``, atomically."""
    body = {**marker, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    tmp = os.path.join(directory, f".{MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, default=str)
    os.replace(tmp, os.path.join(directory, MARKER))


# Settings that may differ on ``--resume`` (they change how long or how the run is shown,
# never what a step computes).
RESUMABLE = frozenset({"epochs", "steps_per_call", "progress"})


def check_resume(marker: Mapping[str, Any], config: Mapping[str, Any], data_fp: str) -> None:
    """Refuses to resume with other data or another setting than the run was started with.

    >>> check_resume({"config": {"lr": 0.1, "epochs": 2}, "data_fingerprint": "a"},
    ...              {"lr": 0.1, "epochs": 5}, "a")
    >>> check_resume({"config": {"lr": 0.1}}, {"lr": 0.2}, "a")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    jaxstab.rundir.RunDirError: cannot resume: lr was 0.1 in the first run, now 0.2 (only ...)
    """
    old = marker.get("config") or {}  # empty: a jaxstab version that recorded no settings
    for key in sorted(set(old) | set(config) if old else ()):
        # ``data`` is the path; its contents are compared through the fingerprint above.
        if key in RESUMABLE or key in ("data", "data_warnings"):
            continue
        a, b = _plain(old.get(key)), _plain(config.get(key))
        if a != b:
            allowed = ", ".join(sorted(RESUMABLE))
            raise RunDirError(
                f"cannot resume: {key} was {a!r} in the first run, now {b!r} "
                f"(only {allowed} may change on --resume)"
            )
    old_fp = marker.get("data_fingerprint")
    if old_fp is not None and old_fp != data_fp:
        raise RunDirError("cannot resume: the training data differ from the first run's")


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, numpy scalars as Python)."""
    return json.loads(json.dumps(value, default=str))
