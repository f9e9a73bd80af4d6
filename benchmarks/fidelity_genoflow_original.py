"""The original GenoFlow code's side of ``benchmarks.fidelity_genoflow``: import, adapter, facts.

- :func:`import_original`: ``causal_genoflow``'s modules (:data:`MODULES`) from a checkout,
  through ``benchmarks.fidelity_original.import_original``;
- :func:`build_original`: ``CausalGenoFlow(n_genes, 16, n_cond, edge_index, beta=1.0,
  lambda_adv=0.1)`` under ``torch.manual_seed(seed)``; :func:`init_weights`: noise on the
  leaves that start at zero or one, BatchNorm running statistics from one pass;
- :class:`OriginalAdapter`: every compared quantity of an original model, NumPy in and out
  (integer condition codes; the adapter builds the original's one-hot ``c``), in float32 or
  (:meth:`OriginalAdapter.as_float64`) float64;
- :func:`probe_facts`: behaviours of the original measured by running it.

The original's ``CausalEncoder.reparameterize`` draws ``eps`` with ``torch.randn_like``; it is
given the benchmark's noise through ``fidelity_original.patched_torch`` on
``causal_genoflow.modules``. ``TwoStageTrainer.compute_ot_coupling`` is run as it is, with
``ot.sinkhorn`` wrapped to also return POT's log (iterations, error), its warnings and prints
recorded. Trajectories are ``ODEIntegrator(model).simulate_trajectory`` (torchdiffeq
``dopri5``). Nothing of the original is contained here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from benchmarks import fidelity_original as orig
from benchmarks.fidelity_original import in_adapter_dtype, named_grads, to_numpy

MODULES = {
    "modules": "causal_genoflow.modules",
    "losses": "causal_genoflow.losses",
    "data": "causal_genoflow.data",
    "trainer": "causal_genoflow.trainer",
    "inference": "causal_genoflow.inference",
}
N_LATENT = 16  # the original's example and the port's original() latent size
BN_BUFFERS = ("running_mean", "running_var")


def import_original(path: Any) -> dict[str, Any]:
    """``causal_genoflow``'s modules from the checkout at ``path`` (``FileNotFoundError``
    without ``causal_genoflow/modules.py`` there)."""
    return orig.import_original(path, MODULES, anchor="modules")


def build_original(
    mods: Mapping[str, Any], n_genes: int, n_cond: int, edges: np.ndarray, seed: int
) -> Any:
    """The original ``CausalGenoFlow`` at its defaults on the gene graph ``edges`` ``[2, E]``."""
    import torch

    torch.manual_seed(seed)
    edge_index = torch.as_tensor(np.asarray(edges, np.int64)).reshape(2, -1)
    return mods["modules"].CausalGenoFlow(
        n_genes, N_LATENT, n_cond, edge_index, beta=1.0, lambda_adv=0.1
    )


def init_weights(model: Any, seed: int, x_log: Any, c: Any) -> None:
    """Noise N(0, 0.1) on every bias and BatchNorm scale (``benchmarks.specs.genoflow.
    parity_weights``), then BatchNorm running statistics set by one pass of the encoder in
    train mode over ``x_log`` and ``c`` (the encoder's condition input: the original's
    one-hot, the PyTorch version's codes) with a cumulative average (the batch's mean and
    unbiased variance), momentum restored; in place, eval mode after."""
    import torch

    from benchmarks.specs.genoflow import parity_weights

    parity_weights(model, seed)
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
    model.encoder.train()
    with torch.no_grad():
        model.encoder(torch.as_tensor(x_log), torch.as_tensor(c))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


def batch_stats(model: Any) -> dict[str, np.ndarray]:
    """BatchNorm's running statistics by state-dict name."""
    return {k: to_numpy(v) for k, v in model.state_dict().items() if k.endswith(BN_BUFFERS)}


