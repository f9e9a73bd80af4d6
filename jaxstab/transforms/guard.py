"""``stability_guard``: the preset chain log → zero/skip → clip → inner, fused."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxstab.transforms import _groups
from jaxstab.transforms.autoclip import autoclip, autoclip_step
from jaxstab.transforms.clip_by_global_norm import Scaler, clip_by_global_norm, clip_step
from jaxstab.transforms.log_norms import (
    check_detail,
    log_norms,
    log_norms_step,
    stats_options,
)
from jaxstab.transforms.skip_bad_steps import run_unless, skip_bad_steps, skip_rule
from jaxstab.transforms.zclip import zclip, zclip_step
from jaxstab.transforms.zero_nonfinite import zero_leaf, zero_nonfinite, zero_nonfinite_step

_ADAPTIVE = (None, "zclip", "autoclip")


def _reference_chain(
    inner: optax.GradientTransformation,
    *,
    clip: float | None,
    adaptive: str | None,
    skip: bool,
    spike_z: float | None,
    group_depth: int | None,
    history: int,
    detail: str | Collection[str],
    axis_name: str | None,
) -> optax.GradientTransformation:
    """The guard as a plain ``optax.chain`` of the separate transforms.

    :func:`stability_guard` has the state of this chain (its ``init``) and the same
    updates and statistics; the chain computes them with a pass over the gradient per
    transform, the guard with one for all of them.
    """
    clippers: list[optax.GradientTransformation] = []
    if adaptive == "zclip":
        clippers.append(zclip(axis_name=axis_name))
    elif adaptive == "autoclip":
        clippers.append(autoclip(axis_name=axis_name))
    if clip is not None:
        clippers.append(clip_by_global_norm(clip, axis_name=axis_name))
    logger = log_norms(group_depth, history, detail=detail, axis_name=axis_name)
    if not skip:
        zero = zero_nonfinite(group_depth=group_depth, axis_name=axis_name)
        return optax.chain(logger, zero, *clippers, inner)
    if spike_z is None:
        # Same result as skip(clip -> inner): clipping keeps a NaN gradient non-finite and
        # the clippers' statistics ignore non-finite steps.
        return optax.chain(logger, *clippers, skip_bad_steps(inner, axis_name=axis_name))
    # Spike detection must see the raw norm, so the clippers go inside the skip.
    body = optax.chain(*clippers, inner) if clippers else inner
    return optax.chain(logger, skip_bad_steps(body, spike_z=spike_z, axis_name=axis_name))


def stability_guard(
    inner: optax.GradientTransformation,
    *,
    clip: float | None = 1.0,
    adaptive: str | None = None,
    skip: bool = True,
    spike_z: float | None = None,
    group_depth: int | None = 1,
    history: int = 0,
    detail: str | Collection[str] = "basic",
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer in the recommended stability chain.

    The chain is :func:`jaxstab.log_norms` (statistics of the raw gradient), then either
    :func:`jaxstab.skip_bad_steps` (``skip=True``: a bad step leaves ``inner`` untouched)
    or :func:`jaxstab.zero_nonfinite` (``skip=False``), then the adaptive clipper
    (``"zclip"`` or ``"autoclip"``, optional), then :func:`jaxstab.clip_by_global_norm`
    (``clip=None`` disables it), then ``inner``. The state, the updates and the statistics
    are those of that ``optax.chain``, but the transforms are fused: the per-leaf
    statistics are computed once (on a finite step one sum of squares per leaf with
    ``detail="basic"``) and every transform reads its norm, NaN/Inf counts and
    finiteness from them; the clippers decide on scalars and their scale factors are
    applied inside the inner update's own elementwise loops; a skipped step is a
    ``lax.cond`` around the inner update. The norm after a clipper is its target (the
    chain recomputes it, equal up to rounding).

    Args:
      inner: the optimizer, e.g. ``optax.adam(1e-3)``.
      clip: global-norm bound, or ``None``.
      adaptive: ``None``, ``"zclip"`` or ``"autoclip"``.
      skip: skip bad steps (True) or zero non-finite entries (False).
      spike_z: with ``skip``, also skip steps whose norm z-score exceeds this.
      group_depth: how groups are named in the statistics.
      history: ring-buffer length of :func:`jaxstab.log_norms` (0: none).
      detail: the statistics of :func:`jaxstab.log_norms`: ``"basic"`` (global and
        per-group norms, NaN/Inf counts: what the ``jaxstab diagnose`` report reads),
        ``"full"`` (also ``grad/max_abs/<g>``, ``grad/zero_frac/<g>`` and
        ``grad/update_ratio``, each a pass of its own) or a collection of those names.
      axis_name: the mapped axis under ``shard_map``/``pmap``.

    >>> import jax.numpy as jnp, optax, jaxstab
    >>> tx = jaxstab.stability_guard(optax.adam(1e-3), clip=1.0, adaptive="zclip")
    >>> params = {"w": jnp.ones(2)}
    >>> updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, tx.init(params), params)
    >>> updates["w"].tolist(), bool(jaxstab.read_stats(state)["skip/skipped"])
    ([0.0, 0.0], True)
    """
    if adaptive not in _ADAPTIVE:
        raise ValueError(f"adaptive must be one of {_ADAPTIVE}, got {adaptive!r}")
    if spike_z is not None and not skip:
        raise ValueError("spike_z needs skip=True")
    # Validates every argument and gives the state layout.
    reference = _reference_chain(
        inner,
        clip=clip,
        adaptive=adaptive,
        skip=skip,
        spike_z=spike_z,
        group_depth=group_depth,
        history=history,
        detail=detail,
        axis_name=axis_name,
    )
    group_depth = _groups.check_group_depth(group_depth)
    extras = check_detail(detail)
    options = stats_options(extras)
    rule = skip_rule(spike_z=spike_z) if skip else None
    kinds = ([adaptive] if adaptive is not None else []) + (["clip"] if clip is not None else [])
    n_clip = len(kinds)
    inner = optax.with_extra_args_support(inner)

    def run_clippers(
        states: tuple, norm: jax.Array, finite: jax.Array
    ) -> tuple[list[Any], list[Scaler], jax.Array]:
        # Each clipper decides on the norm its input has: the previous one's target.
        new_states, scalers = [], []
        for kind, st in zip(kinds, states, strict=True):
            if kind == "zclip":
                new, scaler = zclip_step(st, norm, finite)
            elif kind == "autoclip":
                new, scaler = autoclip_step(st, norm, finite)
            else:
                new, scaler = clip_step(norm, clip)
            new_states.append(new)
            scalers.append(scaler)
            norm = scaler.post_norm()
        return new_states, scalers, norm

    def scaled(updates: Any, scalers: list[Scaler], zero: bool = False) -> Any:
        def leaf(x: jax.Array) -> jax.Array:
            if zero:
                x = zero_leaf(x)
            for scaler in scalers:
                x = scaler.apply(x)
            return x

        return jax.tree.map(leaf, updates)

    def update_fn(
        updates: Any, state: tuple, params: Any = None, **extra_args: Any
    ) -> tuple[Any, tuple]:
        updates = _groups.as_float_updates(updates)
        groups, members = _groups.group_layout(updates, group_depth)
        ts = _groups.tree_stats(updates, axis_name, **options)
        gnorm = _groups.global_norm(ts)
        finite = _groups.all_finite(ts)
        log_state = log_norms_step(state[0], ts, groups, members, extras, params, axis_name)

        if rule is None:  # log -> zero_nonfinite -> clippers -> inner
            zero_state = zero_nonfinite_step(state[1], ts, groups, members)
            # After zeroing the gradient is finite and its norm is that of the finite entries.
            clip_states, scalers, _ = run_clippers(
                state[2 : 2 + n_clip], gnorm, jnp.ones((), jnp.bool_)
            )
            out, inner_state = inner.update(
                scaled(updates, scalers, zero=True), state[-1], params, **extra_args
            )
            return out, (log_state, zero_state, *clip_states, inner_state)

        if spike_z is None:  # log -> clippers -> skip(inner)
            clip_states, scalers, norm = run_clippers(state[1 : 1 + n_clip], gnorm, finite)
            sk = state[-1]
            bad, z = rule.decide(sk, norm, finite)
            old_inner = sk.inner_state
            out, inner_state = run_unless(
                bad,
                lambda: inner.update(scaled(updates, scalers), old_inner, params, **extra_args),
                old_inner,
            )
            skip_state = rule.finish(sk, bad, finite, norm, z, inner_state)
            return out, (log_state, *clip_states, skip_state)

        # log -> skip(clippers -> inner): the skip sees the raw norm; a skipped step keeps
        # the clippers' states too.
        sk = state[1]
        bad, z = rule.decide(sk, gnorm, finite)
        old_clip = tuple(sk.inner_state[:n_clip]) if n_clip else ()
        old_inner = sk.inner_state[n_clip] if n_clip else sk.inner_state
        clip_states, scalers, _ = run_clippers(old_clip, gnorm, finite)
        clip_states = [
            _groups.select_tree(bad, o, n) for o, n in zip(old_clip, clip_states, strict=True)
        ]
        out, inner_state = run_unless(
            bad,
            lambda: inner.update(scaled(updates, scalers), old_inner, params, **extra_args),
            old_inner,
        )
        body_state = (*clip_states, inner_state) if n_clip else inner_state
        return out, (log_state, rule.finish(sk, bad, finite, gnorm, z, body_state))

    return optax.GradientTransformationExtraArgs(reference.init, update_fn)
