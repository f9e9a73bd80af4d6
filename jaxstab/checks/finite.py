"""Finiteness assertions that run on the device: `assert_finite`, `guard_step`, `wait_checks`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxstab.tree import path_name

try:  # chex turns checkify failures whose message has its prefix into AssertionError.
    from chex._src.asserts_internal import get_chexify_err_message as _chex_message
except ImportError:  # pragma: no cover - older/newer chex layouts

    def _chex_message(name: str, msg: str = "") -> str:
        return f"[Chex] chexify assertion '{name}' failed: {msg}"


__all__ = ["GuardedStep", "assert_finite", "guard_step", "wait_checks"]


def _path_str(path: Sequence[Any]) -> str:
    return path_name(tuple(path))


def _is_checked_leaf(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return isinstance(leaf, float | complex)
    return jnp.issubdtype(dtype, jnp.inexact)


def _escape(text: str) -> str:
    # `checkify.check` formats its message with str.format: literal braces must be doubled.
    return text.replace("{", "{{").replace("}", "}}")


def _host_assert_finite(leaves: list[tuple[Any, Any]], name: str) -> None:
    for path, leaf in leaves:
        value = np.asarray(jax.device_get(leaf))
        bad = ~np.isfinite(value)
        if bad.any():
            index = int(np.argmax(bad.ravel()))
            raise AssertionError(
                f"{name}: non-finite value {value.ravel()[index]} in leaf "
                f"'{_path_str(path)}' (shape {value.shape}) at flat index {index}."
            )


def assert_finite(tree: Any, name: str = "tree") -> None:
    """Asserts that every floating-point leaf of ``tree`` is finite (no NaN, no ±Inf).

    Outside ``jit`` (concrete arrays) it checks at once on the host and raises
    ``AssertionError``. Under ``jit`` it emits one ``checkify.check`` per floating leaf,
    so the function must be wrapped, outermost, in ``chex.chexify`` (or
    ``checkify.checkify``); the check then runs on the device and a failure raises
    ``AssertionError`` from chexify (asynchronously with ``async_check=True``).
    Either way the message names ``name``, the tree path of the first non-finite leaf
    (in ``jax.tree_util`` order, joined with "/") and the first bad flat index.
    Integer and boolean leaves are always finite and are skipped.

    >>> import chex, jax, jax.numpy as jnp
    >>> assert_finite({"w": jnp.ones(3)}, "params")  # finite: returns None
    >>> try:
    ...     assert_finite({"w": jnp.array([1.0, jnp.inf])}, "params")
    ... except AssertionError as e:
    ...     print(e)
    params: non-finite value inf in leaf 'w' (shape (2,)) at flat index 1.
    >>> @chex.chexify
    ... @jax.jit
    ... def double(x):
    ...     assert_finite(x, "x")
    ...     return 2 * x
    >>> _ = double(jnp.array([0.0, jnp.nan]))
    >>> try:
    ...     double.wait_checks()
    ... except AssertionError as e:
    ...     print("raised:", "leaf '<root>'" in str(e))
    raised: True
    """
    if not isinstance(name, str):
        raise TypeError(f"assert_finite: name must be a str, got {type(name).__name__}")
    leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if _is_checked_leaf(x)]
    if not any(isinstance(x, jax.core.Tracer) for _, x in leaves):
        _host_assert_finite(leaves, name)
        return
    for path, leaf in leaves:
        leaf = jnp.asarray(leaf)
        bad = jnp.logical_not(jnp.isfinite(leaf)).ravel()
        msg = _chex_message(
            "assert_finite",
            _escape(f"{name}: non-finite value in leaf '{_path_str(path)}' (shape {leaf.shape})")
            + " at flat index {index}.",
        )
        checkify.check(jnp.logical_not(jnp.any(bad)), msg, index=jnp.argmax(bad))


def wait_checks() -> None:
    """Blocks until every pending asynchronous chexify check has run; raises the first failure.

    Covers the checks of every ``guard_step`` and every ``chex.chexify`` function in the
    process (it calls ``chex.block_until_chexify_assertions_complete``).

    >>> import jax.numpy as jnp
    >>> step = guard_step(lambda x: x + 1.0)
    >>> _ = step(jnp.zeros(2))
    >>> wait_checks()  # nothing failed: returns None
    """
    chex.block_until_chexify_assertions_complete()


class GuardedStep:
    """A jitted, chexified training step; see `guard_step`.

    Call it like the step itself; it must be the outermost transformation (chexify
    refuses traced arguments, so do not call it inside ``jit``/``scan``).

    >>> import jax.numpy as jnp
    >>> step = guard_step(lambda x: x / 2.0)
    >>> step(jnp.ones(2)).tolist()
    [0.5, 0.5]
    >>> step.wait_checks()
    """

    def __init__(
        self,
        step_fn: Callable[..., Any],
        *,
        names: Sequence[str] | None,
        select: Callable[[Any], Any] | None,
        async_check: bool,
        jit_kwargs: dict[str, Any],
    ) -> None:
        self._step_fn = step_fn
        self._names = None if names is None else tuple(names)
        self._select = select

        @functools.wraps(step_fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            out = step_fn(*args, **kwargs)
            self._assert_outputs(out)
            return out

        self._fn = chex.chexify(jax.jit(checked, **jit_kwargs), async_check=async_check)
        functools.update_wrapper(self, step_fn)

    def _assert_outputs(self, out: Any) -> None:
        target = out if self._select is None else self._select(out)
        if self._names is None:
            assert_finite(target, "guard_step output")
            return
        if not isinstance(target, tuple | list) or len(target) != len(self._names):
            raise ValueError(
                f"guard_step: names has {len(self._names)} entries but the checked output is "
                f"{type(target).__name__}"
                + (f" of length {len(target)}" if isinstance(target, tuple | list) else "")
            )
        for label, part in zip(self._names, target, strict=True):
            assert_finite(part, label)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def wait_checks(self) -> None:
        """Blocks until this step's pending checks have run; raises the first failure.

        >>> import jax.numpy as jnp
        >>> step = guard_step(lambda x: jnp.log(x))
        >>> _ = step(jnp.array([0.0]))
        >>> try:
        ...     step.wait_checks()
        ... except AssertionError:
        ...     print("log(0) caught")
        log(0) caught
        """
        self._fn.wait_checks()


def guard_step(
    step_fn: Callable[..., Any],
    *,
    names: Sequence[str] | None = None,
    select: Callable[[Any], Any] | None = None,
    async_check: bool = True,
    **jit_kwargs: Any,
) -> GuardedStep:
    """Wraps a pure training step so that its outputs are asserted finite on the device.

    The returned callable is ``chex.chexify(jax.jit(checked_step), async_check=...)``.
    What is checked, exactly:

    * every floating-point leaf of the step's output (e.g. ``(params, opt_state, loss)``,
      or the gradients if the step returns them), or of ``select(output)`` when
      ``select`` is given (e.g. ``select=lambda out: (out[0], out[2])`` to skip a state
      that legitimately holds ``inf``);
    * every `assert_finite` call made inside ``step_fn`` — use it for values the step
      does not return, e.g. ``assert_finite(grads, "grads")`` right after ``jax.grad``.

    Integer leaves (step counters) are skipped. ``names`` labels the elements of a tuple
    output in the messages (``names=("params", "opt_state", "loss")``); without it the
    label is ``guard_step output`` and the tree path gives the position (``2`` for the
    third element). The checks never block the host: a failure raises ``AssertionError``
    at a later call once the device has finished the failing step, or at
    ``step.wait_checks()`` / `wait_checks()` at the latest. The step's outputs are
    returned unchanged. Extra keyword arguments (``static_argnums``, ``donate_argnums``,
    ...) go to ``jax.jit``.

    >>> import jax, jax.numpy as jnp
    >>> def step(w, x):
    ...     loss, g = jax.value_and_grad(lambda w: jnp.sum(jnp.log(w * x)))(w)
    ...     return w - 0.1 * g, loss
    >>> guarded = guard_step(step, names=("w", "loss"))
    >>> w, loss = guarded(jnp.ones(2), jnp.array([1.0, 2.0]))
    >>> guarded.wait_checks()  # finite: nothing raised
    >>> w, loss = guarded(w, jnp.array([1.0, -1.0]))  # log of a negative number
    >>> try:
    ...     guarded.wait_checks()
    ... except AssertionError as e:
    ...     print("loss: non-finite value in leaf '<root>'" in str(e))
    True
    """
    if not callable(step_fn):
        raise TypeError(f"guard_step: step_fn must be callable, got {type(step_fn).__name__}")
    if names is not None:
        names = tuple(names)
        for i, label in enumerate(names):
            if not isinstance(label, str):
                raise TypeError(f"guard_step: names[{i}] must be a str, got {label!r}")
    if select is not None and not callable(select):
        raise TypeError(f"guard_step: select must be callable, got {type(select).__name__}")
    return GuardedStep(
        step_fn, names=names, select=select, async_check=async_check, jit_kwargs=jit_kwargs
    )
