"""Side-chain training on the bundled chains (random crops in the loss), prediction, the
registry entry, the input statistics and the command line on a bad PDB."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jaxstab import plugin, registry
from jaxstab.cli import main
from jaxstab.models.sidechain import (
    SideChainConfig,
    SideChainModel,
    default_data,
    feature_stats,
    load_pdb,
    predict,
    residue_constants,
    sidechain_loss,
    train_sidechain,
)
from jaxstab.models.sidechain.train import FEATURE_NAMES, ZERO_AT_INIT

N_CHAINS, MAX_LEN = 8, 24


@pytest.fixture(scope="module")
def chains() -> dict[str, np.ndarray]:
    return {k: np.asarray(v[:N_CHAINS]) for k, v in default_data("train").arrays.items()}


@pytest.fixture(scope="module")
def initial() -> SideChainModel:
    # no weight decay: a parameter moves only where it has had gradient
    config = SideChainConfig.small().replace(n_blocks=1, lr=3e-3, weight_decay=0.0, max_len=MAX_LEN)
    return SideChainModel(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def trained(chains, initial):
    return train_sidechain(chains, key=jax.random.key(0), model=initial, epochs=4, batch_size=2)


def test_training_on_the_bundled_chains_lowers_the_loss(trained, initial):
    res = trained.fit
    assert res.status == "ok" and res.epochs == 4 and res.steps == 4 * N_CHAINS // 2
    # at initialisation only the edge groups (behind a zero-initialised layer) get no gradient
    report = trained.report
    assert set(report.trainable_without_grad) == set(ZERO_AT_INIT) & set(report.norms)
    assert all(v > 0 for k, v in report.norms.items() if k not in ZERO_AT_INIT)
    # ... and they get it once that layer has moved
    before = nnx.to_pure_dict(nnx.state(initial.edge_feature_net, nnx.Param))
    after = nnx.to_pure_dict(nnx.state(res.model.edge_feature_net, nnx.Param))
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
    assert all(jax.tree.leaves(changed))
    # every step sees new windows and design masks, yet the epoch loss falls steadily
    train = res.epoch_history["train_loss"]
    assert np.isfinite(train).all() and train[-1] < 0.7 * train[0], train
    assert np.all(np.diff(train) < 0), train


class _Seen(Exception):
    pass


class _Spy:
    """Stands in for the model: keeps the batch the loss passes it, then stops the loss."""

    def __init__(self, config: SideChainConfig) -> None:
        self.config = config
        self.batch: dict | None = None

    def __call__(self, batch):
        self.batch = {k: np.asarray(v) for k, v in batch.items()}
        raise _Seen


def _seen_by_model(config, batch, key) -> dict[str, np.ndarray]:
    spy = _Spy(config)
    with pytest.raises(_Seen):
        sidechain_loss(spy, batch, key)
    return spy.batch


def test_the_loss_crops_a_random_window_inside_each_chain(chains):
    config = SideChainConfig.small().replace(max_len=MAX_LEN)
    lengths = chains["chain_length"]
    assert chains["aatype"].shape[1] > MAX_LEN and (lengths > MAX_LEN).all()
    starts = []
    for step in range(6):
        seen = _seen_by_model(config, chains, jax.random.key(step))
        assert seen["aatype"].shape == (N_CHAINS, MAX_LEN)
        assert seen["atom14_pos"].shape == (N_CHAINS, MAX_LEN, 14, 3)
        assert (seen["chain_length"] == MAX_LEN).all()
        row = []
        for i in range(N_CHAINS):
            # the window is a contiguous slice of the stored chain, lying inside it
            start = int(np.argmax(chains["residue_index"][i] == seen["residue_index"][i, 0]))
            assert 0 <= start <= lengths[i] - MAX_LEN
            stop = start + MAX_LEN
            for name in ("aatype", "residue_mask", "atom14_pos", "atom14_mask", "residue_index"):
                np.testing.assert_array_equal(seen[name][i], chains[name][i, start:stop])
            row.append(start)
        # designed residues: drawn after the crop, only among real residues
        assert not (seen["design_mask"] & (seen["residue_mask"] == 0)).any()
        assert seen["design_mask"].sum() > 0
        starts.append(row)
    starts = np.array(starts)
    assert all(len(set(starts[:, i])) > 1 for i in range(N_CHAINS)), starts  # varies by step
    assert len({tuple(r) for r in starts}) == len(starts)


def test_a_narrow_batch_is_not_cropped_and_a_given_design_mask_is_kept(chains):
    config = SideChainConfig.small().replace(max_len=200)
    given = chains["residue_mask"] > 0
    given[:, ::2] = False
    seen = _seen_by_model(config, {**chains, "design_mask": given}, jax.random.key(0))
    np.testing.assert_array_equal(seen["atom14_pos"], chains["atom14_pos"])
    np.testing.assert_array_equal(seen["design_mask"], given)
    pair = {**chains, "esm_pair": np.zeros((N_CHAINS, 173, 173, 1), np.float32)}
    with pytest.raises(ValueError, match="esm_pair"):
        sidechain_loss(_Spy(config.replace(max_len=MAX_LEN)), pair, jax.random.key(0))


def test_predict_shapes_backbone_and_design_modes(trained, chains):
    model = trained.fit.model
    data = {k: v[:3] for k, v in chains.items()}
    out = predict(model, data, batch_size=2)  # 3 chains in two calls, the last filled up
    n, width = data["aatype"].shape
    assert out["atom14_pos"].shape == (n, width, 14, 3)
    assert out["aatype_logits"].shape == (n, width, 21)
    assert isinstance(out["atom14_pos"], np.ndarray) and np.isfinite(out["atom14_pos"]).all()
    present = data["atom14_mask"][..., :4] > 0
    np.testing.assert_array_equal(out["atom14_pos"][..., :4, :][present],
                                  data["atom14_pos"][..., :4, :][present])  # fmt: skip
    real = data["residue_mask"] > 0
    np.testing.assert_array_equal(out["design_mask"], real)  # every residue designed
    assert not out["atom14_pos"][~real].any()
    np.testing.assert_array_equal(out["aatype"], out["aatype_logits"][..., :20].argmax(-1))
    np.testing.assert_array_equal(
        out["atom14_mask"], residue_constants.ATOM14_MASK[out["aatype"]] * real[..., None]
    )
    # a chain's outputs do not depend on the other chains of its batch
    other = predict(model, {k: v[1:3] for k, v in data.items()}, batch_size=2)
    np.testing.assert_allclose(other["atom14_pos"], out["atom14_pos"][1:3], atol=1e-4)
    np.testing.assert_allclose(other["aatype_logits"], out["aatype_logits"][1:3], atol=1e-4)
    # training's random design share, drawn from the key
    rand = predict(model, data, jax.random.key(3), batch_size=2, design="random")
    share = rand["design_mask"].sum(1) / real.sum(1)
    cfg = model.config
    assert (share > cfg.mask_min - 0.15).all() and (share <= cfg.mask_max).all()
    assert not (rand["design_mask"] & ~real).any() and not rand["design_mask"].all()
    with pytest.raises(ValueError, match="needs a key"):
        predict(model, data, design="random")


def test_registry_entry_presets_and_data():
    entry = registry.get("sidechain")
    assert set(entry.presets) == {"default", "original", "small"}
    for name in ("default", "original", "small"):
        assert entry.preset(name) == getattr(SideChainConfig, name)()
    assert entry.load_data is load_pdb and entry.feature_stats is feature_stats
    assert entry.loss_fn is sidechain_loss and entry.stage().name == "all"
    data = entry.default_data(0)
    assert data.meta["split"] == "train" and len(data) == 40
    cfg = plugin.run_config(entry, preset="small", sets=["n_blocks=1"])
    assert (cfg["max_len"], cfg["batch_size"], cfg["lr"]) == (24, 2, 1e-4)
    model = entry.build_model(data, plugin.model_config(entry, cfg), nnx.Rngs(0))
    assert isinstance(model, SideChainModel) and model.config.n_blocks == 1
    assert model.config == SideChainConfig.small().replace(n_blocks=1)


def test_feature_stats_match_numpy(chains):
    batch = {k: v[:4] for k, v in chains.items()}
    stats = jax.jit(feature_stats)(batch)
    assert set(stats) == set(FEATURE_NAMES)
    res = batch["residue_mask"] > 0
    per_chain = res.sum(1)
    assert float(stats["residues_mean"]) == pytest.approx(per_chain.mean())
    assert float(stats["residues_min"]) == per_chain.min()
    assert float(stats["residues_max"]) == per_chain.max()
    share = 1 - per_chain.sum() / batch["chain_length"].sum()
    assert float(stats["masked_residue_share"]) == pytest.approx(share, abs=1e-6)
    side = (batch["atom14_mask"][..., 4:] > 0) & res[..., None]
    expected = residue_constants.ATOM14_MASK[batch["aatype"]][..., 4:] * res[..., None]
    assert float(stats["sidechain_atoms_present"]) == pytest.approx(side.sum() / expected.sum())
    assert float(stats["sidechain_atoms_per_residue"]) == pytest.approx(side.sum() / res.sum())
    steps, spreads = [], []
    for i in range(4):
        ca = batch["atom14_pos"][i, :, 1].astype(np.float64)
        both = res[i, 1:] & res[i, :-1]
        steps += list(np.linalg.norm(ca[1:] - ca[:-1], axis=-1)[both])
        real = ca[res[i]]
        spreads.append(np.sqrt(((real - real.mean(0)) ** 2).sum(-1).mean()))
    assert float(stats["ca_ca_mean"]) == pytest.approx(np.mean(steps), rel=1e-5)
    assert float(stats["ca_ca_max"]) == pytest.approx(np.max(steps), rel=1e-5)
    assert 3.7 < float(stats["ca_ca_mean"]) < 3.9
    assert float(stats["ca_spread_mean"]) == pytest.approx(np.mean(spreads), rel=1e-4)
    assert float(stats["ca_spread_max"]) == pytest.approx(np.max(spreads), rel=1e-4)
    present = (batch["atom14_mask"] > 0) & res[..., None]
    largest = np.abs(batch["atom14_pos"][present]).max()
    assert float(stats["coord_abs_max"]) == pytest.approx(largest)


def test_cli_exits_2_with_one_line_on_a_bad_pdb(tmp_path, capsys):
    bad = tmp_path / "bad.pdb"
    bad.write_text(
        "ATOM      1  N   GLY A   1       0.000   1.458   0.000  1.00  0.00           N\n"
        "ATOM      2  CA  GLY A   1         nan   0.000   0.000  1.00  0.00           C\n"
        "ATOM      3  C   GLY A   1       1.420   0.000   0.000  1.00  0.00           C\n"
        "END\n"
    )
    out = tmp_path / "run"
    code = main(["diagnose", "--model", "sidechain", "--data", str(bad), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("jaxstab: error:") and "\n" not in err
    assert "bad.pdb" in err and not out.exists()
