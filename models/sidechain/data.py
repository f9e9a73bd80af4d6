"""Protein chains for the side-chain model: a validated PDB / mmCIF loader.

:func:`load_pdb` reads structure files with gemmi and returns a
:class:`jaxstab.plugin.Dataset` with one example per protein chain of the first model. Every
array is padded along the residue axis to the longest chain (or to ``max_len``); padded entries
are zero and their masks are 0.

Per residue (``n`` chains, ``L`` residue slots):

- ``aatype`` ``[n, L]`` int32: residue type in AlphaFold's order ``ARNDCQEGHILKMFPSTWYV``
  (0–19), unknown amino acids 20 (see :mod:`residue_constants`);
- ``atom14_pos`` ``[n, L, 14, 3]`` float32: coordinates in Å of the atom14 slots
  (N, CA, C, O, then the side chain in AlphaFold's order);
- ``atom14_mask`` ``[n, L, 14]`` float32: 1 where the atom is in the file and its residue is
  usable (``residue_mask`` 1), 0 for missing atoms, empty slots and unusable residues (whose
  ``atom14_pos`` are 0 too);
- ``residue_mask`` ``[n, L]`` float32: 1 for residues with N, CA and C, 0 for residues lacking
  one of them and for padding;
- ``residue_index`` ``[n, L]`` int32: the residue number in the file (``auth_seq_id`` in
  mmCIF; insertion codes are dropped), for relative positions;
- ``chain_length`` ``[n]`` int32: residues of the chain, masked ones included (the chain
  fills slots ``0 .. chain_length - 1``).

Reading rules: a chain is a polymer chain with at least one amino-acid residue; waters,
ligands and other non-polymer residues are skipped. Residues are standard amino acids, the
aliases of :mod:`residue_constants` (modified residues such as MSE, MD names such as HSD) or
other amino acids gemmi knows (type 20, backbone atoms only). Alternative locations: per
residue the conformer with the highest summed occupancy is kept (the first on ties); an atom
without it takes its own highest-occupancy position. Hydrogens, ``OXT`` and other atoms without
an atom14 slot are ignored.

Crops (:mod:`jaxstab.models.sidechain.crop`): ``crop`` takes a random contiguous window of
``max_len`` residues per example (for training), ``center_crop`` the central window (for
evaluation). ``load_pdb(..., max_len=m)`` stores each longer chain as the same central
window, so it equals ``center_crop`` of the full load.

Everything is checked before anything is returned; a problem raises an error naming the file
(and the chain and residue where there is one). :func:`default_data` is the 50 DSSP test
chains of the MDAnalysisTests package, split into train and validation by chain.

Example:
  >>> data = default_data("all")
  >>> data.meta["n_chains"], data.arrays["atom14_pos"].shape[2:], data.arrays["aatype"].dtype
  (50, (14, 3), dtype('int32'))
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import os
import pathlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gemmi
import numpy as np

from jaxstab.models.sidechain import residue_constants as rc
from jaxstab.plugin import Dataset

__all__ = [
    "RESIDUE_FIELDS",
    "SPLITS",
    "SUFFIXES",
    "VAL_EVERY",
    "default_data",
    "dssp_paths",
    "load_pdb",
]

PDB_SUFFIXES = (".pdb", ".ent")
CIF_SUFFIXES = (".cif", ".mmcif")
SUFFIXES = tuple(s + gz for s in (*PDB_SUFFIXES, *CIF_SUFFIXES) for gz in ("", ".gz"))
# The arrays with a residue axis (axis 1).
RESIDUE_FIELDS = ("aatype", "atom14_pos", "atom14_mask", "residue_mask", "residue_index")
SPLITS = ("train", "val", "all")
VAL_EVERY = 5  # every 5th chain of the sorted names (positions 4, 9, ...) is validation
_LISTED = 5  # chains spelled out in a warning; the rest are counted
_FRAME_SLOTS = (0, 1, 2)  # N, CA, C: a residue without one of them is masked out


@dataclass
class _Chain:
    """One chain's unpadded arrays and what was found while reading it."""

    name: str
    source: str
    aatype: np.ndarray  # [r] int32
    pos: np.ndarray  # [r, 14, 3] float32
    atom_mask: np.ndarray  # [r, 14] float32
    residue_mask: np.ndarray  # [r] float32
    residue_index: np.ndarray  # [r] int32
    n_missing_atoms: int = 0
    unknown: Counter[str] = field(default_factory=Counter)  # residue name -> count (type 20)
    aliases: Counter[str] = field(default_factory=Counter)  # MSE, HSD, ... -> count

    @property
    def n_masked(self) -> int:
        return int(len(self.residue_mask) - self.residue_mask.sum())

    @property
    def sequence(self) -> str:
        return "".join(rc.RESTYPES_WITH_X[t] for t in self.aatype.tolist())


