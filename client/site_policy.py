"""A site's own policy: its epsilon ceiling, its delta, the metrics it shares, the drill opt-in.

`remdr-client start` writes it into the SuperNode's node config, which only the site sets; the
ClientApp and the site worker read it back (`SitePolicy.from_node_config`). The coordinator's
run config can only tighten it: the ceiling and delta a round is planned with are the smaller
of the site's and the run config's, and a run config asking for more metrics than the site
shares is declined. A site that sets nothing still has a ceiling and a delta: the defaults
below, shown by `remdr-client start --check-only` (docs/privacy.md, "Set a budget").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from remdr.errors import Problems

SITE_EPSILON_MAX = 10.0  # the ceiling of a site that sets none: the top of the usual 1-10
DELTA_CAP = 1e-5  # a site's default delta is at most this ...
DELTA_PATIENTS = 10  # ... and at most 1 / (this * its patients), well below 1 / patients
MIN_BIN_PATIENTS = 10  # a severity bin's error is shared only over at least this many patients
METRIC_LEVELS = ("minimal", "standard", "full")  # remdr.client.metrics_policy says what each is
FAULT_DRILL = "allow"  # node-config `fault-drill` value of a site that joins fault drills


def default_delta(patients: int) -> float:
    """The delta of a site that sets none: min(1e-5, 1 / (10 * patients))."""
    return min(DELTA_CAP, 1.0 / (DELTA_PATIENTS * max(1, patients)))


@dataclass(frozen=True)
class SitePolicy:
    """What the site decided; node-config keys are the kebab-case names in `node_config`."""

    epsilon_max: float = SITE_EPSILON_MAX  # the site's ceiling on its cumulative epsilon
    delta: float = 0.0  # the site's delta; 0: `default_delta` of its patients
    require_dp: bool = False  # decline methods that do not train under DP-SGD
    share_metrics: str = ""  # minimal / standard / full; "": minimal with require-dp, else full
    min_bin_patients: int = MIN_BIN_PATIENTS
    allow_fault_drill: bool = False  # run the fault-drill ClientApp when a bundle names it

    @property
    def metrics_level(self) -> str:
        return self.share_metrics or ("minimal" if self.require_dp else "full")

    def site_delta(self, patients: int) -> float:
        return self.delta if self.delta > 0 else default_delta(patients)

    def node_config(self) -> dict[str, Any]:
        """The node-config entries that carry this policy (values as TOML literals take them)."""
        out: dict[str, Any] = {
            "epsilon-max": float(self.epsilon_max),
            "share-metrics": self.metrics_level,
            "min-bin-patients": int(self.min_bin_patients),
        }
        if self.delta > 0:
            out["delta"] = float(self.delta)
        if self.require_dp:
            out["require-dp"] = "true"
        if self.allow_fault_drill:
            out["fault-drill"] = FAULT_DRILL
        return out

    @classmethod
    def from_node_config(cls, node: dict[str, Any]) -> SitePolicy:
        """The policy in a node config; a key it lacks keeps the site default. A malformed value
        (a SuperNode started by hand) is one ConfigError listing every problem."""
        p = Problems()
        epsilon_max = _number(p, node, "epsilon-max", SITE_EPSILON_MAX, low=0.0)
        delta = _number(p, node, "delta", 0.0, low=0.0, high=1.0, allow_zero=True)
        min_bin = _number(p, node, "min-bin-patients", MIN_BIN_PATIENTS, low=0.0)
        share = str(node.get("share-metrics", ""))
        if share not in ("", *METRIC_LEVELS):
            p.add(
                f"node config share-metrics={share!r}",
                f"is one of {', '.join(METRIC_LEVELS)}",
                "start the site with remdr-client start --share-metrics",
            )
        p.raise_if_any()
        return cls(
            epsilon_max=epsilon_max,
            delta=delta,
            require_dp=str(node.get("require-dp", "false")).lower() == "true",
            share_metrics=share,
            min_bin_patients=int(min_bin),
            allow_fault_drill=str(node.get("fault-drill", "")) == FAULT_DRILL,
        )

    def describe(self, patients: int, explicit: set[str] = frozenset()) -> str:
        """The `--check-only` line: the ceiling, delta and metrics this site keeps, and where each
        comes from (`explicit`: the flags its operator gave)."""

        def origin(flag: str) -> str:
            return flag if flag in explicit else "site default"

        delta = self.site_delta(patients)
        delta_why = "--delta" if self.delta > 0 else f"min(1e-5, 1/(10 x {patients} patients))"
        bins = f"per-bin errors only over >= {self.min_bin_patients} patients"
        return (
            f"privacy: epsilon ceiling {self.epsilon_max:g} ({origin('--epsilon-max')}), "
            f"delta {delta:.2g} ({delta_why}); the coordinator can lower these, never raise "
            f"them; metrics shared: {self.metrics_level} ({bins})"
            + ("; non-private methods declined (--require-dp)" if self.require_dp else "")
        )


def _number(
    p: Problems,
    node: dict[str, Any],
    key: str,
    default: float,
    *,
    low: float,
    high: float = math.inf,
    allow_zero: bool = False,
) -> float:
    if key not in node:
        return float(default)
    try:
        value = float(node[key])
    except (TypeError, ValueError):
        value = math.nan
    ok = math.isfinite(value) and (low < value <= high or (allow_zero and value == 0))
    if not ok:
        p.add(
            f"node config {key}={node[key]!r}",
            f"must be a number above {low:g}"
            + (f" and at most {high:g}" if high < math.inf else ""),
            f"start the site with remdr-client start --{key}",
        )
    return value if ok else default
