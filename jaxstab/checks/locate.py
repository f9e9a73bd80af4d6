"""`locate_nonfinite`: the first primitive that produced a NaN or ±Inf, and where it is."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import numpy as np
from jax._src import source_info_util as _siu
from jax.experimental import checkify

from jaxstab.checks import _checkify_ext as _ext
from jaxstab.checks import _nnx_scopes

__all__ = ["NonFiniteReport", "locate_nonfinite"]


@dataclasses.dataclass(frozen=True)
class NonFiniteReport:
    """Where a non-finite value was born.

    Attributes:
      primitive: name of the JAX primitive whose output was first non-finite (``log``,
        ``div``, ``mul``, ...).
      file, line: innermost source location outside jax/flax/optax/chex/numpy/jaxstab.checks
        (the user's line); ``None`` if unknown.
      module_path: NNX path of the module whose ``__call__`` ran the primitive, relative
        to the outermost module called (``"encoder/layers/0"``; ``""`` for the outermost
        module itself); ``None`` outside module calls.
      input_ranges: ``(min, max)`` of each of the primitive's first four inputs
        (``None`` for a non-numeric input); ``None`` when checkify itself reported.
      kind: ``"nan"``, ``"+inf"``, ``"-inf"`` or ``"division by zero"``.
      flat_index: flat index of the first bad element of the output (or ``None``).
      transforms: the JAX transformations in the primitive's name stack, outermost
        first: ``("jvp",)`` for the forward/linearisation part of ``jax.grad``,
        ``("transpose", "jvp")`` for its backward pass, ``()`` for plain code.
      name_stack: the JAX name stack of the primitive, as text.
      message: one readable line with all of the above.
    """

    primitive: str
    file: str | None
    line: int | None
    module_path: str | None
    input_ranges: tuple[tuple[float, float] | None, ...] | None
    message: str
    kind: str = "nan"
    flat_index: int | None = None
    transforms: tuple[str, ...] = ()
    name_stack: str = ""

    def __str__(self) -> str:
        return self.message


def _library_dirs() -> tuple[str, ...]:
    import chex
    import flax
    import optax

    dirs = [os.path.dirname(m.__file__) + os.sep for m in (jax, flax, optax, chex, np)]
    dirs.append(os.path.dirname(os.path.abspath(__file__)) + os.sep)
    return tuple(dirs)


def _user_location(traceback: Any) -> tuple[str | None, int | None, str | None]:
    libs = _library_dirs()
    fallback = None
    for frame in _siu.user_frames(traceback):
        if fallback is None:
            fallback = frame
        if not frame.file_name.startswith(libs):
            return frame.file_name, frame.start_line, frame.function_name
    if fallback is not None:
        return fallback.file_name, fallback.start_line, fallback.function_name
    return None, None, None


def _transforms(name_stack: Any) -> tuple[str, ...]:
    return tuple(
        e.name for e in getattr(name_stack, "stack", ()) if type(e).__name__ == "Transform"
    )


def _check_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path((args, kwargs)):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not np.issubdtype(dtype, np.inexact):
            continue
        value = np.asarray(jax.device_get(leaf))
        bad = ~np.isfinite(value)
        if bad.any():
            index = int(np.argmax(bad.ravel()))
            where = (
                "args" + jax.tree_util.keystr(path[1:])
                if path[0].idx == 0
                else ("kwargs" + jax.tree_util.keystr(path[1:]))
            )
            raise ValueError(
                f"locate_nonfinite: input {where} is already non-finite "
                f"({value.ravel()[index]} at flat index {index}); nothing inside fn to locate"
            )


def _report_from(exc: Exception) -> NonFiniteReport:
    file, line, func = _user_location(exc.traceback_info)
    where = f"{file}:{line} ({func})" if file else "unknown location"
    if isinstance(exc, _ext.NonFiniteError):
        ranges_arr = np.asarray(exc.ranges, dtype=np.float64)
        ranges = tuple(
            None if np.isnan(r).all() else (float(r[0]), float(r[1]))
            for r in ranges_arr[: min(exc.n_inputs, _ext.MAX_RANGED_INPUTS)]
        )
        number, index, kind_code = (int(v) for v in np.asarray(exc.where))
        kind = _ext.KIND_NAMES[kind_code]
        path = _nnx_scopes.module_path(exc.name_stack)
        transforms = _transforms(exc.name_stack)
        stack_text = str(exc.name_stack)
        ranges_text = ", ".join(
            "non-numeric" if r is None else f"[{r[0]:.6g}, {r[1]:.6g}]" for r in ranges
        )
        message = (
            f"{kind} first produced by primitive '{exc.prim}' "
            f"(output {number}, flat index {index}) at {where}"
            + (f", module '{path}'" if path else (", outermost module" if path == "" else ""))
            + (f", under {'/'.join(transforms)}" if transforms else "")
            + (f"; input ranges: {ranges_text}" if ranges else "")
        )
        return NonFiniteReport(
            primitive=exc.prim,
            file=file,
            line=line,
            module_path=path,
            input_ranges=ranges,
            message=message,
            kind=kind,
            flat_index=index,
            transforms=transforms,
            name_stack=stack_text,
        )
    # Reported by checkify's own checks (a primitive the extension did not wrap).
    prim = getattr(exc, "prim", "div")
    kind = "division by zero" if prim == "div" and "division" in str(exc) else "nan"
    return NonFiniteReport(
        primitive=prim,
        file=file,
        line=line,
        module_path=None,
        input_ranges=None,
        message=f"{exc} at {where}",
        kind=kind,
    )


def locate_nonfinite(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> NonFiniteReport | None:
    """Runs ``fn(*args, **kwargs)`` with checks on every primitive; reports the first NaN/±Inf.

    ``fn`` is traced once with nested ``jit`` inlined (so every equation keeps its own
    source line and name stack) and with a name scope per Flax NNX module call; then it
    runs jitted under ``checkify.checkify`` with checkify's float checks
    (``nan_checks | div_checks``) extended by an ±Inf check that records each
    primitive's input ranges (see ``_checkify_ext``). The first equation, in execution
    order, whose floating output holds NaN, +Inf or -Inf is reported — also when a later
    ``jnp.where`` masks it away, since such values still poison gradients. Pass
    ``jax.grad(loss)`` (or ``nnx.grad``) as ``fn`` to find values born in the backward pass.

    Every leaf of ``args``/``kwargs`` is traced, as under ``jax.jit``: bind static
    arguments (Python numbers used in ``if``, strings, ...) with ``functools.partial``.
    Returns ``None`` when every intermediate value is finite. Raises ``ValueError`` if an
    input is already non-finite. Loops written with ``lax.scan`` are unrolled while
    tracing; ``lax.while_loop``/``lax.cond`` bodies are checked equation by equation.
    Module paths come from ``__call__``; other methods of a module are attributed to the
    module that called them.

    >>> import jax, jax.numpy as jnp
    >>> def loss(x):
    ...     return jnp.linalg.norm(x)
    >>> print(locate_nonfinite(loss, jnp.zeros(3)))
    None
    >>> report = locate_nonfinite(jax.grad(loss), jnp.zeros(3))
    >>> report.primitive, report.kind, report.transforms, report.input_ranges
    ('div', '+inf', ('jvp',), ((0.5, 0.5), (0.0, 0.0)))
    """
    if not callable(fn):
        raise TypeError(f"locate_nonfinite: fn must be callable, got {type(fn).__name__}")
    _check_inputs(args, kwargs)
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))

    def flat_fn(*flat: Any) -> Any:
        a, k = jax.tree_util.tree_unflatten(treedef, flat)
        return fn(*a, **k)

    with jax.disable_jit(), _nnx_scopes.module_scopes():
        closed = jax.make_jaxpr(flat_fn)(*leaves)
    _ext.install_rules(*_ext.primitives_in(closed.jaxpr))
    # A fresh marker in the enabled set keeps checkify's trace cache (keyed on the set)
    # from reusing error metadata, such as name stacks, recorded by an earlier call.
    marker = type("_LocateCall", (), {})
    errors = checkify.float_checks | _ext.NONFINITE_CHECKS | {marker}
    run = jax.jit(checkify.checkify(jax.extend.core.jaxpr_as_fun(closed), errors=errors))
    err, _ = run(*leaves)
    exc = err.get_exception()
    if exc is None:
        return None
    return _report_from(exc)
