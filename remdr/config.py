"""Typed configuration: one dataclass per part, composed into `ExperimentConfig`.

Every field has a default that runs on a 2-core CPU. The same tree is saved beside every result
(`config.json`) and can be overridden from flat kebab-case keys (CLI flags, Flower run config):
`image-size=32` sets `data.image_size`. Field names are unique across sections for that reason.

Every field carries its `Rule`: what it means and what it accepts. The one rule validates the
value, writes the `--list-keys` line and drives the property tests, so no key goes unchecked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from remdr.errors import ConfigError, Problems

OCT_VIEWS = ("bscans", "rnflt")
OCT_VIEW_CHOICES = ("auto", *OCT_VIEWS)  # auto: chosen from the data when it is loaded
SCHEDULES = ("cosine", "constant")
GRAD_SAMPLE_MODES = ("auto", "hooks", "ew")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"
SEED_MAX = 2**32 - 1  # NumPy's legacy seeding takes 32 bits
LIST_KEYS_FIX = "`--list-keys` prints every key"


def _methods() -> Collection[str]:
    from remdr.methods import list_methods  # the registry imports torch: only when checked

    return list_methods()


def _encoders() -> Collection[str]:
    from remdr.encoders import available_encoders  # timm: only when checked

    return available_encoders()


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _is_kind(value: Any, kind: type) -> bool:
    """Strict types: a bool is not a number (True is no batch size) and an int is a float."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float
        return False


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name too long for the file system
        return False


def _num(x: float, kind: type) -> str:
    return str(int(x)) if kind is int else f"{x:g}"


def show(value: Any) -> str:
    """A value as a user would type it: true/false, 0.002, 'text'."""
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Rule:
    """What one key means and accepts; the type is its default's (bool, int, float or str)."""

    meaning: str
    low: float | None = None  # numbers: bounds, inclusive unless *_open
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | Callable[[], Collection[Any]] = ()  # a callable is read lazily
    pattern: str = ""  # text: a regex the whole value must match
    path: bool = False  # text: empty, or an existing file
    text: str = ""  # how the accepted values are described, when the bounds do not say it
    fix: str = ""  # the fix, when "e.g. key=<a good value>" is not one

    def options(self) -> Collection[Any]:
        return self.choices() if callable(self.choices) else self.choices

    def describe(self, kind: type) -> str:
        """The accepted values in words, e.g. 'a number in (0, 1]'."""
        if self.text:
            return self.text
        if self.choices:
            return "one of " + ", ".join(show(c) for c in self.options())
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{KIND_NAMES[kind]} in {left}{_num(lo, kind)}, {_num(hi, kind)}{right}"
        if lo is not None:
            return f"{KIND_NAMES[kind]} {'>' if self.low_open else '>='} {_num(lo, kind)}"
        if hi is not None:
            return f"{KIND_NAMES[kind]} {'<' if self.high_open else '<='} {_num(hi, kind)}"
        return "any text" if kind is str else KIND_NAMES[kind]

    def check(self, value: Any, kind: type) -> str:
        """Why `value` breaks the rule, or "" when it is fine."""
        if not _is_kind(value, kind):
            return f"expected {KIND_NAMES[kind]}"
        if kind is float and not _finite(value):
            return "must be a finite number"
        lo, hi = self.low, self.high
        if (lo is not None and (value < lo or (self.low_open and value == lo))) or (
            hi is not None and (value > hi or (self.high_open and value == hi))
        ):
            return f"must be {self.describe(kind)}"
        if self.choices:
            options = self.options()
            if value not in options:
                close = difflib.get_close_matches(str(value), [str(o) for o in options], n=3)
                hint = f"; did you mean {', '.join(close)}" if close else ""
                if len(options) > 20:
                    return f"not {self.describe(kind)}{hint}"
                return f"must be one of {', '.join(show(o) for o in options)}{hint}"
        if self.pattern and not re.fullmatch(self.pattern, value):
            return f"must be {self.describe(kind)}"
        if self.path and value and not _is_file(value):
            return "no such file"
        return ""


def setting(default: Any, meaning: str, **rule: Any) -> Any:
    """A config field: its default, what it means and what it accepts (see `Rule`)."""
    return field(default=default, metadata={"rule": Rule(meaning, **rule)})


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata["rule"]


