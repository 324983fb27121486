"""Seeded synthetic eyes in the Harvard FairVision npz layout (the embedded default dataset).

Files are written exactly as the real loader reads them, so tests and demos exercise the real
path. One file per eye, ``data_00001.npz`` ..., with keys ``oct_bscans`` (D, S, S) uint8,
``slo_fundus`` (S, S) uint8, ``md`` (dB), ``age``, ``male``, ``race`` (a string, as in some
Harvard releases) and two extras the real datasets lack: ``rnflt`` (S, S) float32 in µm, so the
RNFLT view can be tried, and ``patient_id``/``site`` so patient splits and site partitions exist.

Generative model (all draws from one ``numpy.random.Generator(seed)``):

* Patients have two eyes. Patient severity ``s_p ~ Beta(0.5, 3)``; each eye
  ``s = clip(s_p + N(0, 0.05^2), 0, 1)``. This gives an imbalanced MD distribution: about 55% of
  eyes normal (MD >= -2 dB), 22% early, 15% moderate and 8% severe (< -12 dB).
* ``MD_true = 1 - 31 s`` dB and ``MD_obs = MD_true + N(0, sigma^2)`` with ``sigma = noise_sd``
  (default 1 dB, the perimetry test-retest noise). The best possible test MSE is ``sigma^2``.
* OCT, with a floor effect: global RNFL thickness ``T = 45 + 55 exp(-4.5 s)`` µm times an anatomical
  factor ``1 + N(0, 0.06^2)``. T falls fast in early disease and saturates near 45 µm beyond about
  -12 dB, so OCT says little about how severe a severe eye is. The RNFLT map is
  ``T * a(theta) * radial(r)`` around a jittered disc centre (superior and inferior arcuate humps)
  plus an inferior wedge defect of depth proportional to s and N(0, 3 µm) noise. Each of the D
  B-scans cuts one evenly spaced row of that map: vitreous, an RNFL band whose height is
  proportional to the local thickness, two deeper layers and choroid, with multiplicative
  Gamma(4, 1/4) speckle.
* Fundus (SLO, grey), with no floor: cup-to-disc ratio ``CDR = 0.25 + 0.6 s + N(0, 0.04^2)``, a
  bright disc of jittered radius and position with a brighter cup of radius CDR * R, a vignetted
  background, a few dark vessels and N(0, 8^2) pixel noise. Cupping keeps informing in severe eyes.
* Per-site device shift: each of ``n_sites`` sites (patients assigned uniformly) has its own gain
  and offset for both modalities and its own speckle level.

``regime="conflict"`` (``SyntheticSpec.regime``; the default regime's files are unchanged, bit
for bit) changes the generator into the coupled imbalance Re-M3Dr diagnoses (measured: naive
fusion still beats each single modality there); `CONFLICT` below lists each change and why.
``regime="shortcut"`` adds what that lacks, a confound whose mix differs between training and
test: glaucoma is referred to site 0, whose fundus camera has its own look, and the set ships
``train/ val/ test/`` folders whose test eyes come from an external clinic with that camera.

CLI: ``python -m remdr.data.synthetic --out DIR --n 1200 --size 64 --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from remdr.data.splits import SPLITS  # the Harvard layout's own split folders

RACES = ("Asian", "Black", "White")


@dataclass(frozen=True)
class Regime:
    """How a regime departs from the default generator; the defaults change nothing."""

    severity_beta: tuple[float, float] = (0.5, 3.0)  # patient severity s_p ~ Beta(a, b)
    oct_floor_rate: float = 4.5  # RNFL T = 45 + 55 exp(-rate s) µm: a higher rate floors sooner
    wedge_floor: bool = False  # the inferior wedge defect stops deepening at the floor too
    severe_clinic: float = 0.0  # P(patient is seen at site 0) rises by this times s_p
    device_bias_um: float = 0.0  # site 0's OCT device reads the RNFL this much thinner (µm)
    oct_artifact_rate: float = 0.0  # P(the OCT of an eye of severity s looks near-normal) = rate s
    md_tipping: float = 0.0  # structural damage s below which the visual field stays normal
    cdr_sd: float = 0.04  # anatomical spread of the cup-to-disc ratio around its severity value
    fundus_noise: float = 8.0  # pixel noise of the fundus image (grey levels)
    camera_shift: float = 0.0  # grey levels site 0's fundus camera adds: a look that marks it
    external_test: float = 0.0  # share of patients seen at an external clinic: the test split
    referral_threshold: float = 0.0  # patients above this severity are seen at site 0, only they


# The coupled imbalance of Re-M3Dr's diagnosis (docs/method.md, "The conflict regime"):
CONFLICT = Regime(
    oct_floor_rate=9.0,  # OCT floors near -8 dB: it sorts normal/early eyes, not severe ones
    wedge_floor=True,
    severe_clinic=0.8,  # a tertiary glaucoma clinic sees most severe eyes ...
    device_bias_um=-8.0,  # ... on a device that reads thinner: a site shortcut to "severe"
    cdr_sd=0.05,
    fundus_noise=10.0,  # the fundus keeps informing in severe eyes but is slower to read
)
# A confound whose mix differs between training and test (docs/method.md, "The shortcut regime"):
SHORTCUT = Regime(
    referral_threshold=0.16,  # glaucoma past about -4 dB is referred to site 0, a tertiary clinic
    camera_shift=40.0,  # whose fundus camera model has its own, brighter look
    cdr_sd=0.05,  # the fundus keeps informing in severe eyes, where the OCT floors
    fundus_noise=10.0,
    external_test=0.2,  # tested at an external screening clinic that uses site 0's camera model
)
REGIMES = {"default": Regime(), "conflict": CONFLICT, "shortcut": SHORTCUT}


@dataclass
class SyntheticSpec:
    n: int = 1200  # eyes
    size: int = 64  # pixels (S)
    depth: int = 16  # B-scans per OCT volume (D)
    n_sites: int = 4
    noise_sd: float = 1.0  # dB; label noise, the floor of achievable MSE is noise_sd**2
    seed: int = 0
    regime: str = "default"  # one of REGIMES

    def describe(self) -> dict:
        """The spec as saved and compared: the default regime is left out, so the default
        data's metadata (and every cache of it) is what it was before regimes existed; another
        regime is saved with its parameters, so a cache made by an older version of it is
        regenerated rather than reused."""
        d = asdict(self)
        if self.regime == "default":
            d.pop("regime")
        elif self.regime in REGIMES:
            d["regime_parameters"] = asdict(REGIMES[self.regime])
        return json.loads(json.dumps(d))  # as read back from synthetic.json (tuples as lists)


@dataclass
class _Site:
    oct_gain: float
    oct_offset: float
    speckle_shape: float
    fundus_gain: float
    fundus_offset: float
    fundus_camera: float = 0.0  # grey levels a camera model adds (the shortcut regime's look)


def _site_shifts(n_sites: int, rng: np.random.Generator) -> list[_Site]:
    return [
        _Site(
            oct_gain=rng.uniform(0.8, 1.2),
            oct_offset=rng.uniform(-15, 15),
            speckle_shape=rng.choice([3.0, 4.0, 6.0]),
            fundus_gain=rng.uniform(0.85, 1.15),
            fundus_offset=rng.uniform(-20, 20),
        )
        for _ in range(n_sites)
    ]


def _floor(s: float, regime: Regime) -> float:
    """How far the wedge defect has deepened, 0..1: s itself, or saturating with the floor."""
    if not regime.wedge_floor:
        return s
    return (1.0 - np.exp(-regime.oct_floor_rate * s)) / (1.0 - np.exp(-regime.oct_floor_rate))


def _rnflt_map(
    s: float,
    size: int,
    rng: np.random.Generator,
    regime: Regime = REGIMES["default"],
    bias_um: float = 0.0,
) -> np.ndarray:
    """RNFL thickness map in µm, (S, S) float32."""
    thickness = (45.0 + 55.0 * np.exp(-regime.oct_floor_rate * s)) * (1.0 + rng.normal(0, 0.06))
    thickness += bias_um
    cx, cy = size / 2 + rng.normal(0, size * 0.03, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = (xx - cx) / size, (yy - cy) / size
    r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    arcuate = 0.55 + 0.45 * np.sin(theta) ** 2  # humps above and below the disc
    radial = np.exp(-(((r - 0.28) / 0.2) ** 2))
    wedge = np.exp(-(((theta - np.pi / 2) / 0.5) ** 2)) * (r > 0.1)  # inferior (image down)
    rnflt = thickness * arcuate * radial * (1.0 - 0.5 * _floor(s, regime) * wedge) + 10.0
    return (rnflt + rng.normal(0, 3.0, rnflt.shape)).astype(np.float32)


def _bscans(rnflt: np.ndarray, depth: int, site: _Site, rng: np.random.Generator) -> np.ndarray:
    """D B-scans through the map's rows, (D, S, S) uint8: rows are depth z, columns are x."""
    size = rnflt.shape[0]
    rows = np.linspace(0, size - 1, depth + 2)[1:-1].round().astype(int)
    z = np.arange(size, dtype=np.float32)[None, :, None]  # (1, Z, 1)
    x = np.arange(size, dtype=np.float32)
    surface = 0.3 * size + 0.04 * size * ((x - size / 2) / (size / 2)) ** 2  # (X,)
    surface = surface[None, None, :] + rng.normal(0, 0.5)
    band = rnflt[rows][:, None, :] * (size / 400.0)  # µm -> px, (D, 1, X)
    rnfl_bottom = surface + band
    img = np.full((depth, size, size), 12.0, dtype=np.float32)
    img = np.where(z >= surface, 200.0, img)
    img = np.where(z >= rnfl_bottom, 115.0, img)
    img = np.where(z >= rnfl_bottom + 0.08 * size, 75.0, img)
    img = np.where(z >= rnfl_bottom + 0.2 * size, 140.0, img)  # RPE / choroid
    speckle = rng.gamma(site.speckle_shape, 1.0 / site.speckle_shape, img.shape)
    img = img * speckle * site.oct_gain + site.oct_offset
    return np.clip(img, 0, 255).astype(np.uint8)


