"""Molecules for the E3 GNN: a validated SDF loader with MMFF94 force-field terms per molecule.

:func:`load_sdf` reads an ``.sdf`` or ``.sdf.gz`` file, adds hydrogens (with coordinates) to
every record and returns a :class:`jaxstab.plugin.Dataset` of padded per-molecule arrays. All
indices are local to their molecule (atom ``0 .. n_atoms - 1``); every array is padded to the
data set's largest molecule (at least one slot), padded entries are zero and their mask is
False.

Atoms:

- ``x`` ``[N, A, 3]`` float32: Gasteiger charge / :data:`Q_SCALE`, atomic number /
  :data:`Z_SCALE`, mass / :data:`MASS_SCALE`;
- ``pos`` ``[N, A, 3]`` float32: coordinates in Å (the first conformer, after adding H);
- ``atom_mask`` ``[N, A]`` bool and ``n_atoms`` ``[N]`` int32.

Force-field terms (MMFF94 parameters from RDKit), each as ``<name>_index`` int32,
``<name>_attr`` float32 and ``<name>_mask`` bool:

- ``bond`` ``[N, B, 2]``: every bond twice, rows ``2b`` = (begin, end) and ``2b + 1`` = (end,
  begin) for RDKit bond ``b``; attr = [r0 / :data:`R0_SCALE`, kb / :data:`KB_SCALE`], the
  rest length (Å) and the stretch force constant (md/Å);
- ``angle`` ``[N, T, 3]``: every angle (i, j, k) with centre j and i < k; attr = [θ0 in
  radians, ka / :data:`KA_SCALE`] (ka in md·Å/rad²);
- ``torsion`` ``[N, Q, 4]``: every proper dihedral (i, j, k, l) around a bond j–k (RDKit's
  begin atom j), listed once, with i ≠ k, l ≠ j, i ≠ l. MMFF's torsion energy is
  ``E = ½ (V1 (1 + cos φ) + V2 (1 − cos 2φ) + V3 (1 + cos 3φ))``, i.e. the sum over n of
  ``(V_n / 2) (1 + cos(n φ − δ_n))`` with phase δ_n = 0 for n = 1, 3 and π for n = 2. Each
  nonzero V_n gives one row, attr = [V_n / 2 / :data:`TORSION_SCALE`, n, δ_n] (V_n in
  kcal/mol). Dihedrals MMFF has no parameters for (through a linear centre) are left out;
- ``nb`` ``[N, P, 2]``: ordered pairs (both directions) of atoms closer than :data:`NB_CUTOFF`
  Å in ``pos`` and more than two bonds apart (atoms of different fragments count as apart);
  attr = [ln A / :data:`LJ_LOG_SCALE`, ln B / :data:`LJ_LOG_SCALE`], where ``A = ε R*¹²`` and
  ``B = 2 ε R*⁶`` are the Lennard-Jones-form coefficients (``E = A / r¹² − B / r⁶``, minimum
  −ε at r = R*) of the pair's MMFF well: R* (Å) and ε (kcal/mol) as RDKit scales them for
  the pair.

Target ``target`` ``[N, 1536]`` float32: by default ``log1p`` of the RDKit Morgan count
fingerprint (radius 2, 1536 bits) of the molecule without hydrogens; or, with ``targets=``, the
vectors of an HDF5 file holding one dataset per molecule name.

Everything is checked before anything is returned; a problem raises ``ValueError`` naming the
file, the record (its 0-based position in the file) and the molecule's name. With
``skip_invalid=True`` the molecules with a problem are dropped instead and listed in
``meta["skipped_names"]`` and ``meta["warnings"]``.

Example:
  >>> data = default_data()
  >>> data.meta["n_molecules"], data.arrays["pos"].shape[-1], data.arrays["target"].shape[-1]
  (365, 3, 1536)
"""

from __future__ import annotations

import copy
import functools
import gzip
import io
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rdkit import Chem, RDConfig
from rdkit.Chem import AllChem, rdFingerprintGenerator, rdPartialCharges

