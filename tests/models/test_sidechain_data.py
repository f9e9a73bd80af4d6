"""The side-chain loader: atom14 arrays against the PDB text, aliases, masks, errors and crops."""

from __future__ import annotations

import gzip
import importlib.util
from collections import defaultdict
from pathlib import Path

import gemmi
import jax
import numpy as np
import pytest

from jaxstab.models.sidechain import residue_constants as rc
from jaxstab.models.sidechain.crop import center_crop, crop
from jaxstab.models.sidechain.data import (
    RESIDUE_FIELDS,
    VAL_EVERY,
    default_data,
    dssp_paths,
    load_pdb,
)

DATA = Path(next(iter(importlib.util.find_spec("MDAnalysisTests").submodule_search_locations)))
ADK = DATA / "data" / "adk_open.pdb"
FAILING = DATA / "data" / "dssp" / "1mr1D_failing.pdb.gz"
ONE = DATA / "data" / "dssp" / "1ahsA.pdb.gz"
THREE = {one: three for one, three in rc.RESTYPE_1TO3.items()}
CHARMM = {"HSD": "HIS"}


def _file_atoms(path: Path) -> dict[tuple[str, int], dict[str, tuple[float, ...]]]:
    """{(chain id, residue number): {atom name: xyz}} from the fixed columns of ATOM lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    atoms: dict[tuple[str, int], dict[str, tuple[float, ...]]] = defaultdict(dict)
    names: dict[tuple[str, int], str] = {}
    with opener(path, "rt") as fh:
        for line in fh:
            if not line.startswith(("ATOM  ", "HETATM")):
                continue
            assert line[16] == " ", "these files have no alternative locations"
            key = (line[21], int(line[22:26]))
            atoms[key][line[12:16].strip()] = tuple(float(line[c : c + 8]) for c in (30, 38, 46))
            names[key] = line[17:20].strip()
    return {key: {"_res": names[key], **value} for key, value in atoms.items()}


def _atom(serial, name, res, resseq, xyz, chain="A", alt=" ", occ=1.0, record="ATOM"):
    field = name if len(name) == 4 else f" {name:<3}"
    x, y, z = xyz
    return (
        f"{record:<6}{serial:>5} {field}{alt}{res:>3} {chain}{resseq:>4}    "
        f"{x:8.3f}{y:8.3f}{z:8.3f}{occ:6.2f}{0.0:6.2f}\n"
    )


def _pdb(tmp_path: Path, residues, name="t.pdb") -> Path:
    """residues: (res name, number, [atom names], chain) -> a PDB file; xyz from the serial."""
    text, serial = "", 1
    for res, num, atoms, *rest in residues:
        chain = rest[0] if rest else "A"
        known = rc.parent_residue(res) is not None and res not in rc.MODIFIED_RESIDUES
        record = "ATOM" if known else "HETATM"
        for atom in atoms:
            text += _atom(
                serial, atom, res, num, (serial, serial + 0.5, -serial), chain, record=record
            )
            serial += 1
    path = tmp_path / name
    path.write_text(text + "END\n")
    return path


@pytest.fixture(scope="module")
def adk():
    return load_pdb(ADK)


# -------------------------------------------------------------------------- residue tables
def test_residue_tables_are_alphafolds():
    assert "".join(rc.RESTYPES) == "ARNDCQEGHILKMFPSTWYV" and rc.RESTYPES_WITH_X[20] == "X"
    assert rc.UNKNOWN == 20 and rc.NUM_RESTYPES == 21
    names = rc.ATOM14_NAMES
    assert names["ARG"][:11] == ("N", "CA", "C", "O", "CB", "CG", "CD", "NE", "CZ", "NH1", "NH2")
    assert names["TRP"] == ("N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "NE1", "CE2",
                            "CE3", "CZ2", "CZ3", "CH2")  # fmt: skip
    assert names["ILE"][4:8] == ("CB", "CG1", "CG2", "CD1") and names["THR"][4:7] == (
        "CB",
        "OG1",
        "CG2",
    )
    assert names["HIS"][4:10] == ("CB", "CG", "ND1", "CD2", "CE1", "NE2")
    counts = {res: sum(1 for a in n if a) for res, n in names.items()}
    assert counts == {"ALA": 5, "ARG": 11, "ASN": 8, "ASP": 8, "CYS": 6, "GLN": 9, "GLU": 9,
                      "GLY": 4, "HIS": 10, "ILE": 8, "LEU": 8, "LYS": 9, "MET": 8, "PHE": 11,
                      "PRO": 7, "SER": 6, "THR": 7, "TRP": 14, "TYR": 12, "VAL": 7,
                      "UNK": 4}  # fmt: skip
    assert all(len(n) == 14 and n[:4] == ("N", "CA", "C", "O") for n in names.values())
    assert rc.ATOM14_MASK.shape == (21, 14) and rc.ATOM14_MASK.sum() == sum(counts.values())
    for k, one in enumerate(rc.RESTYPES_WITH_X):
        assert rc.RESTYPE_ORDER[rc.RESTYPE_1TO3[one]] == k
        assert rc.ATOM14_NAMES_BY_TYPE[k] == names[rc.RESTYPE_1TO3[one]]
    aliases = {"MSE": "MET", "SEC": "CYS", "HYP": "PRO", "MLY": "LYS", "SEP": "SER", "TPO": "THR",
               "PTR": "TYR", "CSO": "CYS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HID": "HIS",
               "HIE": "HIS", "HIP": "HIS", "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU",
               "LYN": "LYS"}  # fmt: skip
    for alias, parent in aliases.items():
        assert rc.parent_residue(alias) == parent


# -------------------------------------------------------------------- a real file, as text
def test_adk_open_coordinates_are_the_files(adk):
    a, meta = adk.arrays, adk.meta
    atoms = _file_atoms(ADK)
    keys = sorted(atoms, key=lambda k: k[1])
    assert meta["names"] == ["adk_open:4AKE"] and meta["sources"] == [str(ADK)]
    assert a["chain_length"].tolist() == [214] and a["aatype"].shape == (1, 214)
    np.testing.assert_array_equal(a["residue_index"][0], [k[1] for k in keys])
    assert a["residue_mask"][0].tolist() == [1.0] * 214 and meta["n_masked_residues"] == 0
    for r, key in enumerate(keys):
        found = atoms[key]
        res = CHARMM.get(found["_res"], found["_res"])
        assert a["aatype"][0, r] == rc.RESTYPE_ORDER[res]
        for name, slot in (("N", 0), ("CA", 1), ("C", 2), ("CB", 4)):
            if name in found:
                np.testing.assert_array_equal(a["atom14_pos"][0, r, slot], np.float32(found[name]))
        oxygen = found.get("O", found.get("OT1"))
        np.testing.assert_array_equal(a["atom14_pos"][0, r, 3], np.float32(oxygen))
        if res == "ILE":  # CHARMM's CD is atom14's CD1
            np.testing.assert_array_equal(a["atom14_pos"][0, r, 7], np.float32(found["CD"]))
    # Two values read off the file: MET 1 N and GLY 214 OT1.
    np.testing.assert_array_equal(a["atom14_pos"][0, 0, 0], np.float32([-11.921, 26.307, 10.410]))
    np.testing.assert_array_equal(a["atom14_pos"][0, 213, 3], np.float32([-13.786, 28.568, 21.198]))
    assert meta["sequences"][0].startswith("MRIILLGAPGAGKGTQ") and meta["aliases"] == {"HSD": 3}
    assert a["atom14_mask"].sum() == sum(rc.ATOM14_MASK[t].sum() for t in a["aatype"][0])
    assert meta["n_missing_atoms"] == 0 and meta["warnings"] == []


def test_every_slot_holds_the_atom_of_its_name(adk):
    """Across the 50 DSSP chains and adk: each present slot is the file's atom of that name."""
    paths = dssp_paths()
    data = load_pdb(paths)
    assert data.meta["names"] == [f"{p.name[:5]}:{p.name[4]}" for p in paths]
    seen_types = set()
    for row, path in enumerate(paths):
        atoms = _file_atoms(path)
        keys = list(atoms)
        assert data.arrays["chain_length"][row] == len(keys)
        for r, key in enumerate(keys):
            found = atoms[key]
            t = int(data.arrays["aatype"][row, r])
            assert rc.RESTYPES_WITH_X[t] == rc.RESTYPE_3TO1[found["_res"]]
            seen_types.add(t)
            names = rc.ATOM14_NAMES_BY_TYPE[t]
            mask = data.arrays["atom14_mask"][row, r]
            heavy = {n for n in found if n != "_res" and n != "OXT" and not n.startswith("H")}
            assert {names[s] for s in np.nonzero(mask)[0]} == heavy
            for s in np.nonzero(mask)[0]:
                np.testing.assert_array_equal(
                    data.arrays["atom14_pos"][row, r, s], np.float32(found[names[s]])
                )
    assert seen_types == set(range(20))  # every standard type is present and checked