def _fundus(
    s: float,
    size: int,
    site: _Site,
    rng: np.random.Generator,
    regime: Regime = REGIMES["default"],
) -> np.ndarray:
    """SLO fundus, (S, S) uint8, with a cup-to-disc ratio that grows linearly with severity."""
    cdr = np.clip(0.25 + 0.6 * s + rng.normal(0, regime.cdr_sd), 0.1, 0.95)
    radius = size * 0.13 * (1.0 + rng.normal(0, 0.08))
    cx, cy = size / 2 + rng.normal(0, size * 0.04, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d = np.hypot(xx - cx, yy - cy)
    r_full = np.hypot(xx - size / 2, yy - size / 2) / (size / 2)
    img = 95.0 - 35.0 * r_full**2  # vignetted background
    img = np.where(d <= radius, 165.0, img)
    img = np.where(d <= cdr * radius, 225.0, img)
    for _ in range(4):  # dark vessels leaving the disc
        angle, curve = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.6)
        t = np.linspace(radius, size * 0.7, 4 * size)
        vx = cx + t * np.cos(angle + curve * t / size)
        vy = cy + t * np.sin(angle + curve * t / size)
        ok = (vx >= 0) & (vx < size) & (vy >= 0) & (vy < size)
        img[vy[ok].astype(int), vx[ok].astype(int)] -= 40.0
    img = (
        img * site.fundus_gain
        + site.fundus_offset
        + site.fundus_camera
        + rng.normal(0, regime.fundus_noise, img.shape)
    )
    return np.clip(img, 0, 255).astype(np.uint8)