@contextlib.contextmanager
def recording_sinkhorn(ot_module: Any, record: dict[str, Any]) -> Iterator[None]:
    """``ot_module.sinkhorn`` called with ``log=True`` for the block; the log, the cost
    matrix's dtype and ``reg`` go to ``record``, the caller gets the plan alone."""
    real = ot_module.sinkhorn

    def sinkhorn(a: Any, b: Any, M: Any, reg: float, *args: Any, **kwargs: Any) -> Any:
        plan, log = real(a, b, M, reg, *args, **{**kwargs, "log": True})
        record.update(
            log=log,
            cost_dtype=str(np.asarray(M).dtype),
            reg=float(reg),
            method=kwargs.get("method", args[0] if args else "sinkhorn"),
        )
        return plan

    ot_module.sinkhorn = sinkhorn
    try:
        yield
    finally:
        ot_module.sinkhorn = real


class OriginalAdapter:
    """The quantities of an original ``CausalGenoFlow`` (eval mode unless said), NumPy in/out.

    ``codes`` are integer conditions; ``c`` is their one-hot (``ConditionDataLoader``'s
    layout). Gradients are ``{state-dict name: array}``.
    """

    def __init__(self, mods: Mapping[str, Any], model: Any, dtype: Any = None) -> None:
        import torch

        self.torch, self.mods, self.model = torch, mods, model
        self.dtype = torch.float32 if dtype is None else dtype
        self.n_cond = int(model.n_cond)

    def as_float64(self) -> OriginalAdapter:
        """A float64 copy (``model.double()``), every tensor in float64."""
        return OriginalAdapter(self.mods, copy.deepcopy(self.model).double(), self.torch.float64)

    def without_dropout(self) -> OriginalAdapter:
        """A copy with every dropout rate 0 (discriminator, GATv2 attention, vector field)."""
        model = copy.deepcopy(self.model)
        for m in model.modules():
            if isinstance(m, self.torch.nn.Dropout):
                m.p = 0.0
        model.vector_field.gat.dropout = 0.0
        return OriginalAdapter(self.mods, model, self.dtype)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.model.state_dict())

    def _t(self, a: Any, dtype: Any = None) -> Any:
        a = np.asarray(a)
        if dtype is None and np.issubdtype(a.dtype, np.floating):
            dtype = self.dtype
        return self.torch.tensor(a, dtype=dtype)

    def _c(self, codes: Any) -> Any:
        c = self.mods["data"].ConditionDataLoader.one_hot_encode(np.asarray(codes), self.n_cond)
        return c.to(self.dtype)

    def _fixed_noise(self, eps: Any) -> Any:
        return orig.patched_torch(
            self.mods["modules"], randn_like=orig.Queue("randn_like", [self._t(eps)])
        )

    @in_adapter_dtype
    def encode(self, x: Any, codes: Any) -> tuple[np.ndarray, np.ndarray]:
        with self.torch.no_grad():
            mu, logvar = self.model.encoder(self.torch.log1p(self._t(x)), self._c(codes))
        return to_numpy(mu), to_numpy(logvar)

    @in_adapter_dtype
    def sample(self, mu: Any, logvar: Any, eps: Any) -> np.ndarray:
        """``encoder.reparameterize`` with ``eps`` as its ``randn_like``."""
        with self.torch.no_grad(), self._fixed_noise(eps):
            return to_numpy(self.model.encoder.reparameterize(self._t(mu), self._t(logvar)))

    @in_adapter_dtype
    def decode(self, z: Any, codes: Any, library: Any) -> tuple[np.ndarray, np.ndarray]:
        with self.torch.no_grad():
            mean, theta = self.model.decoder(self._t(z), self._c(codes), self._t(library))
        return to_numpy(mean), to_numpy(theta)

    @in_adapter_dtype
    def vae(self, x: Any, codes: Any, library: Any, eps: Any, *, train: bool = False) -> dict:
        """``vae_forward`` (its ``CombinedVAELoss``) with ``eps``: loss, recon, KL, gradients
        of the loss (encoder, decoder; whether the discriminator got one), then
        ``F.cross_entropy(discriminator(z.detach()), labels)`` and its gradients.
        ``train``: on a copy in train mode (BatchNorm batch statistics; its running
        statistics after the pass are returned)."""
        torch, F = self.torch, self.torch.nn.functional
        m = copy.deepcopy(self.model).train() if train else self.model
        xt, c, lib = self._t(x), self._c(codes), self._t(library)
        m.zero_grad(set_to_none=True)
        with self._fixed_noise(eps):
            loss, z, mean, theta, mu, logvar = m.vae_forward(xt, c, lib)
        with torch.no_grad():
            recon = m.vae_loss.nb_loss(xt, mean, theta)
            kl = m.vae_loss.kl_loss(mu, logvar)
        loss.backward()
        grads = named_grads(m)
        disc_touched = any(bool(g.any()) for k, g in grads.items() if k.startswith("disc"))
        m.zero_grad(set_to_none=True)
        ce = F.cross_entropy(m.discriminator(z.detach()), self._t(codes, torch.long))
        ce.backward()
        disc = {k: g for k, g in named_grads(m).items() if k.startswith("discriminator.")}
        m.zero_grad(set_to_none=True)
        out = {
            "vae_total": float(loss.detach()),
            "recon": float(recon),
            "kl": float(kl),
            "disc_ce": float(ce.detach()),
            "z": to_numpy(z),
            "vae_grads": {k: g for k, g in grads.items() if k.startswith(("encoder.", "decoder."))},
            "disc_grads": disc,
            "discriminator_grad_from_vae_loss": disc_touched,
        }
        if train:
            out["batch_stats"] = batch_stats(m)
        return out

    @in_adapter_dtype
    def gene_features(self) -> np.ndarray:
        vf = self.model.vector_field
        with self.torch.no_grad():
            return to_numpy(vf.gat(vf.gene_embeddings, vf.edge_index))

    @in_adapter_dtype
    def velocity(self, t: Any, z: Any, codes: Any) -> np.ndarray:
        with self.torch.no_grad():
            return to_numpy(self.model.vector_field(self._t(t), self._t(z), self._c(codes)))

    @in_adapter_dtype
    def flow(self, z0: Any, z1: Any, codes: Any, t: Any) -> tuple[float, dict[str, np.ndarray]]:
        """``phase2_train``'s loss on one batch: ``z_t = (1 - t) z0 + t z1`` and
        ``flow_forward(z_t, z1 - z0, t, c)`` (the vector field, ``FlowMatchingLoss``: MSE);
        gradients of the vector field."""
        m = self.model
        z0, z1, t = self._t(z0), self._t(z1), self._t(t)
        z_t = (1 - t.unsqueeze(1)) * z0 + t.unsqueeze(1) * z1
        m.zero_grad(set_to_none=True)
        loss = m.flow_forward(z_t, z1 - z0, t, self._c(codes))
        loss.backward()
        grads = {k: g for k, g in named_grads(m).items() if k.startswith("vector_field.")}
        m.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    @in_adapter_dtype
    def ot_coupling(self, za: Any, zb: Any) -> dict[str, Any]:
        """``TwoStageTrainer.compute_ot_coupling(Z_A, Z_B)`` (POT ``ot.sinkhorn``, reg 0.01):
        the plan, the pairing, POT's log, warnings and whether it printed a warning."""
        import ot

        trainer = self.mods["trainer"].TwoStageTrainer(self.model)
        record: dict[str, Any] = {}
        printed = io.StringIO()
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(printed),
            recording_sinkhorn(ot, record),
        ):
            warnings.simplefilter("always")
            plan, pairs = trainer.compute_ot_coupling(self._t(za), self._t(zb))
        log = record.get("log", {})
        err = [float(e) for e in np.ravel(log.get("err", []))]
        return {
            "plan": np.asarray(plan, np.float64),
            "target": np.array([int(j) for _, j in pairs]),
            "warnings": sorted({str(w.message) for w in caught}),
            "printed_nan_warning": "NAN" in printed.getvalue(),
            "iterations": int(log.get("niter", -1)),
            "last_error": err[-1] if err else None,
            "cost_dtype": record.get("cost_dtype"),
            "reg": record.get("reg"),
            "method": record.get("method"),
        }

    @in_adapter_dtype
    def trajectory(
        self, z0: Any, codes: Any, times: Any, rtol: float = 1e-5, atol: float = 1e-6
    ) -> dict[str, Any]:
        """``ODEIntegrator(model).simulate_trajectory(z0, c, t_span=times)`` (dopri5,
        library 1e4): latent ``[T, n, L]``, decoded means, and the vector field's calls."""
        m = self.model
        calls = [0]
        hook = m.vector_field.register_forward_pre_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1)
        )
        try:
            integrator = self.mods["inference"].ODEIntegrator(m)
            traj_z, traj_mean, _ = integrator.simulate_trajectory(
                self._t(z0), self._c(codes), t_span=self._t(times), rtol=rtol, atol=atol
            )
        finally:
            hook.remove()
        return {
            "latent": to_numpy(traj_z),
            "expression": to_numpy(traj_mean),
            "function_evaluations": calls[0],
        }


