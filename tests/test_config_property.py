"""Every config key refuses bad values with a ConfigError and accepts its boundary values.

The values are generated from each key's `Rule` (bounds, choices, pattern, path), so a new key
is tested as soon as it has a rule; that every key has one is asserted against `flat_keys()`
and `fed_keys()` independently.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from remdr.config import ExperimentConfig, apply_overrides, flat_keys
from remdr.errors import ConfigError
from remdr.federation.run_config import FedConfig, fed_keys, split_run_config
from remdr.settings import Rule, kebab

FAST = settings(max_examples=12, deadline=None)


def _rules(*sections: Any) -> dict[str, tuple[Rule, type]]:
    return {
        kebab(f.name): (f.metadata["rule"], type(f.default))
        for section in sections
        for f in fields(section)
        if "rule" in f.metadata
    }


CORE = _rules(*(getattr(ExperimentConfig(), f.name) for f in fields(ExperimentConfig)))
FED = _rules(FedConfig())
EXISTING_FILE = __file__

# Keys whose valid extremes would break a combination check unless a partner key moves too.
PARTNERS: dict[str, dict[str, Any]] = {
    "val-fraction": {"test-fraction": 0.0},
    "test-fraction": {"val-fraction": 0.0},
    "site-dp": {"site-dp-noise": 0.1},  # adaptive clipping needs noise < min-nodes / 10
    "unimodal-rounds": {"num-server-rounds": 2**63},  # some rounds must train the fusion
    "warmup-rounds": {"num-server-rounds": 2**63},  # the warm-up must end within the run
}


def test_every_key_has_a_rule():
    assert set(CORE) == set(flat_keys())
    assert set(FED) == set(fed_keys())


def _below(rule: Rule, kind: type) -> st.SearchStrategy:
    assert rule.low is not None
    if kind is int:
        ints = st.integers(max_value=int(rule.low) - (0 if rule.low_open else 1))
        return ints.filter(lambda x: x not in rule.special)
    floats = st.floats(max_value=rule.low, exclude_max=not rule.low_open, allow_nan=False)
    # not -0.0 for a low of 0, and not a sentinel the rule accepts (-1 = auto)
    return floats.filter(lambda x: (x < rule.low or rule.low_open) and x not in rule.special)


def _above(rule: Rule, kind: type) -> st.SearchStrategy:
    assert rule.high is not None
    if kind is int:
        ints = st.integers(min_value=int(rule.high) + (0 if rule.high_open else 1))
        return ints.filter(lambda x: x not in rule.special)
    floats = st.floats(min_value=rule.high, exclude_min=not rule.high_open, allow_nan=False)
    return floats.filter(lambda x: (x > rule.high or rule.high_open) and x not in rule.special)


WRONG_TYPE = {
    bool: ["abc", "maybe", "2", "", 2, 0.5, None],
    int: ["abc", "1.5", "", "nan", "inf", "-inf", 1.5, math.nan, math.inf, True, False, None],
    float: ["abc", "", "nan", "inf", "-inf", math.nan, math.inf, -math.inf, True, None],
    str: [5, 1.5, True, None, ["a"]],
}


def invalid(rule: Rule, kind: type) -> st.SearchStrategy:
    """Values the rule must refuse: wrong types, out of bounds, outside the choices, ..."""
    out = [st.sampled_from(WRONG_TYPE[kind])]
    for bound, make in ((rule.low, _below), (rule.high, _above)):
        if bound is not None:
            numbers = make(rule, kind)
            out += [numbers, numbers.map(str)]  # typed (TOML) and as text (CLI)
    if rule.choices:
        options = rule.options()
        if kind is int:
            out.append(st.integers().filter(lambda v: v not in options))
        else:
            out.append(st.text(max_size=12).filter(lambda v: v not in options))
    if rule.pattern:
        out.append(st.text(max_size=12).filter(lambda v: not re.fullmatch(rule.pattern, v)))
    if rule.path:
        out.append(st.text(min_size=1, max_size=8).map(lambda v: f"/no/such/dir/{v}.pth"))
        out.append(st.just("w" * 300 + ".pth"))  # too long for the file system
    return st.one_of(out)


def _just_inside(bound: float, open_: bool, kind: type, up: bool) -> float:
    if not open_:
        return bound
    if kind is int:
        return bound + (1 if up else -1)
    return math.nextafter(bound, math.inf if up else -math.inf)


def valid(rule: Rule, kind: type) -> st.SearchStrategy:
    """The rule's extremes: its boundary values and sentinels (as numbers and as text), every
    choice, ..."""
    if kind is bool:
        return st.sampled_from([True, False, "yes", "off", "1", "0", "TRUE", "False"])
    if rule.choices:
        return st.sampled_from(sorted(rule.options(), key=str))
    if rule.pattern:
        return st.from_regex(rule.pattern, fullmatch=True)
    if rule.path:
        return st.sampled_from(["", EXISTING_FILE])
    if kind is str:
        return st.text()
    extremes: list[float] = []
    if rule.low is not None:
        extremes.append(_just_inside(rule.low, rule.low_open, kind, up=True))
    if rule.high is not None:
        extremes.append(_just_inside(rule.high, rule.high_open, kind, up=False))
    if rule.high is None:
        extremes.append(2**62 if kind is int else 1e300)
    if rule.low is None:
        extremes.append(-(2**62) if kind is int else -1e300)
    extremes = [kind(x) for x in (*extremes, *rule.special)]
    return st.sampled_from(extremes + [str(x) for x in extremes])


def _core(key: str, value: Any) -> Any:
    return apply_overrides(ExperimentConfig(), {**PARTNERS.get(key, {}), key: value})


def _fed(key: str, value: Any) -> Any:
    return split_run_config({**PARTNERS.get(key, {}), key: value})


def _one_line_error(call, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        call(key, value)
    assert "\n" not in str(err.value) and key in str(err.value)


@pytest.mark.parametrize("key", sorted(CORE))
def test_core_key_refuses_invalid_values(key):
    @FAST
    @given(invalid(*CORE[key]))
    def check(value):
        _one_line_error(_core, key, value)

    check()


@pytest.mark.parametrize("key", sorted(FED))
def test_federation_key_refuses_invalid_values(key):
    @FAST
    @given(invalid(*FED[key]))
    def check(value):
        _one_line_error(_fed, key, value)

    check()


@pytest.mark.parametrize("key", sorted(CORE))
def test_core_key_accepts_its_extremes(key):
    section, name = flat_keys()[key]

    @FAST
    @given(valid(*CORE[key]))
    def check(value):
        cfg = _core(key, value)
        assert getattr(getattr(cfg, section), name) is not None

    check()


@pytest.mark.parametrize("key", sorted(FED))
def test_federation_key_accepts_its_extremes(key):
    @FAST
    @given(valid(*FED[key]))
    def check(value):
        _, fed = _fed(key, value)
        assert getattr(fed, fed_keys()[key]) is not None

    check()


ANY_KEY = st.sampled_from(sorted(CORE) + sorted(FED))


@settings(max_examples=300, deadline=None)
@given(ANY_KEY, st.text(max_size=20))
def test_any_text_for_any_key_is_a_config_or_a_config_error(key, text):
    try:
        cfg, fed = split_run_config({key: text})
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(cfg, ExperimentConfig) and isinstance(fed, FedConfig)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=20), st.text(max_size=10))
def test_any_unknown_key_is_a_config_error_naming_it(key, text):
    if key.replace("_", "-") in CORE or key.replace("_", "-") in FED:
        return
    with pytest.raises(ConfigError, match="unknown config key") as err:
        apply_overrides(ExperimentConfig(), {key: text})
    assert "--list-keys" in str(err.value) and "\n" not in str(err.value)


# The smallest sizes the rules allow, and the zero ends of the loss and optimiser weights.
EXTREME = {
    "image-size": 16, "n-bscans": 1, "embed-dim": 2, "fusion-hidden": 1, "batch-size": 2,
    "epochs": 1, "dropout": 0.0, "lambda-uni": 0.0, "con-mu": 0.0, "con-gamma": 0.0,
    "con-delta": 0.0, "sam-rho": 0.0, "mod-alpha": 0.0, "mod-ema": 0.0, "weight-decay": 0.0,
    "con-weight-clip": 1.0, "val-fraction": 0.0, "num-workers": 0, "seed": 2**32 - 1,
    "method": "remdr", "device": "cpu",
}  # fmt: skip


def test_valid_extreme_values_still_run(tiny_data):
    """Accepted is not enough: the tiny model trains an epoch at the rules' edges."""
    from remdr.data import load_dataset
    from remdr.data.dataset import EyeDataset
    from remdr.methods import build_model, create_method
    from remdr.runtime import seed_everything
    from remdr.train import fit

    cfg = apply_overrides(ExperimentConfig(), EXTREME)
    seed_everything(cfg.train.seed, torch.device("cpu"))
    ds = EyeDataset(load_dataset(tiny_data, cfg.data).records[:12], cfg.data)
    method = create_method(cfg.train.method, cfg.method)
    method.setup(ds.targets())
    model = build_model(cfg, method)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 2 at 16 px: threads only spin on a busy machine
    try:
        result = fit(
            model, method, ds, cfg=cfg.train, device=torch.device("cpu"), val_ds=ds, epochs=1,
            progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert result.n_steps == len(ds) // 2
    assert np.isfinite(result.history[0]["train_loss"]) and np.isfinite(result.best_val_mse)
