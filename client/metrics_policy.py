"""What a site shares of the metrics it computes each round: its `--share-metrics` level.

The metrics are computed from the site's private labels and are not covered by its DP ledger,
so a site shares only what it chose to. Every reply carries the same keys whatever the level
(Flower aggregates only replies whose metric keys agree, so sites with different policies share
one federation): a withheld value is NaN, as an empty severity bin's already is, and the
coordinator's aggregates skip NaN.

* minimal: what the federation needs to run and to choose its model, and the site's own privacy
  spend: `num-examples`, `unit-weight`, `eyes-*` (aggregation weights), `num-val`, `num-test`,
  `val-mse` (the best model is the one with the lowest aggregated validation MSE),
  `val-mse-blend-*` (the same MSE with a unimodal head blended in, by which the coordinator
  chooses `head-blend`), `dp-*`.
* standard: also `train-loss`, `val-mae`, `test-mse`, `test-mae`, `train-seconds`,
  `train-steps`, `skipped-records`.
* full: every metric, the per-severity-bin errors (`*-mae-<bin>`, `*-mae-bin-avg`) included.

At every level a bin's error leaves only when the bin holds at least `min_bin_patients`
patients (one patient's error would otherwise be that patient's), and the bin-averaged error
only when every non-empty bin does (it would give the small bin away). The same rules hold for
`received-*` (the model the site was sent, scored on the same patients).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from remdr.data.records import EyeRecord
from remdr.errors import ConfigError, PrivacyError
from remdr.federation.site_round import RECEIVED
from remdr.head_blend import SITE_PROBE_PREFIX
from remdr.metrics import BINS, severity_bin

LEVELS = ("minimal", "standard", "full")
REQUEST_KEY = "share-metrics"  # the run-config key by which a coordinator asks for a level
MINIMAL = {"num-examples", "unit-weight", "num-val", "num-test", "val-mse"}
MINIMAL_PREFIXES = ("eyes-", "dp-", SITE_PROBE_PREFIX)
STANDARD = {"train-loss", "train-seconds", "train-steps", "skipped-records", "val-mae"}
STANDARD |= {"test-mse", "test-mae"}
PER_BIN = re.compile(rf"(val|test)-mae-({'|'.join(BINS)}|bin-avg)")

BinPatients = Mapping[str, Mapping[str, int]]  # split ("val", "test") -> bin -> patients


def level_of(key: str) -> str:
    """The lowest level that shares `key` (a key this module does not know: full)."""
    key = key.removeprefix(RECEIVED)
    if key in MINIMAL or key.startswith(MINIMAL_PREFIXES):
        return "minimal"
    if key in STANDARD:
        return "standard"
    return "full"


def bin_patients(splits: Mapping[str, Iterable[EyeRecord]]) -> dict[str, dict[str, int]]:
    """Patients per severity bin of each split (an eye counts in the bin of its MD)."""
    out = {}
    for split, records in splits.items():
        seen: dict[str, set[str]] = {b: set() for b in BINS}
        for r in records:
            seen[BINS[severity_bin(r.md)]].add(r.patient_id)
        out[split] = {b: len(p) for b, p in seen.items()}
    return out


def _bin_ok(key: str, patients: BinPatients, least: int) -> bool:
    match = PER_BIN.fullmatch(key.removeprefix(RECEIVED))
    if match is None:
        return True
    counts = patients.get(match.group(1))
    if counts is None:
        return False
    if match.group(2) == "bin-avg":
        return all(n >= least for n in counts.values() if n > 0)
    return counts.get(match.group(2), 0) >= least


def share_metrics(
    metrics: Mapping[str, float], level: str, patients: BinPatients, min_bin_patients: int
) -> dict[str, float]:
    """`metrics` with every value this level or the bin rule withholds set to NaN."""
    allowed = LEVELS[: LEVELS.index(level) + 1]
    return {
        k: (v if level_of(k) in allowed and _bin_ok(k, patients, min_bin_patients) else math.nan)
        for k, v in metrics.items()
    }


def agreed_level(site_level: str, asked: str) -> str:
    """The level a run shares: the site's own when the run config asks for "auto", a lower one
    when it asks for less; asking for more is declined (PrivacyError), before any training."""
    if asked == "auto":
        return site_level
    if asked not in LEVELS:
        raise ConfigError(
            f"run config {REQUEST_KEY}={asked!r}",
            f"is auto or one of {', '.join(LEVELS)}",
            f'{REQUEST_KEY} = "auto" takes each site\'s own',
        )
    if LEVELS.index(asked) > LEVELS.index(site_level):
        raise PrivacyError(
            f"run config asks {REQUEST_KEY}={asked}",
            f"this site shares at most {site_level} metrics (remdr-client start "
            "--share-metrics; minimal is the default with --require-dp)",
            f'ask for {REQUEST_KEY} = "auto" or "{site_level}"',
        )
    return asked
