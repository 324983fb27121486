"""Typed configuration: one dataclass per part, composed into `ExperimentConfig`.

Every field has a default that runs on a 2-core CPU. The same tree is saved beside every result
(`config.json`) and can be overridden from flat kebab-case keys (CLI flags, Flower run config):
`image-size=32` sets `data.image_size`. Field names are unique across sections for that reason.

Every field is a `setting` with its `Rule` (`remdr.settings`): what it means and what it
accepts. The method names come from the registry (`remdr.registry`), the encoder names from timm.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from remdr.errors import ConfigError, Problems
from remdr.method_config import MethodConfig
from remdr.registry import get_spec, list_methods
from remdr.settings import (
    FRACTION,
    HELD_OUT,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SHARE,
    Rule,
    check_fields,
    coerce,
    describe_fields,
    kebab,
    rule_of,
    setting,
    unknown_key,
)

OCT_VIEWS = ("bscans", "rnflt")
OCT_VIEW_CHOICES = ("auto", *OCT_VIEWS)  # auto: chosen from the data when it is loaded
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")
GRAD_SAMPLE_MODES = ("auto", "hooks", "ew")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"
SEED_MAX = 2**32 - 1  # NumPy's legacy seeding takes 32 bits
SYNTHETIC_REGIMES = ("default", "conflict", "shortcut")  # remdr.data.synthetic.REGIMES, by name


class TimmNames(Collection[str]):
    """timm's model names, read only when needed: the encoders remdr names itself (its defaults,
    presets and documented backbones, all timm models: `tests/test_metrics_config.py` checks)
    are accepted without importing timm and torch, so checking a command's flags stays quick;
    any other name is looked up in `timm.list_models()`."""

    KNOWN = frozenset({"test_resnet", "resnet18", "resnet34", "resnet50", "efficientnet_b0",
                       "convnext_atto", "convnext_tiny"})  # fmt: skip

    @staticmethod
    @functools.cache
    def _all() -> frozenset[str]:
        import timm  # imports torch: only for a name remdr does not know

        return frozenset(timm.list_models())

    def __contains__(self, name: object) -> bool:
        return name in self.KNOWN or name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._all()))

    def __len__(self) -> int:
        return len(self._all())


ENCODER_NAMES = TimmNames()


WEIGHTS = {
    "path": True,
    "text": "a local weights file, or empty for none",
    "fix": "give an existing .safetensors/.pth file, or leave it empty",
}
ENCODER = {
    "choices": lambda: ENCODER_NAMES,
    "text": "a timm model name",
    "fix": "see timm.list_models()",
}


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
    synthetic_regime: str = setting(
        "default",
        "the embedded synthetic data, when no --data is given: default; conflict (an OCT floor "
        "and a referral confound); or shortcut (a referral clinic's camera look that an external "
        "test clinic shares: naive fusion loses to OCT alone; docs/method.md)",
        choices=SYNTHETIC_REGIMES,
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
    # off by default: it lets the GroupNorm fundus branch learn, but federated it was better on the
    # suite's median and worse on its worst case (docs/federation.md, "Weight standardisation")
    weight_standardise: str = setting(
        "none",
        "branches whose conv kernels are standardised per output channel (Qiao et al. 2019), "
        "which lets a GroupNorm encoder learn at small batches: none, fundus, oct or both "
        "(not with a private method)",
        choices=("none", "fundus", "oct", "both"),
    )
    # off: in the federation it cost complete eyes 10-30% (docs/federation.md, "Incomplete sites"); an eye
    # with one image is predicted by that modality's head instead
    modality_dropout: float = setting(
        0.0,
        "training hides one image of a complete eye from the fusion head with this probability "
        "(so the fused model also predicts from one image)",
        low=0,
        high=1,
    )


@dataclass
class TrainConfig:
    # remdr: the lowest validation MSE of every method at 24 epochs (docs/method.md)
    method: str = setting(
        "remdr",
        "the method to train",
        choices=list_methods,
        text="a registered method (remdr-train --list-methods)",
        fix="`remdr-train --list-methods` describes each",
    )
    # 8 -> 16 -> 24 epochs lowered concat's validation MSE 2.82 -> 2.51 -> 2.34 (3 seeds)
    epochs: int = setting(24, "training epochs", low=1)
    batch_size: int = setting(32, "batch size", low=2)
    lr: float = setting(2e-3, "learning rate", **POSITIVE)
    optimizer: str = setting(
        "adamw",
        "adamw, or sgd (with momentum; SCAFFOLD's drift control assumes it, but on the "
        "federation suite SGD did not learn within 32 rounds: docs/federation.md)",
        choices=OPTIMIZERS,
    )
    momentum: float = setting(0.9, "SGD momentum", **FRACTION)
    # modality-specific learning rates (Yao & Mihalcea, Findings of ACL 2022): under GroupNorm
    # the fundus encoder stalls at AdamW 1e-3 inside a two-branch model (docs/federation.md)
    lr_oct_scale: float = setting(
        1.0, "multiplier of lr for the OCT branch and its head", **POSITIVE
    )
    lr_fundus_scale: float = setting(
        1.0, "multiplier of lr for the fundus branch and its head", **POSITIVE
    )
    weight_decay: float = setting(1e-4, "weight decay (decoupled for AdamW)", **NON_NEGATIVE)
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
    ws, method = cfg.model.weight_standardise, cfg.train.method
    if not bad & {"weight-standardise", "method"} and ws != "none" and get_spec(method).private:
        p.add(
            f"weight-standardise={ws} with the private method {method}",
            "DP-SGD's per-sample gradients are computed for plain conv kernels",
            "weight-standardise=none",
        )
    if problems is None:
        p.raise_if_any(ConfigError)


def describe_keys(cfg: ExperimentConfig | None = None) -> list[str]:
    """Every core key with its value in `cfg` (a command's defaults), by section."""
    cfg = cfg or ExperimentConfig()
    return [line for name, sec in _sections(cfg).items() for line in describe_fields(name, sec)]
