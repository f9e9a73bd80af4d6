"""``jaxstab diagnose`` names where a NaN was born, for a model file outside the package.

The run stops at the step that holds the planted rows, replays it once under
``locate_nonfinite`` and puts the origin into ``diagnosis_report.json`` (the report entry
``nonfinite_origin`` and the finding of the same code) and on the console.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from jaxstab.cli import EXIT_UNSTABLE, main

ROOT = Path(__file__).resolve().parents[2]

MODEL_FILE = textwrap.dedent(
    """
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxstab

    KIND = "{kind}"


    @dataclasses.dataclass(frozen=True)
    class Config:
        lr: float = 1e-3
        epochs: int = 2
        batch_size: int = 32


    class Feature(nnx.Module):
        def __init__(self, rngs):
            self.scale = nnx.Param(jnp.ones((4,)))

        def __call__(self, x):
            return jnp.sqrt(x * self.scale)  # FORWARD


    class Radius(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x, keep):
            return jnp.linalg.norm(self.proj(x) * keep[:, None], axis=-1)  # BACKWARD


    class Net(nnx.Module):
        def __init__(self, rngs):
            self.feature = Feature(rngs)
            self.radius = Radius(rngs)
            self.head = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, batch):
            if KIND == "forward":
                return self.head(self.feature(batch["x"]))[:, 0]
            return self.radius(batch["x"], batch["keep"])


    def build_model(dataset, config, rngs):
        return Net(rngs)


    def loss_fn(model, batch, key):
        return jnp.mean((model(batch) - batch["y"]) ** 2), {{}}


    def default_data(seed):
        rng = np.random.default_rng(seed)
        x = (np.abs(rng.normal(size=(256, 4))) + 0.1).astype(np.float32)
        keep = np.ones(256, np.float32)
        bad = np.arange(200, 210)  # a few rows: some are in the training split
        if KIND == "forward":
            x[bad, 0] = -1.0  # sqrt of a negative number: NaN in the forward pass
        else:
            keep[bad] = 0.0  # the norm of a zero vector: finite, its gradient is NaN
        y = rng.normal(size=256).astype(np.float32)
        return jaxstab.Dataset({{"x": x, "keep": keep, "y": y}})


    ENTRY = jaxstab.ModelEntry(
        "planted_" + KIND, build_model, loss_fn, default_data, config=Config()
    )
    """
)


@pytest.mark.parametrize(
    ("kind", "primitive", "module", "backward"),
    [("forward", "sqrt", "feature", False), ("backward", None, "radius", True)],
)
def test_diagnose_names_the_origin_of_a_nan_in_a_user_model(
    tmp_path, capsys, kind, primitive, module, backward
):
    model_file = tmp_path / f"planted_{kind}.py"
    assert not str(model_file).startswith(str(ROOT))
    source = MODEL_FILE.format(kind=kind)
    model_file.write_text(source)
    line = 1 + next(i for i, s in enumerate(source.splitlines()) if f"# {kind.upper()}" in s)
    out = tmp_path / "run"
    rc = main(["diagnose", "--model", f"{model_file}:ENTRY", "--no-progress",
               "--output-dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads((out / "diagnosis_report.json").read_text())
    assert report["status"] == "nonfinite"
    origin = report["nonfinite_origin"]
    assert (origin["file"], origin["line"]) == (str(model_file), line)
    assert origin["module_path"] == module
    if primitive is not None:
        assert origin["primitive"] == primitive
    (finding,) = [f for f in report["findings"] if f["code"] == "nonfinite_origin"]
    assert finding["evidence"]["pass"] == ("backward" if backward else "forward")
    assert f"{model_file}:{line}" in finding["message"]
    assert f"{model_file}:{line}" in printed.replace("\n", "")
    assert rc == EXIT_UNSTABLE
