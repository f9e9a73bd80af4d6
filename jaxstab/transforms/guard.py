"""``stability_guard``: the preset chain log → zero/skip → clip → inner."""

from __future__ import annotations

import optax

from jaxstab.transforms.autoclip import autoclip
from jaxstab.transforms.clip_by_global_norm import clip_by_global_norm
from jaxstab.transforms.log_norms import log_norms
from jaxstab.transforms.skip_bad_steps import skip_bad_steps
from jaxstab.transforms.zclip import zclip
from jaxstab.transforms.zero_nonfinite import zero_nonfinite

_ADAPTIVE = (None, "zclip", "autoclip")


def stability_guard(
    inner: optax.GradientTransformation,
    *,
    clip: float | None = 1.0,
    adaptive: str | None = None,
    skip: bool = True,
    spike_z: float | None = None,
    group_depth: int | None = 1,
    history: int = 0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer in the recommended stability chain.

    The chain is :func:`jaxstab.log_norms` (statistics of the raw gradient), then either
    :func:`jaxstab.skip_bad_steps` (``skip=True``: a bad step leaves ``inner`` untouched)
    or :func:`jaxstab.zero_nonfinite` (``skip=False``), then the adaptive clipper
    (``"zclip"`` or ``"autoclip"``, optional), then :func:`jaxstab.clip_by_global_norm`
    (``clip=None`` disables it), then ``inner``. In the jitted step the shared gradient
    reductions are computed once (without ``spike_z`` the clippers are placed just before
    the skip wrapper, which gives the same updates and lets XLA share their reductions).

    Args:
      inner: the optimizer, e.g. ``optax.adam(1e-3)``.
      clip: global-norm bound, or ``None``.
      adaptive: ``None``, ``"zclip"`` or ``"autoclip"``.
      skip: skip bad steps (True) or zero non-finite entries (False).
      spike_z: with ``skip``, also skip steps whose norm z-score exceeds this.
      group_depth: how groups are named in the statistics.
      history: ring-buffer length of :func:`jaxstab.log_norms` (0: none).
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
    clippers: list[optax.GradientTransformation] = []
    if adaptive == "zclip":
        clippers.append(zclip(axis_name=axis_name))
    elif adaptive == "autoclip":
        clippers.append(autoclip(axis_name=axis_name))
    if clip is not None:
        clippers.append(clip_by_global_norm(clip, axis_name=axis_name))
    logger = log_norms(group_depth, history, axis_name=axis_name)
    if not skip:
        return optax.chain(
            logger, zero_nonfinite(group_depth=group_depth, axis_name=axis_name), *clippers, inner
        )
    if spike_z is None:
        # Same result as skip(clip -> inner): clipping keeps a NaN gradient non-finite and
        # the clippers' statistics ignore non-finite steps. Placed before the skip, the
        # clippers share the gradient reductions with log_norms/skip
        # (XLA merges the identical reductions), so the norm is computed once.
        return optax.chain(logger, *clippers, skip_bad_steps(inner, axis_name=axis_name))
    # Spike detection must see the raw norm, so the clippers go inside the skip.
    body = optax.chain(*clippers, inner) if clippers else inner
    return optax.chain(logger, skip_bad_steps(body, spike_z=spike_z, axis_name=axis_name))