def test_padding_is_zero_and_masks_nest():
    a = default_data("all").arrays
    width = a["aatype"].shape[1]
    inside = np.arange(width) < a["chain_length"][:, None]
    assert a["aatype"].dtype == a["residue_index"].dtype == a["chain_length"].dtype == np.int32
    assert a["atom14_pos"].dtype == a["atom14_mask"].dtype == a["residue_mask"].dtype == np.float32
    for name in RESIDUE_FIELDS:
        assert not a[name][~inside].any()
    assert (a["atom14_mask"] <= a["residue_mask"][..., None]).all()
    assert (a["atom14_mask"] <= rc.ATOM14_MASK[a["aatype"]]).all()
    assert not a["atom14_pos"][a["atom14_mask"] == 0].any()


# ------------------------------------------------------------------- aliases and altlocs
def test_modified_and_md_names_map_to_the_standard_residue_and_atom(tmp_path):
    path = _pdb(tmp_path, [
        ("MSE", 1, ["N", "CA", "C", "O", "CB", "CG", "SE", "CE"]),
        ("HSD", 2, ["N", "HN", "CA", "C", "O", "CB", "CG", "ND1", "HD1", "CD2", "CE1", "NE2"]),
        ("HIE", 3, ["N", "CA", "C", "O", "CB", "CG", "ND1", "CD2", "CE1", "NE2", "HE2"]),
        ("ILE", 4, ["N", "CA", "C", "O", "CB", "CG1", "CG2", "CD", "HD1"]),
        ("SEP", 5, ["N", "CA", "C", "O", "CB", "OG", "P", "O1P"]),
        ("GLY", 6, ["N", "CA", "C", "OT1", "OT2"]),
        ("HOH", 7, ["O"]),
    ])  # fmt: skip
    data = load_pdb(path)
    a, meta = data.arrays, data.meta
    assert meta["sequences"] == ["MHHISG"] and a["chain_length"].tolist() == [6]
    assert meta["aliases"] == {"HSD": 1, "HIE": 1, "MSE": 1, "SEP": 1}
    mask = a["atom14_mask"][0]
    np.testing.assert_array_equal(mask.sum(1), [8, 10, 10, 8, 6, 4])
    pos = a["atom14_pos"][0]
    # serials: MSE 1-8 (SE = 7), HSD 9-20, HIE 21-31, ILE 32-40 (CD = 39), SEP 41-48,
    # GLY 49-53 (OT1 = 52, OT2 = 53)
    np.testing.assert_allclose(pos[0, rc.ATOM14_INDEX["MET"]["SD"]], [7, 7.5, -7])
    np.testing.assert_allclose(pos[3, rc.ATOM14_INDEX["ILE"]["CD1"]], [39, 39.5, -39])
    np.testing.assert_allclose(pos[5, 3], [52, 52.5, -52])
    assert not np.isin(pos[..., 0], [53.0, 10.0, 17.0, 31.0, 40.0, 47.0, 48.0]).any()
    np.testing.assert_allclose(pos[1, rc.ATOM14_INDEX["HIS"]["ND1"]], [16, 16.5, -16])
    assert meta["warnings"] == [] and meta["n_missing_atoms"] == 0


