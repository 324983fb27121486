"""`head-refit`: each head's output layer refitted by ridge on its hidden activations, strength
chosen on validation; in a federation from the sites' summed Grams, which must give what pooling
their eyes would, which are screened like an update, and which no site sends for fewer than
three eyes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import flower_run_identity
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from replies import Nodes, arrays, reply

from remdr.checkpoint import load_run
from remdr.config import apply_overrides
from remdr.data.dataset import EyeDataset
from remdr.experiment import load_splits, train_and_test, write_run
from remdr.federation.run_config import split_run_config
from remdr.federation.screening import head_stats_problem
from remdr.head_blend import choose, set_blend
from remdr.head_refit import (
    FUSION,
    HeadStats,
    add,
    head_stats,
    output_layer,
    refit_heads,
    refit_layer,
    sizes,
)
from remdr.methods import build_model
from remdr.train import evaluate, make_loader, predict

CPU = torch.device("cpu")


def _model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(apply_overrides(cfg, {"head-blend": True})).eval()


def _loader(records, cfg):
    return make_loader(EyeDataset(records, cfg.data), 8, shuffle=False, seed=0, device=CPU)


def _fused_mse(model, loader) -> float:
    """The fused prediction's MSE over the complete eyes, as `evaluate` scores it."""
    p = predict(model, loader, CPU)
    complete = p["has_oct"] & p["has_fundus"]
    return float(np.mean((p["pred"][complete] - p["md"][complete]) ** 2))


def _preds(model, loader) -> dict[str, np.ndarray]:
    return predict(model, loader, CPU)


def _mse(p: dict, key: str, rows: np.ndarray) -> float:
    return float(np.mean((p[key][rows] - p["md"][rows]) ** 2))


def test_the_sites_summed_grams_are_the_pooled_grams(tiny_data, tiny_cfg):
    data = load_splits(tiny_data, tiny_cfg)
    model = _model(tiny_cfg)
    records = data.train.records
    sites = [records[:7], records[7:20], records[20:]]
    summed = head_stats(model, _loader(sites[0], tiny_cfg), CPU)
    for r in sites[1:]:
        summed = add(summed, head_stats(model, _loader(r, tiny_cfg), CPU))
    pooled = head_stats(model, _loader(records, tiny_cfg), CPU)
    assert set(pooled) == {"oct", "fundus", FUSION}
    for head, size in sizes(model).items():
        assert summed[head].n == pooled[head].n == len(records)
        assert pooled[head].gram.shape == (size, size)
        assert pooled[head].gram[size - 2, size - 2] == pooled[head].n  # the constant column
        # the forward passes run in float32 on different batches: equal to its last bits
        np.testing.assert_allclose(summed[head].gram, pooled[head].gram, rtol=1e-5, atol=1e-6)


def test_an_eye_with_one_image_refits_only_its_modalitys_head(tiny_data, tiny_cfg):
    """Its prediction comes from that head, never from the fusion head."""
    import dataclasses

    data = load_splits(tiny_data, tiny_cfg)
    model = _model(tiny_cfg)
    records = data.train.records
    oct_only = [dataclasses.replace(r, modalities=("oct",)) for r in records[:5]]
    with_them = head_stats(model, _loader(oct_only + records[5:], tiny_cfg), CPU)
    without = head_stats(model, _loader(records[5:], tiny_cfg), CPU)
    assert with_them[FUSION].n == without[FUSION].n and with_them["fundus"].n == without["fundus"].n
    assert with_them["oct"].n == without["oct"].n + 5
    np.testing.assert_allclose(with_them[FUSION].gram, without[FUSION].gram, rtol=1e-5, atol=1e-6)