from jaxstab.plugin import Dataset

__all__ = [
    "KA_SCALE",
    "KB_SCALE",
    "LJ_LOG_SCALE",
    "MASS_SCALE",
    "NB_CUTOFF",
    "Q_SCALE",
    "R0_SCALE",
    "TARGET_DIM",
    "TORSION_SCALE",
    "Z_SCALE",
    "default_data",
    "egfr_path",
    "load_sdf",
]

# Feature scales: every feature is divided by its scale so that typical values are O(1).
Q_SCALE = 1.0  # Gasteiger partial charge, e (typically -0.6 .. 0.5)
Z_SCALE = 10.0  # atomic number
MASS_SCALE = 20.0  # atomic mass, amu
R0_SCALE = 1.5  # MMFF bond rest length, Å (typically 1.0 .. 2.1)
KB_SCALE = 5.0  # MMFF bond-stretch force constant, md/Å (typically 4 .. 7)
KA_SCALE = 1.0  # MMFF angle-bend force constant, md·Å/rad² (typically 0.5 .. 1.1)
TORSION_SCALE = 2.0  # MMFF torsion barrier V_n / 2, kcal/mol (typically 0.1 .. 3.5)
LJ_LOG_SCALE = 10.0  # natural log of the Lennard-Jones-form A (~e^6..e^17) and B (~e^2..e^9)
NB_CUTOFF = 5.0  # non-bonded pair cutoff, Å
TARGET_DIM = 1536  # length of a target vector
MORGAN_RADIUS = 2

FEATURE_SCALES: dict[str, float] = {
    "Q_SCALE": Q_SCALE,
    "Z_SCALE": Z_SCALE,
    "MASS_SCALE": MASS_SCALE,
    "R0_SCALE": R0_SCALE,
    "KB_SCALE": KB_SCALE,
    "KA_SCALE": KA_SCALE,
    "TORSION_SCALE": TORSION_SCALE,
    "LJ_LOG_SCALE": LJ_LOG_SCALE,
    "NB_CUTOFF": NB_CUTOFF,
}
SUFFIXES = (".sdf", ".sdf.gz")
# (field, index columns, attr columns) of every force-field term, in the order of the arrays.
TERMS: tuple[tuple[str, int, int], ...] = (
    ("bond", 2, 2),
    ("angle", 3, 2),
    ("torsion", 4, 3),
    ("nb", 2, 2),
)
_LISTED = 5  # problems spelled out in a warning or an error; the rest are counted


class _Unusable(Exception):
    """A record the model cannot use; the message says why (without file or record)."""


@dataclass
class _Molecule:
    x: np.ndarray  # [n, 3] float32
    pos: np.ndarray  # [n, 3] float32
    terms: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (index int32, attr float32)
    target: np.ndarray  # [TARGET_DIM] float32


def egfr_path() -> pathlib.Path:
    """The EGFR ligand set bundled with RDKit (``Contrib/PBF/testData/egfr.sdf``, 365 molecules).

    >>> egfr_path().name
    'egfr.sdf'
    """
    path = pathlib.Path(RDConfig.RDContribDir) / "PBF" / "testData" / "egfr.sdf"
    if not path.is_file():
        raise FileNotFoundError(
            f"file {os.fspath(path)!r} does not exist; it ships with RDKit's Contrib folder "
            "(pip install rdkit)"
        )
    return path


def default_data(seed: int = 0) -> Dataset:
    """The EGFR set (:func:`egfr_path`) as :func:`load_sdf` loads it, read once per process.

    The data are fixed: ``seed`` changes nothing and exists only for the plugin's
    ``default_data(seed)`` signature. Every call shares the same arrays, which are read-only;
    callers must not mutate them (copy first). ``meta`` is a fresh copy on every call.

    >>> data = default_data()
    >>> len(data), data.meta["target_source"], data.arrays["x"].flags.writeable
    (365, 'morgan_count_r2_log1p', False)
    >>> default_data(seed=1).arrays["x"] is data.arrays["x"]
    True
    """
    del seed
    cached = _load_cached(os.fspath(egfr_path()))
    return Dataset(arrays=dict(cached.arrays), meta=copy.deepcopy(dict(cached.meta)))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> Dataset:
    data = load_sdf(path)
    for value in data.arrays.values():
        value.setflags(write=False)
    return data


