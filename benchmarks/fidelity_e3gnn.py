"""Fidelity of the port ``jaxstab.models.e3gnn`` to the ORIGINAL code (RNA-3E-FFI's encoder).

``python -m benchmarks.fidelity_e3gnn --original PATH`` (or ``E3GNN_ORIGINAL=PATH``), PATH a
checkout (or a bare clone) of SleepingLei/RNA-3E-FFI. It imports the original's
``models/e3_gnn_encoder_v2.py`` (``RNAPocketEncoderV2``) and ``models/layers/`` from PATH
(copied to a temporary folder under another package name, unchanged, so that they do not
clash with this repository's ``models``; it needs PyTorch, e3nn and torch_geometric), builds
it at the settings of its best run (6 layers, ``32x0e+16x1o+8x2e``, LayerNorm, multi-hop and
non-bonded branches, attention pooling, 1536 outputs) and the port at
``E3GNNConfig.original()``, copies the original's ``state_dict()`` onto the port with the
spec's name map (every parameter; the constant Bessel frequencies are computed, not copied),
and writes ``benchmarks/results/fidelity_e3gnn-<device>.json`` and ``.md``.

Nothing of the original is contained here; the commit run is recorded
(``git rev-parse HEAD``). Inputs: the first 8 EGFR molecules of
:func:`jaxstab.models.e3gnn.default_data`, flattened by
``benchmarks.torch_ref.e3gnn.batch_to_graph`` into the original's PyG layout (its
non-bonded attribute gets the distance column the original's data carries). Weights: the
original's initialisation with ``torch.manual_seed(seed)``, then every bias and LayerNorm
affine drawn from N(0, 0.1) so every leaf of the conversion matters. Both models in eval mode.

Quantities (max relative error ``max|ours − original| / max|original|``), in float32
(tolerance 1e-5) and float64 (1e-9): the input embedding; the first layer's bonded, angle,
dihedral and non-bonded blocks on the same input; the embedding; the cosine loss against the
Morgan targets; the gradient of every parameter (but ``pooling_mlp.6.bias``, whose gradient
is 0 in exact arithmetic: its size on both sides is shown against the largest gradient).
Also measured: how much a rotation of the molecules changes the original's embedding (its
per-component LayerNorm is not equivariant), next to the port's ``default()``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

TOLERANCE, FLOAT64_TOLERANCE = 1e-5, 1e-9
N_MOLECULES = 8
PACKAGE = "rna3effi_original"
# Gradients that are 0 in exact arithmetic: the attention logits' last bias shifts every logit
# of a molecule alike, which the softmax ignores.
ZERO_BY_SYMMETRY = ("pooling_mlp.6.bias",)
FILES = ("models/e3_gnn_encoder_v2.py", "models/layers")


def original_commit(path: str | os.PathLike[str]) -> str | None:
    """``git rev-parse HEAD`` of the checkout or bare clone at ``path`` (``None`` if not git)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=30)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def import_original(path: str | os.PathLike[str]) -> Iterator[Any]:
    """The original's encoder module, imported from ``path`` as package :data:`PACKAGE`.

    A checkout's files are copied; from a bare clone they are read with ``git archive``.
    """
    root = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / PACKAGE
        if (root / FILES[0]).exists():
            pkg.mkdir()
            shutil.copy(root / FILES[0], pkg)
            shutil.copytree(root / FILES[1], pkg / "layers")
        else:
            archive = subprocess.run(["git", "-C", str(root), "archive", "HEAD", *FILES],
                                     capture_output=True, check=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            (Path(tmp) / "models").rename(pkg)
        (pkg / "__init__.py").write_text("")
        sys.path.insert(0, tmp)
        try:
            yield importlib.import_module(f"{PACKAGE}.e3_gnn_encoder_v2")
        finally:
            sys.path.remove(tmp)
            for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
                del sys.modules[name]


def rel_err(a: Any, b: Any) -> float:
    """``max|a − b| / max|b|`` in float64."""
    a = np.asarray(a.detach() if hasattr(a, "detach") else a, np.float64)
    b = np.asarray(b.detach() if hasattr(b, "detach") else b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _original_model(module: Any, config: Any) -> Any:
    return module.RNAPocketEncoderV2(
        input_dim=3, feature_hidden_dim=config.embed_hidden, hidden_irreps=config.hidden_irreps,
        output_dim=config.output_dim, num_layers=config.num_layers,
        num_radial_basis=config.num_radial, radial_hidden_dim=config.radial_hidden,
        pooling_hidden_dim=config.pooling_hidden, r_max=config.r_max,
        avg_num_neighbors=config.avg_num_neighbors, use_gate=config.use_gate,
        use_layer_norm=config.use_layer_norm, use_multi_hop=config.use_multi_hop,
        use_nonbonded=config.use_nonbonded, pooling_type="attention", dropout=config.dropout,
    )  # fmt: skip


def _graph(arrays: Mapping[str, np.ndarray], dtype: Any) -> Any:
    import torch
    from torch_geometric.data import Data

    from benchmarks.torch_ref.e3gnn import batch_to_graph

    g = batch_to_graph(arrays)
    g = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
         for k, v in g.items()}  # fmt: skip
    src, dst = g["nonbonded_edge_index"]
    dist = torch.linalg.norm(g["pos"][dst] - g["pos"][src], dim=-1, keepdim=True)
    g["nonbonded_edge_attr"] = torch.cat([g["nonbonded_edge_attr"], dist], dim=-1)
    n_graphs = g.pop("num_graphs")
    data = Data(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in g.items()})
    data.num_graphs = n_graphs
    return data


