"""Fidelity of the port ``jaxstab.models.sidechain`` to the ORIGINAL code (JoreyYan/pu's
``SideAtomsIGAModel``).

``python -m benchmarks.fidelity_sidechain --original PATH`` (or ``SIDECHAIN_ORIGINAL=PATH``),
PATH a checkout, an extracted copy or a bare clone of JoreyYan/pu (MIT licence). Its folders
``models``, ``data``, ``openfold``, ``chroma`` and ``configs`` are copied (from a bare clone:
``git archive``) unchanged to a temporary folder and imported from there under their own
top-level names (the original's imports are absolute: ``from models.IGA import ...``), with
that folder first on ``sys.path`` and this repository's ``models`` out of the way; every
module of the original is removed from ``sys.modules`` afterwards. Nothing of the original is
contained here; the commit run is recorded (``git rev-parse HEAD``, or the first line of
``PATH/COMMIT`` for an extracted copy).

What a user must install to run it besides the project's ``bench`` extra (PyTorch and
``omegaconf``, which reads the original's config): ``dm-tree``, ``biopython``, ``plyfile``,
``einops``, ``fair-esm``, ``scikit-learn``, ``deepspeed`` (PyPI names). Three imports of the
original cannot be satisfied here and get stand-ins that raise if anything of them is called
(the model never calls them):
``torch_scatter`` (a compiled extension with no wheel for current PyTorch; used by
``data/utils.py`` helpers), ``nglview`` (a Jupyter widget; ``chroma/data/protein.py``) and
``esm.esmfold.v1.trunk`` (fair-esm 2.0.0's module fails at import on Python >= 3.11, a dataclass
with a mutable default; ``RelativePosition`` is used only with ``use_esm``). ESM2 weights
cannot be downloaded here either: the original is built with its own ``use_esm: False``
(``configs/SH.yaml``), as the port's ``use_esm=False``.

The original is built from its ``configs/SH.yaml`` ``model`` section with the widths of
``SideChainConfig.small(SideChainConfig.original())`` (each field mapped, see
:func:`original_model_config`; c_z stays 128 and the sequence head keeps 3 residual blocks,
which the original fixes, and the side-chain head its 4 + 4 + 4 blocks: ``sidechain_blocks=4``),
then (unless ``--no-full``) at ``SideChainConfig.original()`` on one 12-residue chain.
Weights: the original's initialisation under ``torch.manual_seed(seed)`` (and
``np.random.seed``: OpenFold's truncated-normal init draws from NumPy), then every bias and
1-D parameter (norm affines, ``geo_scale``, ``geo_bias``) + N(0, 0.1²) and every weight
initialised to zero or near it + N(0, (0.1/√fan_in)²), so that every leaf matters. Its
``state_dict()`` is copied onto the port with :func:`name_map` (every parameter; Conv1d
weights transposed; its one buffer, Chroma's RBF centres, is computed by the port). Both in
eval mode.

Inputs: the central 20 residues of two validation chains of
:func:`jaxstab.models.sidechain.default_data`, the second cut to 14 residues and padded to 20;
every other real residue designed. The original's ``input_feats`` are built from the same
arrays as its ``data/datasets.py`` and ``data/interpolant.py`` (``noise_scheme
'Gaussianatoms'``) build them: ``atoms14_local_t`` (atom14 positions in the residue frames,
absent atoms 0, designed residues' atoms 4–13 set to 0), ``update_mask`` = designed residues,
``sidechain_atom_mask`` = ``update_mask`` over the 10 side-chain slots, ``res_mask``,
``diffuse_mask`` (the design flag the port's features see), ``res_idx`` the residue numbers
from 1 at the first real residue (``data/datasets.py``'s renumbering; its random training
offset, ``data/interpolant.py``, taken as 0; the port's node features with ``relpos="arange"``),
``chain_idx`` 1 on real residues, ``atom14_gt_exists``, ``rotmats_1`` / ``trans_1`` (the
port's :meth:`Rigid.from_three_points` frames; Chroma's ``FrameBuilder.inverse``, which the
original's dataset uses, is compared with them separately), no ``r3_t`` (t = 1).

Quantities (max relative error ``max|ours − original| / max|original|`` over real residues),
float32 (tolerance 1e-5) and float64 (1e-9). The original cannot run in float64 as it is
(OpenFold's ``Rotation`` / ``Rigid`` force float32, and a float32 rotation then meets float64
scales in the IGA, which raises; recorded as ``float64 as it is``): its float64 run widens
every explicit float32 cast of its code to float64 (:func:`widened_float32_casts`), and a
pre-hook on each Linear widens (and records) any float32 input left:

- sub-modules on the original's own inputs (hooks): ``node_feature_net``, ``edge_feature_net``,
  the fusions, each trunk block's IGA, sequence transformer, transitions and Gaussian update,
  the heads, and the input Gaussians;
- the port's own forward against the original's (its sub-modules' outputs recorded inside
  the jitted forward): ``feature_graph`` node / edge and ``sidechain_head`` (the port's
  ``backbone_graph="chroma"``, ``sidechain_encoder="conv"``; a port without them gets the
  original's outputs substituted, their parameters not compared), the fused node and edge
  embeddings, each block's node embedding and Gaussian, the outputs (side-chain atoms local
  and global Å on designed residues — the original zeroes the others through
  ``sidechain_atom_mask`` —, logits, final Gaussian), and the gradient of every parameter of
  ``f = Σ w·atoms_local·designed + Σ v·logits·real`` (fixed random ``w``, ``v``; the
  original's loss module is a stub at this commit), but those that are 0 in exact arithmetic
  (:data:`ZERO_BY_SYMMETRY`, shown against the largest gradient);
- the same forward again with the original's ``feature_graph`` outputs and input Gaussians
  substituted (:data:`SUBSTITUTED`: the planar-dihedral signs of the backbone graph, where the
  port's ``original()`` differs by design, and the Gaussian construction, where it differed
  until it took the original's ``sqrt(var + 1e-8)``), so that everything else is compared on
  equal inputs ("substituted" columns);
- facts of the original's pipeline measured on it alone (:func:`findings`): Chroma's frames
  against the port's, its node features with a random offset of ``res_idx``, its outputs
  with Chroma's frames, the input Gaussians' scaling_log, and whether it runs in float64 as it
  is.

Writes ``benchmarks/results/fidelity_sidechain-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import inspect
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fidelity_cfmvc import rel_err
from benchmarks.fidelity_e3gnn import original_commit as git_head
from benchmarks.fidelity_original import original_commit, torch_default_dtype

TOLERANCE, FLOAT64_TOLERANCE = 1e-5, 1e-9
FOLDERS = ("models", "data", "openfold", "chroma", "configs")
TOP_LEVEL = ("models", "data", "openfold", "chroma")
# Imports of the original that cannot be satisfied here: module → why (see the docstring).
STAND_INS = {
    "torch_scatter": "compiled extension without a wheel for this PyTorch (data/utils.py)",
    "nglview": "Jupyter widget (chroma/data/protein.py)",
    "esm.esmfold.v1.trunk": "fair-esm 2.0.0 fails at import on Python >= 3.11 (use_esm only)",
}
VAL_CHAINS, N_RES, SHORT = (1, 2), 20, 14
NM_TO_ANG = 10.0  # the trunk's nm → Å
# One draw of the original's training offset of the residue numbers (data/interpolant.py
# fbb_corrupt_batch: uniform in -50 … 50), for the findings; the comparison uses offset 0.
RES_IDX_OFFSET = 17
FULL_RES = 12
# Gradients that are 0 in exact arithmetic: the pair bias's bias and the Gaussian term's bias
# add the same number to every logit of a query's row, which the softmax ignores.
ZERO_BY_SYMMETRY = ("trunk.iga_*.linear_b.bias", "trunk.iga_*.geo_bias")
# Blocks of original() that may be substituted until the port has the original's versions:
# sub-module → (config field, the value that selects the original's block).
# The second scenario's substitutions: the backbone graph (planar dihedrals, a deviation by
# design) and the input Gaussians (module docstring), so that the rest is compared on equal
# inputs.
SUBSTITUTED = ("feature_graph", "input_gaussian")
ORIGINAL_BLOCKS = {
    "feature_graph": ("backbone_graph", "chroma"),
    "sidechain_head": ("sidechain_encoder", "conv"),
}
# The original's fixed SideAtomsFeatureHead settings (models/flow_model.py SideAtomsIGAModel:
# sidechain_conf.get(...) defaults, SH.yaml sets only ``hidden``); a port config field ending
# in one of these names is set to it (the port's ``sidechain_blocks``: every stack's count).
SIDECHAIN_HEAD_FIXED = {"sidechain_blocks": 4, "conv_blocks": 4, "mlp_blocks": 4, "fuse_blocks": 4}


# ------------------------------------------------------------------------ name map
def name_map(path: tuple) -> str:
    """The port's NNX parameter ``path`` → the original's state-dict key.

    The port's own rules (:func:`benchmarks.specs.sidechain_names.name_map`: NNX's
    ``Sequential.layers`` level dropped, ``seq_tfmr_<b>.<i>`` → ``seq_tfmr_<b>.layers.<i>``,
    ``in_proj`` → ``in_proj_weight`` / ``in_proj_bias``, ``kernel`` / ``scale`` →
    ``weight``), then two of the original's layout:

    - a residual MLP block's ``net`` is ``Linear, SiLU, Dropout, Linear, Dropout`` in the
      original (``models/shattetnion/ShDecoderSidechain.py`` ``MLPResBlock``), so the port's
      ``net`` layer 2 (``Linear, silu, Linear``) is the original's 3;
    - the backbone graph sits one level down, ``BackboneEncoderGNN.feature_graph``
      (``ProteinFeatureGraph``).

    Conv kernels (``[k, in, out]``) are transposed to Conv1d's ``[out, in, k]`` by
    :func:`to_port` / :func:`grads_to_state_dict`.

    >>> name_map(("logits_head", "mlp", "layers", 3, "net", "layers", 2, "kernel"))
    'logits_head.mlp.3.net.3.weight'
    >>> name_map(("feature_graph", "edge_linears", 1, "bias"))
    'feature_graph.feature_graph.edge_linears.1.bias'
    >>> name_map(("trunk", "seq_tfmr_0", 0, "self_attn", "in_proj", "kernel"))
    'trunk.seq_tfmr_0.layers.0.self_attn.in_proj_weight'
    >>> name_map(("sidechain_head", "branchA_blocks", 2, "gn", "scale"))
    'sidechain_head.branchA_blocks.2.gn.weight'
    """
    from benchmarks.specs.sidechain_names import name_map as port_names

    parts = port_names(path).split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "net" and parts[i + 1] == "2":
            parts[i + 1] = "3"
    if parts[0] == "feature_graph" and parts[1] != "feature_graph":
        parts.insert(0, "feature_graph")
    return ".".join(parts)


def _conv_paths(model: Any) -> set[tuple]:
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(p) for p, v in flat if p[-1] == "kernel" and v.get_value().ndim == 3}


def _params(model: Any, skip: Iterable[str] = ()) -> Any:
    from flax import nnx

    skip = set(skip)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return nnx.from_flat_state([(tuple(p), v) for p, v in flat if p[0] not in skip])


def to_port(
    state_dict: Mapping[str, Any],
    model: Any,
    names: Callable[[tuple], str] = name_map,
    *,
    skip: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> list[str]:
    """Copies ``state_dict`` onto ``model`` (in place) with ``names``; returns the keys not
    used (those under ``skip``, the port's top-level groups left out, and the ``optional``
    ones, buffers the port computes). Every other key must be used and every other parameter
    set (:func:`benchmarks.convert.state_dict_to_nnx` checks names and shapes)."""
    from flax import nnx

    from benchmarks.convert import state_dict_to_nnx

    skip = tuple(skip)
    conv = _conv_paths(model)
    sd = {
        k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in state_dict.items()
    }
    left = sorted(k for k in sd if k.split(".")[0] in skip or k in set(optional))
    sd = {k: v for k, v in sd.items() if k not in set(left)}
    for path in conv:
        if path[0] not in skip:
            key = names(path)
            sd[key] = np.transpose(sd[key], (2, 1, 0))
    state = state_dict_to_nnx(
        sd, _params(model, skip), names, transpose=lambda p: p[-1] == "kernel" and p not in conv
    )
    nnx.update(model, state)
    return left


def grads_to_state_dict(
    grads: Any, model: Any, names: Callable[[tuple], str] = name_map, skip: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """The port's gradients (an ``nnx.State`` of the model's parameters) by the reference's
    state-dict keys, in PyTorch's layout."""
    from flax import nnx

    from benchmarks.convert import nnx_to_state_dict

    conv = _conv_paths(model)
    skip = set(skip)
    flat = [(tuple(p), v) for p, v in nnx.to_flat_state(grads) if p[0] not in skip]
    out = nnx_to_state_dict(
        nnx.from_flat_state(flat), names, transpose=lambda p: p[-1] == "kernel" and p not in conv
    )
    for path in conv:
        if path[0] not in skip:
            out[names(path)] = np.transpose(out[names(path)], (2, 1, 0))
    return out