def load_sdf(
    path: str | os.PathLike[str],
    targets: str | os.PathLike[str] | None = None,
    *,
    skip_invalid: bool = False,
) -> Dataset:
    """Reads and validates the molecules of an SDF file into the E3 GNN's padded arrays.

    Each record is read by RDKit (sanitised, hydrogens kept), gets its missing hydrogens with
    coordinates, Gasteiger charges, MMFF94 bond / angle / torsion parameters and its non-bonded
    pairs, as the module docstring describes. A molecule's name is its title line (RDKit's
    ``_Name``, stripped), ``"mol<record>"`` when empty.

    Args:
      path: an ``.sdf`` or ``.sdf.gz`` file with 3D coordinates (the first conformer is used).
      targets: ``None`` (the Morgan count fingerprint, ``log1p``) or an HDF5 file holding, for
        every molecule name, a dataset of :data:`TARGET_DIM` finite numbers.
      skip_invalid: drop the molecules that cannot be used instead of raising.

    Returns:
      A :class:`jaxstab.plugin.Dataset` with arrays ``x``, ``pos``, ``atom_mask``, ``n_atoms``,
      ``bond_*``, ``angle_*``, ``torsion_*``, ``nb_*`` (``_index``, ``_attr``, ``_mask``) and
      ``target``, and meta ``names``, ``source``, ``n_molecules``, ``max_atoms``,
      ``target_dim``, ``target_source`` (``"morgan_count_r2_log1p"`` or ``"hdf5:<file
      name>"``), ``input_dim``, ``bond_attr_dim``, ``angle_attr_dim``, ``torsion_attr_dim``,
      ``nb_attr_dim``, ``skipped``, ``skipped_names``, ``feature_scales`` and ``warnings``.

    Raises:
      FileNotFoundError: ``path`` or ``targets`` does not exist.
      ValueError: a wrong suffix, an unreadable file, no molecules; or a record RDKit cannot
        parse, without atoms or 3D coordinates, with non-finite coordinates, a NaN Gasteiger
        charge, MMFF94 atom types missing, or a target missing, of the wrong length or
        non-finite. The message names the file, the record and the molecule's name. (RDKit
        itself rejects a V2000 record with a ``nan`` or ``inf`` coordinate, so that one is
        reported as unparsable, naming the atom; V3000 records are read and then checked.)
        With ``skip_invalid=True`` only when no molecule is left.

    Example:
      >>> import os, tempfile
      >>> from rdkit import Chem
      >>> from rdkit.Chem import AllChem
      >>> mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
      >>> AllChem.EmbedMolecule(mol, randomSeed=0)
      0
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = os.path.join(tmp, "ethanol.sdf")
      ...     with Chem.SDWriter(path) as writer:
      ...         writer.write(mol)
      ...     data = load_sdf(path)
      >>> data.arrays["x"].shape, data.arrays["bond_index"].shape, data.arrays["angle_index"].shape
      ((1, 9, 3), (1, 16, 2), (1, 13, 3))
      >>> data.meta["names"], sorted(set(data.arrays["torsion_attr"][0, :, 1].tolist()))
      (['mol0'], [1.0, 2.0, 3.0])
    """
    source = os.fspath(path)
    if not source.lower().endswith(SUFFIXES):
        raise ValueError(
            f"file {source!r} is not an SDF file; expected a name ending in .sdf or .sdf.gz"
        )
    raw = _read_bytes(source)
    table = _Targets(targets) if targets is not None else None
    try:
        return _load(source, raw, table, skip_invalid)
    finally:
        if table is not None:
            table.close()