def _own_splits(n_patients: int, regime: Regime, rng: np.random.Generator) -> np.ndarray | None:
    """Each patient's split when the regime tests at an external clinic, else None."""
    if regime.external_test <= 0:
        return None
    n_test = max(1, round(regime.external_test * n_patients))
    split = np.full(n_patients, "train", dtype=object)
    split[n_patients - n_test :] = "test"
    internal = n_patients - n_test
    val = rng.random(internal) < 0.15 / (1.0 - regime.external_test)  # 15% of all, as by default
    split[:internal][val] = "val"
    return split


def generate(out: Path | str, spec: SyntheticSpec | None = None) -> dict:
    """Write ``spec.n`` eye files plus ``synthetic.json`` into ``out``; return the metadata."""
    spec = spec or SyntheticSpec()
    if spec.regime not in REGIMES:
        raise ValueError(f"unknown synthetic regime {spec.regime!r}: one of {', '.join(REGIMES)}")
    regime = REGIMES[spec.regime]
    if regime.referral_threshold > 0 and spec.n_sites < 2:
        raise ValueError(f"the {spec.regime} regime refers patients between sites: n_sites >= 2")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "synthetic.json").exists():  # an older synthetic set here: none of its eyes stay
        for stale in [*out.glob("data_*.npz"), *out.glob("*/data_*.npz")]:
            stale.unlink()
        for split in SPLITS:  # emptied split folders would hide a flat set from the loader
            if (out / split).is_dir() and not any((out / split).iterdir()):
                (out / split).rmdir()
    rng = np.random.default_rng(spec.seed)
    sites = _site_shifts(spec.n_sites, rng)
    if regime.camera_shift:  # site 0's camera model: its look is part of its device shift
        sites[0] = replace(sites[0], fundus_camera=regime.camera_shift)
    n_patients = (spec.n + 1) // 2
    patient_s = rng.beta(*regime.severity_beta, n_patients)
    patient_site = rng.integers(0, spec.n_sites, n_patients)
    if regime.severe_clinic > 0:  # drawn only in that regime: the default's draws are unchanged
        referred = rng.random(n_patients) < regime.severe_clinic * patient_s
        patient_site = np.where(referred, 0, patient_site)
    if regime.referral_threshold > 0:
        others = rng.integers(1, spec.n_sites, n_patients)
        patient_site = np.where(patient_s > regime.referral_threshold, 0, others)
    split_of = _own_splits(n_patients, regime, rng)
    if split_of is not None:  # the external clinic: its own OCT device, site 0's camera model
        external = _site_shifts(1, rng)[0]
        sites.append(
            replace(
                external,
                fundus_gain=sites[0].fundus_gain,
                fundus_offset=sites[0].fundus_offset,
                fundus_camera=sites[0].fundus_camera,
            )
        )
        patient_site = np.where(split_of == "test", spec.n_sites, patient_site)
        for split in SPLITS:
            (out / split).mkdir(exist_ok=True)
    mds = []
    for i in range(spec.n):
        p = i // 2
        s = float(np.clip(patient_s[p] + rng.normal(0, 0.05), 0.0, 1.0))
        site = sites[patient_site[p]]
        md_true = 1.0 - 31.0 * s
        if regime.md_tipping > 0:  # structure is lost before function (a "tipping point")
            md_true = 1.0 - 31.0 * max(0.0, s - regime.md_tipping) / (1.0 - regime.md_tipping)
        md = md_true + rng.normal(0, spec.noise_sd)
        bias = regime.device_bias_um if patient_site[p] == 0 else 0.0
        s_oct = s  # the severity the OCT image shows
        if regime.oct_artifact_rate > 0 and rng.random() < regime.oct_artifact_rate * s:
            s_oct = float(rng.uniform(0.0, 0.1))  # an artifact band that reads near-normal
        rnflt = _rnflt_map(s_oct, spec.size, rng, regime, bias)
        folder = out if split_of is None else out / str(split_of[p])
        np.savez_compressed(
            folder / f"data_{i + 1:05d}.npz",
            oct_bscans=_bscans(rnflt, spec.depth, site, rng),
            slo_fundus=_fundus(s, spec.size, site, rng, regime),
            rnflt=rnflt,
            md=np.float32(md),
            age=np.float32(np.clip(50 + 20 * s + rng.normal(0, 10), 20, 90)),
            male=np.int64(rng.integers(0, 2)),
            race=np.str_(RACES[rng.integers(0, len(RACES))]),
            patient_id=np.str_(f"P{p + 1:05d}"),
            site=np.int64(patient_site[p]),
        )
        mds.append(md)
    mds_arr = np.asarray(mds)
    meta = {
        "generator": "remdr.data.synthetic",
        "spec": spec.describe(),
        "label_noise_sd_db": spec.noise_sd,
        "md_mean": float(mds_arr.mean()),
        "md_var": float(mds_arr.var()),
        "severity_counts": {
            "normal": int((mds_arr >= -2).sum()),
            "early": int(((mds_arr < -2) & (mds_arr >= -6)).sum()),
            "moderate": int(((mds_arr < -6) & (mds_arr >= -12)).sum()),
            "severe": int((mds_arr < -12).sum()),
        },
    }
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2))
    return meta