# Shorthands for the common rules.
POSITIVE = {"low": 0, "low_open": True}  # > 0
NON_NEGATIVE = {"low": 0}  # >= 0
FRACTION = {"low": 0, "high": 1, "high_open": True}  # [0, 1)
PROBABILITY = {"low": 0, "high": 1, "low_open": True, "high_open": True}  # (0, 1)
SHARE = {"low": 0, "high": 1, "low_open": True}  # (0, 1]
HELD_OUT = {"low": 0, "high": 0.9, "high_open": True}  # [0, 0.9)
WEIGHTS = {
    "path": True,
    "text": "a local weights file, or empty for none",
    "fix": "give an existing .safetensors/.pth file, or leave it empty",
}
ENCODER = {"choices": _encoders, "text": "a timm model name", "fix": "see timm.list_models()"}


@dataclass
class DataConfig:
    image_size: int = setting(64, "image side in pixels after resizing", low=16)
    # "auto": 3-D OCT volumes give bscans, 2-D maps give rnflt (resolved when the data is
    # loaded, saved resolved)
    oct_view: str = setting(
        "auto",
        "bscans (K B-scans, 2.5D), rnflt (thickness map) or auto (from the data)",
        choices=OCT_VIEW_CHOICES,
    )
    n_bscans: int = setting(4, "K evenly spaced B-scans per OCT volume (bscans view)", low=1)
    fundus_channels: int = setting(1, "1 = SLO / grey, 3 = colour fundus", choices=(1, 3))
    # each under 0.9, and together too: at least 10% of patients are left for training
    val_fraction: float = setting(0.15, "of patients, when the data has no val/ split", **HELD_OUT)
    test_fraction: float = setting(
        0.15, "of patients, when the data has no test/ split", **HELD_OUT
    )
    augment: bool = setting(True, "light shift + intensity jitter, training batches only")
    augment_strength: float = setting(
        1.0, "scales the augmentation: 1 = shifts up to 6% of the side, 5% jitter", **POSITIVE
    )
    md_center: float = setting(-5.0, "dB; fixed target normalisation (not fitted on private data)")
    md_scale: float = setting(8.0, "dB; target scale", **POSITIVE)
    max_bad_fraction: float = setting(0.5, "loading fails when more records are bad", **SHARE)
    dicom_max_days: int = setting(
        180,
        "DICOM: a visual field pairs with OCT/fundus at most this many days apart",
        **NON_NEGATIVE,
    )

    @property
    def augment_scale(self) -> float:
        """The strength training batches are augmented with (0: not augmented)."""
        return self.augment_strength if self.augment else 0.0

    @property
    def tensor_view(self) -> str:
        """The OCT view tensors and the model are built for: "auto" not yet resolved against
        data (a model built before any data is seen) means the default B-scan view."""
        return "rnflt" if self.oct_view == "rnflt" else "bscans"


@dataclass
class ModelConfig:
    oct_encoder: str = setting(
        "test_resnet", "timm model of the OCT encoder (tiny for CPU)", **ENCODER
    )
    fundus_encoder: str = setting("test_resnet", "timm model of the fundus encoder", **ENCODER)
    oct_weights: str = setting(
        "", "local weights file for the OCT encoder (never a hub)", **WEIGHTS
    )
    fundus_weights: str = setting("", "local weights file for the fundus encoder", **WEIGHTS)
    embed_dim: int = setting(64, "d: size of z_o and z_f", low=2)
    fusion_hidden: int = setting(64, "hidden width of the fusion MLP", low=1)
    dropout: float = setting(0.1, "dropout probability", **FRACTION)
    # off: in the federation it cost complete eyes 10-30% (README, "Incomplete sites"); an eye
    # with one image is predicted by that modality's head instead
    modality_dropout: float = setting(
        0.0,
        "training hides one image of a complete eye from the fusion head with this probability "
        "(so the fused model also predicts from one image)",
        low=0,
        high=1,
    )


