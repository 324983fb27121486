"""`unimodal-rounds`: a federation's first rounds train each branch from its own head only."""

from __future__ import annotations

import pytest
import torch
from test_client_app import RUN_CONFIG, _initial

from remdr.errors import ConfigError
from remdr.federation.run_config import split_run_config
from remdr.federation.site_round import load_site, train_round
from remdr.model import model_part


def _changed(before: dict, after: dict, part: str) -> list[str]:
    keys = [k for k in before if model_part(k) == part and before[k].is_floating_point()]
    assert keys, part
    return [k for k in keys if not torch.equal(before[k], after[k])]


def test_a_unimodal_round_leaves_the_fusion_head_alone_and_trains_both_branches(
    tiny_data, one_thread
):
    """Rounds up to `unimodal-rounds` train no fused loss: the fusion head comes back as it
    was received (AdamW's weight decay included: it gets no gradient, not a zero one, so the
    optimizer leaves it alone and keeps no step count for it), while both encoders learn from
    their own heads; the next round, with the site's optimizer carried over, trains it."""
    run_config = {
        **RUN_CONFIG, "method": "remdr", "oct-view": "bscans", "unimodal-rounds": 1,
        "num-server-rounds": 2, "keep-site-optimizer": True,
    }  # fmt: skip
    cfg, fed = split_run_config(run_config)
    assert cfg.train.weight_decay > 0 and cfg.train.optimizer == "adamw"
    site = load_site(tiny_data, cfg, seed=cfg.train.seed)
    received = _initial(run_config)

    first = train_round(cfg, fed, {k: v.clone() for k, v in received.items()}, site, server_round=1)
    assert _changed(received, first.state, "fusion") == []
    assert _changed(received, first.state, "oct") and _changed(received, first.state, "fundus")
    assert first.metrics["train-steps"] > 0
    optimizer = first.carried.optimizer  # no AdamW state for the parameters left alone
    n_params = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert optimizer["state"] and len(optimizer["state"]) < n_params

    second = train_round(cfg, fed, first.state, site, server_round=2, carried=first.carried)
    assert _changed(first.state, second.state, "fusion")


@pytest.mark.parametrize(
    ("keys", "names"),
    [
        ({"unimodal-rounds": 4, "num-server-rounds": 4}, "num-server-rounds"),
        ({"unimodal-rounds": 2, "method": "concat"}, "method=concat"),
        ({"unimodal-rounds": 2, "method": "mmpareto"}, "method=mmpareto"),
        ({"unimodal-rounds": 2, "method": "ume"}, "method=ume"),
        ({"unimodal-rounds": 2, "method": "remdr_dp"}, "method=remdr_dp"),
    ],
)
def test_unimodal_rounds_that_cannot_act_are_refused_in_one_line(keys, names):
    with pytest.raises(ConfigError) as err:
        split_run_config({**RUN_CONFIG, **keys})
    assert names in str(err.value) and "unimodal-rounds" in str(err.value)


def test_unimodal_rounds_are_off_by_default_and_taken_by_the_remdr_family():
    assert split_run_config(RUN_CONFIG)[1].unimodal_rounds == 0
    for method in ("remdr", "remdr_no_sagm", "multitask"):
        _, fed = split_run_config({**RUN_CONFIG, "method": method, "unimodal-rounds": 3})
        assert fed.unimodal_rounds == 3


def test_warmup_rounds_raise_the_site_lr_linearly_and_resume_at_the_same_lr(tiny_data, one_thread):
    """`warmup-rounds = 4`: round 1 trains at a quarter of lr, round 4 and later at lr; the
    share depends on the round alone, so a resumed run's round trains as it would have."""
    from remdr.federation.site_round import warmup_share

    run_config = {**RUN_CONFIG, "method": "concat", "warmup-rounds": 4, "num-server-rounds": 6,
                  "schedule": "constant"}  # fmt: skip
    cfg, fed = split_run_config(run_config)
    assert [warmup_share(fed, r) for r in (1, 2, 4, 6)] == [0.25, 0.5, 1.0, 1.0]
    site = load_site(tiny_data, cfg, seed=cfg.train.seed)
    received = _initial(run_config)
    lrs = []
    for r in (1, 4):
        out = train_round(
            cfg, fed, {k: v.clone() for k, v in received.items()}, site, server_round=r
        )
        lrs.append(out.carried.optimizer["param_groups"][0]["lr"])
    assert lrs == pytest.approx([cfg.train.lr / 4, cfg.train.lr])
    _, plain = split_run_config({**RUN_CONFIG, "method": "concat", "warmup-rounds": 0})
    assert warmup_share(plain, 1) == 1.0
    with pytest.raises(ConfigError, match="warmup-rounds=7 with num-server-rounds=6"):
        split_run_config({**run_config, "warmup-rounds": 7})


def test_warmup_rounds_auto_warms_a_quarter_of_the_rounds_where_it_was_measured():
    """The default (-1) warms the first quarter of the rounds of a federation with local steps;
    none with local epochs or a private method (the suite measured neither); a set value wins."""
    cases = [({}, 8), ({"num-server-rounds": 10}, 2), ({"num-server-rounds": 3}, 0),
             ({"local-steps": 0}, 0), ({"method": "remdr_dp"}, 0), ({"warmup-rounds": 3}, 3)]  # fmt: skip
    for keys, rounds in cases:
        _, fed = split_run_config(keys)
        assert fed.warmup_rounds == rounds, keys
    # a resume may add rounds once the warm-up is over (auto then warms 16 of 64, not 8 of 32)
    from remdr.federation.run_config import resume_changes

    assert resume_changes({}, {"num-server-rounds": 64}, done=20) == []
    assert resume_changes({}, {"num-server-rounds": 64}, done=10) == ["warmup-rounds 8 -> 16"]
