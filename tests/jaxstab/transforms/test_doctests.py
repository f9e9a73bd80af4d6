"""The ``>>>`` examples in every public docstring run and give the shown output."""

from __future__ import annotations

import doctest
import importlib

import pytest

import jaxstab

MODULES = [
    "autoclip",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "gradient_flow",
    "guard",
    "log_norms",
    "loss_scale",
    "skip_bad_steps",
    "stats",
    "zclip",
    "zero_nonfinite",
    "_groups",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(f"jaxstab.transforms.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_every_public_function_has_an_example():
    public = [n for n in jaxstab.__all__ if n[0].islower() and n != "__version__"]
    for name in public:
        doc = getattr(jaxstab, name).__doc__ or ""
        assert ">>>" in doc, f"jaxstab.{name} has no runnable example"