# ------------------------------------------------------------------------------ defaults
def dssp_paths() -> list[pathlib.Path]:
    """The 50 DSSP test chains of MDAnalysisTests (``data/dssp/<id><chain>.pdb.gz``), sorted.

    These are the files that come with a ``.dssp`` assignment, one chain of a different
    protein each. The folder's two other PDB files are left out: ``1mr1D_failing.pdb.gz`` is
    ``1mr1D`` with two atoms removed (it would put one chain in both splits) and
    ``wrong_hydrogens.pdb.gz`` is a two-residue fragment.

    >>> paths = dssp_paths()
    >>> len(paths), paths[0].name
    (50, '1ahsA.pdb.gz')
    """
    spec = importlib.util.find_spec("MDAnalysisTests")  # found without importing it (slow)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MDAnalysisTests package is not installed (pip install MDAnalysisTests)"
        )
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "dssp"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"folder {os.fspath(folder)!r} does not exist; it ships with the MDAnalysisTests "
            "package (pip install MDAnalysisTests)"
        )
    paths = sorted(
        p
        for p in folder.glob("*.pdb.gz")
        if (folder / p.name.replace(".pdb.gz", ".pdb.dssp")).is_file()
    )
    if not paths:
        raise FileNotFoundError(f"folder {os.fspath(folder)!r} holds no DSSP test chains")
    return paths


