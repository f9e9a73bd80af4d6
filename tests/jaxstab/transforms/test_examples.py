"""Every public function of jaxstab shows a runnable example (tests/test_docstrings.py runs it)."""

from __future__ import annotations

import jaxstab


def test_every_public_function_has_an_example():
    public = [n for n in jaxstab.__all__ if n[0].islower() and n != "__version__"]
    for name in public:
        doc = getattr(jaxstab, name).__doc__ or ""
        assert ">>>" in doc, f"jaxstab.{name} has no runnable example"