@dataclass
class MethodConfig:
    """Hyperparameters of every registered method; each method reads the ones it needs."""

    lambda_uni: float = setting(
        0.5, "weight of the unimodal head losses (remdr family)", **NON_NEGATIVE
    )
    lambda_con: float = setting(0.1, "weight of the adaptive-margin SupCon loss", **NON_NEGATIVE)
    con_delta: float = setting(
        1.0, "dB; |y_i - y_j| <= delta makes a positive pair", **NON_NEGATIVE
    )
    con_tau: float = setting(0.1, "SupCon temperature", **POSITIVE)
    con_mu: float = setting(0.5, "margin strength; 0 gives plain SupCon", **NON_NEGATIVE)
    con_gamma: float = setting(
        0.5, "rarity exponent of the anchor weight p(y)^-gamma", **NON_NEGATIVE
    )
    con_span: float = setting(10.0, "dB; label distance at which the margin saturates", **POSITIVE)
    con_weight_clip: float = setting(5.0, "anchor weights (mean 1) are clipped to this", low=1)
    lds_sigma: float = setting(2.0, "dB; kernel of the label-density smoothing (LDS)", **POSITIVE)
    lds_reweight: float = setting(
        0.0,
        "weight each eye's squared errors by p(y)^-power from the LDS-smoothed training label "
        "density (rare, severe eyes count more); 0 = plain MSE, 0.5 = inverse square root",
        low=0,
        high=2,
    )
    lds_weight_clip: float = setting(
        10.0, "LDS loss weights (training-set mean 1) are clipped to this", low=1
    )
    sam_rho: float = setting(0.05, "SAM neighbourhood radius", **NON_NEGATIVE)
    # 4: remdr's validation MSE 2.10 vs 2.12 with exact SAGM, at 0.68x the training time
    sam_every: int = setting(
        4,
        "SAM/SAGM ascent every k-th step (the others take the plain, still modulated, "
        "gradient): k = 1 is exact SAM at 2 passes a step, k = 4 costs 1.25 passes",
        low=1,
    )
    mod_alpha: float = setting(
        0.5, "modulation strength: k = 1 - tanh(alpha (r - 1))", **NON_NEGATIVE
    )
    mod_ema: float = setting(0.9, "EMA decay of the unimodal MSE scores", **FRACTION)
    mod_start_epoch: int = setting(0, "modulation runs for start <= epoch < end", **NON_NEGATIVE)
    mod_end_epoch: int = setting(-1, "end of the modulation; -1: until the last epoch", low=-1)
    ogm_noise: bool = setting(False, "add OGM-GE Gaussian noise to the modulated gradients")
    proto_bin_width: float = setting(2.0, "dB; MD bins of the learnable prototypes", **POSITIVE)


@dataclass
class TrainConfig:
    # remdr: the lowest validation MSE of every method at 24 epochs (README, "Method")
    method: str = setting(
        "remdr",
        "the method to train",
        choices=_methods,
        text="a registered method (remdr-train --list-methods)",
        fix="`remdr-train --list-methods` describes each",
    )
    # 8 -> 16 -> 24 epochs lowered concat's validation MSE 2.82 -> 2.51 -> 2.34 (3 seeds)
    epochs: int = setting(24, "training epochs", low=1)
    batch_size: int = setting(32, "batch size", low=2)
    lr: float = setting(2e-3, "learning rate", **POSITIVE)
    weight_decay: float = setting(1e-4, "AdamW weight decay", **NON_NEGATIVE)
    schedule: str = setting("cosine", "learning-rate schedule", choices=SCHEDULES)
    patience: int = setting(
        0,
        "stop when validation MSE has not improved for this many epochs (0: never); the best "
        "epoch's weights are kept either way",
        **NON_NEGATIVE,
    )
    seed: int = setting(0, "seed for splits, init and batches", low=0, high=SEED_MAX)
    device: str = setting(
        "auto",
        "where to train",
        pattern=DEVICE_PATTERN,
        text="auto, cpu, cuda, cuda:N or mps",
    )
    num_workers: int = setting(
        0, "DataLoader workers; 0 keeps CPU runs deterministic", **NON_NEGATIVE
    )


