"""Typed configuration: one dataclass per part, composed into `ExperimentConfig`.

Every field has a default that runs on a 2-core CPU. The same tree is saved beside every result
(`config.json`) and can be overridden from flat kebab-case keys (CLI flags, Flower run config):
`image-size=32` sets `data.image_size`. Field names are unique across sections for that reason.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from remdr.errors import ConfigError, Problems

OCT_VIEWS = ("bscans", "rnflt")
OCT_VIEW_CHOICES = ("auto", *OCT_VIEWS)  # auto: chosen from the data when it is loaded


@dataclass
class DataConfig:
    image_size: int = 64  # pixels; every image is resized to image_size x image_size
    # "bscans": K B-scans (2.5D); "rnflt": the RNFL thickness map; "auto": 3-D OCT volumes give
    # bscans, 2-D maps give rnflt (resolved when the data is loaded, saved resolved)
    oct_view: str = "auto"
    n_bscans: int = 4  # K evenly spaced B-scans taken from the OCT volume (bscans view)
    fundus_channels: int = 1  # 1 = SLO / grey, 3 = colour fundus
    val_fraction: float = 0.15  # of patients, when the dataset has no val/ split
    test_fraction: float = 0.15  # of patients, when the dataset has no test/ split
    augment: bool = True  # light shift + intensity jitter, training batches only
    md_center: float = -5.0  # dB; fixed target normalisation (not fitted on private data)
    md_scale: float = 8.0  # dB
    max_bad_fraction: float = 0.5  # load fails when more records than this are bad
    dicom_max_days: int = 180  # DICOM: a visual field pairs with OCT/fundus at most this far apart


@dataclass
class ModelConfig:
    oct_encoder: str = "test_resnet"  # any timm model name; tiny by default for CPU
    fundus_encoder: str = "test_resnet"
    oct_weights: str = ""  # optional local weights file for the OCT encoder (never a hub)
    fundus_weights: str = ""
    embed_dim: int = 64  # d: size of z_o and z_f
    fusion_hidden: int = 64  # hidden width of the fusion MLP
    dropout: float = 0.1


@dataclass
class MethodConfig:
    """Hyperparameters of every registered method; each method reads the ones it needs."""

    lambda_uni: float = 0.5  # weight of the unimodal head losses (remdr family)
    lambda_con: float = 0.1  # weight of the adaptive-margin SupCon loss per modality
    con_delta: float = 1.0  # dB; |y_i - y_j| <= delta makes a positive pair
    con_tau: float = 0.1  # temperature
    con_mu: float = 0.5  # margin strength; 0 gives plain SupCon
    con_gamma: float = 0.5  # rarity exponent of the anchor weight p(y)^-gamma
    con_span: float = 10.0  # dB; label distance at which the margin saturates (Delta)
    con_weight_clip: float = 5.0  # anchor weights are clipped to this after mean-normalising
    lds_sigma: float = 2.0  # dB; Gaussian kernel of the label-density smoothing (LDS)
    sam_rho: float = 0.05  # SAM neighbourhood radius
    mod_alpha: float = 0.5  # modulation strength: k_d = 1 - tanh(alpha * (r - 1))
    mod_ema: float = 0.9  # EMA decay of the unimodal MSE scores
    mod_start_epoch: int = 0  # modulation runs for start <= epoch < end
    mod_end_epoch: int = -1  # -1: until the end
    ogm_noise: bool = False  # add OGM-GE Gaussian noise to the modulated gradients
    proto_bin_width: float = 2.0  # dB; MD bins of the learnable prototypes (remdr_dp)


@dataclass
class TrainConfig:
    method: str = "concat"
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # "cosine" or "constant"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    num_workers: int = 0  # DataLoader workers; 0 keeps CPU runs deterministic


GRAD_SAMPLE_MODES = ("auto", "hooks", "ew")


@dataclass
class PrivacyConfig:
    """Sample-level DP-SGD at a site (private methods only); the unit of privacy is the patient."""

    dp_noise: float = 1.0  # sigma, the noise multiplier (ignored when dp-target-epsilon > 0)
    dp_target_epsilon: float = 0.0  # > 0: solve sigma so the planned training ends at this epsilon
    dp_clip: float = 1.0  # C, the per-patient gradient norm bound
    dp_delta: float = 1e-5  # must be <= 1 / number of patients at the site
    dp_epsilon_max: float = 10.0  # hard ceiling: training that would exceed it is declined
    dp_grad_sample_mode: str = "auto"  # auto picks the first of hooks, ew that passes the check
    dp_ledger: str = ""  # append-only privacy ledger (JSON lines); "" keeps none (remdr-train)
    group_norm: bool = False  # GroupNorm instead of BatchNorm (forced for private methods)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Rebuild from `to_dict()` output; unknown keys are rejected, missing keys keep defaults."""
        problems = Problems()
        parts: dict[str, Any] = {}
        for f in fields(cls):
            section_cls = f.default_factory  # type: ignore[misc]
            raw = dict(d.get(f.name, {}))
            names = {g.name for g in fields(section_cls)}
            for key in sorted(set(raw) - names):
                problems.add(f"unknown config key {f.name}.{key}", "not a field of this version")
                raw.pop(key)
            parts[f.name] = section_cls(**raw)
        problems.raise_if_any(ConfigError)
        cfg = cls(**parts)
        validate(cfg)
        return cfg