def _port_blocks(model: Any, arrays: Mapping[str, Any], h0: np.ndarray) -> dict[str, Any]:
    """The port's first-layer blocks on the original's input embedding ``h0`` (real atoms)."""
    import jax.numpy as jnp

    from jaxstab.models.e3gnn.model import Edges

    mask = np.asarray(arrays["atom_mask"])
    b, n_atoms = mask.shape
    real = np.flatnonzero(mask.reshape(-1))
    dtype = jnp.asarray(arrays["x"]).dtype
    h = jnp.zeros((b * n_atoms, h0.shape[-1]), dtype).at[real].set(jnp.asarray(h0, dtype))
    pos = jnp.asarray(arrays["pos"]).reshape(-1, 3)

    def edges(name: str) -> Any:
        return Edges(jnp.asarray(arrays[f"{name}_index"]), jnp.asarray(arrays[f"{name}_attr"]),
                     jnp.asarray(arrays[f"{name}_mask"]), n_atoms)  # fmt: skip

    out = {
        "layer0_bonded": model.bonded_mp_layers[0](h, pos, edges("bond")),
        "layer0_angle": model.angle_mp_layers[0](h, edges("angle")),
        "layer0_dihedral": model.dihedral_mp_layers[0](h, edges("torsion")),
        "layer0_nonbonded": model.nonbonded_mp_layers[0](h, pos, edges("nb")),
    }
    return {k: np.asarray(v)[real] for k, v in out.items()}