# ------------------------------------------------------------------------ the original
def _is_bare(path: Path) -> bool:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--is-bare-repository"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "true"


def commit_of(path: str | os.PathLike[str]) -> str | None:
    """The commit of the original at ``path``: ``HEAD`` of a bare clone, else
    :func:`benchmarks.fidelity_original.original_commit` (a checkout's top or ``COMMIT``)."""
    return git_head(path) if _is_bare(Path(path)) else original_commit(path)


def _stand_in(name: str, why: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__doc__ = f"stand-in for {name}: {why}"

    def attr(key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{name}.{key} called: {name} is a stand-in ({why})")

        return unavailable

    module.__getattr__ = attr  # type: ignore[method-assign]
    return module


def _shadows(entry: str) -> bool:
    # Whether the sys.path entry holds a package or module named like the original's folders.
    base = Path(entry or ".")
    return any((base / n).is_dir() or (base / f"{n}.py").is_file() for n in TOP_LEVEL)


def _ours(name: str) -> bool:
    return name.split(".")[0] in TOP_LEVEL


@contextlib.contextmanager
def import_original(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The original's modules, imported from a temporary copy of ``path`` (module docstring):
    ``{"flow_model", "rigid_utils", "backbone", "root", "stand_ins"}``."""
    root = Path(path)
    saved_path = list(sys.path)
    saved = {k: sys.modules.pop(k) for k in [m for m in sys.modules if _ours(m)]}
    added: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if (root / "models" / "flow_model.py").exists():
                for folder in FOLDERS:
                    shutil.copytree(root / folder, Path(tmp) / folder)
            else:
                archive = subprocess.run(
                    ["git", "-C", str(root), "archive", "HEAD", *FOLDERS],
                    capture_output=True,
                    check=True,
                ).stdout
                subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            for name, why in STAND_INS.items():
                try:
                    importlib.import_module(name)
                except Exception:  # any failure to import gets the stand-in
                    sys.modules[name] = _stand_in(name, why)
                    added.append(name)
            # The original's folders are namespace packages: a regular package of the same
            # name further down sys.path (this repository's models/) would win, so those
            # entries are left out while the original is imported.
            sys.path[:] = [tmp] + [p for p in saved_path if not _shadows(p)]
            mods = {
                "flow_model": importlib.import_module("models.flow_model"),
                "rigid_utils": importlib.import_module("openfold.utils.rigid_utils"),
                "backbone": importlib.import_module("chroma.layers.structure.backbone"),
                "root": Path(tmp),
                "stand_ins": added,
            }
            sys.path[:] = [tmp, *saved_path]
            yield mods
        finally:
            sys.path[:] = saved_path
            for name in [m for m in sys.modules if _ours(m)] + added:
                sys.modules.pop(name, None)
            sys.modules.update(saved)


def original_model_config(config: Any, sh_yaml: str | os.PathLike[str]) -> Any:
    """The original's ``model`` config (an OmegaConf ``DictConfig``): ``configs/SH.yaml``'s
    ``model`` section with the port ``config``'s widths. Raises ``ValueError`` when
    ``config`` asks for something the original fixes (module docstring)."""
    from omegaconf import OmegaConf

    fixed = {
        "c_z": 128,  # BackboneEncoderGNN(dim_nodes=c_s) keeps dim_edges=128, edge_graph_ln(c_z)
        "seq_head_layers": 3,  # SequenceHead(c_s, c_s, num_classes=21): num_layers=3
        "thickness": (2.5, 0.5),  # forward: torch.where(is_masked, 2.5, 0.5)
        "gaussian_atoms": "all",  # forward(sideonly=False): from_rigid_and_all_atoms
        "relpos": "arange",  # EdgeFeatureNet: torch.arange(num_res)
        "embed_aatype": False,
        "per_atom_gaussians": False,
        "log_scale_clip": "hard",  # compose_update_12D: clamp(-6, 3)
        "use_esm": False,
    }
    for field, value in fixed.items():
        if getattr(config, field) != value:
            raise ValueError(
                f"the original fixes {field} = {value!r}; config has {getattr(config, field)!r}"
            )
    root = OmegaConf.load(sh_yaml)
    m = root.model
    # Switches of the original that the port does not have: they must be its fixed function.
    switches = {
        ("node_features", "embed_chain"): False,  # no chain embedding in the node features
        ("edge_features", "embed_chain"): False,
        ("edge_features", "embed_diffuse_mask"): True,  # the design flags' pair feature
    }
    for (group, key), value in switches.items():
        found = m.get(group, {}).get(key, value)
        if found != value:
            raise ValueError(f"{sh_yaml}: model.{group}.{key} = {found}; the port fixes {value}")
    head = dict(m.get("sidechain_atoms", {}))
    for key, value in {"A": 10, "conv_groups": 1, **SIDECHAIN_HEAD_FIXED}.items():
        if head.get(key, value) != value:
            raise ValueError(
                f"{sh_yaml}: model.sidechain_atoms.{key} = {head[key]}; the port fixes {value}"
            )
    m.use_esm = False
    m.node_embed_size, m.edge_embed_size = config.c_s, config.c_z
    m.node_features.c_pos_emb = config.c_pos_emb
    m.node_features.c_timestep_emb = config.c_timestep_emb
    m.edge_features.feat_dim = config.edge_feat_dim
    m.edge_features.num_bins = config.num_bins
    ipa = m.ipa
    ipa.c_hidden, ipa.no_heads = config.c_hidden, config.n_heads
    ipa.no_qk_points, ipa.no_v_points = config.n_qk_gaussians, config.n_v_points
    ipa.seq_tfmr_num_heads, ipa.seq_tfmr_num_layers = config.seq_heads, config.seq_layers
    ipa.num_blocks = config.n_blocks
    m.sidechain_atoms.hidden = config.sidechain_hidden
    OmegaConf.resolve(root)
    return root.model


def compare_config(base: Any, *, small: bool) -> Any:
    """The port config compared: ``small(base)`` (or ``base``) with the original's fixed
    sizes (c_z 128, 3 sequence-head blocks, the side-chain head's 4 + 4 + 4 blocks:
    :data:`SIDECHAIN_HEAD_FIXED`)."""
    from jaxstab.models.sidechain import SideChainConfig

    config = SideChainConfig.small(base) if small else base
    changes: dict[str, Any] = {"c_z": 128, "seq_head_layers": 3}
    for field in config.field_names():
        for suffix, value in SIDECHAIN_HEAD_FIXED.items():
            if field.endswith(suffix):
                changes[field] = value
    return config.replace(**changes)


def perturb(model: Any, seed: int) -> None:
    """Every bias and 1-D parameter + N(0, 0.1²); every weight whose entries are all below
    1e-3 in size (zero or near-zero initialisation) + N(0, (0.1/√fan_in)²). In place."""
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if name.endswith("bias") or p.ndim == 1:
                p.add_(0.1 * noise)
            elif float(p.abs().max()) < 1e-3:
                fan_in = math.prod(p.shape[1:])
                p.add_(0.1 / math.sqrt(fan_in) * noise)


def _renumbered(residue_index: Any, res: np.ndarray) -> np.ndarray:
    """Residue numbers from 1 at each example's first real residue (``data/datasets.py``'s
    renumbering of a chain; the original's random offset taken as 0), gaps kept."""
    idx = np.asarray(residue_index).astype(np.int64)
    first = np.where(res, idx, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
    return np.where(res, idx - first + 1, 0)


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


@contextlib.contextmanager
def widened_float32_casts() -> Iterator[list[str]]:
    """The original's explicit float32 casts made float64 for the block: ``torch.float32`` in
    every module of the original that uses ``torch`` (``torch`` replaced by a proxy,
    :func:`benchmarks.fidelity_original.patched_torch`), and ``Tensor.float()`` (torch's default
    dtype instead). Yields the modules patched.

    Without it the original cannot run in float64: OpenFold's ``Rotation`` and ``Rigid`` cast
    rotations, quaternions and translations to float32 ("Force full-precision",
    ``openfold/utils/rigid_utils.py``), and the IGA's covariance then multiplies a float32
    rotation by float64 scales (``data/GaussianRigid.py`` ``get_covariance_with_delta``),
    which raises; Chroma's chain-distance features, the time embedding
    (``models/utils.py`` ``get_time_embedding``) and the edge features' node pairs
    (``models/edge_feature_net.py`` ``_cross_concat(...).float()``) are float32 too."""
    import torch

    from benchmarks.fidelity_original import patched_torch

    names = sorted(
        n for n, m in sys.modules.items() if _ours(n) and getattr(m, "torch", None) is torch
    )
    saved = torch.Tensor.float

    def widened(self, memory_format=torch.preserve_format):
        return self.to(torch.get_default_dtype(), memory_format=memory_format)

    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(patched_torch(sys.modules[name], float32=torch.float64))
        torch.Tensor.float = widened
        try:
            yield names
        finally:
            torch.Tensor.float = saved


def _widen_linear_inputs(model: Any) -> set[str]:
    """Forward pre-hooks on every ``nn.Linear`` of a float64 ``model`` that widen a float32
    input to float64; returns the (filled as it runs) set of the Linears that got one.

    Chroma's ``EdgeDistanceChain`` builds its features as float32 whatever the input
    (``chroma/layers/structure/protein_graph.py``: ``.type(torch.float32)``), which a float64
    Linear refuses; widening keeps the original's float32-rounded values."""
    import torch

    seen: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def widen(m, args, name=name):
                out = []
                for a in args:
                    if torch.is_tensor(a) and a.is_floating_point() and a.dtype != m.weight.dtype:
                        seen.add(name)
                        a = a.to(m.weight.dtype)
                    out.append(a)
                return tuple(out)

            mod.register_forward_pre_hook(widen)
    return seen


class OriginalSide:
    """The original ``SideAtomsIGAModel`` as the benchmark's reference (see
    :func:`compare`): inputs built as its data pipeline builds them, its outputs and
    Gaussians as NumPy-ready tensors."""

    name = "original SideAtomsIGAModel"

    def __init__(self, mods: Mapping[str, Any], model: Any, dtype: Any = None) -> None:
        import torch

        self.mods, self.model = mods, model
        self.dtype = torch.float32 if dtype is None else dtype
        self.float32_inputs: set[str] = set()  # float64 copies: Linears given float32 input
        self.widen = True  # float64: the original's float32 casts widened

    def as_float64(self, build: Callable[[], Any]) -> OriginalSide:
        """A float64 model built fresh under float64 (its buffers computed in float64), with
        this model's parameters."""
        import torch

        with torch_default_dtype(torch.float64):
            model = build()
        params = {k: v.double() for k, v in self.model.named_parameters()}
        missing, unexpected = model.load_state_dict(params, strict=False)
        buffers = {k for k, _ in model.named_buffers()}
        if set(missing) != buffers or unexpected:
            raise RuntimeError(f"float64 copy: missing {missing}, unexpected {unexpected}")
        side = OriginalSide(self.mods, model.eval(), torch.float64)
        side.float32_inputs = _widen_linear_inputs(model)
        return side

    def _t(self, a: Any, dtype: Any = None) -> Any:
        import torch

        a = np.asarray(a)
        if dtype is None and np.issubdtype(a.dtype, np.floating):
            dtype = self.dtype
        return torch.tensor(a, dtype=dtype)

    def inputs(
        self,
        arrays: Mapping[str, np.ndarray],
        design: np.ndarray,
        rot: np.ndarray,
        trans: np.ndarray,
    ) -> dict[str, Any]:
        """``input_feats`` (module docstring) for the port's ``arrays`` and frames."""
        with self.running():
            return self._inputs(arrays, design, rot, trans)

    def _inputs(self, arrays: Any, design: Any, rot: Any, trans: Any) -> dict[str, Any]:
        import torch

        ru = self.mods["rigid_utils"]
        res = np.asarray(arrays["residue_mask"]) > 0
        des = np.asarray(design) & res
        exists = (np.asarray(arrays["atom14_mask"]) > 0) & res[..., None]
        rot_t, trans_t = self._t(rot), self._t(trans)
        rigid = ru.Rigid(ru.Rotation(rot_mats=rot_t), trans_t)
        pos = self._t(arrays["atom14_pos"])
        ex = self._t(exists.astype(np.float64))
        local = rigid.unsqueeze(-1).invert_apply(pos) * ex[..., None]
        d = torch.tensor(des)
        local[..., 4:, :] = torch.where(
            d[..., None, None], torch.zeros_like(local[..., 4:, :]), local[..., 4:, :]
        )
        b, n = res.shape
        return {
            "res_mask": self._t(res.astype(np.float64)),
            "diffuse_mask": self._t(des.astype(np.float64)),
            "res_idx": torch.tensor(_renumbered(arrays["residue_index"], res)),
            "chain_idx": torch.tensor(res.astype(np.int64)),
            "rotmats_1": rot_t,
            "trans_1": trans_t,
            "atoms14_local_t": local,
            "atom14_gt_exists": ex,
            "update_mask": d,
            "sidechain_atom_mask": d[..., None].expand(b, n, 10).clone(),
            "aatype": torch.tensor(np.asarray(arrays["aatype"]).astype(np.int64)),
        }

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """torch's default dtype set to this side's; in float64 (unless ``widen`` is off) the
        original's float32 casts widened (:func:`widened_float32_casts`)."""
        import torch

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch_default_dtype(self.dtype))
            if self.dtype == torch.float64 and self.widen:
                stack.enter_context(widened_float32_casts())
            yield

    def forward(self, feats: Mapping[str, Any]) -> dict[str, Any]:
        with self.running():
            return self.model(dict(feats))

    def outputs(self, out: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "local": out["pred_atoms"],
            "global": out["pred_atoms_global"],
            "logits": out["logits"],
            "gaussian": self.gaussian(out["final_gaussian"]),
        }

    @staticmethod
    def gaussian(g: Any) -> dict[str, Any]:
        return {
            "rotation": g.get_rots().get_rot_mats(),
            "translation": g.get_trans(),
            "local_mean": g._local_mean,
            "scaling_log": g._scaling_log,
        }

    @staticmethod
    def feature_graph(out: Any) -> tuple[Any, Any]:
        return out[0], out[1]

    @staticmethod
    def sidechain_features(out: Any) -> Any:
        return out[1]

    def chroma_frames(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Chroma's ``FrameBuilder().inverse`` frames of N, CA, C, O (``data/datasets.py``)."""
        import torch

        x = self._t(np.asarray(arrays["atom14_pos"])[..., :4, :])
        c = torch.tensor((np.asarray(arrays["residue_mask"]) > 0).astype(np.int64))
        with self.running():
            rot, trans, _ = self.mods["backbone"].FrameBuilder().inverse(x, c)
        return _np(rot), _np(trans)


# ------------------------------------------------------------------------ inputs
def make_inputs(
    n_res: int = N_RES, short: int | None = SHORT, chains: tuple[int, ...] = VAL_CHAINS
) -> dict[str, np.ndarray]:
    """The compared batch (module docstring): central windows of validation ``chains``; the
    last one cut to ``short`` residues and zero-padded to ``n_res``; ``design_mask`` every
    other real residue."""
    from jaxstab.models.sidechain import center_crop, default_data

    val = default_data("val").arrays
    rows = []
    for i, idx in enumerate(chains):
        one = {k: np.asarray(v)[idx : idx + 1] for k, v in val.items()}
        length = short if (short is not None and i == len(chains) - 1) else n_res
        crop = {k: np.asarray(v) for k, v in center_crop(one, length).items()}
        rows.append(
            {
                k: (
                    np.pad(v, [(0, 0), (0, n_res - length)] + [(0, 0)] * (v.ndim - 2))
                    if v.ndim >= 2 and v.shape[1] == length
                    else v
                )
                for k, v in crop.items()
            }
        )
    arrays = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    arrays["atom14_pos"] = arrays["atom14_pos"].astype(np.float64)
    res = arrays["residue_mask"] > 0
    design = np.zeros(res.shape, bool)
    design[:, ::2] = True
    arrays["design_mask"] = design & res
    return arrays


def functional_weights(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed random functional's weights: atoms ``[b, L, 10, 3]``, logits ``[b, L, 21]``."""
    rng = np.random.default_rng(1000 + seed)
    return rng.normal(size=(*shape, 10, 3)), rng.normal(size=(*shape, 21))


def port_frames(arrays: Mapping[str, np.ndarray], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """The port's frames (:func:`jaxstab.models.sidechain.features.input_geometry`)."""
    import jax
    import jax.numpy as jnp

    from jaxstab.models.sidechain import SideChainConfig
    from jaxstab.models.sidechain.features import input_geometry

    batch = {
        k: jnp.asarray(v, dtype) if k == "atom14_pos" else jnp.asarray(v) for k, v in arrays.items()
    }
    rigid = jax.jit(lambda b: input_geometry(b, SideChainConfig.original())[0])(batch)
    return np.asarray(rigid.rotation), np.asarray(rigid.translation)


# ------------------------------------------------------------------------ the port's side
_MISSING = object()


@contextlib.contextmanager
def intercept(
    model: Any, record: Iterable[str], replace: Mapping[str, Any] | None = None
) -> Iterator[dict[str, tuple[tuple, Any]]]:
    """Records ``(args, output)`` of the sub-modules at the dotted paths ``record`` and makes
    those at the paths of ``replace`` return the given values, for calls of ``model``'s own
    sub-module objects inside the block (their classes' ``__call__`` wrapped, then restored).
    Use it inside a transformed function on the model object that function sees."""
    from flax import nnx

    record, replace = set(record), dict(replace or {})
    names = {id(m): ".".join(map(str, p)) for p, m in nnx.iter_modules(model)}
    wanted = record | set(replace)
    classes = {type(m) for p, m in nnx.iter_modules(model) if ".".join(map(str, p)) in wanted}
    missing = wanted - set(names.values())
    if missing:
        raise KeyError(f"the port has no sub-modules {sorted(missing)}")
    calls: dict[str, tuple[tuple, Any]] = {}
    saved = {}
    for cls in classes:
        saved[cls] = cls.__dict__.get("__call__", _MISSING)
        inner = cls.__call__

        def wrapper(self, *args, _inner=inner, **kwargs):
            name = names.get(id(self))
            out = replace[name] if name in replace else _inner(self, *args, **kwargs)
            if name in record:
                calls[name] = (args, out)
            return out

        cls.__call__ = wrapper
    try:
        yield calls
    finally:
        for cls, fn in saved.items():
            if fn is _MISSING:
                del cls.__call__
            else:
                cls.__call__ = fn


def _records(n_blocks: int) -> tuple[str, ...]:
    names = [
        "node_feature_net",
        "edge_feature_net",
        "feature_graph",
        "sidechain_head",
        "feature_fusion",
        "edge_feature_fusion",
        "trunk.iga_0",
    ]
    for b in range(n_blocks):
        names += [f"trunk.node_transition_{b}", f"trunk.Gau_update_{b}"]
    return tuple(names)


def _gaussian_dict(g: Any) -> dict[str, Any]:
    return {
        "rotation": g.rigid.rotation,
        "translation": g.rigid.translation,
        "local_mean": g.local_mean,
        "scaling_log": g.scaling_log,
    }


def _port_functional(std: Mapping[str, Any], batch: Mapping[str, Any], w: Any, v: Any) -> Any:
    import jax.numpy as jnp

    res = jnp.asarray(batch["residue_mask"]) > 0
    des = (jnp.asarray(batch["design_mask"]) > 0) & res
    dtype = std["local"].dtype
    return jnp.sum(w * std["local"] * des.astype(dtype)[..., None, None]) + jnp.sum(
        v * std["logits"] * res.astype(dtype)[..., None]
    )


@contextlib.contextmanager
def _input_gaussians(values: Mapping[str, Any] | None) -> Iterator[None]:
    """The port model's input Gaussians (``model.input_geometry``'s, Å) replaced by
    ``values`` (``rotation``, ``translation``, ``local_mean``, ``scaling_log``) for the block."""
    if values is None:
        yield
        return
    from jaxstab.models.sidechain import model as model_module
    from jaxstab.models.sidechain.geometry import OffsetGaussianRigid, Rigid

    saved = model_module.input_geometry

    def replaced(batch, config):
        rigid, _, pos, res, designed = saved(batch, config)
        g = OffsetGaussianRigid(
            Rigid(values["rotation"], values["translation"]),
            values["local_mean"],
            values["scaling_log"],
        )
        return rigid, g, pos, res, designed

    model_module.input_geometry = replaced
    try:
        yield
    finally:
        model_module.input_geometry = saved


def _port_pass(model: Any, batch: Any, w: Any, v: Any, replace: Any, record: tuple) -> Any:
    from flax import nnx

    replace = dict(replace)
    gaussians = replace.pop("input_gaussian", None)

    def f(m):
        with intercept(m, record, replace) as rec, _input_gaussians(gaussians):
            out = m(batch)
        std = {
            "local": out["sidechain_local"],
            "global": out["atom14_pos"][..., 4:14, :],
            "logits": out["aatype_logits"],
            "gaussian": _gaussian_dict(out["gaussian"]),
        }
        kept = {k: o for k, (_, o) in rec.items()}
        kept["input_gaussian"] = _gaussian_dict(rec["trunk.iga_0"][0][2])
        # The residue indices the port's feature nets were given (for their isolated calls).
        kept["node_index"] = rec["node_feature_net"][0][0]
        kept["edge_index"] = rec["edge_feature_net"][0][2]
        return _port_functional(std, batch, w, v), (std, kept)

    (value, (std, rec)), grads = nnx.value_and_grad(f, has_aux=True)(model)
    return value, std, rec, grads


def _port_isolated(model: Any, x: Any) -> dict[str, Any]:
    from jaxstab.models.sidechain.geometry import OffsetGaussianRigid, Rigid

    def g_of(d):
        return OffsetGaussianRigid(
            Rigid(d["rotation"], d["translation"]), d["local_mean"], d["scaling_log"]
        )

    c, t = model.config, model.trunk
    out = {
        "node_feature_net": model.node_feature_net(x["node_index"], x["mask"], x["des"]),
        "edge_feature_net": model.edge_feature_net(
            x["edge_feature_net"], x["ca"], x["edge_index"], x["mask"], x["des"]
        ),
        "feature_fusion": model.feature_fusion(x["feature_fusion"]),
        "edge_feature_fusion": model.edge_feature_fusion(x["edge_feature_fusion"]),
        "atom_head": model.atom_head(x["atom_head"]),
        "logits_head": model.logits_head(x["logits_head"]),
    }
    for b in range(c.n_blocks):
        s, z, g, m = x[f"iga_{b}"]
        out[f"iga_{b}"] = t[f"iga_{b}"](s, z, g_of(g), m)
        seq = x[f"seq_tfmr_{b}"]
        for layer in t[f"seq_tfmr_{b}"]:
            seq = layer(seq, x["res"])
        out[f"seq_tfmr_{b}"] = seq
        out[f"node_transition_{b}"] = t[f"node_transition_{b}"](x[f"node_transition_{b}"])
        if b < c.n_blocks - 1:
            out[f"edge_transition_{b}"] = t[f"edge_transition_{b}"](*x[f"edge_transition_{b}"])
        s, g, m = x[f"Gau_update_{b}"]
        out[f"Gau_update_{b}"] = _gaussian_dict(t[f"Gau_update_{b}"](s, g_of(g), m))
    return out


_JIT: dict[str, Any] = {}


def _jitted(name: str) -> Any:
    # One compiled function per kind, shared by every comparison (the cache is nnx.jit's).
    if not _JIT:
        from flax import nnx

        _JIT["pass"] = nnx.jit(_port_pass, static_argnames=("record",))
        _JIT["isolated"] = nnx.jit(_port_isolated)
    return _JIT[name]


# ------------------------------------------------------------------------ the reference's side
def _hooks(n_blocks: int) -> list[str]:
    names = [
        "node_feature_net",
        "edge_feature_net",
        "feature_graph",
        "sidechain_head",
        "feature_fusion",
        "edge_feature_fusion",
        "atom_head.projection",
        "logits_head",
    ]
    for b in range(n_blocks):
        names += [
            f"trunk.iga_{b}",
            f"trunk.seq_tfmr_{b}",
            f"trunk.node_transition_{b}",
            f"trunk.Gau_update_{b}",
        ]
        if b < n_blocks - 1:
            names.append(f"trunk.edge_transition_{b}")
    return names


@contextlib.contextmanager
def capture(module: Any, names: Iterable[str]) -> Iterator[dict[str, tuple[list, Any]]]:
    """Forward hooks on ``module``'s sub-modules ``names``: ``{name: (arguments in the order
    of its ``forward``'s signature, output)}`` of their last call in the block."""
    calls: dict[str, tuple[list, Any]] = {}
    handles = []
    for name in names:
        sub = module.get_submodule(name)
        sig = inspect.signature(sub.forward)

        def hook(mod, args, kwargs, output, name=name, sig=sig):
            calls[name] = (list(sig.bind(*args, **kwargs).arguments.values()), output)

        handles.append(sub.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def reference_pass(
    ref: Any,
    feats: Mapping[str, Any],
    w: np.ndarray,
    v: np.ndarray,
    res: np.ndarray,
    des: np.ndarray,
    n_blocks: int,
) -> tuple[dict, dict, dict]:
    """The reference's values (per compared quantity), the inputs of its sub-modules (for
    the port's sub-modules) and every parameter's gradient of the test functional."""
    from benchmarks.convert import torch_grads

    model = ref.model
    model.zero_grad(set_to_none=True)
    with capture(model, _hooks(n_blocks)) as calls:
        std = ref.outputs(ref.forward(feats))
    wt, vt, rt, dt = (ref._t(a.astype(np.float64)) for a in (w, v, res, des))
    f = (std["local"] * wt * dt[..., None, None]).sum() + (std["logits"] * vt * rt[..., None]).sum()
    f.backward()
    grads = torch_grads(model)
    model.zero_grad(set_to_none=True)

    def out(name):
        return calls[name][1]

    def args(name):
        return calls[name][0]

    def gdict(g):
        return {k: _np(t) for k, t in ref.gaussian(g).items()}

    graph_node, graph_edge = ref.feature_graph(out("feature_graph"))
    vals = {
        "node_feature_net": _np(out("node_feature_net")),
        "edge_feature_net": _np(out("edge_feature_net")),
        "feature_graph.node": _np(graph_node),
        "feature_graph.edge": _np(graph_edge),
        "sidechain_head": _np(ref.sidechain_features(out("sidechain_head"))),
        "feature_fusion": _np(out("feature_fusion")),
        "edge_feature_fusion": _np(out("edge_feature_fusion")),
        "input_gaussian": gdict(args("trunk.iga_0")[2]),
        "atom_head": _np(out("atom_head.projection")),
        "logits_head": _np(out("logits_head")),
        "outputs": {k: (gdict_np(t) if k == "gaussian" else _np(t)) for k, t in std.items()},
    }
    ins = {
        "edge_feature_net": _np(args("edge_feature_net")[0]),
        "feature_fusion": _np(args("feature_fusion")[0]),
        "edge_feature_fusion": _np(args("edge_feature_fusion")[0]),
        "atom_head": _np(args("atom_head.projection")[0]),
        "logits_head": _np(args("logits_head")[0]),
    }
    for b in range(n_blocks):
        s, z, g, m = args(f"trunk.iga_{b}")
        ins[f"iga_{b}"] = (_np(s), _np(z), gdict(g), _np(m))
        vals[f"iga_{b}"] = _np(out(f"trunk.iga_{b}"))
        ins[f"seq_tfmr_{b}"] = _np(args(f"trunk.seq_tfmr_{b}")[0])
        vals[f"seq_tfmr_{b}"] = _np(out(f"trunk.seq_tfmr_{b}"))
        ins[f"node_transition_{b}"] = _np(args(f"trunk.node_transition_{b}")[0])
        vals[f"node_transition_{b}"] = _np(out(f"trunk.node_transition_{b}"))
        if b < n_blocks - 1:
            ins[f"edge_transition_{b}"] = tuple(_np(a) for a in args(f"trunk.edge_transition_{b}"))
            vals[f"edge_transition_{b}"] = _np(out(f"trunk.edge_transition_{b}"))
        s, g, m = args(f"trunk.Gau_update_{b}")
        ins[f"Gau_update_{b}"] = (_np(s), gdict(g), _np(m).astype(np.float64))
        vals[f"Gau_update_{b}"] = gdict(out(f"trunk.Gau_update_{b}"))
    return vals, ins, grads


def gdict_np(g: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: _np(t) for k, t in g.items()}


# ------------------------------------------------------------------------ comparison
PAIRS = ("edge_feature_net", "edge_feature_fusion", "feature_graph.edge", "edge_transition")


def _pick(a: Any, rows: np.ndarray, name: str = "") -> np.ndarray:
    """``a [b, L, ...]`` at the residues ``rows [b, L]``, or, for the pair quantities
    (:data:`PAIRS`, by name prefix), ``a [b, L, L, ...]`` at the pairs of them."""
    a = np.asarray(a, np.float64)
    if name.startswith(PAIRS):
        return a[rows[:, :, None] & rows[:, None, :]]
    return a[rows]


def _g_err(
    ours: Mapping[str, Any],
    theirs: Mapping[str, Any],
    rows: np.ndarray,
    keys: Iterable[str] = ("rotation", "translation", "local_mean", "scaling_log"),
) -> float:
    return max(rel_err(_pick(ours[k], rows), _pick(theirs[k], rows)) for k in keys)


def compare(
    ref: Any,
    state_dict: Mapping[str, Any],
    config: Any,
    arrays: Mapping[str, np.ndarray],
    *,
    float64: bool = False,
    names: Callable[[tuple], str] = name_map,
    substitute: Iterable[str] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """The port at ``config`` with ``state_dict`` (the reference's weights) against the
    reference ``ref`` (an :class:`OriginalSide` or an object with its interface) on
    ``arrays`` (:func:`make_inputs`), in float32 or float64. ``substitute``: sub-modules of
    the port (``feature_graph``, ``sidechain_head``) whose outputs are replaced by the
    reference's and whose parameters are not compared (``input_gaussian``: the model's input
    Gaussians replaced by the reference's).

    ``ref`` provides ``model`` (a ``torch.nn.Module`` with the port's sub-module names),
    ``dtype``, ``_t(array)`` (a tensor in its dtype), ``inputs(arrays, design, rot, trans)``,
    ``forward(inputs)``, ``outputs(raw)`` (``local``, ``global``, ``logits``, ``gaussian``),
    ``gaussian(g)`` (``rotation``, ``translation``, ``local_mean``, ``scaling_log``),
    ``feature_graph(output)`` (node, edge) and ``sidechain_features(output)``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxstab.models.sidechain import SideChainModel

    substitute = tuple(substitute)
    j_dtype = jnp.float64 if float64 else jnp.float32
    n_blocks = config.n_blocks
    res = np.asarray(arrays["residue_mask"]) > 0
    des = np.asarray(arrays["design_mask"]) & res
    w, v = functional_weights(res.shape, seed)
    buffers = [k for k, _ in ref.model.named_buffers()]
    with jax.enable_x64(float64):
        # Built abstract (no initialisation: every parameter comes from state_dict), zeros
        # in the substituted groups, whose outputs are replaced.
        model = nnx.eval_shape(lambda: SideChainModel(config, rngs=nnx.Rngs(seed)))
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p: jnp.asarray(np.zeros(p.shape, j_dtype)), params))
        unused = to_port(state_dict, model, names, skip=substitute, optional=buffers)
        model.eval()
        batch = {
            k: (
                jnp.asarray(a, j_dtype)
                if np.issubdtype(np.asarray(a).dtype, np.floating)
                else jnp.asarray(a)
            )
            for k, a in arrays.items()
        }
        rot, trans = port_frames(arrays, j_dtype)
        feats = ref.inputs(arrays, des, rot, trans)
        theirs, ins, their_grads = reference_pass(ref, feats, w, v, res, des, n_blocks)
        replace = {}
        if "feature_graph" in substitute:
            replace["feature_graph"] = (
                jnp.asarray(theirs["feature_graph.node"], j_dtype),
                jnp.asarray(theirs["feature_graph.edge"], j_dtype),
            )
        if "sidechain_head" in substitute:
            replace["sidechain_head"] = jnp.asarray(theirs["sidechain_head"], j_dtype)
        if "input_gaussian" in substitute:  # the original's, nm → Å
            g = theirs["input_gaussian"]
            replace["input_gaussian"] = {
                "rotation": jnp.asarray(g["rotation"], j_dtype),
                "translation": jnp.asarray(g["translation"] * NM_TO_ANG, j_dtype),
                "local_mean": jnp.asarray(g["local_mean"] * NM_TO_ANG, j_dtype),
                "scaling_log": jnp.asarray(g["scaling_log"] + math.log(NM_TO_ANG), j_dtype),
            }
        _, std, rec, grads = _jitted("pass")(
            model,
            batch,
            jnp.asarray(w, j_dtype),
            jnp.asarray(v, j_dtype),
            replace,
            record=_records(n_blocks),
        )
        x = jax.tree.map(
            lambda a: (
                jnp.asarray(a, j_dtype) if np.asarray(a).dtype.kind == "f" else jnp.asarray(a)
            ),
            ins,
        )
        x.update(
            node_index=rec["node_index"],
            edge_index=rec["edge_index"],
            mask=jnp.asarray(res, j_dtype),
            des=jnp.asarray(des, j_dtype),
            res=jnp.asarray(res),
            ca=jnp.asarray(arrays["atom14_pos"], j_dtype)[..., 1, :],
        )
        iso = jax.tree.map(np.asarray, _jitted("isolated")(model, x))
        std, rec = jax.tree.map(np.asarray, (std, rec))
        our_grads = grads_to_state_dict(grads, model, names, skip=substitute)

    def e(ours: Any, theirs_: Any, name: str = "", rows: np.ndarray = res) -> float:
        return rel_err(_pick(ours, rows, name), _pick(theirs_, rows, name))

    err: dict[str, float] = {}
    # sub-modules on the reference's inputs
    for name in ("node_feature_net", "edge_feature_net", "feature_fusion", "edge_feature_fusion"):
        err[f"{name} (its inputs)"] = e(iso[name], theirs[name], name)
    ours_g, their_g = rec["input_gaussian"], theirs["input_gaussian"]
    for k in ("scaling_log", "local_mean"):
        err[f"input gaussian {k}"] = _g_err(ours_g, their_g, res, (k,))
    err["input gaussian frame"] = _g_err(ours_g, their_g, res, ("rotation", "translation"))
    for b in range(n_blocks):
        for part in ("iga", "seq_tfmr", "node_transition", "edge_transition"):
            key = f"{part}_{b}"
            if key in theirs:
                err[f"block {b} {part} (its inputs)"] = e(iso[key], theirs[key], key)
        err[f"block {b} Gau_update (its inputs)"] = _g_err(
            iso[f"Gau_update_{b}"], theirs[f"Gau_update_{b}"], res
        )
    u = theirs["atom_head"].reshape(iso["atom_head"].shape)
    err["atom_head u (its inputs)"] = e(iso["atom_head"], u)
    err["logits_head (its inputs)"] = e(iso["logits_head"], theirs["logits_head"])
    # the port's own forward
    not_compared = {}
    if "feature_graph" in substitute:
        not_compared["feature_graph"] = "substituted: the port's forward gets the original's"
    else:
        err["feature_graph node"] = e(rec["feature_graph"][0], theirs["feature_graph.node"])
        err["feature_graph edge"] = e(
            rec["feature_graph"][1], theirs["feature_graph.edge"], "feature_graph.edge"
        )
    if "sidechain_head" in substitute:
        not_compared["sidechain_head"] = "substituted: the port's forward gets the original's"
    else:
        err["sidechain_head"] = e(rec["sidechain_head"], theirs["sidechain_head"])
    err["fused node embedding"] = e(rec["feature_fusion"], theirs["feature_fusion"])
    err["fused edge embedding"] = e(
        rec["edge_feature_fusion"], theirs["edge_feature_fusion"], "edge_feature_fusion"
    )
    for b in range(n_blocks):
        err[f"block {b} node embedding"] = e(
            rec[f"trunk.node_transition_{b}"], theirs[f"node_transition_{b}"]
        )
        err[f"block {b} gaussian"] = _g_err(
            _gaussian_np(rec[f"trunk.Gau_update_{b}"]), theirs[f"Gau_update_{b}"], res
        )
    o = theirs["outputs"]
    err["pred_atoms local Å (designed)"] = e(std["local"], o["local"], rows=des)
    err["pred_atoms global Å (designed)"] = e(std["global"], o["global"], rows=des)
    err["logits"] = e(std["logits"], o["logits"])
    for k in ("scaling_log", "local_mean"):
        err[f"final gaussian {k}"] = _g_err(std["gaussian"], o["gaussian"], res, (k,))
    err["final gaussian frame"] = _g_err(
        std["gaussian"], o["gaussian"], res, ("rotation", "translation")
    )
    context = res & ~des
    context_max = float(np.max(np.abs(_pick(o["local"], context)))) if context.any() else 0.0

    skip = tuple(substitute)
    compared = {
        k: g for k, g in their_grads.items() if k.split(".")[0] not in skip and k not in buffers
    }
    zero = [k for k in compared if any(fnmatch.fnmatch(k, p) for p in ZERO_BY_SYMMETRY)]
    scale = max(float(np.max(np.abs(g))) for g in compared.values())
    grad_err = {k: rel_err(our_grads[k], g) for k, g in compared.items() if k not in zero}
    worst = max(grad_err, key=grad_err.get)
    err["gradients (worst tensor)"] = grad_err[worst]
    noise = {
        k: {
            "ours": float(np.max(np.abs(our_grads[k]))) / scale,
            "original": float(np.max(np.abs(compared[k]))) / scale,
        }
        for k in zero
    }
    nonfinite = sorted(
        [f"reference {k}" for k, a in _leaves(theirs) if not np.all(np.isfinite(a))]
        + [
            f"port {k}"
            for k, a in _leaves({"iso": iso, "rec": rec, "std": std})
            if not np.all(np.isfinite(a))
        ]
        + [
            f"gradient {k}"
            for k, g in compared.items()
            if not (np.all(np.isfinite(g)) and np.all(np.isfinite(our_grads[k])))
        ]
    )
    tol = FLOAT64_TOLERANCE if float64 else TOLERANCE
    within = {k: bool(e <= tol) for k, e in err.items()}
    return {
        "dtype": "float64" if float64 else "float32",
        "tolerance": tol,
        "max_relative_error": err,
        "within_tolerance": within,
        "ok": all(within.values()) and not nonfinite,
        "worst_gradient_tensor": worst,
        "gradient_errors": dict(sorted(grad_err.items(), key=lambda kv: -kv[1])[:10]),
        "n_parameters_compared": len(grad_err),
        "zero_by_symmetry_relative_to_largest_gradient": noise,
        "state_dict_keys_not_copied": unused,
        "buffers_computed_by_the_port": buffers,
        "not_compared": not_compared,
        "nonfinite": nonfinite,
        "reference_context_atoms_max_abs": context_max,
    }


def _gaussian_np(g: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(a) for k, a in _gaussian_dict(g).items()}


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(tree, Mapping):
        for k, sub in tree.items():
            yield from _leaves(sub, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (tuple, list)) or hasattr(tree, "_fields"):
        for i, sub in enumerate(tree):
            yield from _leaves(sub, f"{prefix}.{i}")
    else:
        a = np.asarray(tree)
        if a.dtype.kind == "f":
            yield prefix, a


# ------------------------------------------------------------------------ the original only
def findings(ref: OriginalSide, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Facts of the original's own pipeline that the comparison's inputs sidestep, measured
    on the original alone (in ``ref``'s dtype): Chroma's frames against the port's, its node
    features with a random offset of ``res_idx``, and its outputs with Chroma's frames."""
    import jax
    import jax.numpy as jnp
    import torch

    res = np.asarray(arrays["residue_mask"]) > 0
    des = np.asarray(arrays["design_mask"]) & res
    f64 = ref.dtype == torch.float64
    with jax.enable_x64(f64):
        rot, trans = port_frames(arrays, jnp.float64 if f64 else jnp.float32)
    c_rot, c_trans = ref.chroma_frames(arrays)
    col_norm = np.linalg.norm(c_rot[res], axis=-2)
    unit = c_rot[res] / col_norm[..., None, :]
    out = {
        "frames: Chroma FrameBuilder.inverse rotation vs Rigid.from_three_points": rel_err(
            c_rot[res], rot[res]
        ),
        "frames: the same, Chroma's columns normalised": rel_err(unit, rot[res]),
        "frames: translation": rel_err(c_trans[res], trans[res]),
        "frames: Chroma's column norms (min, max)": [float(col_norm.min()), float(col_norm.max())],
    }
    feats = ref.inputs(arrays, des, rot, trans)
    with torch.no_grad(), ref.running():
        net = ref.model.node_feature_net
        t = torch.ones((res.shape[0], 1), dtype=ref.dtype)
        a = net(t, feats["res_mask"], feats["diffuse_mask"], feats["res_idx"])
        b = net(t, feats["res_mask"], feats["diffuse_mask"], feats["res_idx"] + RES_IDX_OFFSET)
    out[f"node_feature_net: res_idx offset by {RES_IDX_OFFSET} vs none"] = rel_err(
        _np(b)[res], _np(a)[res]
    )
    with torch.no_grad():
        with capture(ref.model, ["trunk.iga_0"]) as calls:
            base = ref.outputs(ref.forward(feats))
        theirs_sl = _np(ref.gaussian(calls["trunk.iga_0"][0][2])["scaling_log"])
        chroma = ref.outputs(ref.forward(ref.inputs(arrays, des, c_rot, c_trans)))
    for k in ("global", "logits"):
        rows = des if k == "global" else res
        out[f"outputs with Chroma's frames vs the port's: {k}"] = rel_err(
            _np(chroma[k])[rows], _np(base[k])[rows]
        )
    # The input Gaussians' scaling_log (data/GaussianRigid.py from_rigid_and_all_atoms:
    # std = sqrt(var + 1e-8)), the port's (input_geometry) against the original's.
    sl = _port_scaling_log(arrays, f64)
    nm = math.log(0.1)
    out["input gaussian scaling_log: port vs original"] = rel_err(sl[res] + nm, theirs_sl[res])
    if f64:  # as it is, without widening its float32 casts
        ref.widen = False
        try:
            ref.forward(feats)
            out["float64 as it is"] = "runs"
        except Exception as e:  # reported, not raised
            out["float64 as it is"] = f"{type(e).__name__}: {e}"
        finally:
            ref.widen = True
    return out


def _port_scaling_log(arrays: Mapping[str, np.ndarray], f64: bool) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    from jaxstab.models.sidechain import SideChainConfig
    from jaxstab.models.sidechain.features import input_geometry

    dtype = jnp.float64 if f64 else jnp.float32
    with jax.enable_x64(f64):
        batch = {
            k: jnp.asarray(v, dtype) if k == "atom14_pos" else jnp.asarray(v)
            for k, v in arrays.items()
        }
        g = jax.jit(lambda b: input_geometry(b, SideChainConfig.original())[1])(batch)
        return np.asarray(g.scaling_log)


def time_embedding_check(size: int) -> dict[str, float]:
    """The node features' time embedding at t = 1 in float32 (the original computes it in
    float32 whatever the dtype, ``models/utils.py`` ``get_time_embedding``): largest absolute
    difference port vs original, and each against the exact (float64) values. Its angles
    reach 2056 rad, so one ulp of a frequency moves a sine by up to ~1e-4: the float32 floor of
    everything that depends on it (``node_feature_net.linear.weight``'s gradient above all).
    Call inside :func:`import_original`."""
    import jax
    import jax.numpy as jnp
    import torch

    from jaxstab.models.sidechain.features import time_embedding

    utils = sys.modules["models.utils"]
    theirs = _np(utils.get_time_embedding(torch.ones(1), size, max_positions=2056))[0]
    ours = np.asarray(time_embedding(jnp.ones((), jnp.float32), size), np.float64)
    with jax.enable_x64(True):
        exact = np.asarray(time_embedding(jnp.ones((), jnp.float64), size))
    return {
        "port vs original": float(np.max(np.abs(ours - theirs))),
        "original vs exact": float(np.max(np.abs(theirs - exact))),
        "port vs exact": float(np.max(np.abs(ours - exact))),
    }


def run(original: str, seed: int = 0, full: bool = True) -> dict[str, Any]:
    """Every comparison against the original at ``original``; returns the result dict."""
    import jax
    import torch

    from benchmarks.run import device_name
    from jaxstab.models.sidechain import SideChainConfig

    with import_original(original) as mods:
        result: dict[str, Any] = {
            "original": "JoreyYan/pu models/flow_model.py SideAtomsIGAModel (configs/SH.yaml)",
            "original_commit": commit_of(original),
            "stand_ins": {k: STAND_INS[k] for k in mods["stand_ins"]},
            "torch": torch.__version__,
            "jax": jax.__version__,
            "python": platform.python_version(),
            "device": device_name(),
            "device_kind": jax.devices()[0].device_kind,
            "seed": seed,
            "sizes": {},
        }
        sizes = {"small": (True, make_inputs())}
        if full:
            sizes["full"] = (False, make_inputs(FULL_RES, None, VAL_CHAINS[:1]))
        for size, (small, arrays) in sizes.items():
            config = compare_config(SideChainConfig.original(), small=small)
            substitute = [
                blk
                for blk, (field, value) in ORIGINAL_BLOCKS.items()
                if getattr(config, field, None) != value
            ]
            mconf = original_model_config(config, mods["root"] / "configs" / "SH.yaml")

            def build(mconf=mconf):
                return mods["flow_model"].SideAtomsIGAModel(mconf)

            torch.manual_seed(seed)
            np.random.seed(seed)
            model = build()
            perturb(model, seed)
            model.eval()
            ref = OriginalSide(mods, model)
            ref64 = ref.as_float64(build)
            b, n = arrays["residue_mask"].shape
            entry: dict[str, Any] = {
                "config": (
                    "SideChainConfig.small(SideChainConfig.original())"
                    if small
                    else "SideChainConfig.original()"
                )
                + " with c_z=128, seq_head_layers=3, sidechain_blocks=4",
                "config_fields": config.to_dict(),
                "data": f"{b} validation chains, {n} residue slots, "
                f"{int(arrays['residue_mask'].sum())} real, "
                f"{int(arrays['design_mask'].sum())} designed",
            }
            scenarios = {"": substitute, "_substituted": [*substitute, *SUBSTITUTED]}
            for suffix, subst in scenarios.items():
                for key, side in (("float32", ref), ("float64", ref64)):
                    entry[key + suffix] = compare(
                        side,
                        side.model.state_dict(),
                        config,
                        arrays,
                        float64=key == "float64",
                        substitute=subst,
                        seed=seed,
                    )
            entry["original_float64_linears_given_float32"] = sorted(ref64.float32_inputs)
            entry["findings_float64"] = findings(ref64, arrays)
            entry["time_embedding_float32"] = time_embedding_check(config.c_timestep_emb)
            result["sizes"][size] = entry
    result["all_ok"] = all(
        s[p]["ok"] for s in result["sizes"].values() for p in ("float32", "float64")
    )
    result["all_ok_substituted"] = all(
        s[p]["ok"]
        for s in result["sizes"].values()
        for p in ("float32_substituted", "float64_substituted")
    )
    return result


# ------------------------------------------------------------------------ reporting
def _cell(err: float, tol: float) -> str:
    return f"{err:.1e}" if err <= tol else f"**{err:.1e}** NO"


def to_markdown(result: Mapping[str, Any]) -> str:
    """The result as README-ready tables (one per size: float32 and float64 side by side)."""
    lines = [
        f"Original: {result['original']} at `{result['original_commit']}`; device "
        f"{result['device']} ({result['device_kind']}); torch {result['torch']}, jax "
        f"{result['jax']}. Tolerances: float32 {TOLERANCE:g}, float64 {FLOAT64_TOLERANCE:g}; "
        "**bold NO**: above it.",
    ]
    if result.get("stand_ins"):
        lines += [
            "",
            "Stand-ins for imports the original's model never calls: "
            + "; ".join(f"`{k}` ({v})" for k, v in result["stand_ins"].items())
            + ".",
        ]
    for size, entry in result["sizes"].items():
        runs = [
            k
            for k in ("float32", "float64", "float32_substituted", "float64_substituted")
            if k in entry
        ]
        f32 = entry["float32"]
        heads = {
            "float32": "float32",
            "float64": "float64",
            "float32_substituted": "float32, substituted",
            "float64_substituted": "float64, substituted",
        }
        lines += [
            "",
            f"### {size}: {entry['config']}",
            "",
            entry["data"] + ".",
            "",
            "| quantity | " + " | ".join(heads[k] for k in runs) + " |",
            "|---|" + "---|" * len(runs),
        ]
        names = list(dict.fromkeys(k for r in runs for k in entry[r]["max_relative_error"]))
        for k in names:
            cells = []
            for r in runs:
                err = entry[r]["max_relative_error"].get(k)
                cells.append("—" if err is None else _cell(err, entry[r]["tolerance"]))
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        for k in f32["zero_by_symmetry_relative_to_largest_gradient"]:
            cells = []
            for r in runs:
                z = entry[r]["zero_by_symmetry_relative_to_largest_gradient"][k]
                cells.append(f"{z['ours']:.0e} / {z['original']:.0e}")
            lines.append(
                f"| {k} (0 by symmetry; size vs the largest gradient, ours / original) | "
                + " | ".join(cells)
                + " |"
            )
        if "float32_substituted" in entry:
            lines += [
                "",
                "Substituted: the port's forward gets the original's "
                + ", ".join(f"`{k}`" for k in SUBSTITUTED)
                + " (its rows —; those parameters' gradients not compared).",
            ]
        lines.append("")
        for r in runs:
            res = entry[r]
            line = (
                f"Worst gradient tensor ({heads[r]}): `{res['worst_gradient_tensor']}` of "
                f"{res['n_parameters_compared']}"
            )
            lines.append(line + ".")
        for r in runs:
            if entry[r]["nonfinite"]:
                lines.append(f"Non-finite values ({heads[r]}): {entry[r]['nonfinite']}.")
        for k, why in f32["not_compared"].items():
            lines.append(f"Not compared: `{k}`: {why}.")
        islands = entry.get("original_float64_linears_given_float32")
        if islands:
            lines.append(
                "In float64 the original feeds float32 features to "
                + ", ".join(f"`{k}`" for k in islands)
                + " (widened to float64 by a pre-hook; their values keep float32 rounding)."
            )
        te = entry.get("time_embedding_float32")
        if te:
            lines.append(
                "Time embedding at t = 1 in float32 (largest absolute difference): port vs "
                f"original {te['port vs original']:.1e}, original vs exact "
                f"{te['original vs exact']:.1e}, port vs exact {te['port vs exact']:.1e}."
            )
        found = entry.get("findings_float64")
        if found:
            lines += ["", "Facts of the original's pipeline (float64, the original alone):", ""]
            for k, val in found.items():
                if isinstance(val, float):
                    shown = f"{val:.2e}"
                elif isinstance(val, str):
                    shown = val
                else:
                    shown = ", ".join(f"{x:.6f}" for x in val)
                lines.append(f"- {k}: {shown}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fidelity_sidechain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--original",
        default=os.environ.get("SIDECHAIN_ORIGINAL"),
        help="checkout, extracted copy or bare clone of JoreyYan/pu",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-full", action="store_true", help="skip the full-width run")
    parser.add_argument("--out", default=None, help="results folder (benchmarks/results)")
    args = parser.parse_args(argv)
    if not args.original:
        parser.error("--original PATH (or SIDECHAIN_ORIGINAL) is required")
    from benchmarks.run import write_results

    result = run(args.original, args.seed, full=not args.no_full)
    md = to_markdown(result)
    write_results("fidelity_sidechain", result, md, Path(args.out) if args.out else None)
    print(md)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