def _read_bytes(source: str) -> bytes:
    if not os.path.exists(source):
        raise FileNotFoundError(f"file {source!r} does not exist")
    if os.path.isdir(source):
        raise ValueError(f"{source!r} is a directory, not an SDF file")
    try:
        if source.lower().endswith(".gz"):
            with gzip.open(source, "rb") as fh:
                return fh.read()
        with open(source, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"file {source!r} cannot be read ({type(e).__name__}: {e})") from e


class _Targets:
    """Target vectors by molecule name, from an HDF5 file of one dataset per name."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import h5py

        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"targets file {self.path!r} does not exist")
        if not h5py.is_hdf5(self.path):
            raise ValueError(f"targets file {self.path!r} is not an HDF5 file")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"targets file {self.path!r} cannot be read ({e})") from e
        self.source = f"hdf5:{os.path.basename(self.path)}"

    def close(self) -> None:
        self.file.close()

    def get(self, name: str) -> np.ndarray:
        import h5py

        where = f"targets file {self.path!r}"
        item = self.file.get(name) if name not in ("", "/") else None
        if not isinstance(item, h5py.Dataset):
            raise _Unusable(f"{where} has no dataset named {name!r}")
        value = np.asarray(item[()])
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_) or (
            np.issubdtype(value.dtype, np.complexfloating)
        ):
            raise _Unusable(f"{where}: dataset {name!r} holds {value.dtype}, not real numbers")
        if value.shape != (TARGET_DIM,):
            raise _Unusable(
                f"{where}: dataset {name!r} has shape {value.shape}; expected ({TARGET_DIM},)"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            cast = value.astype(np.float32)
        bad = ~np.isfinite(cast)
        if bad.any():
            j = int(np.argmax(bad))
            raise _Unusable(
                f"{where}: dataset {name!r} has a non-finite value at column {j} "
                f"({value[j]}, {cast[j]} in float32)"
            )
        return cast


def _split_records(raw: bytes) -> list[list[bytes]]:
    """The lines of each record, split the way RDKit's supplier does (at ``$$$$`` lines)."""
    records: list[list[bytes]] = []
    lines: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"$$$$"):
            records.append(lines)
            lines = []
        else:
            lines.append(line)
    records.append(lines)  # what follows the last "$$$$" (often nothing)
    return records


def _title(lines: list[bytes]) -> str:
    return lines[0].decode("utf-8", "replace").strip() if lines else ""


def _unparsable_reason(lines: list[bytes]) -> str:
    """Why RDKit rejected a record, where the text shows it: non-finite V2000 coordinates."""
    reason = "RDKit cannot parse the record"
    if len(lines) < 4 or not lines[3].rstrip().upper().endswith(b"V2000"):
        return reason
    try:
        n_atoms = int(lines[3][:3])
    except ValueError:
        return reason
    for a, line in enumerate(lines[4 : 4 + n_atoms]):
        for c in range(3):
            text = line[10 * c : 10 * c + 10].strip()
            try:
                value = float(text)
            except ValueError:
                continue
            if not math.isfinite(value):
                return f"{reason}: atom {a} has a non-finite coordinate ({text.decode()})"
    return reason


