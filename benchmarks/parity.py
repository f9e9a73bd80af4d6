"""Numerical parity of the model ports with their PyTorch versions.

``python -m benchmarks.run --suite parity [--model NAME]`` runs, for every spec of
:mod:`benchmarks.specs` (or the ones named) and every config preset in its ``presets``, at
its ``"full"`` size: the PyTorch version and the port are built, the PyTorch weights are
copied onto the port with the shared converter (:mod:`benchmarks.convert`), both are put in
eval mode (dropout off), given the same inputs (``spec.inputs``: a batch and its noise) and
compared quantity by quantity (``spec.outputs_jax`` / ``spec.outputs_torch``). The error is
the largest relative error ``max |ours - theirs| / max |theirs|``, for a gradient the largest
over its parameters, against the tolerances the parity tests use (1e-5 values, 1e-4
gradients). ``tests/benchmarks`` runs the same loop at the ``"small"`` size.

Example:
  >>> sorted(TOLERANCES)
  ['gradient', 'value']
  >>> error(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
  (0.2, 'value')
  >>> error({"w": np.ones(2)}, {"w": np.ones(2), "b": np.zeros(1)})
  (0.0, 'gradient')
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from benchmarks import specs
from benchmarks.meta import describe, environment

TOLERANCES = {"value": 1e-5, "gradient": 1e-4}
SIZE = "full"


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a PyTorch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a, np.float64)


def _rel(a: Any, b: Any) -> float:
    a, b = _np(a), _np(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def error(ours: Any, theirs: Any, zero: Iterable[str] = ()) -> tuple[float, str]:
    """Largest relative error of one quantity and its kind (``"value"`` or ``"gradient"``).

    A mapping is a gradient (``{state-dict key: array}``), compared over the keys of
    ``ours``; a tuple is compared member by member; anything else is one array. Gradient keys
    matching a pattern of ``zero`` (``fnmatch``; gradients that are 0 in exact arithmetic, so
    that both sides hold rounding noise) are measured against the largest gradient of any
    key instead of their own.

    >>> g = {"w": np.ones(2), "b": np.array([1e-9])}
    >>> error(g, {"w": np.ones(2), "b": np.array([-1e-9])})[0]
    2.0
    >>> error(g, {"w": np.ones(2), "b": np.array([-1e-9])}, zero=["b"])[0]
    2e-09
    """
    if isinstance(ours, Mapping):
        if not isinstance(theirs, Mapping):
            raise TypeError("a gradient (a mapping) on one side only")
        missing = sorted(set(ours) - set(theirs))
        if missing:
            raise KeyError(f"gradients missing on the PyTorch side: {missing}")
        zero = tuple(zero)
        largest = max(float(np.max(np.abs(_np(theirs[k])), initial=0.0)) for k in ours)

        def one(k: str) -> float:
            if any(fnmatch.fnmatchcase(k, pattern) for pattern in zero):
                diff = np.max(np.abs(_np(ours[k]) - _np(theirs[k])), initial=0.0)
                return float(diff / max(largest, 1e-30))
            return _rel(ours[k], theirs[k])

        return max(one(k) for k in ours), "gradient"
    if isinstance(ours, tuple | list):
        return max(_rel(o, t) for o, t in zip(ours, theirs, strict=True)), "value"
    return _rel(ours, theirs), "value"


def compare(spec: specs.ModelSpec, preset: str = "default", size: str = SIZE, seed: int = 0):
    """One spec at one preset and size: the error, tolerance and verdict of each quantity."""
    from flax import nnx

    torch_model = spec.build_torch(size, preset, seed)
    torch_model.eval()  # dropout off on both sides
    weights = "PyTorch init, copied by benchmarks.convert"
    if spec.parity_weights is not None:
        spec.parity_weights(torch_model, seed)
        weights = (
            f"PyTorch init changed by {spec.name}'s parity_weights, copied by benchmarks.convert"
        )
    model, _ = spec.build_jax(size, preset, seed)
    nnx.update(model, spec.convert(torch_model.state_dict(), model))
    model.eval()
    inputs = spec.inputs(size, seed)
    ours = spec.outputs_jax(model, inputs)
    theirs = spec.outputs_torch(torch_model, inputs)
    if set(ours) != set(theirs):
        raise KeyError(f"{spec.name}: quantities differ: {sorted(set(ours) ^ set(theirs))}")
    errors, tolerance = {}, {}
    for name in ours:
        errors[name], kind = error(ours[name], theirs[name], spec.zero_gradients)
        tolerance[name] = TOLERANCES[kind]
    return {
        "config": {
            "preset": preset,
            "size": size,
            "settings": dict(spec.size(size)),
            "seed": seed,
            "weights": weights,
        },
        "max_relative_error": errors,
        "tolerance": tolerance,
        "within_tolerance": {k: errors[k] < tolerance[k] for k in errors},
    }


def result_key(spec: specs.ModelSpec, preset: str) -> str:
    """``name`` for the default preset, ``name-<preset>`` for the others."""
    return spec.name if preset == "default" else f"{spec.name}-{preset}"


def run(models: Iterable[str] | None = None, size: str = SIZE) -> dict[str, Any]:
    """Every preset of every spec (or of ``models``), keyed by :func:`result_key`."""
    results = {
        result_key(spec, preset): compare(spec, preset, size)
        for spec in specs.select(models)
        for preset in spec.presets
    }
    return {"environment": environment(), "tolerances": TOLERANCES, "models": results}


def parity_markdown(result: dict[str, Any]) -> str:
    """One table per model and preset: quantity, max relative error, tolerance, within it."""
    lines = ["# Parity with the PyTorch versions", "", describe(result["environment"]), ""]
    for name, res in result["models"].items():
        cfg = res["config"]
        batch = cfg["settings"].get("batch_size")
        lines += [f"## {name} (preset {cfg['preset']}, size {cfg['size']}: one batch of {batch})"]
        lines.append("")
        lines += ["| quantity | max rel. error | tolerance | ok |", "|---|---|---|---|"]
        for k, err in res["max_relative_error"].items():
            ok = "yes" if res["within_tolerance"][k] else "NO"
            lines.append(f"| {k} | {err:.1e} | {res['tolerance'][k]:.0e} | {ok} |")
        lines.append("")
    return "\n".join(lines)
