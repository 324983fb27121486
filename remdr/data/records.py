"""Eye records, their validation and the load report that counts what was skipped and why."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remdr.errors import DataError
from remdr.registry import MODALITIES

MD_RANGE = (-40.0, 10.0)  # dB; outside this an MD value is a data error, not a severe eye
MIN_IMAGE_SIDE = 8  # pixels
KINDS = {("oct", "fundus"): "complete", ("oct",): "oct-only", ("fundus",): "fundus-only"}


@dataclass
class EyeRecord:
    """One eye: where its images are, its label and who it belongs to. Arrays load lazily."""

    eye_id: str
    patient_id: str
    md: float  # dB
    source: str  # "npz", "manifest" or "dicom"
    path: str  # the npz file, or the OCT image of a manifest row or a DICOM eye
    fundus_path: str = ""  # manifest and DICOM eyes only
    site: str = ""
    split: str = ""  # "train" / "val" / "test" when the dataset ships its own splits
    demographics: dict[str, Any] = field(default_factory=dict)
    modalities: tuple[str, ...] = MODALITIES  # the images this eye has (one may be absent)

    @property
    def kind(self) -> str:
        """ "complete", "oct-only" or "fundus-only"."""
        return KINDS[self.modalities]


@dataclass
class LoadReport:
    """What a load found: records kept, records skipped by reason (with example files), and
    files ignored by reason: not wrong, just not training data (another DICOM SOP class, an
    image without a visual field). Ignored files do not count towards the bad fraction."""

    n_seen: int = 0
    n_ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    ignored: Counter = field(default_factory=Counter)
    unit: str = "records"  # what n_seen counts ("DICOM files" for a DICOM folder)
    trace: dict[str, str] | None = None  # when a dict: every skipped/ignored file -> reason
    kinds: Counter = field(default_factory=Counter)  # usable eyes: complete / oct-only / ...

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self._example(reason, where)

    def ignore(self, reason: str, where: str) -> None:
        self.ignored[reason] += 1
        self._example(reason, where)

    def _example(self, reason: str, where: str) -> None:
        if self.trace is not None:
            self.trace[where] = reason
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    @property
    def n_bad(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        line = f"{self.n_ok} of {self.n_seen} {self.unit} usable"
        if self.skipped:
            reasons = ", ".join(f"{r}: {c}" for r, c in self.skipped.most_common())
            line += f"; skipped {self.n_bad} ({reasons})"
        if self.ignored:
            reasons = ", ".join(f"{r}: {c}" for r, c in self.ignored.most_common())
            line += f"; ignored {sum(self.ignored.values())} ({reasons})"
        if set(self.kinds) - {"complete"}:
            line += "; eyes: " + ", ".join(f"{self.kinds[k]} {k}" for k in KINDS.values())
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_seen": self.n_seen,
            "n_ok": self.n_ok,
            "skipped": dict(self.skipped),
            "ignored": dict(self.ignored),
            "kinds": dict(self.kinds),
            "examples": self.examples,
        }

    def check(self, max_bad_fraction: float, where: str) -> None:
        """Fail with one line when the dataset is mostly bad (or empty)."""
        if self.n_seen == 0:
            raise DataError(f"no eye records found in {where}", "the folder holds no data files")
        if self.n_ok == 0 or self.n_bad > max_bad_fraction * self.n_seen:
            top = ", ".join(f"{r}: {c}" for r, c in self.skipped.most_common(3))
            worst = self.skipped.most_common(1)[0][0] if self.skipped else ""
            example = self.examples.get(worst, [""])[0]
            raise DataError(
                f"{self.n_bad} of {self.n_seen} records in {where} are bad ({top})",
                f"e.g. {Path(example).name}" if example else "",
                "check the dataset format and the --oct-view setting",
            )


def check_md(value: Any) -> tuple[float | None, str]:
    """Return (md, "") or (None, reason)."""
    try:
        md = float(value)
    except (TypeError, ValueError):
        return None, "MD not a number"
    if not math.isfinite(md):
        return None, "MD not finite"
    if not MD_RANGE[0] <= md <= MD_RANGE[1]:
        return None, f"MD outside [{MD_RANGE[0]:g}, {MD_RANGE[1]:g}] dB"
    return md, ""


def check_image_shape(shape: tuple[int, ...], ndim: tuple[int, ...], name: str) -> str:
    """Return "" if an image shape is usable, else the reason.

    A 3D OCT array is a volume (D, H, W): any D >= 1. A 3D fundus is colour (H, W, C).
    """
    if len(shape) not in ndim:
        return f"{name} has wrong shape"
    if len(shape) == 3:
        if name == "fundus" and shape[-1] not in (3, 4):
            return f"{name} has wrong shape"
        shape = shape[:2] if name == "fundus" else shape[1:]
    if min(shape) < MIN_IMAGE_SIDE:
        return f"{name} has wrong shape"
    return ""