def test_the_validation_grams_score_each_head_exactly(tiny_data, tiny_cfg):
    """Before and after the refit, the MSE each Gram gives is what that head then predicts,
    and the blend chosen from the fusion Gram is the one the refitted model's probes choose."""
    import dataclasses

    data = load_splits(tiny_data, tiny_cfg)
    model = _model(tiny_cfg)
    val_records = (
        data.val.records
        + [  # an OCT-only eye too: the OCT head's, not the fusion's
            dataclasses.replace(r, modalities=("oct",)) for r in data.train.records[:4]
        ]
    )
    val_loader = _loader(val_records, tiny_cfg)
    train = head_stats(model, _loader(data.train.records, tiny_cfg), CPU)
    val = head_stats(model, val_loader, CPU)
    before = _preds(model, val_loader)
    complete = before["has_oct"] & before["has_fundus"]
    chosen = refit_heads(model, train, val, blend=True)
    after = _preds(model, val_loader)
    for head, key in ((FUSION, "pred"), ("oct", "pred_oct"), ("fundus", "pred_fundus")):
        rows = complete if head == FUSION else np.isfinite(before[key])
        r = chosen.heads[head]
        assert r.val_eyes == rows.sum()
        assert r.val_mse_before == pytest.approx(_mse(before, key, rows), rel=1e-4)
        assert r.val_mse <= r.val_mse_before
        assert math.isfinite(r.strength)  # an untrained head: some fit beats it
        assert r.val_mse == pytest.approx(_mse(after, key, rows), rel=1e-4)
    complete_loader = _loader([r for r in val_records if len(r.modalities) == 2], tiny_cfg)
    probes = choose(evaluate(model, complete_loader, CPU), model.modalities)
    assert chosen.blend is not None
    assert (chosen.blend.modality, chosen.blend.weight) == (probes.modality, probes.weight)
    assert chosen.blend.mse == pytest.approx(probes.mse, rel=1e-4)
    set_blend(model, chosen.blend)  # the final model: refitted heads, the blend, one-image eyes
    final = _preds(model, val_loader)
    assert chosen.val_mse == pytest.approx(
        _mse(final, "pred", np.isfinite(final["pred"])), rel=1e-4
    )


def _stats(x: np.ndarray, y: np.ndarray, heads: np.ndarray) -> HeadStats:
    rows = np.column_stack([x, np.ones(len(x)), heads, y])
    return HeadStats(rows.T @ rows, len(x))


def test_least_squares_at_strength_zero_and_the_trained_layer_when_nothing_beats_it():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    true = np.array([0.5, -1.0, 0.0, 2.0, 0.3, 0.1])  # weights, then bias
    y = x @ true[:5] + true[5] + rng.normal(0, 0.1, 200)
    heads = rng.normal(size=(200, 2))
    train, val = _stats(x[:150], y[:150], heads[:150]), _stats(x[150:], y[150:], heads[150:])
    cols = list(range(6))  # five features, then the constant
    chosen = refit_layer(train, val, cols, np.zeros(6), scale=1.0)
    lstsq = np.linalg.lstsq(np.column_stack([x[:150], np.ones(150)]), y[:150], rcond=None)[0]
    assert chosen.strength in (0.0, 1e-4)  # hardly any shrinkage toward the zero layer
    np.testing.assert_allclose(chosen.weight, lstsq, atol=2e-3)
    kept = refit_layer(train, val, cols, chosen.weight, scale=1.0)  # nothing beats the fit
    assert kept.strength == math.inf and np.array_equal(kept.weight, chosen.weight)
    assert kept.val_mse == kept.val_mse_before == chosen.val_mse


def test_pooled_training_applies_the_refit_it_reports(tiny_data, tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, {"head-refit": True, "head-blend": True, "epochs": 2})
    data = load_splits(tiny_data, cfg)
    outcome = train_and_test(cfg, data, progress=False)
    assert outcome.refit is not None
    assert set(outcome.refit.heads) == {"oct", "fundus", FUSION}
    write_run(tmp_path, cfg, data, outcome, str(tiny_data))  # what remdr-predict loads
    loaded = load_run(tmp_path)[0]
    for head, module in (("oct", loaded.heads["oct"]), (FUSION, loaded.fusion)):
        np.testing.assert_allclose(
            output_layer(module), outcome.refit.heads[head].weight, rtol=1e-6
        )
    saved = json.loads((tmp_path / "metrics.json").read_text())["head_refit"]
    assert saved[FUSION]["val-mse"] == pytest.approx(outcome.refit.heads[FUSION].val_mse)
    assert any(math.isfinite(r.strength) for r in outcome.refit.heads.values())  # it refitted
    plain = train_and_test(apply_overrides(cfg, {"head-refit": False}), data, progress=False)
    assert plain.refit is None


@pytest.mark.parametrize(
    "run_config",
    [{"site-dp": "fixed", "site-dp-clip": 1.0}, {"method": "remdr_dp"}, {"strategy": "fedmedian"}],
)
def test_refit_is_off_where_the_run_trusts_its_sites_less(run_config):
    """The sums are released outside any DP accounting and summed, not robustly aggregated."""
    base = {"head-refit": True, "min-nodes": 4, "group-norm": True}
    assert split_run_config(base)[0].method.head_refit
    assert not split_run_config({**base, **run_config})[0].method.head_refit