def test_altloc_keeps_the_highest_occupancy_conformer(tmp_path):
    lines = [_atom(i + 1, n, "SER", 1, (i, 0, 0)) for i, n in enumerate(["N", "CA", "C", "O"])]
    lines += [
        _atom(5, "CB", "SER", 1, (10, 0, 0), alt="A", occ=0.4),
        _atom(6, "CB", "SER", 1, (20, 0, 0), alt="B", occ=0.6),
        _atom(7, "OG", "SER", 1, (11, 0, 0), alt="A", occ=0.4),
        _atom(8, "OG", "SER", 1, (21, 0, 0), alt="B", occ=0.6),
    ]
    path = tmp_path / "alt.pdb"
    path.write_text("".join(lines) + "END\n")
    pos = load_pdb(path).arrays["atom14_pos"][0, 0]
    assert pos[4, 0] == 20 and pos[5, 0] == 21


def test_unknown_amino_acid_keeps_its_backbone_and_is_reported(tmp_path):
    path = _pdb(tmp_path, [("ALA", 1, ["N", "CA", "C", "O", "CB"]),
                           ("DAL", 2, ["N", "CA", "C", "O", "CB"])])  # fmt: skip
    data = load_pdb(path)
    assert data.arrays["aatype"].tolist() == [[0, 20]] and data.meta["sequences"] == ["AX"]
    assert data.arrays["atom14_mask"][0, 1].tolist() == [1.0] * 4 + [0.0] * 10
    assert data.meta["unknown_residues"] == {"DAL": 1}
    assert any("DAL 1" in w for w in data.meta["warnings"])


