"""What a model port supplies to the benchmark suites: one :class:`ModelSpec`.

The suites (``parity``, ``speed``, ``stability``) never name a model; they loop over the
specs of :mod:`benchmarks.specs` and call these fields. Sizes are named presets of the
spec's own settings (data dimensions, ``config`` field changes); every spec has at least:

- ``"small"``: seconds on a CPU, what the tests build;
- ``"full"``: the parity and speed suites' default (the published figures);
- ``"faults"``: the stability suite's (many short runs).

Two keys of a size are read by the suites: ``batch_size`` (examples per step; the parity
batch) and, for ``"faults"``, ``n_eval`` (the last ``n_eval`` examples of the data are the
held-out set). ``config`` (optional) holds model config fields that the size changes; the
rest is the spec's own.

Example:
  >>> spec = ModelSpec(name="m", entry="m", sizes={"small": {"batch_size": 4}}, stage="all",
  ...                  data=print, build_torch=print, name_map=str,
  ...                  inputs=print, outputs_jax=print, outputs_torch=print,
  ...                  train_torch=print, torch_loss=print, eval_loss_jax=print,
  ...                  eval_loss_torch=print)
  >>> spec.size("small")["batch_size"]
  4
  >>> spec.size("huge")
  Traceback (most recent call last):
  ...
  KeyError: "model 'm' has no size 'huge'; sizes: small"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flax import nnx

    from jaxstab.plugin import ModelEntry


def as_numpy(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A batch of tensors (or arrays) as NumPy arrays, for the specs' PyTorch losses.

    >>> as_numpy({"x": [1, 2]})["x"].tolist()
    [1, 2]
    """
    import numpy as np

    return {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in batch.items()}