# ---------------------------------------------------------------------------- facts
FACTS = {
    "phase1": "phase1_train runs the encoder twice per step in train mode (the discriminator "
    "step's no-grad pass with its own reparameterisation noise, then vae_forward): BatchNorm's "
    "running statistics move twice per optimizer step (effective momentum 1 - 0.9^2 = 0.19; "
    "the port's step moves them once) and the discriminator trains on another sample than the "
    "VAE's z (the port's on the VAE's z, stopped)",
    "adv_dropout": "in train mode the adversarial entropy term of vae_forward reads the "
    "discriminator with its dropout (p = 0.2) active: the same batch and noise give different "
    "losses (the port's train-mode discriminator applies its dropout too)",
    "running_var": "BatchNorm1d updates its running variance with the unbiased batch variance "
    "(ddof 1; train-mode normalisation uses the biased one), flax's nnx.BatchNorm with the "
    "biased one; the row 'train: BatchNorm running_var after the pass' compares the port's",
    "disc_grad": "vae_forward's loss reaches the discriminator's weights through the entropy "
    "term (phase1_train sets their requires_grad = False for the VAE step); the port's "
    "vae_total reads the discriminator with stopped weights",
    "flow_dropout": "phase2_train keeps the model in train mode: the vector field's GATv2 "
    "attention dropout (0.1) and MLP dropout (0.1) are active while the flow trains",
    "gat": "the GATv2 is torch_geometric's GATv2Conv: self loops removed and one per gene added "
    "(as the port's with_self_loops), LeakyReLU slope 0.2, heads concatenated",
    "eval": "ODEIntegrator.simulate_trajectory switches the whole model to eval mode and leaves "
    "it there",
    "defaults": "ODEIntegrator.simulate_trajectory's defaults are t_span = linspace(0, 1, "
    "100) [first, last, points], one unit of t whatever the number of time points, and "
    "library 1e4; the port's simulate_trajectory spans flow time 0 to T - 1 (all intervals) "
    "by default, so the benchmark passes t_span=(0, 1)",
    "stub": "CausalGenoFlow.sample_trajectory is a stub",
}