def test_chains_ligands_and_waters(tmp_path):
    path = _pdb(tmp_path, [
        ("ALA", 1, ["N", "CA", "C", "O", "CB"], "A"),
        ("GLY", 2, ["N", "CA", "C", "O"], "A"),
        ("VAL", 5, ["N", "CA", "C", "O", "CB", "CG1", "CG2"], "B"),
        ("HOH", 9, ["O"], "W"),
    ], name="two.pdb")  # fmt: skip
    data = load_pdb([path, path])
    assert data.meta["names"] == ["two:A", "two:B", "two:A", "two:B"]
    assert data.arrays["chain_length"].tolist() == [2, 1, 2, 1]
    assert data.arrays["residue_index"][1].tolist() == [5, 0]


# ------------------------------------------------------------------------ masks and counts
def test_a_residue_without_ca_is_masked_and_counted(tmp_path):
    path = _pdb(tmp_path, [("ALA", 1, ["N", "CA", "C", "O", "CB"]),
                           ("ALA", 2, ["N", "C", "O", "CB"]),
                           ("ALA", 3, ["N", "CA", "C", "O", "CB"])], name="noca.pdb")  # fmt: skip
    data = load_pdb(path)
    a, meta = data.arrays, data.meta
    assert a["residue_mask"].tolist() == [[1.0, 0.0, 1.0]] and a["chain_length"].tolist() == [3]
    assert not a["atom14_mask"][0, 1].any() and not a["atom14_pos"][0, 1].any()
    assert meta["masked_residues"] == [1] and meta["n_masked_residues"] == 1
    assert meta["warnings"] == ["1 residue lacking N, CA or C was masked out (noca:A 1)"]


def test_the_real_file_without_c_has_that_residue_masked():
    data = load_pdb(FAILING)
    a = data.arrays
    (masked,) = np.nonzero(a["residue_mask"][0][: a["chain_length"][0]] == 0)[0]
    assert a["residue_index"][0, masked] == 219 and data.meta["sequences"][0][masked] == "R"
    assert "1mr1D_failing:D 1" in data.meta["warnings"][0]


def test_a_missing_side_chain_atom_is_masked(tmp_path):
    path = _pdb(tmp_path, [("LYS", 1, ["N", "CA", "C", "O", "CB", "CG", "CD", "CE"])])
    data = load_pdb(path)
    assert data.arrays["atom14_mask"][0, 0].tolist() == [1.0] * 8 + [0.0] * 6
    assert data.arrays["residue_mask"].tolist() == [[1.0]]
    assert data.meta["missing_atoms"] == [1] and data.meta["n_missing_atoms"] == 1
    assert "1 atom missing" in data.meta["warnings"][0]


