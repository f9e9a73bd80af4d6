"""The E3 GNN loader: the EGFR arrays against RDKit, HDF5 targets, gzip input and every error."""

from __future__ import annotations

import gzip
import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem, rdFingerprintGenerator, rdPartialCharges

from jaxstab.models.e3gnn import data as e3data
from jaxstab.models.e3gnn.data import (
    KA_SCALE,
    KB_SCALE,
    LJ_LOG_SCALE,
    MASS_SCALE,
    NB_CUTOFF,
    Q_SCALE,
    R0_SCALE,
    TARGET_DIM,
    TORSION_SCALE,
    Z_SCALE,
    default_data,
    egfr_path,
    load_sdf,
)

TERMS = {"bond": (2, 2), "angle": (3, 2), "torsion": (4, 3), "nb": (2, 2)}
ONE = 211  # the molecule compared feature by feature with RDKit


@pytest.fixture(scope="module")
def egfr():
    return default_data()


@pytest.fixture(scope="module")
def rdkit_mols():
    """The EGFR molecules as RDKit reads them, with hydrogens added."""
    with open(egfr_path(), "rb") as fh:
        supplier = Chem.ForwardSDMolSupplier(fh, removeHs=False, sanitize=True)
        return [Chem.AddHs(m, addCoords=True) for m in supplier]


def _valid(data, term, r):
    mask = data.arrays[f"{term}_mask"][r]
    return data.arrays[f"{term}_index"][r][mask], data.arrays[f"{term}_attr"][r][mask]


def _block(smiles: str, name: str, seed: int = 0) -> str:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    mol.SetProp("_Name", name)
    return Chem.MolToMolBlock(mol)


def _write(path: Path, blocks: list[str]) -> Path:
    path.write_text("".join(b + "$$$$\n" for b in blocks))
    return path


# ------------------------------------------------------------------ the EGFR set, as arrays
def test_egfr_shapes_dtypes_and_meta(egfr, rdkit_mols):
    a, meta = egfr.arrays, egfr.meta
    n_atoms = np.array([m.GetNumAtoms() for m in rdkit_mols])
    width = int(n_atoms.max())
    assert len(egfr) == meta["n_molecules"] == 365
    assert a["pos"].shape == a["x"].shape == (365, width, 3) and meta["max_atoms"] == width
    assert a["x"].dtype == a["pos"].dtype == a["target"].dtype == np.float32
    assert a["target"].shape == (365, TARGET_DIM) and a["n_atoms"].dtype == np.int32
    np.testing.assert_array_equal(a["n_atoms"], n_atoms)
    np.testing.assert_array_equal(a["atom_mask"], np.arange(width) < n_atoms[:, None])
    for term, (n_index, n_attr) in TERMS.items():
        index, attr, mask = (a[f"{term}_{k}"] for k in ("index", "attr", "mask"))
        assert index.dtype == np.int32 and attr.dtype == np.float32 and mask.dtype == np.bool_
        assert index.shape[::2] == (365, n_index) and attr.shape[::2] == (365, n_attr)
        assert mask.shape == index.shape[:2] == attr.shape[:2]
        counts = mask.sum(1)
        assert counts.max() == mask.shape[1] and counts.min() > 0  # padded to the maximum
        np.testing.assert_array_equal(mask, np.arange(mask.shape[1]) < counts[:, None])
        assert (index < a["n_atoms"][:, None, None]).all() and (index >= 0).all()
        assert meta[f"{term}_attr_dim"] == n_attr
    assert meta["names"][0] == "ZINC02640583" and len(set(meta["names"])) == 365
    assert meta["source"] == str(egfr_path()) and meta["target_dim"] == TARGET_DIM
    assert meta["target_source"] == "morgan_count_r2_log1p" and meta["input_dim"] == 3
    assert meta["skipped"] == 0 and meta["skipped_names"] == [] and meta["warnings"] == []
    assert meta["feature_scales"]["KB_SCALE"] == KB_SCALE == 5.0
    assert meta["feature_scales"]["NB_CUTOFF"] == NB_CUTOFF == 5.0
    assert np.isfinite(a["x"]).all() and np.isfinite(a["pos"]).all()
    for term in TERMS:
        assert np.isfinite(a[f"{term}_attr"]).all()


def test_padded_entries_are_zero(egfr):
    a = egfr.arrays
    assert not a["x"][~a["atom_mask"]].any() and not a["pos"][~a["atom_mask"]].any()
    for term in TERMS:
        off = ~a[f"{term}_mask"]
        assert off.any()
        assert not a[f"{term}_index"][off].any() and not a[f"{term}_attr"][off].any()


