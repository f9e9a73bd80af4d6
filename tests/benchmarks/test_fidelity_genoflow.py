"""The GenoFlow fidelity benchmark's comparison and reporting, without the original's code.

CI has no checkout of the original (``causal_genoflow``), so the reference side is an adapter
over the project's own PyTorch version (``benchmarks/torch_ref/genoflow.py``) at
``GenoFlowConfig.original()`` with small widths, with the interface of
``benchmarks.fidelity_genoflow_original.OriginalAdapter``: the vector field and trajectories as
the original's ``ODEFunc`` (the field read at the integrator's ``t``), the OT plan as the
original's call (POT's default ``ot.sinkhorn`` on float32 z-scores). The port under test is at
the same config, compared in float32 and float64."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import ot
import pytest
import torch
from torchdiffeq import odeint

from benchmarks import fidelity_genoflow as fg
from benchmarks import fidelity_genoflow_compare as cmp
from benchmarks import fidelity_genoflow_dynamics as dyn
from benchmarks import fidelity_genoflow_original as og
from benchmarks import fidelity_genoflow_port as ports
from benchmarks import fidelity_original as orig
from benchmarks import run as runner
from benchmarks.torch_ref import genoflow as tref
from jaxstab.models.genoflow import GenoFlowConfig

N_CELLS, N_GENES, SEED = 12, 24, 3
WIDTHS = {
    "latent_dim": 4,
    "hidden_encoder": 16,
    "hidden_decoder": 16,
    "hidden_disc": 8,
    "gene_dim": 4,
    "time_dim": 4,
    "cond_dim": 4,
    "hidden_flow": 16,
}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


class TorchRefAdapter:
    """The quantities of a ``benchmarks.torch_ref.genoflow.GenoFlowModel`` (integer codes)."""

    def __init__(self, model: tref.GenoFlowModel, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.dtype = model, dtype

    def as_float64(self) -> TorchRefAdapter:
        return TorchRefAdapter(copy.deepcopy(self.model).double(), torch.float64)

    def without_dropout(self) -> TorchRefAdapter:
        model = copy.deepcopy(self.model)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.vector_field.gat.dropout = 0.0
        return TorchRefAdapter(model, self.dtype)

    def state_dict(self) -> dict:
        return dict(self.model.state_dict())

    def _t(self, a) -> torch.Tensor:
        a = np.asarray(a)
        return torch.tensor(a, dtype=self.dtype if a.dtype.kind == "f" else torch.long)

    def encode(self, x, codes):
        with torch.no_grad():
            mu, lv = self.model.encoder(torch.log1p(self._t(x)), self._t(codes))
        return _np(mu), _np(lv)

    def sample(self, mu, lv, eps):
        return _np(self._t(mu) + self._t(eps) * torch.exp(0.5 * self._t(lv)))

    def decode(self, z, codes, library):
        with torch.no_grad():
            mean, theta = self.model.decoder(self._t(z), self._t(codes), self._t(library))
        return _np(mean), _np(theta)

    def _grads(self, m, prefix):
        return {
            k: np.zeros(tuple(p.shape)) if p.grad is None else _np(p.grad)
            for k, p in m.named_parameters()
            if k.startswith(prefix)
        }

    def vae(self, x, codes, library, eps, *, train=False):
        m = copy.deepcopy(self.model).train() if train else self.model
        m.zero_grad(set_to_none=True)
        _, aux = m.vae_terms(self._t(x), self._t(codes), self._t(library), self._t(eps))
        aux["vae_total"].backward()
        vae_grads = self._grads(m, ("encoder.", "decoder."))
        touched = any(p.grad is not None for p in m.discriminator.parameters())
        m.zero_grad(set_to_none=True)
        aux["disc_ce"].backward()
        out = {k: float(aux[k].detach()) for k in ("vae_total", "recon", "kl", "disc_ce")}
        out |= {
            "vae_grads": vae_grads,
            "disc_grads": self._grads(m, "discriminator."),
            "discriminator_grad_from_vae_loss": touched,
        }
        m.zero_grad(set_to_none=True)
        if train:
            out["batch_stats"] = og.batch_stats(m)
        return out

    def gene_features(self):
        with torch.no_grad():
            return _np(self.model.vector_field.gene_features())

    def velocity(self, t, z, codes):
        with torch.no_grad():
            return _np(self.model.vector_field(self._t(t), self._t(z), self._t(codes)))

    def flow(self, z0, z1, codes, t):
        m, z0 = self.model, self._t(z0)
        zero = torch.zeros(len(z0), dtype=self.dtype)
        m.zero_grad(set_to_none=True)
        loss, _ = m.flow_terms(z0, self._t(z1), self._t(codes), zero, zero + 1, self._t(t))
        loss.backward()
        return float(loss.detach()), self._grads(m, "vector_field.")

    def ot_coupling(self, za, zb):
        """POT's default Sinkhorn on torch z-scores (std ddof 1, floored at 1e-8), as the
        original's call, recorded like ``OriginalAdapter.ot_coupling``."""

        def z(v):
            v = self._t(v)
            return _np((v - v.mean(0)) / v.std(0).clamp(min=1e-8))

        record: dict = {}
        with warnings.catch_warnings(record=True) as caught, og.recording_sinkhorn(ot, record):
            warnings.simplefilter("always")
            cost = ot.dist(z(za), z(zb), metric="euclidean")
            plan = ot.sinkhorn(ot.unif(len(za)), ot.unif(len(zb)), cost, dyn.OT_EPSILON)
        log = record["log"]
        err = [float(e) for e in np.ravel(log.get("err", []))]
        return {
            "plan": np.asarray(plan, np.float64),
            "target": np.argmax(plan, 1),
            "warnings": sorted({str(w.message) for w in caught}),
            "printed_nan_warning": False,
            "iterations": int(log["niter"]),
            "last_error": err[-1] if err else None,
            "cost_dtype": str(cost.dtype),
            "reg": record["reg"],
            "method": record["method"],
        }

    def trajectory(self, z0, codes, times, rtol=1e-5, atol=1e-6):
        vf, c = self.model.vector_field, self._t(codes)
        calls = [0]

        def field(t, z):
            calls[0] += 1
            return vf(t.expand(len(z)), z, c)

        with torch.no_grad():
            z = odeint(field, self._t(z0), self._t(times), method="dopri5", rtol=rtol, atol=atol)
            mean, _ = self.model.decoder(z.reshape(-1, z.shape[-1]), c.repeat(len(times)), 1e4)
        return {
            "latent": _np(z),
            "expression": _np(mean).reshape(len(times), len(z0), -1),
            "function_evaluations": calls[0],
        }