def ensure(out: Path | str, spec: SyntheticSpec | None = None) -> Path:
    """Generate into ``out`` unless a complete set with the same spec is already there."""
    spec = spec or SyntheticSpec()
    out = Path(out)
    if _holds(out, spec):
        return out
    # Written beside and swapped in whole, so a second process that finds the folder never
    # reads a half-written set, and one that generates at the same time cannot mix the two.
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    stale = fresh.with_suffix(".old")
    try:
        generate(fresh, spec)
        if not _holds(out, spec):  # else another process finished first: keep its set
            if out.exists():
                out.rename(stale)
            try:
                fresh.rename(out)
            except OSError:  # another process swapped its set in between
                if not _holds(out, spec):
                    raise
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return out


def _holds(out: Path, spec: SyntheticSpec) -> bool:
    """Whether ``out`` holds a complete set of this spec (the metadata is written last)."""
    try:
        return json.loads((out / "synthetic.json").read_text()).get("spec") == spec.describe()
    except (OSError, json.JSONDecodeError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m remdr.data.synthetic", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", required=True, help="output directory")
    for f, default in asdict(SyntheticSpec()).items():
        if f not in ("seed", "regime"):
            ap.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--regime", choices=tuple(REGIMES), default="default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    spec = SyntheticSpec(**{k: getattr(args, k) for k in asdict(SyntheticSpec())})
    if spec.n < 2 or spec.size < 16 or spec.depth < 1 or spec.n_sites < 1:  # fmt: skip
        print("error: need --n >= 2, --size >= 16, --depth >= 1, --n-sites >= 1", file=sys.stderr)
        return 2
    try:
        meta = generate(args.out, spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {spec.n} eyes to {args.out}: {meta['severity_counts']}, MD variance {meta['md_var']:.1f} dB^2"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