def test_bonds_are_rdkit_bonds_in_both_directions(egfr, rdkit_mols):
    for r, mol in enumerate(rdkit_mols):
        index, _ = _valid(egfr, "bond", r)
        rows = [tuple(p) for p in index.tolist()]
        expected = []
        for b in mol.GetBonds():
            i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
            expected += [(i, j), (j, i)]
        assert rows == expected  # rows 2b, 2b + 1: bond b forwards, then backwards
        assert all(mol.GetBondBetweenAtoms(i, j) is not None for i, j in rows)


def test_angles_have_their_centre_bonded_to_both_ends(egfr, rdkit_mols):
    for r, mol in enumerate(rdkit_mols):
        index, attr = _valid(egfr, "angle", r)
        assert (index[:, 0] < index[:, 2]).all() and len({tuple(t) for t in index.tolist()}) == len(
            index
        )
        for a, c, b in index.tolist():
            assert mol.GetBondBetweenAtoms(a, c) and mol.GetBondBetweenAtoms(c, b)
        degrees = np.array([atom.GetDegree() for atom in mol.GetAtoms()])
        assert len(index) == int(np.sum(degrees * (degrees - 1) // 2))
        assert ((attr[:, 0] > 1.0) & (attr[:, 0] <= math.pi + 1e-6)).all()  # radians


def test_nonbonded_pairs_are_far_in_bonds_and_near_in_space(egfr, rdkit_mols):
    for r, mol in enumerate(rdkit_mols):
        index, _ = _valid(egfr, "nb", r)
        n = mol.GetNumAtoms()
        pos = egfr.arrays["pos"][r, :n].astype(np.float64)
        dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        hops = Chem.GetDistanceMatrix(mol)
        src, dst = index.T
        assert (hops[src, dst] > 2).all() and (dist[src, dst] < NB_CUTOFF).all()
        rows = {tuple(p) for p in index.tolist()}
        assert len(rows) == len(index) and rows == {(j, i) for i, j in rows}
        expected = (hops > 2) & (dist < NB_CUTOFF)
        np.fill_diagonal(expected, False)
        assert rows == set(zip(*(v.tolist() for v in np.nonzero(expected)), strict=True))


def test_torsion_rows_have_periodicity_and_matching_phase(egfr, rdkit_mols):
    for r, mol in enumerate(rdkit_mols):
        index, attr = _valid(egfr, "torsion", r)
        period, phase = attr[:, 1], attr[:, 2]
        assert set(period.tolist()) <= {1.0, 2.0, 3.0}
        np.testing.assert_allclose(phase, np.where(period == 2.0, np.float32(np.pi), 0.0))
        assert (attr[:, 0] != 0).all()
        for i, j, k, m in index.tolist():
            assert i != m and mol.GetBondBetweenAtoms(i, j) and mol.GetBondBetweenAtoms(j, k)
            assert mol.GetBondBetweenAtoms(k, m)


def test_features_of_one_molecule_match_rdkit(egfr, rdkit_mols):
    mol = Chem.Mol(rdkit_mols[ONE])
    n = mol.GetNumAtoms()
    a = egfr.arrays
    rdPartialCharges.ComputeGasteigerCharges(mol)
    atoms = list(mol.GetAtoms())
    charge = [at.GetDoubleProp("_GasteigerCharge") for at in atoms]
    np.testing.assert_allclose(a["x"][ONE, :n, 0], np.array(charge) / Q_SCALE, rtol=1e-6)
    np.testing.assert_allclose(a["x"][ONE, :n, 1], [at.GetAtomicNum() / Z_SCALE for at in atoms])
    np.testing.assert_allclose(a["x"][ONE, :n, 2], [at.GetMass() / MASS_SCALE for at in atoms])
    np.testing.assert_allclose(a["pos"][ONE, :n], mol.GetConformer().GetPositions(), rtol=1e-6)

    props = AllChem.MMFFGetMoleculeProperties(mol)
    index, attr = _valid(egfr, "bond", ONE)
    for row in (0, len(index) - 1):
        i, j = index[row].tolist()
        _, kb, r0 = props.GetMMFFBondStretchParams(mol, i, j)
        np.testing.assert_allclose(attr[row], [r0 / R0_SCALE, kb / KB_SCALE], rtol=1e-6)
    assert len({tuple(v) for v in attr.tolist()}) > 1  # not one value broadcast

    index, attr = _valid(egfr, "angle", ONE)
    for (i, j, k), (theta, ka) in zip(index.tolist(), attr.tolist(), strict=True):
        _, ka_ref, theta0 = props.GetMMFFAngleBendParams(mol, i, j, k)
        np.testing.assert_allclose([theta, ka], [math.radians(theta0), ka_ref / KA_SCALE], 1e-6)

    expected = []  # every proper dihedral around every bond, one row per nonzero V_n
    for b in mol.GetBonds():
        j, k = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        for i in sorted(x.GetIdx() for x in atoms[j].GetNeighbors()):
            for m in sorted(x.GetIdx() for x in atoms[k].GetNeighbors()):
                if i in (k, m) or m == j:
                    continue
                params = props.GetMMFFTorsionParams(mol, i, j, k, m)
                if params is None:
                    continue
                for p, v in enumerate(params[1:], 1):
                    if v:
                        expected.append(((i, j, k, m), v / 2 / TORSION_SCALE, p))
    index, attr = _valid(egfr, "torsion", ONE)
    assert [tuple(t) for t in index.tolist()] == [e[0] for e in expected]
    np.testing.assert_allclose(attr[:, 0], [e[1] for e in expected], rtol=1e-6)
    np.testing.assert_array_equal(attr[:, 1], [e[2] for e in expected])

    index, attr = _valid(egfr, "nb", ONE)
    for (i, j), (log_a, log_b) in zip(index.tolist(), attr.tolist(), strict=True):
        _, _, r_star, eps = props.GetMMFFVdWParams(i, j)
        ref = [math.log(eps * r_star**12), math.log(2 * eps * r_star**6)]
        np.testing.assert_allclose([log_a, log_b], np.array(ref) / LJ_LOG_SCALE, rtol=1e-6)


def test_morgan_target_is_log1p_of_rdkit_count_fingerprint(egfr, rdkit_mols):
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1536)
    for r in (0, ONE, 364):
        counts = generator.GetCountFingerprintAsNumPy(Chem.RemoveHs(rdkit_mols[r]))
        expected = np.log1p(counts.astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(egfr.arrays["target"][r], expected)
        assert egfr.arrays["target"][r].max() > 0


def test_default_data_is_fixed_shared_and_read_only(egfr):
    again = default_data(seed=7)
    assert again.arrays["x"] is egfr.arrays["x"] and again.meta == egfr.meta
    assert again.meta is not egfr.meta and again.meta["names"] is not egfr.meta["names"]
    with pytest.raises(ValueError, match="read-only"):
        again.arrays["pos"][0, 0, 0] = 1.0


def test_egfr_path_is_rdkits_file():
    path = egfr_path()
    assert path.is_file() and path.parts[-3:] == ("PBF", "testData", "egfr.sdf")


def test_egfr_path_names_a_missing_file(monkeypatch, tmp_path):
    monkeypatch.setattr(e3data.RDConfig, "RDContribDir", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "PBF"))):
        egfr_path()