def _load(source: str, raw: bytes, table: _Targets | None, skip_invalid: bool) -> Dataset:
    texts = _split_records(raw)
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=MORGAN_RADIUS, fpSize=TARGET_DIM)
    supplier = Chem.ForwardSDMolSupplier(io.BytesIO(raw), removeHs=False, sanitize=True)
    wells: dict[tuple[int, int], tuple[float, float]] = {}
    molecules: list[_Molecule] = []
    names: list[str] = []
    problems: list[tuple[int, str, str]] = []  # (record, name, reason)
    n_records = 0
    for k, mol in enumerate(supplier):
        lines = texts[k] if k < len(texts) else []
        if mol is None and not any(line.strip() for line in lines):
            continue  # a blank stretch between or after records, not a molecule
        n_records += 1
        name = (
            mol.GetProp("_Name").strip()
            if mol is not None and mol.HasProp("_Name")
            else _title(lines)
        ) or f"mol{k}"
        try:
            if mol is None:
                raise _Unusable(_unparsable_reason(lines))
            item = _featurise(mol, generator, wells)
            if table is not None:
                item.target = table.get(name)
        except _Unusable as e:
            if not skip_invalid:
                raise ValueError(f"file {source!r}, record {k} ({name!r}): {e}") from None
            problems.append((k, name, str(e)))
            continue
        molecules.append(item)
        names.append(name)
    if n_records == 0:
        raise ValueError(f"file {source!r} holds no molecules")
    if not molecules:
        raise ValueError(
            f"file {source!r}: none of its {n_records} molecules can be used: {_listing(problems)}"
        )
    warnings = []
    if problems:
        warnings.append(
            f"skipped {len(problems)} molecule{'s' if len(problems) > 1 else ''} "
            f"that could not be used: {_listing(problems)}"
        )
    arrays = _stack(molecules)
    meta: dict[str, Any] = {
        "names": names,
        "source": source,
        "n_molecules": len(molecules),
        "max_atoms": int(arrays["x"].shape[1]),
        "target_dim": TARGET_DIM,
        "target_source": table.source if table is not None else "morgan_count_r2_log1p",
        "input_dim": 3,
        **{f"{term}_attr_dim": width for term, _, width in TERMS},
        "skipped": len(problems),
        "skipped_names": [name for _, name, _ in problems],
        "feature_scales": dict(FEATURE_SCALES),
        "warnings": warnings,
    }
    return Dataset(arrays=arrays, meta=meta)


def _listing(problems: Sequence[tuple[int, str, str]]) -> str:
    shown = "; ".join(f"record {k} ({name!r}): {why}" for k, name, why in problems[:_LISTED])
    more = len(problems) - _LISTED
    return shown if more <= 0 else f"{shown}; and {more} more"


def _featurise(
    mol: Chem.Mol, generator: Any, wells: dict[tuple[int, int], tuple[float, float]]
) -> _Molecule:
    """One molecule's arrays; raises :class:`_Unusable` saying what is wrong with it."""
    if mol.GetNumAtoms() == 0:
        raise _Unusable("the molecule has no atoms")
    if mol.GetNumConformers() == 0:
        raise _Unusable("the molecule has no conformer; 3D coordinates are needed")
    conf = mol.GetConformer()
    _check_coordinates(conf.GetPositions(), "")
    if not conf.Is3D() or not np.any(conf.GetPositions()[:, 2] != 0.0):
        raise _Unusable(
            "the coordinates are 2D (not flagged 3D, or every z is 0); 3D coordinates are needed"
        )
    counts = generator.GetCountFingerprintAsNumPy(Chem.RemoveHs(mol))
    target = np.log1p(counts.astype(np.float64)).astype(np.float32)

    mol = Chem.AddHs(mol, addCoords=True)
    n = mol.GetNumAtoms()
    pos = _check_coordinates(mol.GetConformer().GetPositions(), " after adding hydrogens")
    atoms = [mol.GetAtomWithIdx(i) for i in range(n)]  # faster than GetAtoms()
    rdPartialCharges.ComputeGasteigerCharges(mol)
    charge = np.array([a.GetDoubleProp("_GasteigerCharge") for a in atoms])
    nan = ~np.isfinite(charge)
    if nan.any():  # one atom without parameters spreads NaN to the atoms around it
        a = int(np.argmax(nan))
        elements = sorted({atoms[i].GetSymbol() for i in np.nonzero(nan)[0].tolist()})
        raise _Unusable(
            f"the Gasteiger charge is NaN at {int(nan.sum())} of {n} atoms (first: atom {a}, "
            f"{atoms[a].GetSymbol()}; elements: {', '.join(elements)}); RDKit lacks Gasteiger "
            "parameters for one of them"
        )
    props = AllChem.MMFFGetMoleculeProperties(mol)
    if props is None:
        elements = sorted({a.GetSymbol() for a in atoms})
        raise _Unusable(
            f"MMFF94 cannot assign atom types to the molecule (elements: {', '.join(elements)})"
        )
    z = np.array([a.GetAtomicNum() for a in atoms], np.float64)
    mass = np.array([a.GetMass() for a in atoms], np.float64)
    x = np.stack([charge / Q_SCALE, z / Z_SCALE, mass / MASS_SCALE], axis=1).astype(np.float32)
    pairs = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, j in pairs:
        neighbours[i].append(j)
        neighbours[j].append(i)
    for around in neighbours:
        around.sort()
    terms = {
        "bond": _bonds(mol, props, pairs),
        "angle": _angles(mol, props, neighbours),
        "torsion": _torsions(mol, props, pairs, neighbours),
        "nb": _nonbonded(mol, props, pos.astype(np.float64), wells),
    }
    return _Molecule(x=x, pos=pos, terms=terms, target=target)


