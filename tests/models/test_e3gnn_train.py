"""E3 GNN training on EGFR, its registry entry and the command line on a bad SDF."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from jaxstab import registry
from jaxstab.cli import main
from jaxstab.models.e3gnn import E3GNNConfig, default_data, feature_stats, train_e3gnn

N_MOL = 32


@pytest.fixture(scope="module")
def trained():
    data = default_data()
    arrays = {k: v[:N_MOL] for k, v in data.arrays.items()}
    config = E3GNNConfig.small().replace(lr=2e-3, dropout=0.0)
    return train_e3gnn(arrays, key=jax.random.key(0), config=config, epochs=3, batch_size=8)


def test_training_on_egfr_lowers_the_cosine_loss(trained):
    res = trained.fit
    assert res.status == "ok" and res.epochs == 3 and res.steps == 3 * 4
    epochs = res.epoch_history["train_loss"]
    assert epochs[-1] < 0.95 * epochs[0], epochs
    cosine = np.asarray(res.history["cosine"])
    assert np.isfinite(cosine).all() and cosine[-4:].mean() < cosine[:4].mean()


def test_every_group_gets_gradient(trained):
    report = trained.report
    assert report.ok
    groups = {"input_embedding", "bonded_mp_layers", "angle_mp_layers", "dihedral_mp_layers",
              "nonbonded_mp_layers", "angle_weight", "dihedral_weight", "nonbonded_weight",
              "pooling_mlp", "output_projection"}  # fmt: skip
    assert set(report.norms) == groups
    assert all(report.norms[g] > 0 for g in groups)


def test_registry_entry_presets_and_data():
    entry = registry.get("e3gnn")
    assert set(entry.presets) >= {"default", "original", "seed", "small"}
    assert entry.preset("original") == E3GNNConfig.original()
    assert entry.load_data is not None and entry.feature_stats is feature_stats


def test_feature_stats_are_seed_001s_per_column_statistics():
    arrays = {k: v[:4] for k, v in default_data().arrays.items()}
    stats = jax.jit(feature_stats)(arrays)
    mask = arrays["atom_mask"]
    z = arrays["x"][..., 1][mask]
    assert float(stats["atomic_number_min"]) == pytest.approx(z.min())
    assert float(stats["atomic_number_max"]) == pytest.approx(z.max())
    assert float(stats["atomic_number_mean"]) == pytest.approx(z.mean(), rel=1e-5)
    assert float(stats["atomic_number_std"]) == pytest.approx(z.std(), rel=1e-4)
    pos = arrays["pos"][0][mask[0]]
    spread0 = np.sqrt(((pos - pos.mean(0)) ** 2).sum(-1).mean())
    assert float(stats["pos_spread_max"]) >= spread0 - 1e-5
    assert all(bool(jnp.isfinite(v)) for v in stats.values())


def _write_sdf(path, coords_nan: bool) -> None:
    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    block = Chem.MolToMolBlock(mol)
    if coords_nan:
        lines = block.splitlines()
        lines[4] = "       nan" + lines[4][10:]
        block = "\n".join(lines)
    path.write_text(block + "\n$$$$\n")


def test_cli_exits_2_with_one_line_on_a_bad_sdf(tmp_path, capsys):
    bad = tmp_path / "bad.sdf"
    _write_sdf(bad, coords_nan=True)
    out = tmp_path / "run"
    code = main(["diagnose", "--model", "e3gnn", "--data", str(bad), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("jaxstab: error:") and "\n" not in err
    assert "bad.sdf" in err and not out.exists()
