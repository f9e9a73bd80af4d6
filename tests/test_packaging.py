"""What ``pip install`` puts into site-packages: jaxstab and its ports under the jaxstab
namespace, no top-level ``models``; the built-in ports registered as entry points."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> set[str]:
    found = set()
    for folder, prefix in (("jaxstab", "jaxstab"), ("models", "jaxstab.models")):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((prefix, *rel)))
    return found


def test_every_package_folder_is_listed():
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == _package_folders()


def test_the_wheel_has_no_top_level_models(tmp_path):
    # Built from a copy of the sources, so setuptools' build/ folder is not left in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("jaxstab", "models"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("jaxstab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "models" not in tops
    assert {t for t in tops if not t.endswith(".dist-info")} == {"jaxstab"}
    assert "jaxstab/models/cfmvc/model.py" in names
    modules = {n for n in names if n.endswith(".py")}
    for source in (ROOT / "models").rglob("*.py"):
        assert "jaxstab/models/" + source.relative_to(ROOT / "models").as_posix() in modules
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[jaxstab.models]" in text and "cfmvc = jaxstab.models.cfmvc.train:ENTRY" in text