def compare(module: Any, seed: int, float64: bool) -> dict[str, Any]:
    """One comparison at ``E3GNNConfig.original()`` in float32 or float64."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from benchmarks.convert import nnx_to_state_dict
    from benchmarks.specs.e3gnn import SPEC, name_map
    from jaxstab.models.e3gnn import E3GNNConfig, build_model, default_data
    from jaxstab.models.e3gnn.losses import embedding_loss

    t_dtype, j_dtype = (torch.float64, jnp.float64) if float64 else (torch.float32, jnp.float32)
    config = E3GNNConfig.original()
    data = default_data()
    arrays = {k: v[:N_MOLECULES] for k, v in data.arrays.items()}
    torch.manual_seed(seed)
    # Built under the default dtype of the run, so that its buffers (the Bessel frequencies
    # n·π, e3nn's Wigner tables) are computed, not rounded to float32 and then widened.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(t_dtype)
    try:
        orig = _original_model(module, config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in orig.named_parameters():
            if name.endswith("bias") or (name.endswith("weight") and p.ndim == 1 and
                                         "layer_norm" in name):  # fmt: skip
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    orig.eval()
    graph = _graph(arrays, t_dtype)
    target = torch.as_tensor(arrays["target"], dtype=t_dtype)

    with jax.enable_x64(float64):
        model = build_model(data, config, nnx.Rngs(0))
        # Parameters widened first: the converter casts to the target's dtype.
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda v: jnp.asarray(v, j_dtype), params))
        state = SPEC.convert(orig.state_dict(), model)
        nnx.update(model, jax.tree.map(lambda v: jnp.asarray(v, j_dtype), state))
        model.eval()
        jarr = {k: (jnp.asarray(v, j_dtype) if np.issubdtype(v.dtype, np.floating)
                    else jnp.asarray(v)) for k, v in arrays.items()}  # fmt: skip
        real = np.flatnonzero(arrays["atom_mask"].reshape(-1))
        with torch.no_grad():
            h0 = orig.input_embedding(graph.x)
            theirs = {
                "input_embedding": h0,
                "layer0_bonded": orig.bonded_mp_layers[0](h0, graph.pos, graph.edge_index,
                                                          graph.edge_attr),
                "layer0_angle": orig.angle_mp_layers[0](h0, graph.triple_index,
                                                        graph.triple_attr),
                "layer0_dihedral": orig.dihedral_mp_layers[0](h0, graph.quadra_index,
                                                              graph.quadra_attr),
                "layer0_nonbonded": orig.nonbonded_mp_layers[0](
                    h0, graph.pos, graph.nonbonded_edge_index, graph.nonbonded_edge_attr),
            }  # fmt: skip
        emb = model.input_embedding
        n = jarr["x"].shape[0] * jarr["x"].shape[1]
        ours = {"input_embedding": np.asarray(emb["irreps_projection"](
            emb["feature_mlp"](jarr["x"].reshape(n, -1))))[real]}  # fmt: skip
        ours |= _port_blocks(model, jarr, h0.numpy())
        orig.zero_grad()
        pred = orig(graph)
        loss_t = (1.0 - torch.nn.functional.cosine_similarity(pred, target, dim=1)).mean()
        loss_t.backward()
        theirs |= {"embedding": pred.detach(), "cosine_loss": loss_t.detach()}

        def loss_fn(m: Any) -> Any:
            p = m(jarr)
            return embedding_loss(p, jarr["target"], m.config)[1]["cosine"], p

        (loss_j, pred_j), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
        ours |= {"embedding": pred_j, "cosine_loss": loss_j}
        our_grads = nnx_to_state_dict(grads, name_map)
    errors = {k: rel_err(ours[k], theirs[k]) for k in theirs}
    grad_err, scale = {}, 0.0
    theirs_grads = {}
    for name, p in orig.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        theirs_grads[name] = g.detach().double().numpy()
        scale = max(scale, float(np.max(np.abs(theirs_grads[name]))))
    for name, g in theirs_grads.items():
        if name in ZERO_BY_SYMMETRY:
            continue
        grad_err[name] = rel_err(our_grads[name], g)
    worst = max(grad_err, key=grad_err.get)
    errors["gradients (worst tensor)"] = grad_err[worst]
    # Exactly 0 in exact arithmetic on both sides: rounding noise, shown against the largest
    # gradient of the model.
    noise = {name: {"ours": float(np.max(np.abs(our_grads[name]))) / scale,
                    "original": float(np.max(np.abs(theirs_grads[name]))) / scale}
             for name in ZERO_BY_SYMMETRY}  # fmt: skip
    tol = FLOAT64_TOLERANCE if float64 else TOLERANCE
    return {
        "max_relative_error": errors,
        "worst_gradient_tensor": worst,
        "gradient_errors": dict(sorted(grad_err.items(), key=lambda kv: -kv[1])[:10]),
        "zero_by_symmetry_relative_to_largest_gradient": noise,
        "n_parameters_compared": len(grad_err),
        "tolerance": tol,
        "ok": all(v <= tol for v in errors.values()),
    }


def rotation_sensitivity(module: Any, seed: int) -> dict[str, float]:
    """Relative change of the embedding when the molecules are rotated: the original (its
    LayerNorm is per component) and the port's ``default()`` (equivariant LayerNorm)."""
    import torch
    from flax import nnx
    from scipy.spatial.transform import Rotation

    from jaxstab.models.e3gnn import E3GNNConfig, build_model, default_data

    data = default_data()
    arrays = {k: v[:N_MOLECULES] for k, v in data.arrays.items()}
    rot = Rotation.random(random_state=seed).as_matrix().astype(np.float32)
    turned = dict(arrays, pos=(arrays["pos"] @ rot.T).astype(np.float32))
    torch.manual_seed(seed)
    orig = _original_model(module, E3GNNConfig.original()).eval()
    with torch.no_grad():
        a, b = orig(_graph(arrays, torch.float32)), orig(_graph(turned, torch.float32))
    port = build_model(data, E3GNNConfig.default(), nnx.Rngs(seed))
    port.eval()
    return {
        "original": rel_err(b, a),
        "port_default": rel_err(port(turned), port(arrays)),
    }