def _phase1_counts(adapter: OriginalAdapter, x: Any, c: Any, lib: Any, batch: int) -> dict:
    """One epoch of the original's ``phase1_train`` on a copy: its steps, BatchNorm updates
    and ``reparameterize`` draws."""
    torch = adapter.torch
    m = copy.deepcopy(adapter.model)
    draws = [0]

    def counting_randn_like(t: Any, *args: Any, **kwargs: Any) -> Any:
        draws[0] += 1
        return torch.randn_like(t, *args, **kwargs)

    trainer = adapter.mods["trainer"].TwoStageTrainer(m)
    before = int(m.encoder.fc[1].num_batches_tracked)
    patch = orig.patched_torch(adapter.mods["modules"], randn_like=counting_randn_like)
    with contextlib.redirect_stdout(io.StringIO()), patch:
        trainer.phase1_train(x, c, lib, num_epochs=1, batch_size=batch, verbose=False)
    bn_updates = int(m.encoder.fc[1].num_batches_tracked) - before
    steps = int(np.ceil(len(x) / batch))
    return {"steps": steps, "bn_updates": bn_updates, "noise_draws": draws[0]}


def _running_var_update(adapter: OriginalAdapter, xt: Any, c: Any) -> dict[str, Any]:
    """Max abs distance of the first BatchNorm's running variance after one train pass to
    the update with the biased (ddof 0) and unbiased (ddof 1) batch variance."""
    torch = adapter.torch
    m = copy.deepcopy(adapter.model).train()
    bn, old = m.encoder.fc[1], to_numpy(m.encoder.fc[1].running_var)
    with torch.no_grad():
        h = to_numpy(m.encoder.fc[0](torch.cat([torch.log1p(xt), c], dim=1))).astype(np.float64)
        m.encoder(torch.log1p(xt), c)
    new, mom = to_numpy(bn.running_var), bn.momentum
    dist = {}
    for d in (0, 1):
        dist[f"ddof{d}"] = float(np.max(np.abs(new - (1 - mom) * old - mom * h.var(0, ddof=d))))
    return {"max_abs_diff_to_update_with": dist, "batch": len(h)}