def test_no_site_sends_sums_a_group_of_one_or_two_eyes_could_be_read_off(tiny_data, tiny_cfg):
    """The Gram of two rows gives both rows; two OCT-only eyes are the difference of the OCT
    head's and the fusion head's Grams. Such a split goes out empty; three eyes do not."""
    import dataclasses

    from remdr.head_refit import MIN_EYES, withheld

    data = load_splits(tiny_data, tiny_cfg)
    model = _model(tiny_cfg)
    records = data.train.records
    for few in (records[:1], records[:2]):
        assert all(s.n == 0 and not s.gram.any() for s in withheld(
            head_stats(model, _loader(few, tiny_cfg), CPU)).values())  # fmt: skip
    two_oct_only = [dataclasses.replace(r, modalities=("oct",)) for r in records[:2]]
    sums = head_stats(model, _loader(two_oct_only + records[2:], tiny_cfg), CPU)
    assert sums["oct"].n - sums[FUSION].n == 2 and withheld(sums)[FUSION].n == 0
    enough = head_stats(model, _loader(records[:MIN_EYES], tiny_cfg), CPU)
    assert withheld(enough) is enough


def test_a_refit_without_validation_eyes_keeps_the_trained_layer():
    rng = np.random.default_rng(1)
    x, y, heads = rng.normal(size=(50, 5)), rng.normal(size=50), rng.normal(size=(50, 2))
    empty = HeadStats(np.zeros((9, 9)), 0)
    kept = refit_layer(_stats(x, y, heads), empty, list(range(6)), np.ones(6), scale=1.0)
    assert kept.strength == math.inf and math.isnan(kept.val_mse) and kept.val_eyes == 0


# -- the coordinator screens each site's sums like an update ----------------------------------

SIZES = {"oct": 6, "fundus": 6, FUSION: 14}  # hidden widths 4: [h, 1, y]; [h_f, h_o, h_u, 1, y]


