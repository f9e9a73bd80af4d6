"""The original CFM-VC code's side of ``benchmarks.fidelity_cfmvc``: import, noise, adapter.

- :func:`original_commit`, :func:`import_original`: which checkout is run, and its modules
  (``cfm_vc.models.*`` and ``cfm_vc.data.dataset``; ``cfm_vc.training`` needs ``tqdm`` and is
  not imported);
- :func:`patched_torch`: a module's ``torch`` replaced for a block by a proxy whose random
  functions hand out fixed tensors (:class:`Queue`), so the original draws our noise;
- :class:`OriginalAdapter`: every compared quantity of an original ``CFMVCModel``, NumPy in
  and out, in float32 or (:meth:`OriginalAdapter.as_float64`) float64;
- :func:`init_weights`, :func:`stress_clamps`: the weights of the two scenarios.

The encoder's ``forward`` draws ``eps`` with ``torch.randn_like`` when ``self.training`` and
returns only samples and KLs; it is run with ``training = True`` on the encoder module alone
(its dropout modules stay in eval mode) with ``randn_like`` giving the fixed noise and
``clamp`` recording its results (the original's own bounded logvars). ``flow_step``'s
``torch.randn_like`` / ``torch.rand`` and generation's ``torch.randn`` are replaced the same
way in ``cfm_vc.models.cfmvc``. In float64 the torch default dtype is float64 for every call,
so tensors the original creates without a dtype (``torch.zeros`` in generation) follow.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

MODULES = {
    "encoder": "cfm_vc.models.encoder",
    "decoder": "cfm_vc.models.decoder",
    "context": "cfm_vc.models.context",
    "flow": "cfm_vc.models.flow",
    "cfmvc": "cfm_vc.models.cfmvc",
    "dataset": "cfm_vc.data.dataset",
}


def original_commit(path: str | os.PathLike[str]) -> str | None:
    """The commit of the original at ``path``: ``git rev-parse HEAD`` when ``path`` is the top
    of a checkout, else the first line of ``path/COMMIT``, else ``None``."""
    root = Path(path).resolve()
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.split()  # fmt: skip
        if len(out) == 2 and Path(out[0]).resolve() == root:
            return out[1]
    except (OSError, subprocess.SubprocessError):
        pass
    marker = root / "COMMIT"
    if marker.is_file():
        lines = marker.read_text().strip().splitlines()
        return lines[0].strip() if lines else None
    return None


def import_original(
    path: str | os.PathLike[str],
    modules: Mapping[str, str] = MODULES,
    anchor: str = "cfmvc",
) -> dict[str, Any]:
    """Puts ``path`` on ``sys.path`` and imports the original's modules (default
    :data:`MODULES`, CFM-VC's; another original passes its own ``{key: module}`` and the key
    ``anchor`` of the module that must be a file under ``path``).

    Raises ``FileNotFoundError`` when ``path`` holds no file of the anchor module (for CFM-VC
    ``cfm_vc/models/cfmvc.py``) and ``ImportError`` when its package resolves elsewhere.
    """
    root = str(Path(path).resolve())
    marker = Path(*modules[anchor].split(".")).with_suffix(".py").as_posix()
    if not (Path(root) / marker).is_file():
        raise FileNotFoundError(f"{root} has no {marker} (the original's code)")
    if root not in sys.path:
        sys.path.insert(0, root)
    mods = {key: importlib.import_module(name) for key, name in modules.items()}
    where = Path(mods[anchor].__file__).resolve()
    if not str(where).startswith(root):
        package = modules[anchor].split(".")[0]
        raise ImportError(f"{package} was imported from {where}, not from {root}")
    return mods


class Queue:
    """Hands out fixed tensors in order in place of a torch random function (a
    ``RuntimeError`` when called more often than it holds tensors, or for another shape)."""

    def __init__(self, name: str, values: list) -> None:
        self.name, self.values = name, list(values)

    def __call__(self, *args: Any, **kwargs: Any):
        if not self.values:
            raise RuntimeError(f"torch.{self.name} called more often than expected")
        value = self.values.pop(0)
        if args and hasattr(args[0], "shape") and tuple(args[0].shape) != tuple(value.shape):
            raise RuntimeError(f"torch.{self.name}: shape {tuple(args[0].shape)} expected")
        return value.clone()


class _TorchProxy:
    """``torch`` with some attributes replaced (patched into a module's globals)."""

    def __init__(self, torch_module: Any, **overrides: Any) -> None:
        self._torch, self._overrides = torch_module, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._torch, name)