def probe_facts(
    adapter: OriginalAdapter, x: np.ndarray, codes: np.ndarray, library: np.ndarray, eps: Any
) -> list[dict[str, Any]]:
    """Behaviours of the original (float32) measured by running it: ``[{"fact", "measured"}]``
    (texts in :data:`FACTS`)."""
    torch = adapter.torch
    xt, c, lib = adapter._t(x), adapter._c(codes), adapter._t(library)
    measured: dict[str, Any] = {"phase1": _phase1_counts(adapter, xt, c, lib, batch=64)}
    m = copy.deepcopy(adapter.model).train()
    losses = []
    for _ in range(2):
        with adapter._fixed_noise(eps), torch.no_grad():
            losses.append(float(m.vae_forward(xt, c, lib)[0]))
    measured["adv_dropout"] = {"losses": losses, "difference": abs(losses[0] - losses[1])}
    measured["running_var"] = _running_var_update(adapter, xt, c)
    vae = adapter.vae(x, codes, library, eps)
    measured["disc_grad"] = {"discriminator_grad_nonzero": vae["discriminator_grad_from_vae_loss"]}
    vf = copy.deepcopy(adapter.model.vector_field).train()
    args = (torch.full((4,), 0.5), torch.zeros(4, N_LATENT), adapter._c(codes[:4]))
    with torch.no_grad():
        diff = float((vf(*args) - vf(*args)).abs().max())
    measured["flow_dropout"] = {"two_train_mode_calls_max_abs_diff": diff}
    gat = adapter.model.vector_field.gat
    keys = ("add_self_loops", "negative_slope", "heads", "concat", "dropout", "share_weights")
    measured["gat"] = {k: getattr(gat, k, None) for k in (*keys, "fill_value", "residual")}
    m = copy.deepcopy(adapter.model).train()
    integrator = adapter.mods["inference"].ODEIntegrator(m)
    with torch.no_grad():
        _, _, info = integrator.simulate_trajectory(args[1][:2], args[2][:2])
    measured["eval"] = {"model_training_after_call": bool(m.training)}
    span = np.asarray(info["t_span"])
    measured["defaults"] = {
        "t_span": [float(span[0]), float(span[-1]), len(span)],
        "library_size": float(np.asarray(info["library_size"])[0]),
    }
    try:
        adapter.model.sample_trajectory(args[1], args[2], torch.linspace(0, 1, 3))
        measured["stub"] = {"raises": None}
    except NotImplementedError as e:
        measured["stub"] = {"raises": f"NotImplementedError: {e}"}
    return [{"fact": FACTS[k], "measured": v} for k, v in measured.items()]
