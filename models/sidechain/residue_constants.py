"""Amino-acid facts for the side-chain model: residue types, atom14 slots and name aliases.

Residue types are indexed in AlphaFold's order ``ARNDCQEGHILKMFPSTWYV`` (0–19), with the
unknown type ``X`` at index :data:`UNKNOWN` (20). Each residue type has 14 atom slots
("atom14"): N, CA, C, O in slots 0–3, then the side chain in AlphaFold's order (CB in slot 4,
the rest outward), empty names ``""`` after the last atom. TRP is the only type with 14 atoms;
GLY has only the four backbone atoms. The unknown type keeps the backbone (slots 0–3), so that
an unknown residue still has a frame; AlphaFold itself lists no atoms for it.

Aliases met in files map onto these types before the atoms are placed:

- :data:`MODIFIED_RESIDUES`: common modified residues of the PDB and their parents (MSE →
  MET, SEP → SER, ...); the parent's atoms are read by name, extra atoms (phosphate, methyl
  groups on the side chain) are ignored;
- :data:`MD_RESIDUES`: protonation-state names of MD force fields (CHARMM HSD/HSE/HSP, AMBER
  HID/HIE/HIP, CYX, ASH, ...);
- :data:`RESIDUE_ATOM_RENAMES`: atom names that differ from the parent's in one residue (MSE's
  selenium ``SE`` → ``SD``, CHARMM's isoleucine ``CD`` → ``CD1``);
- :data:`ATOM_RENAMES` and :data:`IGNORED_ATOMS`: terminal oxygens of MD files (``OT1`` →
  ``O``; ``OT2`` and ``OXT`` are not in atom14).

Hydrogens and every other atom whose name is not one of the residue's atom14 names are ignored.

Example:
  >>> RESTYPES[3], RESTYPE_1TO3["D"], RESTYPE_ORDER["TRP"], UNKNOWN
  ('D', 'ASP', 17, 20)
  >>> ATOM14_NAMES["ARG"][:11]
  ('N', 'CA', 'C', 'O', 'CB', 'CG', 'CD', 'NE', 'CZ', 'NH1', 'NH2')
  >>> parent_residue("HSD"), parent_residue("MSE"), parent_residue("HOH")
  ('HIS', 'MET', None)
  >>> int(ATOM14_MASK.sum(axis=1)[RESTYPE_ORDER["GLY"]]), int(ATOM14_MASK[UNKNOWN].sum())
  (4, 4)
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ATOM14_INDEX",
    "ATOM14_MASK",
    "ATOM14_NAMES",
    "ATOM14_NAMES_BY_TYPE",
    "ATOM_RENAMES",
    "BACKBONE_ATOMS",
    "IGNORED_ATOMS",
    "MD_RESIDUES",
    "MODIFIED_RESIDUES",
    "NUM_ATOM14",
    "NUM_RESTYPES",
    "RESIDUE_ATOM_RENAMES",
    "RESTYPES",
    "RESTYPES_WITH_X",
    "RESTYPE_1TO3",
    "RESTYPE_3TO1",
    "RESTYPE_ORDER",
    "UNKNOWN",
    "WATERS",
    "parent_residue",
]

RESTYPES: tuple[str, ...] = tuple("ARNDCQEGHILKMFPSTWYV")  # AlphaFold's order
RESTYPES_WITH_X: tuple[str, ...] = (*RESTYPES, "X")
UNKNOWN = 20  # index of the unknown residue type X
NUM_RESTYPES = 21  # the 20 amino acids and X
NUM_ATOM14 = 14

RESTYPE_1TO3: dict[str, str] = {
    "A": "ALA",
    "R": "ARG",
    "N": "ASN",
    "D": "ASP",
    "C": "CYS",
    "Q": "GLN",
    "E": "GLU",
    "G": "GLY",
    "H": "HIS",
    "I": "ILE",
    "L": "LEU",
    "K": "LYS",
    "M": "MET",
    "F": "PHE",
    "P": "PRO",
    "S": "SER",
    "T": "THR",
    "W": "TRP",
    "Y": "TYR",
    "V": "VAL",
    "X": "UNK",
}
RESTYPE_3TO1: dict[str, str] = {three: one for one, three in RESTYPE_1TO3.items()}
# Three-letter code -> residue type index (UNK -> 20).
RESTYPE_ORDER: dict[str, int] = {RESTYPE_1TO3[one]: i for i, one in enumerate(RESTYPES_WITH_X)}

BACKBONE_ATOMS: tuple[str, ...] = ("N", "CA", "C", "O")

# The atoms of each residue type, backbone first, then the side chain outward from CB.
_SIDE_CHAINS: dict[str, tuple[str, ...]] = {
    "ALA": ("CB",),
    "ARG": ("CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"),
    "ASN": ("CB", "CG", "OD1", "ND2"),
    "ASP": ("CB", "CG", "OD1", "OD2"),
    "CYS": ("CB", "SG"),
    "GLN": ("CB", "CG", "CD", "OE1", "NE2"),
    "GLU": ("CB", "CG", "CD", "OE1", "OE2"),
    "GLY": (),
    "HIS": ("CB", "CG", "ND1", "CD2", "CE1", "NE2"),
    "ILE": ("CB", "CG1", "CG2", "CD1"),
    "LEU": ("CB", "CG", "CD1", "CD2"),
    "LYS": ("CB", "CG", "CD", "CE", "NZ"),
    "MET": ("CB", "CG", "SD", "CE"),
    "PHE": ("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"),
    "PRO": ("CB", "CG", "CD"),
    "SER": ("CB", "OG"),
    "THR": ("CB", "OG1", "CG2"),
    "TRP": ("CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"),
    "TYR": ("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"),
    "VAL": ("CB", "CG1", "CG2"),
    "UNK": (),
}


def _slots(side_chain: tuple[str, ...]) -> tuple[str, ...]:
    names = (*BACKBONE_ATOMS, *side_chain)
    return names + ("",) * (NUM_ATOM14 - len(names))


# Three-letter code -> the 14 slot names ("" for an empty slot).
ATOM14_NAMES: dict[str, tuple[str, ...]] = {
    name: _slots(side) for name, side in _SIDE_CHAINS.items()
}
# The same by residue type index: ATOM14_NAMES_BY_TYPE[aatype][slot].
ATOM14_NAMES_BY_TYPE: tuple[tuple[str, ...], ...] = tuple(
    ATOM14_NAMES[RESTYPE_1TO3[one]] for one in RESTYPES_WITH_X
)
# Three-letter code -> {atom name: slot}.
ATOM14_INDEX: dict[str, dict[str, int]] = {
    res: {atom: slot for slot, atom in enumerate(names) if atom}
    for res, names in ATOM14_NAMES.items()
}
# [21, 14] float32: 1 where the residue type has an atom in the slot.
ATOM14_MASK: np.ndarray = np.array(
    [[1.0 if atom else 0.0 for atom in names] for names in ATOM14_NAMES_BY_TYPE], np.float32
)
ATOM14_MASK.setflags(write=False)

# Modified residues of the PDB -> parent residue.
MODIFIED_RESIDUES: dict[str, str] = {
    "MSE": "MET",  # selenomethionine
    "SEC": "CYS",  # selenocysteine
    "CSO": "CYS",  # S-hydroxycysteine
    "CSD": "CYS",  # 3-sulfinoalanine
    "CME": "CYS",  # S,S-(2-hydroxyethyl)thiocysteine
    "OCS": "CYS",  # cysteine sulfonic acid
    "HYP": "PRO",  # 4-hydroxyproline
    "MLY": "LYS",  # N6,N6-dimethyllysine
    "M3L": "LYS",  # N6,N6,N6-trimethyllysine
    "ALY": "LYS",  # N6-acetyllysine
    "KCX": "LYS",  # N6-carboxylysine
    "SEP": "SER",  # phosphoserine
    "TPO": "THR",  # phosphothreonine
    "PTR": "TYR",  # phosphotyrosine
    "CGU": "GLU",  # gamma-carboxyglutamic acid
    "HIC": "HIS",  # 4-methylhistidine
}
# Residue names of MD force fields (protonation states) -> standard residue.
MD_RESIDUES: dict[str, str] = {
    "HSD": "HIS",  # CHARMM, proton on ND1
    "HSE": "HIS",  # CHARMM, proton on NE2
    "HSP": "HIS",  # CHARMM, both protonated
    "HID": "HIS",  # AMBER, proton on ND1
    "HIE": "HIS",  # AMBER, proton on NE2
    "HIP": "HIS",  # AMBER, both protonated
    "CYX": "CYS",  # AMBER, disulfide-bonded
    "CYM": "CYS",  # AMBER, deprotonated
    "ASH": "ASP",  # AMBER, protonated
    "GLH": "GLU",  # AMBER, protonated
    "LYN": "LYS",  # AMBER, neutral
}
# Atom renames inside one residue (keyed by the residue's name in the file).
RESIDUE_ATOM_RENAMES: dict[str, dict[str, str]] = {
    "MSE": {"SE": "SD"},
    "SEC": {"SE": "SG"},
    "ILE": {"CD": "CD1"},  # CHARMM
}
# Atom renames in any residue: the first terminal oxygen of MD files.
ATOM_RENAMES: dict[str, str] = {"OT1": "O", "OC1": "O"}
# Atoms with no atom14 slot that are named here for clarity (every unmatched name is ignored).
IGNORED_ATOMS: frozenset[str] = frozenset({"OXT", "OT2", "OC2"})
WATERS: frozenset[str] = frozenset({"HOH", "WAT", "H2O", "DOD", "TIP", "TIP3", "SOL"})


def parent_residue(name: str) -> str | None:
    """The standard three-letter code a residue name stands for, ``None`` if it is not known.

    Standard names (and ``UNK``) map to themselves; :data:`MODIFIED_RESIDUES` and
    :data:`MD_RESIDUES` to their parents.

    >>> parent_residue("ALA"), parent_residue("HIE"), parent_residue("SEP"), parent_residue("XYZ")
    ('ALA', 'HIS', 'SER', None)
    """
    key = name.strip().upper()
    if key in RESTYPE_ORDER:
        return key
    return MODIFIED_RESIDUES.get(key) or MD_RESIDUES.get(key)
