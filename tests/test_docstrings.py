"""Every ``>>>`` example in the docstrings of ``jaxstab`` and ``jaxstab.models`` runs and gives
the output it shows (one test per module, collected from the installed package).

The few modules whose examples train a model for tens of seconds are marked slow; the tests
named beside them cover the same behaviour.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import jaxstab

# module -> the test that covers the same behaviour quickly.
SLOW = {
    "jaxstab.models.cfmvc": "tests/models/test_cfmvc_train.py (train + generate)",
    "jaxstab.models.cfmvc.train": "tests/models/test_cfmvc_train.py (two stages)",
    "jaxstab.models.cfmvc.losses": "tests/models/test_cfmvc_model.py and test_cfmvc_parity.py",
    "jaxstab.models.e3gnn": "tests/models/test_e3gnn_model.py (embed)",
    "jaxstab.models.e3gnn.model": "tests/models/test_e3gnn_model.py",
    "jaxstab.models.e3gnn.losses": "tests/models/test_e3gnn_parity.py (loss and gradients)",
    "jaxstab.models.e3gnn.train": "tests/models/test_e3gnn_train.py",
    "jaxstab.models.sidechain.model": "tests/models/test_sidechain_model.py (forward)",
    "jaxstab.models.sidechain.losses": "tests/models/test_sidechain_model.py (loss, training)",
    "jaxstab.models.sidechain.predict": "tests/models/test_sidechain_train.py (predict)",
    "jaxstab.models.sidechain.train": "tests/models/test_sidechain_train.py",
}


def _modules() -> list[str]:
    found = ["jaxstab"]
    for info in pkgutil.walk_packages(jaxstab.__path__, "jaxstab."):
        found.append(info.name)
    models = importlib.import_module("jaxstab.models")
    for info in pkgutil.walk_packages(models.__path__, "jaxstab.models."):
        found.append(info.name)
    return sorted(set(found) - {"jaxstab.__main__"})


MODULES = _modules()


def test_the_ports_are_collected():
    assert "jaxstab.models.cfmvc.train" in MODULES and "jaxstab.plugin" in MODULES


@pytest.mark.parametrize(
    "name", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in MODULES]
)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)[-6000:]