@contextlib.contextmanager
def patched_torch(module: Any, **overrides: Any) -> Iterator[None]:
    """Replaces ``module.torch`` by a :class:`_TorchProxy` with ``overrides`` for the block."""
    saved = module.torch
    module.torch = _TorchProxy(saved, **overrides)
    try:
        yield
    finally:
        module.torch = saved


@contextlib.contextmanager
def torch_default_dtype(dtype: Any) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the block."""
    import torch

    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def in_adapter_dtype(method: Callable) -> Callable:
    """Runs an adapter method with torch's default dtype set to the adapter's ``dtype``."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with torch_default_dtype(self.dtype):
            return method(self, *args, **kwargs)

    return wrapper


def to_numpy(t: Any) -> np.ndarray:
    """A detached NumPy copy of a tensor."""
    return t.detach().cpu().numpy().copy()


def named_grads(model: Any) -> dict[str, np.ndarray]:
    """``.grad`` of every named parameter (zeros where ``None``), by state-dict name."""
    return {
        name: np.zeros(tuple(p.shape), np.float64) if p.grad is None else to_numpy(p.grad)
        for name, p in model.named_parameters()
    }


class OriginalAdapter:
    """Each quantity of the original ``CFMVCModel`` (``cfm_vc.models.cfmvc``), from NumPy in.

    ``mods`` is :func:`import_original`'s dict; ``model`` an original ``CFMVCModel`` in eval
    mode. The perturbation input is ``inputs["p_original"]`` (the control's own column).
    Every method takes and returns NumPy arrays; gradients are keyed by state-dict names.
    """

    p_key = "p_original"

    def __init__(self, mods: Mapping[str, Any], model: Any, dtype: Any = None) -> None:
        import torch

        self.torch, self.mods, self.model = torch, mods, model
        self.dtype = torch.float32 if dtype is None else dtype
        self.default_n_steps = int(
            inspect.signature(model.generate_expression).parameters["n_steps"].default
        )

    def as_float64(self) -> OriginalAdapter:
        """The same model (a float64 copy) and code, every tensor in float64."""
        return OriginalAdapter(self.mods, copy.deepcopy(self.model).double(), self.torch.float64)

    def _t(self, a: Any, dtype: Any = None) -> Any:
        a = np.asarray(a)
        if dtype is None and np.issubdtype(a.dtype, np.floating):
            dtype = self.dtype
        return self.torch.tensor(a, dtype=dtype)

    def _codes(self, inputs: Mapping[str, Any]) -> tuple[Any, Any]:
        long = self.torch.long
        return self._t(inputs["batch"], long), self._t(inputs["cell_type"], long)

    @contextlib.contextmanager
    def _sampling_encoder(self, eps_int: Any, eps_tech: Any, clamps: list) -> Iterator[None]:
        """The encoder samples (``training`` on the encoder only; dropout stays off) with the
        given noise; its ``torch.clamp`` results are appended to ``clamps``."""
        torch, enc = self.torch, self.model.encoder

        def recording_clamp(x, *args, **kwargs):
            out = torch.clamp(x, *args, **kwargs)
            clamps.append(out.detach().clone())
            return out

        randn = Queue("randn_like", [self._t(eps_int), self._t(eps_tech)])
        was_training = enc.training
        enc.training = True
        try:
            with patched_torch(self.mods["encoder"], randn_like=randn, clamp=recording_clamp):
                yield
        finally:
            enc.training = was_training
        if randn.values:
            raise RuntimeError("the original's encoder drew less noise than expected")

    @in_adapter_dtype
    def encode(self, inputs, eps_int, eps_tech) -> dict[str, np.ndarray]:
        enc, x = self.model.encoder, self._t(inputs["x"])
        b, c = self._codes(inputs)
        with self.torch.no_grad():
            mean_int, mean_tech, _, _ = enc(x, b, c)  # eval mode: the means
            clamps: list = []
            with self._sampling_encoder(eps_int, eps_tech, clamps):
                z_int, z_tech, kl_int, kl_tech = enc(x, b, c)
        if len(clamps) != 2:
            raise RuntimeError(f"expected 2 logvar clamps in the encoder, saw {len(clamps)}")
        return {
            "int_mean": to_numpy(mean_int),
            "int_logvar": to_numpy(clamps[0]),
            "tech_mean": to_numpy(mean_tech),
            "tech_logvar": to_numpy(clamps[1]),
            "z_int": to_numpy(z_int),
            "z_tech": to_numpy(z_tech),
            "kl_int": to_numpy(kl_int),
            "kl_tech": to_numpy(kl_tech),
        }

    @in_adapter_dtype
    def decode(self, z_int, z_tech) -> tuple[np.ndarray, np.ndarray]:
        with self.torch.no_grad():
            mean, theta = self.model.decoder(self._t(z_int), self._t(z_tech))
        return to_numpy(mean), to_numpy(theta)

    @in_adapter_dtype
    def nb_log_likelihood(self, x, mean, theta) -> np.ndarray:
        nb = self.mods["decoder"].nb_log_likelihood
        with self.torch.no_grad():
            return to_numpy(nb(self._t(x), self._t(mean), self._t(theta)))

    @in_adapter_dtype
    def context(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        with self.torch.no_grad():
            ctx, alpha = self.model.context_encoder(self._t(inputs[self.p_key]),
                                                    *self._codes(inputs))  # fmt: skip
        return to_numpy(ctx), to_numpy(alpha)

    @in_adapter_dtype
    def velocity(self, z_t, t, context, alpha) -> np.ndarray:
        with self.torch.no_grad():
            v = self.model.flow(self._t(z_t), self._t(t), self._t(context), self._t(alpha))
        return to_numpy(v)

    @in_adapter_dtype
    def vae_loss(self, inputs, eps_int, eps_tech) -> tuple[float, dict[str, np.ndarray]]:
        m = self.model
        m.zero_grad(set_to_none=True)
        with self._sampling_encoder(eps_int, eps_tech, []):
            loss, _, _ = m.vae_forward(self._t(inputs["x"]), *self._codes(inputs))
        loss.backward()
        grads = named_grads(m)
        m.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    @in_adapter_dtype
    def flow_loss(self, inputs, eps, z0, t) -> tuple[float, dict[str, np.ndarray], bool]:
        """The loss, its gradients, and whether the encoder got no gradient."""
        m, x = self.model, self._t(inputs["x"])
        b, c = self._codes(inputs)
        m.zero_grad(set_to_none=True)
        no_tech = np.zeros((len(x), m.dim_tech))
        with self.torch.no_grad(), self._sampling_encoder(eps, no_tech, []):
            z_int, _, _, _ = m.encoder(x, b, c)  # the training loop's target: a sample
        fixed = {"randn_like": Queue("randn_like", [self._t(z0)]),
                 "rand": Queue("rand", [self._t(t)])}  # fmt: skip
        with patched_torch(self.mods["cfmvc"], **fixed):
            loss, _, _ = m.flow_step(z_int.detach(), self._t(inputs[self.p_key]), b, c)
        loss.backward()
        untouched = all(p.grad is None or not p.grad.any() for p in m.encoder.parameters())
        grads = named_grads(m)
        m.zero_grad(set_to_none=True)
        return float(loss.detach()), grads, untouched

    @in_adapter_dtype
    def generate(self, inputs, z0, n_steps) -> tuple[np.ndarray, np.ndarray]:
        m, p = self.model, self._t(inputs[self.p_key])
        b, c = self._codes(inputs)
        with patched_torch(self.mods["cfmvc"], randn=Queue("randn", [self._t(z0)])):
            z = m.sample_z1_from_flow(p, b, c, n_steps=n_steps)
        with patched_torch(self.mods["cfmvc"], randn=Queue("randn", [self._t(z0)])):
            expression = m.generate_expression(p, b, c, n_steps=n_steps)
        return to_numpy(z), to_numpy(expression)


def init_weights(model: Any, seed: int) -> None:
    """Biases and ``log_theta`` from N(0, 0.1) (every leaf of the conversion then matters)."""
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "log_theta")):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def stress_clamps(model: Any) -> None:
    """Sets biases and ``log_theta`` of an original-layout torch model so that every clamp
    is active for some entries (logvar below -10, log-mean above 20, ``log_theta`` ±11)."""
    import torch

    with torch.no_grad():
        model.encoder.z_int_logvar.bias[:4] = -15.0
        model.encoder.z_tech_logvar.bias[:2] = -15.0
        model.decoder.mean_out.bias[:5] = 25.0
        model.decoder.log_theta[:3] = 11.0
        model.decoder.log_theta[3:6] = -11.0