def to_markdown(result: Mapping[str, Any]) -> str:
    """The result as a README-ready table."""
    lines = [
        f"Original: {result['original']} at `{result['original_commit']}`; "
        f"{result['data']}; device {result['device_kind']}.",
        "",
        "| quantity | float32 | float64 |",
        "|---|---|---|",
    ]
    f32, f64 = result["float32"], result["float64"]
    for k in f32["max_relative_error"]:
        lines.append(f"| {k} | {f32['max_relative_error'][k]:.1e} | "
                     f"{f64['max_relative_error'][k]:.1e} |")  # fmt: skip
    for name, v in f32["zero_by_symmetry_relative_to_largest_gradient"].items():
        lines.append(f"| {name} (0 by symmetry; size vs the largest gradient, ours / original) "
                     f"| {v['ours']:.0e} / {v['original']:.0e} | "
                     f"{f64['zero_by_symmetry_relative_to_largest_gradient'][name]['ours']:.0e}"
                     " |")  # fmt: skip
    rot = result["rotation_sensitivity"]
    lines += ["", f"Rotated molecules change the original's embedding by {rot['original']:.1e} "
              f"(relative), the port's default() by {rot['port_default']:.1e}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def run(original: str, seed: int = 0) -> dict[str, Any]:
    """Every comparison against the original at ``original``; returns the result dict."""
    import e3nn
    import jax
    import torch
    import torch_geometric

    with import_original(original) as module:
        result = {
            "original": "SleepingLei/RNA-3E-FFI models/e3_gnn_encoder_v2.py RNAPocketEncoderV2",
            "original_commit": original_commit(original),
            "torch": torch.__version__,
            "e3nn": e3nn.__version__,
            "torch_geometric": torch_geometric.__version__,
            "jax": jax.__version__,
            "python": platform.python_version(),
            "device_kind": jax.devices()[0].device_kind,
            "data": f"first {N_MOLECULES} EGFR molecules (RDKit egfr.sdf), seed {seed}",
            "config": "E3GNNConfig.original()",
            "float32": compare(module, seed, float64=False),
            "float64": compare(module, seed, float64=True),
            "rotation_sensitivity": rotation_sensitivity(module, seed),
        }
    result["all_ok"] = result["float32"]["ok"] and result["float64"]["ok"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fidelity_e3gnn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--original", default=os.environ.get("E3GNN_ORIGINAL"),
                        help="checkout or clone of SleepingLei/RNA-3E-FFI")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if not args.original:
        parser.error("--original PATH (or E3GNN_ORIGINAL) is required")
    import jax

    result = run(args.original, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fidelity_e3gnn-{jax.devices()[0].platform}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