class WideLatents:
    """The stand-in's OT call on 16-d latents (normal draws seeded by the cells' counts): the
    original's latent size, at which its float32 kernel ``exp(-M / 0.01)`` underflows."""

    def __init__(self, adapter: TorchRefAdapter) -> None:
        self.adapter = adapter

    def as_float64(self) -> WideLatents:
        return WideLatents(self.adapter.as_float64())

    def encode(self, x, codes):
        rng = np.random.default_rng(int(np.asarray(x).sum()))
        dtype = np.float64 if self.adapter.dtype == torch.float64 else np.float32
        return rng.normal(size=(len(x), 16)).astype(dtype), None

    def ot_coupling(self, za, zb):
        return self.adapter.ot_coupling(za, zb)


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    saved, ports.FAST_COMPILE = ports.FAST_COMPILE, True
    yield
    ports.FAST_COMPILE = saved


@pytest.fixture(scope="module")
def setup():
    inputs = ports.make_inputs(N_CELLS, N_GENES, SEED)
    meta = inputs["meta"]
    config = GenoFlowConfig.original().replace(**WIDTHS)
    torch.manual_seed(SEED)
    model = tref.GenoFlowModel(
        meta["n_genes"],
        meta["n_conditions"],
        meta["gene_graph"],
        config,
        time_points=meta["time_points"],
    )
    last = inputs["time"] == 2  # BatchNorm statistics from one pass: not 0 / 1
    og.init_weights(model, SEED, np.log1p(inputs["x"][last]), inputs["condition"][last])
    noise = ports.make_noise(len(inputs["x"]), config.latent_dim, SEED, n_flow=16)
    return TorchRefAdapter(model), config, inputs, noise