def _check_coordinates(xyz: np.ndarray, when: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        cast = xyz.astype(np.float32)
    bad = ~np.isfinite(cast).all(axis=1)
    if bad.any():
        a = int(np.argmax(bad))
        raise _Unusable(
            f"atom {a} has non-finite coordinates{when} "
            f"({', '.join(str(v) for v in xyz[a])}; finite float32 needed)"
        )
    return cast


def _missing(kind: str, atoms: Sequence[int]) -> _Unusable:
    return _Unusable(f"MMFF94 has no {kind} parameters for atoms {'-'.join(map(str, atoms))}")


def _bonds(mol: Chem.Mol, props: Any, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, ...]:
    rows = []
    for i, j in pairs:
        params = props.GetMMFFBondStretchParams(mol, i, j)
        if params is None:
            raise _missing("bond-stretch", (i, j))
        rows.append(params)
    ends = np.asarray(pairs, np.int32).reshape(-1, 2)
    index = np.stack([ends, ends[:, ::-1]], axis=1).reshape(-1, 2)  # (i, j), (j, i), ...
    values = np.asarray(rows, np.float64).reshape(-1, 3)
    attr = np.stack([values[:, 2] / R0_SCALE, values[:, 1] / KB_SCALE], axis=1)
    return index, np.repeat(attr, 2, axis=0).astype(np.float32)


def _angles(mol: Chem.Mol, props: Any, neighbours: list[list[int]]) -> tuple[np.ndarray, ...]:
    index: list[tuple[int, int, int]] = []
    rows = []
    for j, around in enumerate(neighbours):
        for p, i in enumerate(around):
            for k in around[p + 1 :]:
                params = props.GetMMFFAngleBendParams(mol, i, j, k)
                if params is None:
                    raise _missing("angle-bend", (i, j, k))
                index.append((i, j, k))
                rows.append(params)
    values = np.asarray(rows, np.float64).reshape(-1, 3)
    attr = np.stack([np.radians(values[:, 2]), values[:, 1] / KA_SCALE], axis=1)
    return np.asarray(index, np.int32).reshape(-1, 3), attr.astype(np.float32)


def _torsions(
    mol: Chem.Mol, props: Any, pairs: list[tuple[int, int]], neighbours: list[list[int]]
) -> tuple[np.ndarray, ...]:
    index: list[tuple[int, int, int, int]] = []
    rows = []
    for j, k in pairs:
        for i in neighbours[j]:
            if i == k:
                continue
            for m in neighbours[k]:
                if m in (j, i):
                    continue
                params = props.GetMMFFTorsionParams(mol, i, j, k, m)
                if params is not None:  # None: no MMFF torsion (a linear centre)
                    index.append((i, j, k, m))
                    rows.append(params)
    v = np.asarray(rows, np.float64).reshape(-1, 4)[:, 1:]  # V1, V2, V3
    quad, term = np.nonzero(v != 0.0)  # row-major: each dihedral's terms in the order n = 1, 2, 3
    period = term + 1.0
    attr = np.stack(
        [v[quad, term] / 2.0 / TORSION_SCALE, period, np.where(period == 2.0, np.pi, 0.0)], axis=1
    )
    return np.asarray(index, np.int32).reshape(-1, 4)[quad], attr.astype(np.float32)


def _nonbonded(
    mol: Chem.Mol, props: Any, pos: np.ndarray, wells: dict[tuple[int, int], tuple[float, float]]
) -> tuple[np.ndarray, ...]:
    dist = np.sqrt(np.sum(np.square(pos[:, None, :] - pos[None, :, :]), axis=-1))
    hops = Chem.GetDistanceMatrix(mol)
    close = (dist < NB_CUTOFF) & (hops > 2)
    np.fill_diagonal(close, False)
    src, dst = np.nonzero(close)
    # MMFF's van der Waals well depends only on the two atoms' MMFF types: ``wells`` keeps the
    # scaled (ln A, ln B) of every ordered pair of types met so far in this load.
    types = np.array([props.GetMMFFAtomType(i) for i in range(mol.GetNumAtoms())], np.int64)
    key = types[src] * 1000 + types[dst]
    unique, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    coef = np.zeros((len(unique), 2))
    for u, p in enumerate(first.tolist()):
        i, j = int(src[p]), int(dst[p])
        pair = (int(types[i]), int(types[j]))
        if pair not in wells:
            params = props.GetMMFFVdWParams(i, j)
            if params is None:
                raise _missing("van der Waals", (i, j))
            r_star, eps = params[2], params[3]
            if not (r_star > 0 and eps > 0):
                raise _Unusable(
                    f"MMFF94 gives atoms {i}-{j} a van der Waals well with R* = {r_star} and "
                    f"epsilon = {eps}; both must be > 0"
                )
            log_r, log_eps = math.log(r_star), math.log(eps)
            wells[pair] = (
                (log_eps + 12.0 * log_r) / LJ_LOG_SCALE,  # ln(eps R*^12)
                (math.log(2.0) + log_eps + 6.0 * log_r) / LJ_LOG_SCALE,  # ln(2 eps R*^6)
            )
        coef[u] = wells[pair]
    index = np.stack([src, dst], axis=1).astype(np.int32)
    return index, coef[inverse.reshape(-1)].astype(np.float32)


def _stack(molecules: list[_Molecule]) -> dict[str, np.ndarray]:
    """Pads every molecule's arrays to the data set's maxima (at least 1) and stacks them."""
    m = len(molecules)
    sizes = np.array([len(item.x) for item in molecules], np.int32)
    width = int(sizes.max())
    x = np.zeros((m, width, 3), np.float32)
    pos = np.zeros((m, width, 3), np.float32)
    for r, item in enumerate(molecules):
        x[r, : sizes[r]] = item.x
        pos[r, : sizes[r]] = item.pos
    arrays: dict[str, np.ndarray] = {
        "x": x,
        "pos": pos,
        "atom_mask": np.arange(width)[None, :] < sizes[:, None],
        "n_atoms": sizes,
    }
    for term, n_index, n_attr in TERMS:
        counts = [len(item.terms[term][0]) for item in molecules]
        rows = max(1, *counts)
        index = np.zeros((m, rows, n_index), np.int32)
        attr = np.zeros((m, rows, n_attr), np.float32)
        mask = np.zeros((m, rows), bool)
        for r, item in enumerate(molecules):
            idx, val = item.terms[term]
            index[r, : len(idx)] = idx
            attr[r, : len(idx)] = val
            mask[r, : len(idx)] = True
        arrays[f"{term}_index"], arrays[f"{term}_attr"], arrays[f"{term}_mask"] = index, attr, mask
    arrays["target"] = np.stack([item.target for item in molecules]).astype(np.float32)
    return arrays
