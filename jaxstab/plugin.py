"""The plugin API: what a model supplies so that ``jaxstab diagnose`` and ``jaxstab train`` run it.

A model, built-in port or a user's own, is one :class:`ModelEntry`. Only four fields are
required: a name, ``build_model(dataset, config, rngs) -> nnx.Module``, ``loss_fn(model, batch,
key) -> (loss, {term: scalar})`` and ``default_data(seed) -> Dataset``. Everything else has a
default: AdamW with the config's ``lr`` and ``weight_decay``, no input statistics, the
diagnosis notes' thresholds, the training defaults in :data:`TRAIN_DEFAULTS`.

The config is the model's own: a frozen dataclass (recommended; presets are then its
classmethods named in ``presets``) or a plain mapping. :func:`run_config` merges it with the
training defaults and the caller's overrides into one flat, JSON-able dict;
:func:`model_config` turns that dict back into the model's config type for ``build_model``.

Example:
  >>> import jax.numpy as jnp, numpy as np
  >>> from flax import nnx
  >>> def build(dataset, config, rngs):
  ...     return nnx.Linear(dataset.meta["n_in"], 1, rngs=rngs)
  >>> def loss(model, batch, key):
  ...     err = model(batch["x"]) - batch["y"]
  ...     return jnp.mean(err**2), {}
  >>> def data(seed):
  ...     x = np.random.default_rng(seed).normal(size=(64, 3)).astype(np.float32)
  ...     return Dataset({"x": x, "y": x[:, :1]}, {"n_in": 3})
  >>> entry = ModelEntry("toy", build, loss, data, config={"lr": 1e-2})
  >>> cfg = run_config(entry, overrides={"epochs": 2})
  >>> cfg["lr"], cfg["epochs"], cfg["batch_size"]
  (0.01, 2, 64)
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import jax
    import optax
    from flax import nnx

    from jaxstab.report.thresholds import Thresholds

# Training settings every run has; a model's config may override any of them.
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "explosion_norm": 100.0,
    "seed": 0,
}

# loss_fn(model, batch, key) -> (scalar loss, {term name: scalar}); pure and jittable.
LossFn = Callable[["nnx.Module", Mapping[str, "jax.Array"], "jax.Array"], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Validated training data: per-example arrays with a shared leading axis, plus metadata.

    ``arrays`` holds numpy arrays (moved to the device once by the training loop); ``meta``
    holds sizes and vocabularies the model builder needs (``n_genes``, category names, ...) and
    ``warnings``, plain sentences the command line prints before training.

    >>> import numpy as np
    >>> len(Dataset({"x": np.zeros((5, 2)), "y": np.zeros(5)}))
    5
    >>> Dataset({"x": np.zeros((5, 2)), "y": np.zeros(4)})
    Traceback (most recent call last):
    ...
    ValueError: Dataset field 'y' has 4 rows but 'x' has 5
    """

    arrays: Mapping[str, np.ndarray]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.arrays:
            raise ValueError("Dataset has no arrays")
        sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in self.arrays.items()}
        scalar = next((k for k, n in sizes.items() if n is None), None)
        if scalar is not None:
            raise ValueError(f"Dataset field {scalar!r} is a scalar; every field needs a row axis")
        first = next(iter(sizes))
        bad = next((k for k, n in sizes.items() if n != sizes[first]), None)
        if bad is not None:
            raise ValueError(
                f"Dataset field {bad!r} has {sizes[bad]} rows but {first!r} has {sizes[first]}"
            )

    def __len__(self) -> int:
        return int(np.shape(next(iter(self.arrays.values())))[0])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One training stage: which top-level parameter groups train, on which loss.

    ``trainable=None`` trains every group. ``loss_fn=None`` is the entry's loss. With
    ``check_flow`` (the default) a stage that freezes groups first checks on one batch that
    its loss gives every trainable group finite non-zero gradient and every frozen group none
    (its loss must not reach them, e.g. through ``stop_gradient``); ``check_flow=False``
    allows a frozen group to receive gradient (fine-tuning a head on a frozen body).
    ``prepare(model, dataset) -> Dataset``, when given, builds the stage's training data from
    the model as the earlier stages left it (GenoFlow's flow stage trains on cells paired
    across time points by optimal transport on its encoder's latents); it runs once, before
    the gradient check, and its arrays are what ``loss_fn`` and ``feature_stats`` receive.

    >>> Stage(name="vae", trainable=("encoder", "decoder")).trainable
    ('encoder', 'decoder')
    """

    name: str
    trainable: tuple[str, ...] | None = None
    loss_fn: LossFn | None = None
    check_flow: bool = True
    prepare: Callable[[nnx.Module, Dataset], Dataset] | None = None

    def data(self, model: nnx.Module, dataset: Dataset | Mapping[str, Any]) -> Dataset:
        """The stage's training data: ``prepare(model, dataset)``, or ``dataset`` itself.

        >>> import numpy as np
        >>> len(Stage(name="all").data(None, {"x": np.zeros((3, 1))}))
        3
        """
        if not isinstance(dataset, Dataset):
            dataset = Dataset(dict(dataset))
        if self.prepare is None:
            return dataset
        out = self.prepare(model, dataset)
        if not isinstance(out, Dataset):
            raise TypeError(f"stage {self.name!r}: prepare must return a Dataset")
        return out


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """Everything the generic training loop and the diagnosis report need for one model.

    Attributes:
      name: the name ``--model`` takes (``cfmvc``, ``e3gnn``, ...).
      build_model: ``(dataset, config, rngs) -> nnx.Module``; ``config`` is of the type of
        ``config`` below (a mapping when that is ``None``).
      loss_fn: ``(model, batch, key) -> (loss, aux)``, aux a dict of scalar loss terms.
      default_data: ``seed -> Dataset``; bundled data that needs no download.
      load_data: ``(path, **options) -> Dataset`` for ``--data``; validates before returning
        and raises ``ValueError`` naming the field and the first bad index. ``None``: the
        model takes no data files.
      config: the default config, a frozen dataclass instance or a mapping. Keys named like
        :data:`TRAIN_DEFAULTS` override those training defaults.
      presets: ``{name: () -> config}``, the choices of ``--preset`` (``default`` is
        ``config``).
      feature_stats: ``batch -> {name: scalar}``, jittable, a few dozen input statistics at
        most, recorded every step into ``input_features.csv``.
      optimizer: ``config -> optax.GradientTransformation``, the inner optimizer (default
        AdamW with ``lr`` and ``weight_decay``); the guard and the stage's freezing wrap it.
      thresholds: report thresholds (``Thresholds`` or a mapping of its fields) for this
        model's gradient scale; default the diagnosis notes' levels.
      stages: named training stages (the first is what ``diagnose`` and ``train`` run unless
        ``--stage`` names another); empty: one stage training everything on ``loss_fn``.
    """

    name: str
    build_model: Callable[[Dataset, Any, nnx.Rngs], nnx.Module]
    loss_fn: LossFn
    default_data: Callable[[int], Dataset]
    _: dataclasses.KW_ONLY
    load_data: Callable[..., Dataset] | None = None
    config: Any = None
    presets: Mapping[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)
    feature_stats: Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]] | None = None
    optimizer: Callable[[Any], optax.GradientTransformation] | None = None
    thresholds: Thresholds | Mapping[str, float] | None = None
    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        for field in ("build_model", "loss_fn", "default_data"):
            if not callable(getattr(self, field)):
                raise TypeError(f"ModelEntry {self.name!r}: {field} must be callable")
        if self.config is not None and not (
            _is_config_dataclass(self.config) or isinstance(self.config, Mapping)
        ):
            raise TypeError(
                f"ModelEntry {self.name!r}: config must be a dataclass instance or a mapping, "
                f"got {type(self.config).__name__}"
            )

    def stage(self, name: str | None = None) -> Stage:
        """The stage called ``name`` (default: the first, or one training everything).

        >>> ModelEntry("m", print, print, print).stage().name
        'all'
        """
        if not self.stages:
            if name not in (None, "all"):
                raise ValueError(f"model {self.name!r} has no stage {name!r}; it has: all")
            return Stage(name="all")
        if name is None:
            return self.stages[0]
        for s in self.stages:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.stages)
        raise ValueError(f"model {self.name!r} has no stage {name!r}; it has: {known}")

    def preset(self, name: str | None = None) -> Any:
        """The config of preset ``name`` (``None`` or ``"default"``: :attr:`config`)."""
        if name in (None, "default") and "default" not in self.presets:
            return self.config
        if name is None:
            name = "default"
        if name not in self.presets:
            known = ", ".join(sorted({"default", *self.presets}))
            raise ValueError(f"model {self.name!r} has no preset {name!r}; presets: {known}")
        return self.presets[name]()


def _is_config_dataclass(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def config_dict(config: Any) -> dict[str, Any]:
    """A model config (dataclass or mapping, or ``None``) as a plain dict.

    >>> config_dict({"lr": 0.1}), config_dict(None)
    ({'lr': 0.1}, {})
    """
    if config is None:
        return {}
    if _is_config_dataclass(config):
        items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        items = dict(config)
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in items.items()}


def _parse_value(key: str, text: str, like: Any) -> Any:
    """``text`` read as the type of the current value ``like`` (JSON for containers)."""
    try:
        if isinstance(like, bool):
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, str):
            return text
        if like is None:
            if text.strip().lower() in ("none", "null"):
                return None
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return text
        value = json.loads(text)
        if isinstance(like, tuple) and isinstance(value, list):
            return tuple(value)
        return value
    except (ValueError, json.JSONDecodeError):
        kind = type(like).__name__
        raise ValueError(f"--set {key}={text}: not a valid {kind}") from None


def parse_sets(items: typing.Iterable[str], base: Mapping[str, Any]) -> dict[str, Any]:
    """``["key=value", ...]`` as typed overrides of ``base``; unknown keys are an error.

    >>> parse_sets(["lr=0.1", "epochs=3"], {"lr": 1e-3, "epochs": 10})
    {'lr': 0.1, 'epochs': 3}
    >>> parse_sets(["lrr=0.1"], {"lr": 1e-3})
    Traceback (most recent call last):
    ...
    ValueError: --set lrr: unknown key; valid keys: lr
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        if key not in base:
            raise ValueError(f"--set {key}: unknown key; valid keys: {', '.join(sorted(base))}")
        out[key] = _parse_value(key, text, base[key])
    return out


def run_config(
    entry: ModelEntry,
    *,
    preset: str | None = None,
    sets: typing.Iterable[str] = (),
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The flat run config: training defaults < the preset's config < ``--set`` < overrides.

    ``overrides`` (the command line's named options such as ``--lr``) skip ``None`` values.
    Numeric training settings are checked here, so the Python API refuses what the command
    line refuses.

    >>> e = ModelEntry("m", print, print, print, config={"hidden": 8})
    >>> run_config(e, sets=["hidden=16"], overrides={"lr": None, "epochs": 1})["hidden"]
    16
    """
    cfg = {**TRAIN_DEFAULTS, **config_dict(entry.preset(preset))}
    cfg.update(parse_sets(sets, cfg))
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    check_settings(cfg)
    return cfg


_FLAGS = {
    "total_warning": "--warn-norm",
    "total_danger": "--danger-norm",
    "group_warning": "--group-warn-norm",
    "group_danger": "--group-danger-norm",
}
_POSITIVE_INTS = ("epochs", "batch_size", "steps_per_call")
_POSITIVE_FLOATS = ("lr", "explosion_norm", *_FLAGS)


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def check_settings(settings: Mapping[str, Any]) -> None:
    """Refuses a run setting that is out of range (``ValueError`` naming its option).

    ``epochs``, ``batch_size``, ``steps_per_call``: positive integers; ``lr``,
    ``explosion_norm`` and the report levels (``total_warning`` ...): finite and > 0;
    ``grad_clip``: ``0`` (no clipping) or finite and > 0; ``weight_decay``: finite and >= 0;
    ``seed``: an integer in ``[0, 2**32)``. ``None`` means the default and is accepted; other
    keys are the model's own and are not looked at.

    >>> check_settings({"lr": 1e-3, "grad_clip": 0, "epochs": 2, "hidden": -1})
    >>> check_settings({"lr": float("nan")})
    Traceback (most recent call last):
    ...
    ValueError: --lr must be a finite number > 0, got nan
    """
    for name, value in settings.items():
        if value is None:
            continue
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        x = float(value) if real else math.nan
        if name == "seed":
            if not integral or not 0 <= int(value) < 2**32:
                raise ValueError(f"--seed must be an integer in [0, 2**32), got {value!r}")
        elif name in _POSITIVE_INTS:
            if not integral or int(value) < 1:
                raise ValueError(f"{_flag(name)} must be a positive integer, got {value!r}")
        elif name == "weight_decay":
            if not (real and math.isfinite(x) and x >= 0):
                raise ValueError(f"--weight-decay must be a finite number >= 0, got {value!r}")
        elif name in _POSITIVE_FLOATS or name == "grad_clip":
            if name == "grad_clip" and real and x == 0:
                continue
            if not (real and math.isfinite(x) and x > 0):
                extra = " (0: no clipping)" if name == "grad_clip" else ""
                raise ValueError(f"{_flag(name)} must be a finite number > 0{extra}, got {value!r}")


def model_config(entry: ModelEntry, cfg: Mapping[str, Any]) -> Any:
    """The model's own config type rebuilt from a flat run config (what ``build_model`` gets).

    A dataclass config takes the values of its fields from ``cfg``; a mapping config gets
    ``cfg`` itself.

    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...     hidden: int = 8
    >>> model_config(ModelEntry("m", print, print, print, config=C()), {"hidden": 4, "lr": 1})
    C(hidden=4)
    """
    base = entry.config
    if _is_config_dataclass(base):
        names = {f.name for f in dataclasses.fields(base)}
        return dataclasses.replace(base, **{k: v for k, v in cfg.items() if k in names})
    return dict(cfg)


def thresholds(entry: ModelEntry, cfg: Mapping[str, Any], **flags: float | None) -> Thresholds:
    """Report thresholds: the entry's (or the config's ``thresholds``), then explicit flags.

    ``flags`` are :class:`~jaxstab.report.thresholds.Thresholds` fields (``None`` skipped);
    ``explosion`` comes from the run's ``explosion_norm``.

    >>> e = ModelEntry("m", print, print, print, thresholds={"total_warning": 50.0})
    >>> th = thresholds(e, {"explosion_norm": 1e3}, total_danger=80.0)
    >>> th.total_warning, th.total_danger, th.explosion
    (50.0, 80.0, 1000.0)
    """
    from jaxstab.report.thresholds import Thresholds

    base = entry.thresholds if entry.thresholds is not None else cfg.get("thresholds")
    th = Thresholds(**dict(base._asdict() if isinstance(base, Thresholds) else base or {}))
    explosion = cfg.get("explosion_norm")
    th = th._replace(explosion=float(explosion) if explosion else math.inf)
    return th._replace(**{k: float(v) for k, v in flags.items() if v is not None})


def inner_optimizer(entry: ModelEntry, cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """The entry's inner optimizer for the run config ``cfg`` (default AdamW, ``lr``,
    ``weight_decay``); the guard and a stage's freezing wrap it (:mod:`jaxstab.train.stages`).

    >>> e = ModelEntry("m", print, print, print)
    >>> tx = inner_optimizer(e, run_config(e))
    >>> type(tx).__name__
    'GradientTransformationExtraArgs'
    """
    import optax

    if entry.optimizer is not None:
        return entry.optimizer(model_config(entry, cfg))
    return optax.adamw(float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay") or 0.0))