@pytest.fixture(scope="module")
def result(setup):
    return cmp.compare(*setup)


@pytest.fixture(scope="module")
def result64(setup):
    return cmp.compare(*setup, float64=True)


def test_stand_in_matches_the_port(result, setup):
    adapter = setup[0]
    assert result["ok_or_rounding"], result["max_relative_error"]
    assert all(result["checks"].values()), result["checks"]
    assert all(v <= 1e-5 for v in result["max_relative_error"].values()), result[
        "max_relative_error"
    ]
    assert any(v > 0 for v in result["max_relative_error"].values())  # two implementations
    assert {
        "train: vae_total gradients (encoder, decoder)",
        cmp.PRE_BN_ROW,
        "flow gradients (vector field)",
        "GATv2 gene features",
    } <= set(result["max_relative_error"])
    assert len(adapter.state_dict()) == 51  # the original's entries (edge_index, 2 counters)


def test_velocity_and_running_statistics_match(result):
    # GenoFlow.velocity reads tau = 1 as the end of the first interval, as the original's t = 1.
    assert result["ok"] and result["ok_or_rounding"]
    errors = result["max_relative_error"]
    assert errors[cmp.VELOCITY_AT_1] <= 1e-5
    assert errors["velocity at t = 1 (vector_field)"] <= 1e-5
    # torch's BatchNorm1d and the port's both update with the unbiased batch variance
    assert errors[cmp.RUNNING_VAR] <= 1e-5
    assert errors["train: BatchNorm running_mean after the pass"] <= 1e-5


def test_float64_agrees_with_the_stand_in(result64):
    assert result64["dtype"] == "float64" and result64["tolerance"] == cmp.FLOAT64_TOLERANCE
    assert result64["ok_or_rounding"], result64["max_relative_error"]
    assert all(v <= 1e-9 for v in result64["max_relative_error"].values()), result64


@pytest.mark.parametrize("key", ["vector_field.final_mlp.3.bias", "encoder.fc.1.running_mean"])
def test_a_perturbed_weight_is_flagged(setup, key):
    adapter, config, inputs, noise = setup
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    state[key] += 0.5
    bad = cmp.compare(adapter, config, inputs, noise, state_dict=state)
    within = bad["within_tolerance"]
    assert not bad["ok"] and not bad["ok_or_rounding"]
    flow_rows = ("velocity v(t, z, c)", "flow-matching loss", "flow gradients (vector field)")
    vae_rows = ("encoder.mu", "decoder.mean", "vae_total (vae_forward loss)")
    if key.startswith("vector_field"):
        assert not any(within[k] for k in flow_rows)
        assert all(within[k] for k in (*vae_rows, "train: vae_total (vae_forward loss)"))
    else:  # a running statistic: eval mode reads it, train mode (batch statistics) does not
        assert not any(within[k] for k in vae_rows)
        assert all(within[k] for k in (*flow_rows, "train: vae_total (vae_forward loss)"))
        assert not within["train: BatchNorm running_mean after the pass"]


def test_trajectory_and_its_report(setup, result, result64, tmp_path):
    adapter, config, inputs, _ = setup
    tr = dyn.compare_trajectory(adapter, config, inputs, full=False)
    assert len(tr["max_relative_error"]) == 2 and all(tr["within_tolerance"].values()), tr
    assert all(v <= 1e-4 for v in tr["max_relative_error"].values())
    assert tr["steps"]["original_function_evaluations"] > 0
    ot_result = dyn.compare_ot(WideLatents(adapter), inputs, reference_iterations=2000)
    result_dict = {
        "original": "stand-in",
        "original_commit": "0" * 40,
        "device": runner.device_name(),
        "float32": result,
        "float64": result64,
        "trajectory": {"float32": tr},
        "ot": {"float32": ot_result},
        "facts": [{"fact": "a fact", "measured": {"x": 1}}],
    }
    md = fg.to_markdown(result_dict)
    assert "0" * 40 in md and "## float32" in md and "## float64" in md and "| 1e-09 |" in md
    assert "### float32" in md and "| identical argmax pairs port vs original |" in md
    assert "a fact. Measured: {'x': 1}" in md and "| NO |" not in md
    json_path, md_path = runner.write_results("fidelity_genoflow", result_dict, md, tmp_path)
    assert json.loads(json_path.read_text())["float32"]["ok"] is True
    assert md_path.read_text() == md