def size_examples(settings: Mapping[str, Any]) -> int | None:
    """The number of examples a size's ``settings`` hold: ``n_cells``, ``n_molecules``, or
    ``n_train`` plus the held-out ``n_eval`` (``None`` if none is given).

    >>> size_examples({"n_train": 24, "n_eval": 8}), size_examples({"n_cells": 5})
    (32, 5)
    """
    for key in ("n_cells", "n_molecules"):
        if key in settings:
            return int(settings[key])
    if "n_train" in settings:
        return int(settings["n_train"]) + int(settings.get("n_eval", 0))
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """How the suites build, compare and train one port and its PyTorch version.

    Attributes:
      name: the name ``--model`` takes and the results' key.
      entry: the ``jaxstab.registry`` name of the port's ``ModelEntry`` (its config presets,
        stages, loss and inner optimizer).
      sizes: ``{size: settings}``, see the module docstring.
      presets: the config presets the parity suite compares (results key ``name`` for
        ``"default"``, ``name-<preset>`` for the others).
      stage: the ``ModelEntry`` stage that the speed and stability suites train.
      data: ``(size, seed) -> Dataset``, the training data at that size.
      jax_builder: ``(size, preset, seed) -> (model, dataset)`` for a port that its
        ``ModelEntry`` cannot build alone; ``None`` (the usual case): :meth:`build_jax`'s
        default.
      build_torch: ``(size, preset, seed, **config_changes) -> torch.nn.Module``, the PyTorch
        version at the same sizes and config (``torch.manual_seed(seed)`` first), with the
        same top-level groups as the port (``model.encoder`` ...).
      name_map: NNX parameter path → state-dict key, for :mod:`benchmarks.convert`.
      inputs: ``(size, seed) -> inputs``, the parity suite's batch and noise (opaque to it).
      outputs_jax, outputs_torch: ``(model, inputs) -> {quantity: value}``, the same
        quantities on both sides, in eval mode (the suite sets it). A value is an array, a
        tuple of arrays (compared member by member) or, for a gradient, ``{state-dict key:
        array}`` (compared over the keys of the JAX side); the two dicts have the same keys.
      train_torch: ``(torch_model, dataset, *, epochs, batch_size, seed, compile) ->
        {"loss": [per step], "epoch_seconds": [per epoch]}``, the PyTorch version's own
        training loop for ``stage`` (the speed suite).
      torch_loss: ``(torch_model, batch) -> loss``, the stage's training loss on a batch of
        tensors (the stability suite's PyTorch runs).
      eval_loss_jax, eval_loss_torch: ``(model, held_out) -> loss``, the deterministic
        evaluation loss the stability suite compares (model in eval mode; the PyTorch one
        under ``torch.no_grad``).
      seed_guards: config changes that give the PyTorch version the guards of the code it was
        ported from (the stability suite's ``torch_seed`` variant).
      optional_keys: state-dict keys the port need not hold (``key -> bool``; buffers it
        computes, such as constant frequencies); ``None``: every key must map.
      parity_weights: ``(torch_model, seed) -> None`` changes the PyTorch version's initial
        weights in place before the parity suite copies them (for example noise on every
        parameter, so that layers initialised to zero take part); ``None``: the initial ones.
      zero_gradients: ``fnmatch`` patterns of state-dict keys whose gradient is 0 in exact
        arithmetic (a bias that shifts every logit of a softmax alike): the parity suite
        measures their difference against the largest gradient, not their own rounding noise.
    """

    name: str
    entry: str
    sizes: Mapping[str, Mapping[str, Any]]
    presets: tuple[str, ...] = ("default",)
    stage: str
    data: Callable[..., Any]
    build_torch: Callable[..., Any]
    name_map: Callable[[tuple], str]
    inputs: Callable[..., Any]
    outputs_jax: Callable[..., dict[str, Any]]
    outputs_torch: Callable[..., dict[str, Any]]
    train_torch: Callable[..., dict[str, Any]]
    torch_loss: Callable[..., Any]
    eval_loss_jax: Callable[..., Any]
    eval_loss_torch: Callable[..., Any]
    seed_guards: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optional_keys: Callable[[str], bool] | None = None
    parity_weights: Callable[[Any, int], None] | None = None
    zero_gradients: tuple[str, ...] = ()
    jax_builder: Callable[..., Any] | None = None

    def size(self, name: str) -> Mapping[str, Any]:
        """The settings of size ``name``; ``KeyError`` listing the sizes if there is none."""
        if name not in self.sizes:
            known = ", ".join(self.sizes)
            raise KeyError(f"model {self.name!r} has no size {name!r}; sizes: {known}")
        return self.sizes[name]

    def build_jax(self, size: str, preset: str, seed: int) -> tuple[nnx.Module, Any]:
        """The port on ``data(size, seed)``, built by its ``ModelEntry`` with the preset's
        config (:meth:`config`) and ``nnx.Rngs(seed)``: ``(model, dataset)``."""
        if self.jax_builder is not None:
            return self.jax_builder(size, preset, seed)
        from flax import nnx

        dataset = self.data(size, seed)
        model = self.model_entry().build_model(dataset, self.config(size, preset), nnx.Rngs(seed))
        return model, dataset

    def model_entry(self) -> ModelEntry:
        """The port's ``ModelEntry`` (``jaxstab.registry.get(entry)``)."""
        from jaxstab import registry

        return registry.get(self.entry)

    def run_config(self, size: str, preset: str = "default") -> dict[str, Any]:
        """The flat run config: ``plugin.run_config`` of the preset with the size's changes."""
        from jaxstab import plugin

        changes = dict(self.size(size).get("config", {}))
        return plugin.run_config(self.model_entry(), preset=preset, overrides=changes)

    def config(self, size: str, preset: str = "default") -> Any:
        """The model's own config at ``size`` and ``preset`` (``plugin.model_config``)."""
        from jaxstab import plugin

        return plugin.model_config(self.model_entry(), self.run_config(size, preset))

    def convert(self, state_dict: Mapping[str, Any], model: nnx.Module) -> nnx.State:
        """The PyTorch ``state_dict`` as the ``Param`` state of ``model`` (not changed), by
        :func:`benchmarks.convert.state_dict_to_nnx` with :attr:`name_map`."""
        from benchmarks import convert

        return convert.state_dict_to_nnx(
            state_dict, model, self.name_map, optional=self.optional_keys
        )
