"""The fidelity benchmark's comparison and reporting, without the original's code.

CI has no checkout of the original (``cfm_vc``), so the reference side is an adapter over the
project's own PyTorch version (``benchmarks/torch_ref/cfmvc.py``) at
``CFMVCConfig.original()`` (small widths; bounds ``"clip"``, i.e. ``torch.clamp`` as in the
original), with the same interface as ``benchmarks.fidelity_original.OriginalAdapter``; the port
under test is at ``CFMVCConfig.original()`` too, compared in float32 and float64."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch

from benchmarks import fidelity_cfmvc as fid
from benchmarks import fidelity_original as orig
from benchmarks import run as runner
from benchmarks.torch_ref import cfmvc as tref
from jaxstab.models.cfmvc import CFMVCConfig

N_CELLS, N_GENES, N_STEPS = 16, 30, 5


def _np(t):
    return t.detach().cpu().numpy().copy()


class TorchRefAdapter:
    """The quantities of a ``benchmarks.torch_ref.cfmvc.CFMVCModel`` (the data's ``p``)."""

    p_key = "p"

    def __init__(self, model, dtype=torch.float32):
        self.model, self.dtype = model, dtype

    def as_float64(self):
        return TorchRefAdapter(copy.deepcopy(self.model).double(), torch.float64)

    def _t(self, a):
        return torch.tensor(np.asarray(a), dtype=self.dtype)

    def _codes(self, inputs):
        return (torch.tensor(inputs["batch"], dtype=torch.long),
                torch.tensor(inputs["cell_type"], dtype=torch.long))  # fmt: skip

    def encode(self, inputs, eps_int, eps_tech):
        b, c = self._codes(inputs)
        with torch.no_grad():
            mu_i, lv_i, mu_t, lv_t = self.model.encoder(self._t(inputs["x"]), b, c)
        kl = lambda mu, lv: -0.5 * (1.0 + lv - mu.pow(2) - lv.exp()).sum(-1)
        return {
            "int_mean": _np(mu_i),
            "int_logvar": _np(lv_i),
            "tech_mean": _np(mu_t),
            "tech_logvar": _np(lv_t),
            "z_int": _np(mu_i + self._t(eps_int) * torch.exp(0.5 * lv_i)),
            "z_tech": _np(mu_t + self._t(eps_tech) * torch.exp(0.5 * lv_t)),
            "kl_int": _np(kl(mu_i, lv_i)),
            "kl_tech": _np(kl(mu_t, lv_t)),
        }

    def decode(self, z_int, z_tech):
        with torch.no_grad():
            mean, theta = self.model.decoder(self._t(z_int), self._t(z_tech))
        return _np(mean), _np(theta)

    def nb_log_likelihood(self, x, mean, theta):
        return _np(tref.nb_log_likelihood(self._t(x), self._t(mean), self._t(theta)))

    def context(self, inputs):
        with torch.no_grad():
            ctx, alpha = self.model.context_encoder(self._t(inputs["p"]), *self._codes(inputs))
        return _np(ctx), _np(alpha)

    def velocity(self, z_t, t, context, alpha):
        with torch.no_grad():
            v = self.model.flow(self._t(z_t), self._t(t), self._t(context), self._t(alpha))
        return _np(v)

    def _grads(self):
        return {k: np.zeros(tuple(p.shape), np.float32) if p.grad is None else _np(p.grad)
                for k, p in self.model.named_parameters()}  # fmt: skip

    def vae_loss(self, inputs, eps_int, eps_tech):
        self.model.zero_grad(set_to_none=True)
        x = self._t(inputs["x"])
        loss, _, _ = self.model.vae_forward(x, *self._codes(inputs), self._t(eps_int),
                                            self._t(eps_tech))  # fmt: skip
        loss.backward()
        return float(loss.detach()), self._grads()

    def flow_loss(self, inputs, eps, z0, t):
        m = self.model
        m.zero_grad(set_to_none=True)
        b, c = self._codes(inputs)
        loss, _ = m.flow_step(self._t(inputs["x"]), self._t(inputs["p"]), b, c, self._t(z0),
                              self._t(t), eps=self._t(eps))  # fmt: skip
        loss.backward()
        untouched = all(p.grad is None or not p.grad.any() for p in m.encoder.parameters())
        return float(loss.detach()), self._grads(), untouched

    def generate(self, inputs, z0, n_steps):
        m = self.model
        b, c = self._codes(inputs)
        with torch.no_grad(), orig.torch_default_dtype(self.dtype):
            ctx, alpha = m.context_encoder(self._t(inputs["p"]), b, c)
            z, dt = self._t(z0), 1.0 / n_steps
            for i in range(n_steps):
                z = z + dt * m.flow(z, torch.full((len(z),), i * dt), ctx, alpha)
            mean, _ = m.decoder(z, torch.zeros(len(z), m.dim_tech))
        return _np(z), _np(mean)


@pytest.fixture(scope="module")
def setup():
    inputs = fid.make_inputs(N_CELLS, N_GENES, seed=2)
    config = CFMVCConfig.small(CFMVCConfig.original()).replace(
        control_column=inputs["control_column"]
    )
    assert (config.logvar_bound, config.mean_bound, config.theta_bound) == ("clip",) * 3
    torch.manual_seed(0)
    meta = inputs["meta"]
    model = tref.CFMVCModel(
        meta["n_genes"], meta["n_batches"], meta["n_cell_types"], meta["n_perturbations"], config
    )
    orig.stress_clamps(model)  # every clamp active somewhere: the clip comparison is exercised
    model.eval()
    noise = fid.make_noise(N_CELLS, config.dim_int, config.dim_tech, seed=2)
    return model, config, inputs, noise


@pytest.fixture(scope="module")
def result(setup):
    model, config, inputs, noise = setup
    return fid.compare(TorchRefAdapter(model), model.state_dict(), config, inputs, noise, N_STEPS)


@pytest.fixture(scope="module")
def result64(setup):
    model, config, inputs, noise = setup
    adapter = TorchRefAdapter(model)
    return fid.compare(adapter, model.state_dict(), config, inputs, noise, N_STEPS, float64=True)


def test_inputs_encode_the_control_as_the_original_does():
    inputs = fid.make_inputs(N_CELLS, N_GENES, seed=2)
    assert inputs["labels"] == ["BRCA1", "MYC", "NTC", "TP53"]
    assert inputs["control_column"] == 2
    p, p_orig = inputs["p"], inputs["p_original"]
    assert p.shape[1] + 1 == p_orig.shape[1]
    np.testing.assert_array_equal(np.delete(p_orig, 2, axis=1), p)
    np.testing.assert_array_equal(p_orig[:, 2], 1.0 - p.sum(1))


def test_stand_in_matches_the_port(result):
    errors = result["max_relative_error"]
    assert result["checks"]["n_gradient_tensors"] == 39
    assert all(result["checks"].values())
    assert {"velocity", "generate.expression", "stage2_flow_gradients", "kl_int"} <= set(errors)
    assert result["ok_up_to_float32_rounding"], errors
    assert all(v <= 1e-4 for k, v in errors.items() if k not in result["by_design"]), errors
    assert any(v > 0 for v in errors.values())  # two implementations, not one


def test_active_clamps_are_reported_and_compared_with_clip(result):
    assert all(n > 0 for k, n in result["clamps_active"].items() if k != "log_mean_generation")
    by_design = result["by_design"]
    assert by_design == [fid.STRAIGHT_THROUGH_ROW]
    assert "straight_through=True" in by_design[0]
    assert result["max_relative_error"][by_design[0]] > 1e-3  # straight-through ≠ clamp
    assert by_design[0] not in result["within_tolerance"]  # not counted as failing
    assert result["within_tolerance"]["stage1_vae_gradients"]  # original() is torch.clamp
    assert result["ok"] or result["ok_up_to_float32_rounding"]
    md = fid.markdown_table(result["max_relative_error"], 1e-5, frozenset(by_design))
    assert f"| {by_design[0]} |" in md and f"| {fid.BY_DESIGN} |" in md


def test_float64_agrees_with_the_stand_in(result64):
    errors = result64["max_relative_error"]
    assert result64["dtype"] == "float64" and result64["tolerance"] == fid.FLOAT64_TOLERANCE
    assert result64["ok"], errors
    assert result64["by_design"] == [fid.STRAIGHT_THROUGH_ROW]
    assert all(v <= 1e-9 for k, v in errors.items() if k not in result64["by_design"]), errors
    assert errors[fid.STRAIGHT_THROUGH_ROW] > 1e-3  # the variant still differs by design
    assert not result64["float32_floor"]
    assert {"stage1_vae_gradients", "stage2_flow_gradients", "generate.expression"} <= set(errors)


@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
def test_a_perturbed_weight_is_flagged(setup, tmp_path, float64):
    model, config, inputs, noise = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["flow.base_head.bias"] += 0.5  # the port gets a different flow bias
    adapter = TorchRefAdapter(model)
    bad = fid.compare(adapter, state, config, inputs, noise, N_STEPS, float64=float64)
    within = bad["within_tolerance"]
    assert not bad["ok"] and not bad["ok_up_to_float32_rounding"]
    for name in ("velocity", "stage2_flow_loss", "stage2_flow_gradients", "generate.z_int"):
        assert not within[name], name
    for name in ("encoder.int_mean", "context", "alpha", "nb_log_likelihood"):
        assert within[name], name
    if float64:
        return
    bad["float64"] = fid.compare(adapter, state, config, inputs, noise, N_STEPS, float64=True)
    result = {
        "original": "stand-in", "original_commit": "0" * 40, "tolerance": fid.TOLERANCE,
        "device": runner.device_name(), "all_ok": False, "scenarios": {"perturbed": bad},
        "all_within_tolerance_float64": False, "tolerance_float64": fid.FLOAT64_TOLERANCE,
    }  # fmt: skip
    md = fid.to_markdown(result)
    assert "| velocity |" in md and "| NO |" in md and "0" * 40 in md
    assert "### float32" in md and "### float64" in md and "| 1e-09 | NO |" in md
    json_path, md_path = runner.write_results("fidelity_cfmvc", result, md, tmp_path)
    assert json.loads(json_path.read_text())["scenarios"]["perturbed"]["ok"] is False
    assert md_path.read_text() == md


def test_rel_err_and_table():
    assert fid.rel_err([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert fid.rel_err([0.0, 3.0], [0.0, 2.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes"):
        fid.rel_err([1.0], [1.0, 2.0])
    md = fid.markdown_table({"a": 1e-6, "b": 1e-3}, 1e-5)
    assert "| a | 1.000e-06 | 1e-05 | yes |" in md and "| b | 1.000e-03 | 1e-05 | NO |" in md
    floor = {"b": {"original_f32_vs_f64": 2e-3, "port_vs_f64": 2e-3}}
    assert "NO (float32" in fid.markdown_table({"b": 1e-3}, 1e-5, floor=floor)


def test_port_side_in_float64_keeps_float64(setup):
    import jax

    from benchmarks import fidelity_port as port_side

    model, config, inputs, _ = setup
    with pytest.raises(RuntimeError, match="x64"):
        port_side.build_port(config, model.state_dict(), inputs, np.float64)
    with jax.enable_x64(True):
        port = port_side.build_port(config, model.state_dict(), inputs, np.float64)
        dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(nnx_params(port))}
    assert dtypes == {"float64"}
    assert port_side.as_dtype(inputs, np.float64, ("x",))["x"].dtype == np.float64
    assert port_side.as_dtype(inputs, np.float64, ("x",))["p"].dtype == np.float32


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def test_commit_and_import_of_the_original(tmp_path):
    assert orig.original_commit(tmp_path) is None
    (tmp_path / "COMMIT").write_text("e2a56a3e607b894321126787773a0b24747a8a0f\n")
    assert orig.original_commit(tmp_path) == "e2a56a3e607b894321126787773a0b24747a8a0f"
    with pytest.raises(FileNotFoundError, match="cfm_vc"):
        orig.import_original(tmp_path)


def test_torch_proxy_hands_out_fixed_noise_and_restores():
    mod = types.SimpleNamespace(torch=torch)
    z = torch.arange(6.0).reshape(2, 3)
    with orig.patched_torch(mod, randn_like=orig.Queue("randn_like", [z])):
        np.testing.assert_array_equal(mod.torch.randn_like(torch.zeros(2, 3)).numpy(), z.numpy())
        assert mod.torch.exp is torch.exp
        with pytest.raises(RuntimeError, match="more often"):
            mod.torch.randn_like(torch.zeros(2, 3))
    assert mod.torch is torch
    with (
        orig.patched_torch(mod, randn_like=orig.Queue("randn_like", [z])),
        pytest.raises(RuntimeError, match="shape"),
    ):
        mod.torch.randn_like(torch.zeros(3, 2))