@dataclass
class PrivacyConfig:
    """Sample-level DP-SGD at a site (private methods only); the unit of privacy is the patient."""

    dp_noise: float = setting(
        1.0, "sigma, the noise multiplier (unused when dp-target-epsilon > 0)", **NON_NEGATIVE
    )
    dp_target_epsilon: float = setting(
        0.0, "> 0: solve sigma so the planned training ends at this epsilon", **NON_NEGATIVE
    )
    dp_clip: float = setting(1.0, "C, the per-patient gradient norm bound", **POSITIVE)
    dp_delta: float = setting(1e-5, "delta; must be <= 1 / patients at the site", **PROBABILITY)
    dp_epsilon_max: float = setting(
        10.0, "ceiling: training that would exceed it is declined", **POSITIVE
    )
    dp_grad_sample_mode: str = setting(
        "auto",
        "per-sample gradients; auto takes the first of hooks, ew that passes",
        choices=GRAD_SAMPLE_MODES,
    )
    dp_ledger: str = setting("", "append-only privacy ledger (JSON lines); empty keeps none")
    group_norm: bool = setting(False, "GroupNorm instead of BatchNorm (forced for private methods)")


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


def kebab(name: str) -> str:
    return name.replace("_", "-")


def flat_keys(cfg: ExperimentConfig | None = None) -> dict[str, tuple[str, str]]:
    """Map every kebab-case key to (section, field)."""
    cfg = cfg or ExperimentConfig()
    out: dict[str, tuple[str, str]] = {}
    for sname, section in _sections(cfg).items():
        for f in fields(section):
            out[kebab(f.name)] = (sname, f.name)
    return out


def flat_values(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every kebab-case key with its value in `cfg` (the flat view CLIs and Flower use)."""
    return {k: getattr(getattr(cfg, s), f) for k, (s, f) in flat_keys(cfg).items()}


def flat_rules() -> dict[str, tuple[Rule, Any]]:
    """Every kebab-case key with its rule and default."""
    return {
        kebab(f.name): (rule_of(f), f.default)
        for section in _sections(ExperimentConfig()).values()
        for f in fields(section)
    }


TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def coerce(value: Any, current: Any, key: str) -> Any:
    """Convert a flat-config value (often a string from a CLI or TOML) to the type of `current`.

    Only the type is checked here (a bool is no number); ranges are the rules' (`validate`)."""

    def wrong(expected: str) -> ConfigError:
        return ConfigError(
            f"{key}={show(value)}", f"expected {expected}", f"e.g. {key}={show(current)}"
        )

    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE
        raise wrong("true or false")
    if isinstance(current, int | float) and isinstance(value, bool):
        raise wrong(KIND_NAMES[type(current)] + ", not true/false")
    if isinstance(current, int):
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)  # exact, also beyond 2**53
            except ValueError:
                pass
        try:
            as_float = float(value)  # 4.0, "4.0", "1e3"
        except (TypeError, ValueError, OverflowError):
            raise wrong("an integer") from None
        if not as_float.is_integer():  # also nan and inf
            raise wrong("an integer")
        return int(as_float)
    if isinstance(current, float):
        if isinstance(value, int | float):
            try:
                return float(value)
            except OverflowError:
                raise wrong("a finite number") from None
        try:
            return float(value)  # "nan" and "inf" convert; the rules refuse them
        except (TypeError, ValueError):
            raise wrong("a number") from None
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    raise wrong("text")


def unknown_key(raw_key: str, valid: Collection[str]) -> tuple[str, str, str]:
    """(what, why, fix) for a key that does not exist: the closest valid ones, if any."""
    close = difflib.get_close_matches(kebab(raw_key), list(valid), n=3)
    why = "did you mean " + ", ".join(close) if close else "no valid key is spelled like it"
    return f"unknown config key {raw_key!r}", why, LIST_KEYS_FIX


def apply_overrides(
    cfg: ExperimentConfig, overrides: dict[str, Any], *, ignore: set[str] | None = None
) -> ExperimentConfig:
    """Return a copy of `cfg` with flat kebab-case (or snake_case) overrides applied.

    Every problem (unknown key, wrong type, out of range) is collected and raised once. Unknown
    keys are rejected with the closest valid names, unless listed in `ignore` (e.g. run-config
    keys that belong to the federation, not to the ML core).
    """
    keys = flat_keys(cfg)
    ignore = ignore or set()
    new = dataclasses.replace(
        cfg, **{name: dataclasses.replace(sec) for name, sec in _sections(cfg).items()}
    )
    problems = Problems()
    for raw_key, value in overrides.items():
        key = kebab(raw_key)
        if key in ignore or raw_key in ignore:
            continue
        if key not in keys:
            problems.add(*unknown_key(raw_key, keys))
            continue
        sname, fname = keys[key]
        section = getattr(new, sname)
        try:  # a value of the wrong type leaves the old one, so the other checks still run
            setattr(section, fname, coerce(value, getattr(section, fname), key))
        except ConfigError as err:
            problems.add(err.what, err.why, err.fix)
    validate(new, problems, example=cfg)
    problems.raise_if_any(ConfigError)
    return new