def default_data(split: str = "train") -> Dataset:
    """The DSSP chains (:func:`dssp_paths`) as :func:`load_pdb` loads them, split by chain.

    Rule: the chain names (``"<file stem>:<chain id>"``) are sorted and every
    :data:`VAL_EVERY`-th one (positions 4, 9, 14, ... of the sorted list) is validation, the
    rest training: 40 training and 10 validation chains of the 50. Rows keep the sorted order;
    all splits share the residue width of the longest of the 50 chains (173), so their shapes
    match. The files are read once per process (about 0.5 s); every call shares the same
    read-only arrays (copy before mutating them) and gets a fresh ``meta``.

    Args:
      split: ``"train"``, ``"val"`` or ``"all"``.

    >>> train, val = default_data("train"), default_data("val")
    >>> len(train), len(val), train.arrays["aatype"].shape[1] == val.arrays["aatype"].shape[1]
    (40, 10, True)
    >>> set(train.meta["names"]) & set(val.meta["names"])
    set()
    >>> default_data("train").arrays["atom14_pos"] is train.arrays["atom14_pos"]
    True
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    arrays, meta = _default_split(split)
    return Dataset(arrays=dict(arrays), meta=copy.deepcopy(meta))


@functools.lru_cache(maxsize=1)
def _default_chains() -> tuple[list[_Chain], list[str], int]:
    chains: list[_Chain] = []
    notes: list[str] = []
    for path in dssp_paths():
        found, said = _read_file(os.fspath(path))
        chains += found
        notes += said
    order = sorted(range(len(chains)), key=lambda k: chains[k].name)
    width = max(len(c.aatype) for c in chains)
    return [chains[k] for k in order], notes, width


@functools.lru_cache(maxsize=len(SPLITS))
def _default_split(split: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    chains, notes, width = _default_chains()
    is_val = [k % VAL_EVERY == VAL_EVERY - 1 for k in range(len(chains))]
    picked = [
        c for c, v in zip(chains, is_val, strict=True) if split == "all" or v == (split == "val")
    ]
    arrays = _stack(picked, width)
    for value in arrays.values():
        value.setflags(write=False)
    meta = _meta(picked, width, notes, None)
    meta["split"] = split
    meta["split_rule"] = (
        f"sorted chain names; positions {VAL_EVERY - 1}, {2 * VAL_EVERY - 1}, ... "
        f"(every {VAL_EVERY}th) are validation"
    )
    return arrays, meta


# ------------------------------------------------------------------------------- loading
def load_pdb(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    max_len: int | None = None,
) -> Dataset:
    """Reads and validates the protein chains of structure files into padded atom14 arrays.

    One example per protein chain of each file's first model, in file order, then chain
    order, as the module docstring describes.

    Args:
      paths: one file or a list of files: ``.pdb``, ``.ent``, ``.cif``, ``.mmcif``, each also
        gzipped (``.gz``).
      max_len: ``None`` pads to the longest chain. An int pads to exactly ``max_len``
        residues and stores each longer chain as its central window of ``max_len`` residues
        (residues ``(n - max_len) // 2`` onwards; the same window as :func:`center_crop`),
        listed in ``meta["cropped"]`` and ``meta["warnings"]``. For random training windows
        load the full chains and use :func:`crop` per batch instead.

    Returns:
      A :class:`jaxstab.plugin.Dataset` with arrays ``aatype``, ``atom14_pos``,
      ``atom14_mask``, ``residue_mask``, ``residue_index`` and ``chain_length``, and meta
      ``names`` (``"<file stem>:<chain id>"``; a blank chain id is replaced by the segment id,
      or ``_``), ``sources`` (the file of each chain), ``sequences`` (one letter per residue,
      ``X`` for type 20), ``n_chains``, ``max_len`` (the padded width), ``masked_residues``
      and ``missing_atoms`` (per chain: residues without N, CA or C; atoms absent from the
      other residues), their totals ``n_masked_residues`` and ``n_missing_atoms``,
      ``unknown_residues`` and ``aliases`` (residue name -> count, over all chains),
      ``cropped`` (names) and ``warnings`` (plain sentences).

    Raises:
      FileNotFoundError: a file does not exist.
      ValueError: no paths, a bad ``max_len``, an unsupported suffix, a directory, a file that
        cannot be read or parsed, a file with no amino-acid residue (or none with N, CA and
        C), or a non-finite coordinate (the message names the file, chain, residue and atom).

    Example:
      >>> import os, tempfile
      >>> lines = [
      ...     "ATOM      1  N   GLY A   7       0.000   1.458   0.000  1.00  0.00           N",
      ...     "ATOM      2  CA  GLY A   7       0.000   0.000   0.000  1.00  0.00           C",
      ...     "ATOM      3  C   GLY A   7       1.420   0.000   0.000  1.00  0.00           C",
      ...     "HETATM    4  O   HOH A 101       5.000   5.000   5.000  1.00  0.00           O",
      ... ]
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = os.path.join(tmp, "gly.pdb")
      ...     with open(path, "w") as fh:
      ...         _ = fh.write("\\n".join(lines) + "\\nEND\\n")
      ...     data = load_pdb(path)
      >>> data.meta["names"], data.arrays["atom14_mask"][0, 0].tolist()[:5]
      (['gly:A'], [1.0, 1.0, 1.0, 0.0, 0.0])
      >>> data.arrays["residue_index"].tolist(), data.meta["n_missing_atoms"]
      ([[7]], 1)
    """
    sources = _sources(paths)
    if max_len is not None and (
        isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1
    ):
        raise ValueError(f"max_len must be None or an int >= 1; got {max_len!r}")
    chains: list[_Chain] = []
    notes: list[str] = []
    for source in sources:
        found, said = _read_file(source)
        chains += found
        notes += said
    width = max(len(c.aatype) for c in chains) if max_len is None else max_len
    arrays = _stack(chains, width)
    return Dataset(arrays=arrays, meta=_meta(chains, width, notes, max_len))


def _sources(paths: Any) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        items = [paths]
    elif isinstance(paths, Sequence):
        items = list(paths)
    else:
        raise ValueError(f"paths must be a path or a list of paths; got {type(paths).__name__}")
    if not items:
        raise ValueError("paths is empty; give at least one structure file")
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"paths[{k}] is {type(item).__name__}, not a path")
        out.append(os.fspath(item))
    return out


def _stem(source: str) -> str:
    name = os.path.basename(source)
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[0]


def _parse(source: str) -> gemmi.Structure:
    """The file as a gemmi structure with entity types set up; errors name the file."""
    lower = source.lower()
    bare = lower[:-3] if lower.endswith(".gz") else lower
    if not bare.endswith((*PDB_SUFFIXES, *CIF_SUFFIXES)):
        raise ValueError(
            f"file {source!r} is not a supported structure file; expected a name ending in "
            f"{', '.join(SUFFIXES)}"
        )
    if not os.path.exists(source):
        raise FileNotFoundError(f"file {source!r} does not exist")
    if os.path.isdir(source):
        raise ValueError(f"{source!r} is a directory, not a structure file")
    try:
        if lower.endswith(".gz"):
            with gzip.open(source, "rb") as fh:
                raw = fh.read()
        else:
            with open(source, "rb") as fh:
                raw = fh.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"file {source!r} cannot be read ({type(e).__name__}: {e})") from e
    if b"\x00" in raw:
        raise ValueError(f"file {source!r} cannot be read: it holds binary data, not text")
    text = raw.decode("utf-8", errors="replace")
    kind = "PDB" if bare.endswith(PDB_SUFFIXES) else "mmCIF"
    try:
        if kind == "PDB":
            structure = gemmi.read_pdb_string(text)
        else:
            doc = gemmi.cif.read_string(text)
            if len(doc) == 0:
                raise ValueError("no data block")
            structure = gemmi.make_structure_from_block(doc[0])
        structure.setup_entities()
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"file {source!r} cannot be parsed as {kind} ({e})") from e
    return structure


def _read_file(source: str) -> tuple[list[_Chain], list[str]]:
    """The protein chains of one file and the file's own warnings."""
    structure = _parse(source)
    notes: list[str] = []
    if len(structure) == 0:
        raise ValueError(f"file {source!r} holds no models (no atoms)")
    if len(structure) > 1:
        notes.append(f"file {source!r} holds {len(structure)} models; only the first was read")
    stem = _stem(source)
    chains: list[_Chain] = []
    unusable: list[tuple[str, int]] = []
    seen: Counter[str] = Counter()
    n_amino = 0
    for chain in structure[0]:
        label = chain.name.strip()
        residues = [r for r in chain.first_conformer() if _residue_type(r) is not None]
        if not residues:
            continue
        n_amino += len(residues)
        if not label:
            label = residues[0].segment.strip() or "_"
        seen[label] += 1
        tag = label if seen[label] == 1 else f"{label}#{seen[label]}"
        item = _read_chain(source, chain.name, residues)
        item.name, item.source = f"{stem}:{tag}", source
        if item.residue_mask.any():
            chains.append(item)
        else:
            unusable.append((item.name, len(residues)))
    if n_amino == 0:
        raise ValueError(f"file {source!r} holds no amino-acid residues (model 1)")
    if not chains:
        raise ValueError(
            f"file {source!r}: none of its {n_amino} amino-acid residues has N, CA and C"
        )
    if unusable:
        shown = ", ".join(f"{name} ({n} residues)" for name, n in unusable)
        notes.append(
            f"skipped {_count(len(unusable), 'chain')} without a residue having N, CA and C: "
            f"{shown}"
        )
    return chains, notes


def _residue_type(residue: gemmi.Residue) -> tuple[int, str] | None:
    """(type index, standard name of its atom table) of an amino-acid residue, else None."""
    name = residue.name.strip().upper()
    kind = residue.entity_type
    if name in rc.WATERS or kind in (
        gemmi.EntityType.Water,
        gemmi.EntityType.NonPolymer,
        gemmi.EntityType.Branched,
    ):
        return None
    parent = rc.parent_residue(name)
    if parent is not None:
        return rc.RESTYPE_ORDER[parent], parent
    info = gemmi.find_tabulated_residue(name)
    if info is not None:
        return (rc.UNKNOWN, "UNK") if info.is_amino_acid() else None
    if kind == gemmi.EntityType.Polymer and {"N", "CA", "C"} <= {a.name.strip() for a in residue}:
        return rc.UNKNOWN, "UNK"  # a polymer residue gemmi does not know, with a backbone
    return None


def _pick_atoms(residue: gemmi.Residue) -> dict[str, gemmi.Atom]:
    """One atom per name: no altloc, else the residue's main conformer, else highest occupancy."""
    occupancy: dict[str, float] = {}
    for atom in residue:
        if atom.altloc != "\0":
            occupancy[atom.altloc] = occupancy.get(atom.altloc, 0.0) + atom.occ
    main = max(occupancy, key=occupancy.__getitem__) if occupancy else None  # first on ties
    picked: dict[str, gemmi.Atom] = {}
    rank: dict[str, tuple[int, float]] = {}
    for atom in residue:
        name = atom.name.strip().upper()
        score = (2 if atom.altloc == "\0" else 1 if atom.altloc == main else 0, atom.occ)
        if name not in picked or score > rank[name]:
            picked[name], rank[name] = atom, score
    return picked


def _non_finite(value: float) -> str:
    if np.isnan(value):  # gemmi also reads an mmCIF "Inf" or an unparsable number as NaN
        return "NaN (the file's value is not a finite number)"
    if np.isinf(value):
        return "infinite"
    return f"{value!r}, beyond float32"


def _read_chain(source: str, chain_id: str, residues: list[gemmi.Residue]) -> _Chain:
    r = len(residues)
    aatype = np.zeros(r, np.int32)
    mask = np.zeros((r, rc.NUM_ATOM14), np.float32)
    residue_index = np.zeros(r, np.int32)
    xyz: list[tuple[float, float, float]] = []  # every placed atom, in order
    where: list[tuple[int, int, gemmi.Atom]] = []  # (residue, slot, atom) of each
    unknown: Counter[str] = Counter()
    aliases: Counter[str] = Counter()
    for k, residue in enumerate(residues):
        restype = _residue_type(residue)
        assert restype is not None
        aatype[k], parent = restype
        file_name = residue.name.strip().upper()
        if aatype[k] == rc.UNKNOWN:
            unknown[file_name] += 1
        elif file_name != parent:
            aliases[file_name] += 1
        residue_index[k] = residue.seqid.num
        slots = rc.ATOM14_INDEX[parent]
        renames = rc.RESIDUE_ATOM_RENAMES.get(file_name, {})
        atoms = _pick_atoms(residue)
        placed: dict[int, gemmi.Atom] = {slots[n]: a for n, a in atoms.items() if n in slots}
        for n, a in atoms.items():  # renamed atoms fill only slots no atom has by name
            new = renames.get(n) or rc.ATOM_RENAMES.get(n)
            if new in slots and slots[new] not in placed:
                placed[slots[new]] = a
        for slot, atom in placed.items():
            xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
            where.append((k, slot, atom))
            mask[k, slot] = 1.0
    coords = np.array(xyz, np.float64).reshape(-1, 3)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = coords.astype(np.float32)
    bad = ~np.isfinite(cast)
    if bad.any():
        row, axis = (int(i[0]) for i in np.nonzero(bad))
        k, _, atom = where[row]
        seqid = residues[k].seqid
        raise ValueError(
            f"file {source!r} chain {chain_id.strip() or '_'} residue "
            f"{seqid.num}{seqid.icode.strip()} ({residues[k].name.strip()}): coordinate "
            f"{'xyz'[axis]} of {atom.name.strip()} is {_non_finite(float(coords[row, axis]))}"
        )
    pos = np.zeros((r, rc.NUM_ATOM14, 3), np.float32)
    if where:
        index = np.array([(k, slot) for k, slot, _ in where], np.int64)
        pos[index[:, 0], index[:, 1]] = cast
    usable = mask[:, list(_FRAME_SLOTS)].all(axis=1)
    pos[~usable] = 0.0
    mask[~usable] = 0.0
    missing = int((rc.ATOM14_MASK[aatype] - mask)[usable].sum())
    return _Chain(
        "",
        source,
        aatype,
        pos,
        mask,
        usable.astype(np.float32),
        residue_index,
        n_missing_atoms=missing,
        unknown=unknown,
        aliases=aliases,
    )


# ---------------------------------------------------------------------- padding and meta
def _stack(chains: list[_Chain], width: int) -> dict[str, np.ndarray]:
    n = len(chains)
    arrays = {
        "aatype": np.zeros((n, width), np.int32),
        "atom14_pos": np.zeros((n, width, rc.NUM_ATOM14, 3), np.float32),
        "atom14_mask": np.zeros((n, width, rc.NUM_ATOM14), np.float32),
        "residue_mask": np.zeros((n, width), np.float32),
        "residue_index": np.zeros((n, width), np.int32),
        "chain_length": np.zeros(n, np.int32),
    }
    for row, item in enumerate(chains):
        length = len(item.aatype)
        start = max(length - width, 0) // 2
        stop = start + min(length, width)
        for name, value in (
            ("aatype", item.aatype),
            ("atom14_pos", item.pos),
            ("atom14_mask", item.atom_mask),
            ("residue_mask", item.residue_mask),
            ("residue_index", item.residue_index),
        ):
            arrays[name][row, : stop - start] = value[start:stop]
        arrays["chain_length"][row] = stop - start
    return arrays


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _listing(counts: Sequence[tuple[str, Any]]) -> str:
    shown = ", ".join(f"{name} {n}" for name, n in counts[:_LISTED])
    more = len(counts) - _LISTED
    return shown if more <= 0 else f"{shown} and {more} more chains"


def _meta(
    chains: list[_Chain], width: int, notes: list[str], max_len: int | None
) -> dict[str, Any]:
    masked = [c.n_masked for c in chains]
    missing = [c.n_missing_atoms for c in chains]
    unknown: Counter[str] = sum((c.unknown for c in chains), Counter())
    aliases: Counter[str] = sum((c.aliases for c in chains), Counter())
    cropped = [c.name for c in chains if len(c.aatype) > width]
    warnings = list(notes)
    if sum(masked):
        listed = [(c.name, c.n_masked) for c in chains if c.n_masked]
        warnings.append(
            f"{_count(sum(masked), 'residue')} lacking N, CA or C "
            f"{'was' if sum(masked) == 1 else 'were'} masked out ({_listing(listed)})"
        )
    if sum(missing):
        listed = [(c.name, c.n_missing_atoms) for c in chains if c.n_missing_atoms]
        warnings.append(
            f"{_count(sum(missing), 'atom')} missing from residues with N, CA and C "
            f"{'is' if sum(missing) == 1 else 'are'} masked in atom14_mask ({_listing(listed)})"
        )
    if unknown:
        names = ", ".join(f"{name} {n}" for name, n in sorted(unknown.items()))
        warnings.append(
            f"{_count(sum(unknown.values()), 'residue')} of amino-acid types without an atom "
            f"table read as unknown (type {rc.UNKNOWN}, backbone atoms only): {names}"
        )
    if cropped:
        shown = ", ".join(cropped[:_LISTED])
        more = f" and {len(cropped) - _LISTED} more" if len(cropped) > _LISTED else ""
        warnings.append(
            f"{_count(len(cropped), 'chain')} longer than max_len={max_len} cut to the central "
            f"{max_len} residues: {shown}{more}"
        )
    return {
        "names": [c.name for c in chains],
        "sources": [c.source for c in chains],
        "sequences": [c.sequence for c in chains],
        "n_chains": len(chains),
        "max_len": width,
        "masked_residues": masked,
        "n_masked_residues": sum(masked),
        "missing_atoms": missing,
        "n_missing_atoms": sum(missing),
        "unknown_residues": dict(sorted(unknown.items())),
        "aliases": dict(sorted(aliases.items())),
        "cropped": cropped,
        "warnings": warnings,
    }