# ----------------------------------------------------------------------------------- errors
def test_nan_coordinate_names_file_chain_residue_and_atom(tmp_path):
    path = _pdb(tmp_path, [("ALA", 1, ["N", "CA", "C", "O"]),
                           ("LYS", 57, ["N", "CA", "C", "O", "CB"])], name="1abc.pdb")  # fmt: skip
    lines = path.read_text().splitlines(keepends=True)
    lines[8] = lines[8][:30] + "     nan" + lines[8][38:]  # LYS 57 CB
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"1abc\.pdb' chain A residue 57 \(LYS\): coordinate x "
                       r"of CB is NaN"):  # fmt: skip
        load_pdb(path)


def test_non_finite_mmcif_coordinates_are_errors(tmp_path):
    # gemmi writes an infinite coordinate as "Inf" and reads that back as NaN.
    for value, word in ((float("inf"), "NaN"), (1e39, "1e\\+39, beyond float32")):
        structure = gemmi.read_structure(str(ONE))
        structure[0][0][0][4].pos = gemmi.Position(value, 0.0, 0.0)  # THR 126 CB
        structure.setup_entities()
        path = tmp_path / "bad.cif"
        structure.make_mmcif_document().write_file(str(path))
        with pytest.raises(ValueError, match=rf"bad\.cif' chain A residue 126 \(THR\).*CB.*{word}"):
            load_pdb(path)


@pytest.mark.parametrize(
    ("text", "name", "match"),
    [
        ("", "empty.pdb", "holds no amino-acid residues"),
        (_atom(1, "O", "HOH", 1, (0, 0, 0), record="HETATM"), "water.pdb", "no amino-acid"),
        ("hello\n", "junk.cif", "cannot be parsed as mmCIF"),
        ("\x00\x01\x02", "binary.pdb", "binary data"),
        (_atom(1, "CA", "ALA", 1, (0, 0, 0)), "caonly.pdb", "none of its 1 amino-acid residues"),
    ],
)
def test_files_without_usable_protein_are_errors(tmp_path, text, name, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_pdb(path)
    assert name in str(info.value)


def test_path_errors(tmp_path):
    bad_gz = tmp_path / "bad.pdb.gz"
    bad_gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=r"bad\.pdb\.gz' cannot be read"):
        load_pdb(bad_gz)
    with pytest.raises(FileNotFoundError, match=r"nothere\.pdb"):
        load_pdb(tmp_path / "nothere.pdb")
    with pytest.raises(ValueError, match="not a supported structure file"):
        load_pdb(tmp_path / "x.xyz")
    (tmp_path / "folder.pdb").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        load_pdb(tmp_path / "folder.pdb")
    with pytest.raises(ValueError, match="paths is empty"):
        load_pdb([])
    with pytest.raises(ValueError, match="max_len"):
        load_pdb(ADK, max_len=0)
    with pytest.raises(ValueError, match=r"bad\.pdb\.gz"):  # no partial result
        load_pdb([ADK, bad_gz])


# ------------------------------------------------------------------------------- formats
def test_gzip_and_mmcif_give_the_same_arrays(tmp_path, adk):
    packed = tmp_path / "adk_open.pdb.gz"
    packed.write_bytes(gzip.compress(ADK.read_bytes()))
    for name, value in load_pdb(packed).arrays.items():
        np.testing.assert_array_equal(value, adk.arrays[name])

    reference = load_pdb(ONE)
    structure = gemmi.read_structure(str(ONE))
    structure.setup_entities()
    cif = tmp_path / "one.cif"
    structure.make_mmcif_document().write_file(str(cif))
    ent_gz = tmp_path / "one.mmcif.gz"
    ent_gz.write_bytes(gzip.compress(cif.read_bytes()))
    for path in (cif, ent_gz):
        data = load_pdb(path)
        assert data.meta["names"] == ["one:A"] and data.meta["sources"] == [str(path)]
        for name, value in data.arrays.items():
            np.testing.assert_array_equal(value, reference.arrays[name])