@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
def test_ot_comparison_reports_the_original_calls_outcome(setup, float64):
    adapter, _, inputs, _ = setup
    res = dyn.compare_ot(WideLatents(adapter), inputs, float64=float64, reference_iterations=2000)
    o, p, ref = res["original"], res["port"], res["reference"]
    assert res["dtype"] == o["cost_dtype"] == ("float64" if float64 else "float32")
    assert p["marginal_error"] < 1e-3 and p["distinct_targets"] > 1
    assert ref["port_argmax_agreement"] >= 0.9
    assert ref["port_plan_max_abs_diff"] < 0.1 * res["plan_max"]
    if float64:  # POT's kernel iterations work in float64: the same pairing
        assert not o["all_zero_plan"] and res["argmax_agreement"] >= 0.9
    else:  # float32: POT's numerical-error exit, an all-zero plan, every cell paired with 0
        assert o["all_zero_plan"] and not o["converged"] and o["distinct_targets"] == 1
        assert any("umerical" in w for w in o["warnings"]) and o["iterations"] == 0
        assert o["marginal_error"] == pytest.approx(2 / res["n_source"])
    plan, info = dyn.reference_plan(np.eye(3), np.eye(3)[::-1], epsilon=0.1)
    assert np.argmax(plan, 1).tolist() == [2, 1, 0] and info["converged"]


def test_rel_err_table_and_marginal_error():
    assert cmp.rel_err([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert cmp.rel_err([0.0, 3.0], [0.0, 2.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes"):
        cmp.rel_err([1.0], [1.0, 2.0])
    md = fg.table({"a": 1e-6, "b": 1e-3, "c": 2e-3}, {"a": 1e-5, "b": 1e-5, "c": 1e-2})
    assert "| a | 1.000e-06 | 1e-05 | yes |" in md
    assert "| b | 1.000e-03 | 1e-05 | NO |" in md
    assert "| c | 2.000e-03 | 0.01 | yes |" in md
    assert fg.table({"d": 1.0}, 1e-5).endswith("| d | 1.000e+00 | 1e-05 | NO |\n")
    assert ports.marginal_error(np.full((2, 4), 0.125)) == 0.0
    assert ports.marginal_error(np.zeros((2, 2))) == pytest.approx(1.0)
    assert np.isnan(ports.marginal_error(np.array([[np.nan, 0.5], [0.5, 0.0]])))


def test_commit_reader_and_import_of_the_original(tmp_path):
    assert orig.original_commit(tmp_path) is None
    (tmp_path / "COMMIT").write_text("c1433d98a7cd2803ed6a97dd4bc9b842d00de028\n")
    assert orig.original_commit(tmp_path) == "c1433d98a7cd2803ed6a97dd4bc9b842d00de028"
    with pytest.raises(FileNotFoundError, match=r"causal_genoflow/modules\.py"):
        og.import_original(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cfm_vc/models/cfmvc\.py"):
        orig.import_original(tmp_path)  # the CFM-VC default is unchanged


def test_recording_sinkhorn_returns_the_plan_and_keeps_the_log():
    record: dict = {}
    cost = np.array([[0.0, 1.0], [1.0, 0.0]])
    with og.recording_sinkhorn(ot, record):
        plan = ot.sinkhorn(ot.unif(2), ot.unif(2), cost, 0.5)
    assert plan.shape == (2, 2) and record["reg"] == 0.5 and record["method"] == "sinkhorn"
    assert record["log"]["niter"] >= 0 and record["cost_dtype"] == "float64"
    assert ot.sinkhorn.__module__.startswith("ot")  # restored