def check_fields(section: Any, problems: Problems, example: Any = None) -> set[str]:
    """Check every field of a config dataclass by its rule; return the keys that failed. The
    fix suggests `example`'s value (the caller's base, e.g. a command's defaults)."""
    bad = set()
    for f in fields(section):
        rule, value, key, kind = (
            rule_of(f),
            getattr(section, f.name),
            kebab(f.name),
            type(f.default),
        )
        why = rule.check(value, kind)
        if why:
            good = getattr(example, f.name, f.default)
            good = f.default if rule.check(good, kind) else good
            problems.add(f"{key}={show(value)}", why, rule.fix or f"e.g. {key}={show(good)}")
            bad.add(key)
    return bad


def validate(
    cfg: ExperimentConfig, problems: Problems | None = None, example: ExperimentConfig | None = None
) -> None:
    """Check every key by its rule, then the few combinations; raise once with every problem,
    or add them to `problems` for a caller that checks more before raising."""
    p = Problems() if problems is None else problems
    example = example or ExperimentConfig()
    bad = {
        key
        for name, section in _sections(cfg).items()
        for key in check_fields(section, p, getattr(example, name))
    }
    d, mc = cfg.data, cfg.method
    if not bad & {"val-fraction", "test-fraction"} and d.val_fraction + d.test_fraction >= 0.9:
        p.add(
            f"val-fraction + test-fraction = {d.val_fraction + d.test_fraction:g}",
            "leaves under 10% of patients for training",
            "lower either, e.g. 0.15 each",
        )
    window = {"mod-start-epoch", "mod-end-epoch"}
    if not bad & window and mc.mod_end_epoch != -1 and mc.mod_end_epoch <= mc.mod_start_epoch:
        p.add(
            f"mod-end-epoch={mc.mod_end_epoch} with mod-start-epoch={mc.mod_start_epoch}",
            "the modulation window start <= epoch < end is empty",
            "an end above the start, or -1 for until the last epoch",
        )
    if problems is None:
        p.raise_if_any(ConfigError)


@dataclass(frozen=True)
class Preset:
    """A named set of config values for a kind of machine; explicit flags and keys override it."""

    summary: str
    values: dict[str, Any]


PRESETS = {
    "cpu": Preset("the defaults: tiny encoders at 64 px, 4 B-scans (a 2-core CPU)", {}),
    # a GPU site: the encoders and input sizes of the method papers. bf16 autocast, channels-last
    # and pinned memory are on whenever the device is CUDA (remdr.runtime), for any preset.
    "paper": Preset(
        "a GPU site: resnet18 encoders at 224 px, 8 B-scans, 256-wide embeddings, 4 loader "
        "workers (bf16 on CUDA)",
        {
            "oct-encoder": "resnet18",
            "fundus-encoder": "resnet18",
            "image-size": 224,
            "n-bscans": 8,
            "embed-dim": 256,
            "fusion-hidden": 256,
            "num-workers": 4,
        },
    ),
}


def apply_preset(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """`cfg` with the preset's values; an unknown name is a ConfigError naming the presets."""
    if name not in PRESETS:
        raise ConfigError(
            f"preset {name!r}",
            "no such preset",
            "one of " + ", ".join(f"{k} ({v.summary})" for k, v in PRESETS.items()),
        )
    return apply_overrides(cfg, PRESETS[name].values)


def describe_fields(title: str, section: Any) -> list[str]:
    """The `--list-keys` lines of one section: key, value, meaning and accepted values."""
    lines = [f"[{title}]"]
    for f in fields(section):
        rule = rule_of(f)
        value = show(getattr(section, f.name))
        lines.append(
            f"  {kebab(f.name):20s} {value:14s} {rule.meaning} ({rule.describe(type(f.default))})"
        )
    return lines


def describe_keys(cfg: ExperimentConfig | None = None) -> list[str]:
    """Every core key with its value in `cfg` (a command's defaults), by section."""
    cfg = cfg or ExperimentConfig()
    return [line for name, sec in _sections(cfg).items() for line in describe_fields(name, sec)]
