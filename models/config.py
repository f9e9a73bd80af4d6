"""What every port's config dataclass shares: presets replaced field by field, dict round trips.

A port's config is a frozen dataclass that subclasses :class:`PortConfig`, names itself in
``LABEL`` (used in error messages) and lists its one-of choices in ``CHOICES``; it gets
:meth:`~PortConfig.replace` and :meth:`~PortConfig.from_dict` with unknown keys named,
:meth:`~PortConfig.to_dict`, validation of the choices, immutable ``thresholds`` and pickling.

Example:
  >>> import dataclasses
  >>> @dataclasses.dataclass(frozen=True)
  ... class Toy(PortConfig):
  ...     LABEL = "toy"
  ...     CHOICES = {"act": ("relu", "silu")}
  ...     width: int = 8
  ...     act: str = "relu"
  >>> Toy().replace(width=4).width
  4
  >>> Toy(act="tanh")
  Traceback (most recent call last):
  ...
  ValueError: toy config act = 'tanh'; expected one of ('relu', 'silu')
  >>> Toy.from_dict({"widht": 4})  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  KeyError: "unknown toy config key 'widht'; valid keys: width, act"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Self

__all__ = ["PortConfig"]


@dataclasses.dataclass(frozen=True)
class PortConfig:
    """Base of the ports' frozen config dataclasses (see the module docstring)."""

    LABEL: ClassVar[str] = "model"
    CHOICES: ClassVar[Mapping[str, tuple[Any, ...]]] = {}

    def __post_init__(self) -> None:
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{self.LABEL} config {name} = {getattr(self, name)!r}; "
                    f"expected one of {choices}"
                )
        if "thresholds" in self.field_names():
            object.__setattr__(self, "thresholds", MappingProxyType(dict(self.thresholds)))

    def check_positive(self, *names: str, strict: bool = True) -> None:
        """Raises ``ValueError`` naming the first of ``names`` that is not > 0 (>= 0 with
        ``strict=False``)."""
        for name in names:
            value = float(getattr(self, name))
            if not (value > 0 if strict else value >= 0):
                bound = "> 0" if strict else ">= 0"
                raise ValueError(f"{self.LABEL} config {name} must be {bound}, got {value}")

    # A frozen config is immutable (``thresholds`` is a read-only mapping), so a copy is the
    # config itself and pickling rebuilds it from its fields.
    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict) -> Self:
        return self

    def __reduce__(self) -> tuple:
        return (_rebuild, (type(self), self.to_dict()))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of every field, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def default(cls) -> Self:
        """The port's default config."""
        return cls()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: Self | None = None) -> Self:
        """``base`` (default: :meth:`default`) with the fields in ``values`` replaced.

        An unknown key is a ``KeyError`` naming it and listing the valid ones.
        """
        base = cls.default() if base is None else base
        return base.replace(**values)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (validated like a new config)."""
        names = self.field_names()
        for key in changes:
            if key not in names:
                valid = ", ".join(names)
                raise KeyError(f"unknown {self.LABEL} config key {key!r}; valid keys: {valid}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain ``dict`` (mapping fields as plain dicts)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out


def _rebuild(cls: type, fields: Mapping[str, Any]) -> Any:
    return cls(**fields)
