import math

import numpy as np
import pytest

from remdr.config import ExperimentConfig, apply_overrides, flat_keys
from remdr.errors import ConfigError
from remdr.metrics import regression_metrics, severity_bin


def test_metrics_known_values():
    y = np.array([0.0, -4.0, -8.0, -20.0])
    p = np.array([1.0, -4.0, -10.0, -17.0])
    m = regression_metrics(y, p)
    assert m["mse"] == pytest.approx((1 + 0 + 4 + 9) / 4)
    assert m["mae"] == pytest.approx(1.5)
    assert m["rmse"] == pytest.approx(math.sqrt(3.5))
    assert m["within_2db"] == pytest.approx(75.0)
    assert (m["mae_normal"], m["mae_early"], m["mae_moderate"], m["mae_severe"]) == (
        1.0,
        0.0,
        2.0,
        3.0,
    )
    assert m["mae_bin_avg"] == pytest.approx(1.5)
    assert m["r2"] == pytest.approx(1 - 3.5 / np.var(y))
    assert m["pearson"] == pytest.approx(np.corrcoef(y, p)[0, 1])


def test_bin_edges():
    assert [severity_bin(v) for v in (-2.0, -2.01, -6.0, -6.01, -12.0, -12.01)] == [
        0,
        1,
        1,
        2,
        2,
        3,
    ]


def test_bin_average_ignores_empty_bins():
    m = regression_metrics(np.array([0.0, -1.0]), np.array([1.0, 0.0]))
    assert math.isnan(m["mae_severe"]) and m["mae_bin_avg"] == pytest.approx(1.0)


def test_overrides_map_kebab_keys_and_coerce_types():
    cfg = apply_overrides(
        ExperimentConfig(), {"image-size": "48", "con_mu": 0.2, "augment": "false", "method": "oct"}
    )
    assert cfg.data.image_size == 48 and cfg.method.con_mu == 0.2 and cfg.data.augment is False
    assert cfg.train.method == "oct"
    assert len(flat_keys()) == sum(len(vars(s)) for s in vars(ExperimentConfig()).values())


def test_unknown_and_bad_keys_reported_together():
    with pytest.raises(ConfigError) as err:
        apply_overrides(ExperimentConfig(), {"image-sise": 3, "epochs": "x", "lr": -1})
    msg = str(err.value)
    assert "image-size" in msg and "epochs" in msg and "lr" in msg and "3 problems" in msg


def test_validation_collects_every_problem():
    with pytest.raises(ConfigError) as err:
        apply_overrides(
            ExperimentConfig(), {"oct-view": "volume", "fundus-channels": 2, "image-size": 8}
        )
    assert "3 problems" in str(err.value)


def test_config_dict_round_trip():
    cfg = apply_overrides(ExperimentConfig(), {"embed-dim": 8})
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config key"):
        ExperimentConfig.from_dict({"data": {"bogus": 1}})


def test_the_encoders_remdr_names_itself_are_timm_models():
    """They are accepted without importing timm (`TimmNames.KNOWN`), so each must be a real one."""
    import timm

    from remdr.config import ENCODER_NAMES, TimmNames

    assert set(timm.list_models()) >= TimmNames.KNOWN
    assert "resnet18" in ENCODER_NAMES and "no_such_net" not in ENCODER_NAMES


def test_the_ratio_interval_covers_the_true_ratio_and_narrows_with_more_eyes():
    """A model with 1.2x another's expected squared error on every eye (give or take 50%), on
    200 test sets of 240 eyes: the 95% interval holds 1.2 on about 95% of them and leaves out
    1 on most; with 4x the eyes it is about half as wide. Pairing matters: the eyes' own spread
    (exponential, as squared errors are) cancels in the ratio."""
    from remdr.metrics import ratio_interval

    rng = np.random.default_rng(0)

    def interval(n: int) -> tuple[float, float]:
        base = rng.exponential(4.0, n)
        return ratio_interval(1.2 * base * rng.uniform(0.5, 1.5, n), base, draws=500)

    small = [interval(240) for _ in range(200)]
    assert 0.88 <= np.mean([low < 1.2 < high for low, high in small]) <= 0.99
    assert np.mean([low > 1.0 for low, _ in small]) > 0.9
    large = [interval(960) for _ in range(50)]
    width = np.median([h - lo for lo, h in large]) / np.median([h - lo for lo, h in small])
    assert 0.4 < width < 0.6
    same = rng.exponential(4.0, 50)
    assert ratio_interval(same, same) == (1.0, 1.0)
    assert ratio_interval(2 * same, same) == pytest.approx((2.0, 2.0))


def test_the_ratio_interval_leaves_out_eyes_without_a_prediction():
    from remdr.metrics import ratio_interval

    errors = np.array([1.0, 2.0, np.nan, 4.0])
    assert ratio_interval(errors, np.array([1.0, 2.0, 3.0, 4.0])) == (1.0, 1.0)
    assert all(math.isnan(v) for v in ratio_interval([1.0, np.nan], [1.0, 1.0]))