# ------------------------------------------------------------------ other files
def test_gzip_input_gives_the_same_arrays(tmp_path, egfr):
    packed = tmp_path / "egfr.sdf.gz"
    with gzip.open(packed, "wb") as fh:
        fh.write(egfr_path().read_bytes())
    data = load_sdf(packed)
    assert data.arrays.keys() == egfr.arrays.keys()
    for key, value in egfr.arrays.items():
        np.testing.assert_array_equal(data.arrays[key], value, err_msg=key)
    assert data.meta["names"] == egfr.meta["names"] and data.meta["source"] == str(packed)


def test_small_file_counts_names_and_blank_lines(tmp_path):
    blocks = [_block("CCO", "ethanol"), _block("c1ccccc1", "")]
    path = tmp_path / "two.sdf"
    path.write_text("".join(b + "$$$$\n" for b in blocks) + "\n\n\n")  # trailing blank lines
    data = load_sdf(path)
    assert data.meta["names"] == ["ethanol", "mol1"] and data.meta["n_molecules"] == 2
    a = data.arrays
    np.testing.assert_array_equal(a["n_atoms"], [9, 12])
    np.testing.assert_array_equal(a["bond_mask"].sum(1), [16, 24])
    np.testing.assert_array_equal(a["angle_mask"].sum(1), [13, 18])
    assert a["x"].shape == (2, 12, 3) and a["target"].shape == (2, TARGET_DIM)
    assert data.meta["skipped"] == 0 and data.meta["warnings"] == []