def _honest(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in (("train", n), ("val", n // 4)):
        for head, size in SIZES.items():
            rows = rng.normal(size=(k, size))
            rows[:, size - 2] = 1.0
            out[f"{split}-{head}-gram"] = rows.T @ rows
            out[f"{split}-{head}-n"] = np.array([k], dtype=np.int64)
    return out


def _counts(n: int) -> dict[str, float]:
    return {"num-examples": float(n), "num-val": float(n // 4), "unit-weight": 1.0}


def _not_psd(s):
    g = s["train-fusion-gram"]
    g[0, 1] = g[1, 0] = 10 * np.abs(g).max()


def _asymmetric(s):
    s["val-oct-gram"][0, 1] += 1.0


def _nan(s):
    s["train-fundus-gram"][2, 2] = np.nan


def _constant_column(s):
    s["train-oct-gram"][4, 4] *= 3


def _float32(s):
    s["val-fusion-gram"] = s["val-fusion-gram"].astype(np.float32)


def _too_many_eyes(s):
    s["train-oct-n"] = np.array([10_000], dtype=np.int64)


def _extra_array(s):
    s["test-oct-gram"] = s["val-oct-gram"]


def _wrong_size(s):
    s["val-fundus-gram"] = np.eye(5)


def _float_count(s):
    s["train-oct-n"] = np.array([30.0])


def _text_count(s):
    s["val-oct-n"] = np.array(["10"])


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (_not_psd, "negative eigenvalue"),
        (_asymmetric, "not symmetric"),
        (_nan, "not finite"),
        (_constant_column, "constant column"),
        (_float32, "float64"),
        (_too_many_eyes, "more than"),
        (_extra_array, "expected"),
        (_wrong_size, "shape"),
        (_float_count, "int64"),
        (_text_count, "int64"),
    ],
)
def test_sums_that_cannot_be_a_sites_gram_are_refused(spoil, reason):
    stats = _honest(40, 0)
    assert head_stats_problem(stats, SIZES, _counts(40)) is None
    spoil(stats)
    assert reason in (head_stats_problem(stats, SIZES, _counts(40)) or "")


class _Grid(Nodes):
    """The coordinator's grid for one exchange: the sites' replies as they come back."""

    def __init__(self, replies) -> None:
        super().__init__([1, 2, 3])
        self.replies, self.dst_of_message = replies, {}

    def send_and_receive(self, messages, timeout=None):
        return self.replies


def _stats_reply(node: int, site: str, stats: dict, n: int):
    content = RecordDict(
        {
            "arrays": arrays(stats),
            "metrics": MetricRecord(_counts(n)),
            "site": ConfigRecord({"site-id": site}),
        }
    )
    return reply(node, content, "evaluate")


def test_the_coordinator_sums_the_sites_that_pass_and_names_the_one_that_does_not():
    from remdr.server.strategy import build_strategy

    _, fed = split_run_config({"min-nodes": 3, "node-wait": 0.0})
    strategy = build_strategy(fed)
    bad = _honest(30, 3)
    _not_psd(bad)
    strategy.grid = _Grid(
        [
            _stats_reply(1, "A", _honest(40, 1), 40),
            _stats_reply(2, "B", _honest(60, 2), 60),
            _stats_reply(3, "C", bad, 30),
        ]
    )
    with flower_run_identity():
        train, val, sites, errors = strategy.head_statistics(
            arrays({"fusion.3.weight": np.zeros((1, 4), np.float32)}), ConfigRecord(), 5, SIZES
        )
    assert sites == ["A", "B"] and train["oct"].n == 100 and val[FUSION].n == 10 + 15
    expected = _honest(40, 1)["train-fusion-gram"] + _honest(60, 2)["train-fusion-gram"]
    np.testing.assert_allclose(train[FUSION].gram, expected)
    assert [e["site"] for e in errors] == ["C"] and "negative eigenvalue" in errors[0]["reason"]


def test_a_site_that_does_not_answer_is_named_and_the_others_are_summed():
    from remdr.server.strategy import build_strategy

    _, fed = split_run_config({"min-nodes": 3, "node-wait": 0.0})
    strategy = build_strategy(fed)
    strategy.grid = _Grid([_stats_reply(1, "A", _honest(40, 1), 40)])  # 2 and 3 stay silent
    with flower_run_identity():
        train, _, sites, errors = strategy.head_statistics(
            arrays({"fusion.3.weight": np.zeros((1, 4), np.float32)}), ConfigRecord(), 5, SIZES
        )
    assert sites == ["A"] and train["oct"].n == 40
    assert sorted(e["reason"] for e in errors) == ["no reply", "no reply"]


class _Sites(Nodes):
    """A grid whose nodes are real ClientApps (the production app, over the wire) on one
    site's data each: what the coordinator's last step talks to."""

    def __init__(self, contexts: dict) -> None:
        super().__init__(list(contexts))
        self.contexts, self.dst_of_message = contexts, {}

    def send_and_receive(self, messages, timeout=None):
        from site_app import app

        return [app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def _two_sites(tiny_data, run_config: dict):
    """The coordinator's strategy over two real ClientApps (hospA, hospB) on the tiny data."""
    from flwr.app import Context
    from remdr.server.strategy import build_strategy

    def context(node: int, site: str) -> Context:
        node_config = {"data-path": str(tiny_data), "site-id": site}
        return Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(),
                       run_config=run_config)  # fmt: skip

    strategy = build_strategy(split_run_config(run_config)[1])
    strategy.grid = _Sites({7: context(7, "hospA"), 8: context(8, "hospB")})
    return strategy


def _assert_same_file(first: dict, again: dict) -> None:
    assert set(first) == set(again)
    for key in first:
        torch.testing.assert_close(first[key], again[key])


def test_the_coordinator_refits_from_real_site_replies_and_a_resume_repeats_it(tiny_data, tmp_path):
    from conftest import TINY
    from remdr.server.head_refit import refit_best
    from safetensors.torch import load_file

    from remdr.federation.run_config import run_config_defaults
    from remdr.federation.run_directory import RunDirectory

    run_config = {**run_config_defaults(), **TINY, "min-nodes": 2, "node-wait": 0.0}
    cfg, fed = split_run_config(run_config)
    assert cfg.method.head_refit  # the federated default
    torch.manual_seed(0)
    model = build_model(cfg)
    run = RunDirectory(tmp_path / "run")
    run.save_round(1, model.state_dict(), {"num-examples": 10})
    run.add_evaluation(1, {"val-mse": 30.0}, {})

    strategy = _two_sites(tiny_data, run_config)
    with flower_run_identity():
        record = refit_best(strategy, run, cfg, ConfigRecord({}), 1, average_rounds=4)
        first = load_file(str(tmp_path / "run" / "best.safetensors"))
        assert record["sites"] == ["hospA", "hospB"] and "errors" not in record
        best = json.loads((tmp_path / "run" / "best.json").read_text())
        assert best["round"] == 1 and best["val-mse"] == 30.0  # the round's, as resume compares
        assert any(math.isfinite(r["strength"]) for r in (best["head-refit"][h] for h in
                                                          ("oct", "fundus", FUSION)))  # fmt: skip
        refit_best(strategy, run, cfg, ConfigRecord({}), 1, average_rounds=4)  # resumed
    _assert_same_file(first, load_file(str(tmp_path / "run" / "best.safetensors")))
    loaded, trained = build_model(cfg), build_model(cfg)
    loaded.load_state_dict(first)
    trained.load_state_dict(run.load_weights(1))  # the round's own file stays the trained model
    for head, module in (("oct", "heads.oct"), ("fundus", "heads.fundus"), (FUSION, "fusion")):
        moved = not np.allclose(
            output_layer(loaded.get_submodule(module)), output_layer(trained.get_submodule(module))
        )
        assert moved == math.isfinite(best["head-refit"][head]["strength"]), head


def test_the_simulator_summary_prints_a_head_without_validation_eyes():
    from remdr.sim.report import _refit

    no_val = {"strength": "inf", "val-mse-before": None, "val-mse": None, "val-eyes": 0}
    line = _refit({FUSION: no_val, "oct": {"val-mse-before": 4.0, "val-mse": 3.25}})
    assert line == "fusion kept (no validation eyes), oct 4.00 -> 3.25"


def test_the_mean_of_the_last_rounds_is_refitted_too_and_the_lower_scoring_model_kept(
    tiny_data, tmp_path
):
    from conftest import TINY
    from remdr.server.global_model import mean_state
    from remdr.server.head_refit import refit_best
    from safetensors.torch import load_file

    from remdr.federation.run_config import run_config_defaults
    from remdr.federation.run_directory import RunDirectory

    run_config = {**run_config_defaults(), **TINY, "min-nodes": 2, "node-wait": 0.0}
    cfg, fed = split_run_config(run_config)
    assert fed.average_rounds == 4  # the federated default
    run = RunDirectory(tmp_path / "run")
    states = {}
    for r in (1, 2, 3):
        torch.manual_seed(r)
        states[r] = build_model(cfg).state_dict()
        run.save_round(r, states[r], {"num-examples": 10})
        run.add_evaluation(r, {"val-mse": 30.0 + r}, {})  # round 1 is the best

    strategy = _two_sites(tiny_data, run_config)
    with flower_run_identity():
        record = refit_best(strategy, run, cfg, ConfigRecord({}), 3, average_rounds=2)
        first = load_file(str(tmp_path / "run" / "best.safetensors"))
        refit_best(strategy, run, cfg, ConfigRecord({}), 3, average_rounds=2)  # resumed
    _assert_same_file(first, load_file(str(tmp_path / "run" / "best.safetensors")))
    scores = record["candidates"]
    assert set(scores) == {"round 1", "mean of rounds 2-3"}
    assert record["model"] == min(scores, key=scores.get)
    assert record["val-mse"] == min(scores.values()) and record["round"] == 1
    chosen = states[1] if record["model"] == "round 1" else mean_state([states[2], states[3]])
    saved = load_file(str(tmp_path / "run" / "best.safetensors"))
    encoder = [k for k in chosen if k.startswith("branches.") and chosen[k].is_floating_point()]
    assert encoder  # the refit moves only the heads' output layers
    for key in encoder:
        torch.testing.assert_close(saved[key], chosen[key])
    assert json.loads((tmp_path / "run" / "best.json").read_text())["val-mse"] == 31.0


def test_the_mean_of_models_averages_weights_and_keeps_the_last_counters():
    from remdr.server.global_model import mean_state

    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float32), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0], dtype=torch.float32), "n": torch.tensor(5)}
    mean = mean_state([a, b])
    torch.testing.assert_close(mean["w"], torch.tensor([2.0, 4.0]))
    assert mean["w"].dtype == torch.float32 and int(mean["n"]) == 5


def test_sums_that_contradict_each_other_score_no_model():
    """Fewer validation eyes with an image than complete ones: no eyes give that, so the
    refitted model gets no score (NaN) and cannot win the coordinator's choice."""
    from remdr.head_refit import Refit, _model_mse

    fusion = HeadStats(np.eye(5), 10)
    val = {FUSION: fusion, "oct": HeadStats(np.eye(3), 6), "fundus": HeadStats(np.eye(3), 10)}
    chosen = {m: Refit(0.0, np.zeros(2), 1.0, 1.0, 10) for m in ("oct", "fundus")}
    on_fusion = {m: np.array([0.0, 0.0, 0.0, 0.0, -1.0]) for m in ("oct", "fundus")}
    assert math.isnan(_model_mse(val, chosen, on_fusion, 2.0, 1.0))
    val["oct"] = HeadStats(np.eye(3), 12)  # two OCT-only eyes: their squared errors add in
    assert _model_mse(val, chosen, on_fusion, 2.0, 1.0) == pytest.approx((2.0 * 10 + 1 - 1) / 12)