def _sections(cfg: ExperimentConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def flat_keys(cfg: ExperimentConfig | None = None) -> dict[str, tuple[str, str]]:
    """Map every kebab-case key to (section, field)."""
    cfg = cfg or ExperimentConfig()
    out: dict[str, tuple[str, str]] = {}
    for sname, section in _sections(cfg).items():
        for f in fields(section):
            out[f.name.replace("_", "-")] = (sname, f.name)
    return out


def flat_values(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every kebab-case key with its value in `cfg` (the flat view CLIs and Flower use)."""
    return {k: getattr(getattr(cfg, s), f) for k, (s, f) in flat_keys(cfg).items()}


def coerce(value: Any, current: Any, key: str) -> Any:
    """Convert a flat-config value (often a string from a CLI or TOML) to the type of `current`."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{key}={value!r}", "expected true or false")
    if isinstance(current, int):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}", "expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}={value!r}", "expected an integer")
        return int(as_float)
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}", "expected a number") from None
    return str(value)


def apply_overrides(
    cfg: ExperimentConfig, overrides: dict[str, Any], *, ignore: set[str] | None = None
) -> ExperimentConfig:
    """Return a copy of `cfg` with flat kebab-case (or snake_case) overrides applied.

    Unknown keys are rejected with the closest valid names, unless listed in `ignore`
    (e.g. run-config keys that belong to the federation, not to the ML core).
    """
    keys = flat_keys(cfg)
    ignore = ignore or set()
    new = dataclasses.replace(
        cfg, **{name: dataclasses.replace(sec) for name, sec in _sections(cfg).items()}
    )
    problems = Problems()
    for raw_key, value in overrides.items():
        key = raw_key.replace("_", "-")
        if key in ignore or raw_key in ignore:
            continue
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            problems.add(
                f"unknown config key '{raw_key}'",
                "did you mean " + ", ".join(close) if close else "see `flat_keys()` for valid keys",
            )
            continue
        sname, fname = keys[key]
        section = getattr(new, sname)
        try:
            setattr(section, fname, coerce(value, getattr(section, fname), key))
        except ConfigError as err:
            problems.add(err.what, err.why)
    problems.raise_if_any(ConfigError)
    validate(new)
    return new


def validate(cfg: ExperimentConfig) -> None:
    """Check ranges and combinations; raise once with every problem."""
    p = Problems()
    d, m, mc, t = cfg.data, cfg.model, cfg.method, cfg.train
    if d.image_size < 16:
        p.add(f"image-size={d.image_size}", "must be at least 16 pixels")
    if d.oct_view not in OCT_VIEW_CHOICES:
        p.add(f"oct-view={d.oct_view!r}", f"must be one of {', '.join(OCT_VIEW_CHOICES)}")
    if d.n_bscans < 1:
        p.add(f"n-bscans={d.n_bscans}", "must be at least 1")
    if d.fundus_channels not in (1, 3):
        p.add(f"fundus-channels={d.fundus_channels}", "must be 1 (SLO/grey) or 3 (colour)")
    if not 0 <= d.val_fraction < 1 or not 0 <= d.test_fraction < 1:
        p.add("val-fraction/test-fraction", "must lie in [0, 1)")
    elif d.val_fraction + d.test_fraction >= 0.9:
        p.add("val-fraction + test-fraction", "leaves under 10% of patients for training")
    if d.md_scale <= 0:
        p.add(f"md-scale={d.md_scale}", "must be positive")
    if d.dicom_max_days < 0:
        p.add(f"dicom-max-days={d.dicom_max_days}", "must be >= 0 days")
    if not 0 < d.max_bad_fraction <= 1:
        p.add(f"max-bad-fraction={d.max_bad_fraction}", "must lie in (0, 1]")
    if m.embed_dim < 2 or m.fusion_hidden < 1:
        p.add("embed-dim/fusion-hidden", "must be positive (embed-dim at least 2)")
    if not 0 <= m.dropout < 1:
        p.add(f"dropout={m.dropout}", "must lie in [0, 1)")
    if mc.con_tau <= 0 or mc.con_span <= 0 or mc.con_delta < 0:
        p.add("con-tau/con-span/con-delta", "tau and span must be positive, delta non-negative")
    if mc.con_weight_clip < 1:
        p.add(f"con-weight-clip={mc.con_weight_clip}", "must be at least 1 (weights have mean 1)")
    if mc.sam_rho < 0 or mc.mod_alpha < 0 or not 0 <= mc.mod_ema < 1:
        p.add("sam-rho/mod-alpha/mod-ema", "rho and alpha must be >= 0, ema in [0, 1)")
    if mc.lds_sigma <= 0:
        p.add(f"lds-sigma={mc.lds_sigma}", "must be positive")
    if t.epochs < 1 or t.batch_size < 2:
        p.add("epochs/batch-size", "need at least 1 epoch and a batch of 2")
    if t.lr <= 0 or t.weight_decay < 0:
        p.add("lr/weight-decay", "lr must be positive and weight decay non-negative")
    if t.schedule not in ("cosine", "constant"):
        p.add(f"schedule={t.schedule!r}", "must be cosine or constant")
    if t.num_workers < 0:
        p.add(f"num-workers={t.num_workers}", "must be >= 0")
    if mc.proto_bin_width <= 0:
        p.add(f"proto-bin-width={mc.proto_bin_width}", "must be positive")
    pc = cfg.privacy
    if pc.dp_noise < 0 or pc.dp_clip <= 0 or pc.dp_target_epsilon < 0:
        p.add("dp-noise/dp-clip/dp-target-epsilon", "noise >= 0, clip > 0, target epsilon >= 0")
    if not 0 < pc.dp_delta < 1 or pc.dp_epsilon_max <= 0:
        p.add("dp-delta/dp-epsilon-max", "delta must lie in (0, 1) and the ceiling be positive")
    if pc.dp_grad_sample_mode not in GRAD_SAMPLE_MODES:
        p.add(
            f"dp-grad-sample-mode={pc.dp_grad_sample_mode!r}",
            f"must be one of {', '.join(GRAD_SAMPLE_MODES)}",
        )
    p.raise_if_any(ConfigError)