def test_hdf5_targets_are_read_by_name(tmp_path):
    path = _write(tmp_path / "mols.sdf", [_block("CCO", "alpha"), _block("CCN", "beta")])
    rng = np.random.default_rng(0)
    vectors = {"beta": rng.normal(size=TARGET_DIM), "alpha": rng.normal(size=TARGET_DIM)}
    h5 = tmp_path / "targets.h5"
    with h5py.File(h5, "w") as f:
        for name, v in vectors.items():
            f.create_dataset(name, data=v)
        f.create_dataset("unused", data=np.zeros(3))
    data = load_sdf(path, targets=h5)
    assert data.meta["target_source"] == "hdf5:targets.h5"
    assert data.arrays["target"].dtype == np.float32
    np.testing.assert_array_equal(data.arrays["target"][0], vectors["alpha"].astype(np.float32))
    np.testing.assert_array_equal(data.arrays["target"][1], vectors["beta"].astype(np.float32))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "has no dataset named 'beta'"),
        (np.zeros(TARGET_DIM - 1), r"has shape \(1535,\); expected \(1536,\)"),
        (np.zeros((1, TARGET_DIM)), r"has shape \(1, 1536\)"),
        (np.where(np.arange(TARGET_DIM) == 7, np.nan, 0.0), "non-finite value at column 7"),
        (np.where(np.arange(TARGET_DIM) == 9, 1e39, 0.0), "non-finite value at column 9"),
        (np.array([b"x"] * TARGET_DIM), "not real numbers"),
    ],
    ids=["missing", "short", "2d", "nan", "float32-overflow", "bytes"],
)
def test_bad_hdf5_targets_are_errors_naming_record_and_molecule(tmp_path, value, message):
    path = _write(tmp_path / "mols.sdf", [_block("CCO", "alpha"), _block("CCN", "beta")])
    h5 = tmp_path / "targets.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("alpha", data=np.ones(TARGET_DIM))
        if value is not None:
            f.create_dataset("beta", data=value)
    with pytest.raises(ValueError, match=message) as info:
        load_sdf(path, targets=h5)
    text = str(info.value)
    assert str(path) in text and "record 1 ('beta')" in text and str(h5) in text
    data = load_sdf(path, targets=h5, skip_invalid=True)
    assert data.meta["names"] == ["alpha"] and data.meta["skipped_names"] == ["beta"]
    np.testing.assert_array_equal(data.arrays["target"], np.ones((1, TARGET_DIM)))


def test_targets_file_problems(tmp_path):
    path = _write(tmp_path / "mols.sdf", [_block("CCO", "alpha")])
    with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
        load_sdf(path, targets=tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match=r"text\.h5.* is not an HDF5 file"):
        load_sdf(path, targets=tmp_path / "text.h5")


# ------------------------------------------------------------------ errors
def _nan_v2000(name: str) -> str:
    lines = _block("CCO", name).splitlines()
    lines[4] = "       nan" + lines[4][10:]
    return "\n".join(lines) + "\n"


def _v3000_coordinate(name: str, value: str) -> str:
    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    mol.SetProp("_Name", name)
    lines = Chem.MolToV3KMolBlock(mol).splitlines()
    k = lines.index("M  V30 BEGIN ATOM") + 2  # the second atom
    fields = lines[k].split(" ")
    assert fields[:5] == ["M", "", "V30", "2", "C"]
    fields[7] = value  # its z
    lines[k] = " ".join(fields)
    return "\n".join(lines) + "\n"


def _flat(name: str, header: str) -> str:
    mol = Chem.MolFromSmiles("CCN")
    AllChem.Compute2DCoords(mol)
    mol.SetProp("_Name", name)
    lines = Chem.MolToMolBlock(mol).splitlines()
    assert lines[1].endswith("2D")
    lines[1] = lines[1][:-2] + header
    return "\n".join(lines) + "\n"


EMPTY_BLOCK = "bad\n     RDKit          3D\n\n  0  0  0  0  0  0  0  0  0  0999 V2000\nM  END\n"