# -------------------------------------------------------------------------- default data
def test_default_split_by_chain():
    train, val, whole = default_data("train"), default_data("val"), default_data("all")
    assert (len(train), len(val), len(whole)) == (40, 10, 50) and VAL_EVERY == 5
    names = sorted(whole.meta["names"])
    assert whole.meta["names"] == names
    assert val.meta["names"] == names[VAL_EVERY - 1 :: VAL_EVERY]
    assert sorted(train.meta["names"] + val.meta["names"]) == names
    assert not set(train.meta["names"]) & set(val.meta["names"])
    assert default_data("val").meta["names"] == val.meta["names"]  # deterministic
    for data in (train, val):
        for name, value in data.arrays.items():
            rows = [names.index(n) for n in data.meta["names"]]
            np.testing.assert_array_equal(value, whole.arrays[name][rows])
            assert not value.flags.writeable and value.shape[1:] == whole.arrays[name].shape[1:]
    assert (
        train.meta["n_chains"] == 40
        and sum(train.meta["missing_atoms"]) == (train.meta["n_missing_atoms"])
    )
    val.meta["names"].append("x")
    assert len(default_data("val").meta["names"]) == 10  # meta is a fresh copy
    with pytest.raises(ValueError, match="split must be one of"):
        default_data("test")


# ---------------------------------------------------------------------------------- crops
def _stacked(tmp_path: Path):
    short = _pdb(tmp_path, [("ALA", k, ["N", "CA", "C", "O", "CB"]) for k in range(1, 6)],
                 name="short.pdb")  # fmt: skip
    return load_pdb([ADK, short, FAILING]).arrays  # lengths 214, 5, 96


def test_crop_windows_are_contiguous_inside_the_chain(tmp_path):
    arrays = _stacked(tmp_path)
    length = arrays["chain_length"]
    jitted = jax.jit(crop, static_argnums=2)
    starts = set()
    for seed in range(8):
        out = {k: np.asarray(v) for k, v in jitted(arrays, jax.random.key(seed), 64).items()}
        assert out["atom14_pos"].shape == (3, 64, 14, 3) and out["aatype"].shape == (3, 64)
        assert out["chain_length"].tolist() == [64, 5, 64]
        for row in (0, 2):
            full = arrays["residue_index"][row, : length[row]].tolist()
            window = out["residue_index"][row].tolist()
            start = full.index(window[0])
            assert 0 <= start <= length[row] - 64 and window == full[start : start + 64]
            for name in RESIDUE_FIELDS:
                np.testing.assert_array_equal(out[name][row], arrays[name][row, start : start + 64])
            starts.add((row, start))
        np.testing.assert_array_equal(out["residue_mask"][1], [1.0] * 5 + [0.0] * 59)
        np.testing.assert_array_equal(out["atom14_pos"][1, :5], arrays["atom14_pos"][1, :5])
    assert len({s for r, s in starts if r == 0}) > 1  # different keys, different windows
    same = [np.asarray(crop(arrays, jax.random.key(3), 64)["aatype"]) for _ in range(2)]
    np.testing.assert_array_equal(*same)


def test_center_crop_matches_load_with_max_len_and_pads(tmp_path):
    arrays = _stacked(tmp_path)
    out = center_crop(arrays, 50)
    np.testing.assert_array_equal(out["aatype"][0], arrays["aatype"][0, 82:132])
    np.testing.assert_array_equal(out["aatype"][2], arrays["aatype"][2, 23:73])
    loaded = load_pdb([ADK, tmp_path / "short.pdb", FAILING], max_len=50)
    for name, value in loaded.arrays.items():
        np.testing.assert_array_equal(value, np.asarray(out[name]))
    assert loaded.meta["cropped"] == ["adk_open:4AKE", "1mr1D_failing:D"]
    assert any("2 chains longer than max_len=50" in w for w in loaded.meta["warnings"])
    wide = center_crop(arrays, 300)  # wider than the data: padded with zeros
    assert wide["atom14_mask"].shape == (3, 300, 14)
    np.testing.assert_array_equal(wide["atom14_pos"][:, :214], arrays["atom14_pos"])
    assert not np.asarray(wide["residue_mask"][:, 214:]).any()
    with pytest.raises(ValueError, match="max_len"):
        center_crop(arrays, 0)
    with pytest.raises(ValueError, match="chain_length"):
        crop({"aatype": arrays["aatype"]}, jax.random.key(0), 8)