BAD = {
    "garbage": (lambda name: f"{name}\nnot a molecule\n\nfoo\n", "RDKit cannot parse"),
    "nan-v2000": (_nan_v2000, r"atom 0 has a non-finite coordinate \(nan\)"),
    "nan-v3000": (lambda name: _v3000_coordinate(name, "nan"), "atom 1 has non-finite coord"),
    "inf-v3000": (lambda name: _v3000_coordinate(name, "inf"), "atom 1 has non-finite coord"),
    "float32-overflow": (lambda name: _v3000_coordinate(name, "1e39"), "finite float32 needed"),
    "2d": (lambda name: _flat(name, "2D"), "coordinates are 2D"),
    "3d-flag-zero-z": (lambda name: _flat(name, "3D"), r"every z is 0"),
    "no-atoms": (lambda name: EMPTY_BLOCK.replace("bad", name, 1), "has no atoms"),
    "boron": (lambda name: _block("CB(C)C", name), r"MMFF94 cannot assign atom types.*B, C, H"),
    "selenium": (
        lambda name: _block("C[Se]C", name),
        r"Gasteiger charge is NaN at \d+ of 9 atoms .*elements: .*Se\)",
    ),
}


def test_rdkit_rejects_nan_in_v2000_but_reads_it_in_v3000():
    assert Chem.MolFromMolBlock(_nan_v2000("x"), removeHs=False) is None
    mol = Chem.MolFromMolBlock(_v3000_coordinate("x", "nan"), removeHs=False)
    assert np.isnan(mol.GetConformer().GetPositions()[1, 2])


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_record_is_an_error_naming_file_record_and_name(tmp_path, kind):
    make, message = BAD[kind]
    path = _write(tmp_path / "bad.sdf", [_block("CCO", "good"), make("bad_one")])
    with pytest.raises(ValueError, match=message) as info:
        load_sdf(path)
    assert str(info.value).startswith(f"file {str(path)!r}, record 1 ('bad_one'): ")


def test_skip_invalid_drops_and_counts_every_bad_record(tmp_path):
    blocks = [_block("CCO", "first")]
    blocks += [make(f"bad_{kind}") for kind, (make, _) in BAD.items()]
    blocks += [_block("CC(=O)O", "last")]
    path = _write(tmp_path / "mixed.sdf", blocks)
    with pytest.raises(ValueError, match=r"record 1 \('bad_garbage'\)"):
        load_sdf(path)
    data = load_sdf(path, skip_invalid=True)
    meta = data.meta
    assert meta["names"] == ["first", "last"] and meta["n_molecules"] == len(data) == 2
    assert meta["skipped"] == len(BAD) == 10
    assert meta["skipped_names"] == [f"bad_{kind}" for kind in BAD]
    assert len(meta["warnings"]) == 1
    warning = meta["warnings"][0]
    assert warning.startswith("skipped 10 molecules that could not be used: record 1 ")
    assert "and 5 more" in warning
    np.testing.assert_array_equal(data.arrays["n_atoms"], [9, 8])
    alone = load_sdf(_write(tmp_path / "last.sdf", [_block("CC(=O)O", "last")]))
    for term in TERMS:
        for part in (0, 1):
            got, ref = _valid(data, term, 1)[part], _valid(alone, term, 0)[part]
            np.testing.assert_array_equal(got, ref, err_msg=term)
    np.testing.assert_array_equal(data.arrays["x"][1, :8], alone.arrays["x"][0])


def test_skip_invalid_with_nothing_left_is_an_error(tmp_path):
    path = _write(tmp_path / "bad.sdf", [BAD["boron"][0]("b1"), BAD["2d"][0]("b2")])
    with pytest.raises(ValueError, match=r"none of its 2 molecules can be used: record 0 \('b1'\)"):
        load_sdf(path, skip_invalid=True)


@pytest.mark.parametrize("text", ["", "\n\n", "$$$$\n"], ids=["empty", "blank", "delimiter"])
def test_a_file_without_molecules_is_an_error(tmp_path, text):
    path = tmp_path / "empty.sdf"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"file {str(path)!r} holds no molecules")):
        load_sdf(path)


def test_missing_file_wrong_suffix_and_bad_gzip(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.sdf"):
        load_sdf(tmp_path / "missing.sdf")
    other = tmp_path / "mols.mol2"
    other.write_text(_block("CCO", "x"))
    with pytest.raises(ValueError, match=r"mols\.mol2.*expected a name ending in \.sdf"):
        load_sdf(other)
    fake = tmp_path / "fake.sdf.gz"
    fake.write_text(_block("CCO", "x"))
    with pytest.raises(ValueError, match=r"fake\.sdf\.gz.* cannot be read"):
        load_sdf(fake)
