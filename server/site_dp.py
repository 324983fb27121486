"""Site-level DP of the aggregate: Flower's server-side clipping wrappers, the release over the
round's fixed cohort, and the accounting of what was released.

Site-level DP releases the sum of the clipped updates actually aggregated divided by the round's
fixed cohort size m (the sites asked), plus Gaussian noise of std z*C/m: adding or removing one
site's update moves the release by at most C/m whether other sites replied or were refused, so
the multiplier z holds. A missing or refused site counts as a zero update.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from remdr.federation.run_config import FedConfig
from remdr.privacy import epsilon_of


class ServerSideAdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, noised with the norm the updates were clipped to.

    Flower 1.42 moves the clipping norm (`_geometric_update`) before it adds the noise, so a
    shrinking norm under-noises the release (std z*C_next/m for updates clipped to C). Here the
    next norm takes effect only after the release."""

    _next_norm: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        used = self.clipping_norm
        super()._geometric_update(clipped_fraction)
        self._next_norm, self.clipping_norm = self.clipping_norm, used

    def aggregate_train(self, server_round, replies):  # noqa: D102
        self._next_norm = None
        out = super().aggregate_train(server_round, replies)
        if self._next_norm is not None:
            self.clipping_norm = self._next_norm
        return out


DP_WRAPPERS = (
    DifferentialPrivacyServerSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)


def wrap(inner: Strategy, fed: FedConfig) -> Strategy:
    """`inner` inside Flower's site-level DP wrapper when the run asks for one."""
    if fed.site_dp == "fixed":
        return DifferentialPrivacyServerSideFixedClipping(
            inner, fed.site_dp_noise, fed.site_dp_clip, fed.min_nodes
        )
    if fed.site_dp == "adaptive":
        return ServerSideAdaptiveClipping(
            inner, fed.site_dp_noise, fed.min_nodes, initial_clipping_norm=fed.site_dp_clip
        )
    return inner


def over_cohort(
    arrays: ArrayRecord, global_state: dict[str, np.ndarray], k: int, m: int
) -> ArrayRecord:
    """Rescale the wrapper's g + mean_k + N(0, (zC/k)^2) to g + sum_k/m + N(0, (zC/m)^2), with
    m the round's cohort (the sites asked) and k the updates aggregated: the release then has
    sensitivity C/m and multiplier z however many replied or passed screening."""
    if k >= m:
        return arrays
    scaled = {}
    for key, array in arrays.items():
        a, g = array.numpy(), global_state[key].astype(np.float64)
        scaled[key] = Array(np.asarray((g + (a.astype(np.float64) - g) * (k / m)).astype(a.dtype)))
    return ArrayRecord(scaled)


def release_record(wrapper: Strategy, server_round: int, m: int, k: int, clip: float) -> dict:
    """What one release was (the journal entry `site_level_privacy` accounts)."""
    z = float(wrapper.noise_multiplier)
    release = {
        "round": server_round,
        "cohort": m,
        "aggregated": k,
        "noise_multiplier": z,
        "clip": clip,
        "noise_std": z * clip / m,
    }
    if isinstance(wrapper, DifferentialPrivacyServerSideAdaptiveClipping):
        release["count_noise"] = float(wrapper.clipped_count_stddev)
    return release


def site_level_privacy(fed: FedConfig, releases: list[dict]) -> dict | None:
    """(epsilon, delta) of the site-level guarantee after the noised aggregates in `releases`
    (the journal: one entry per release made, as `RemdrStrategy` recorded it).

    Every site joins every round (q = 1, no amplification): each release is a Gaussian
    mechanism with multiplier z on the sum of clipped updates over the fixed cohort m (std
    z*C/m on the released mean), composed with Opacus' RDP. Adaptive clipping also releases a
    noisy count of clipped updates (sensitivity 1, std `count_noise`), accounted as a second
    Gaussian mechanism per release.
    """
    if fed.site_dp == "off":
        return None
    history = [(float(r["noise_multiplier"]), 1.0, 1) for r in releases]
    history += [(float(r["count_noise"]), 1.0, 1) for r in releases if "count_noise" in r]
    return {
        "granularity": "site-level: add or remove one site's whole update in a round",
        "mechanism": (
            f"Flower server-side {fed.site_dp} clipping; the sum of the clipped updates over the "
            "round's cohort m (a missing or refused site counts as zero), noise z*C/m on the mean"
        ),
        "noise_multiplier": fed.site_dp_noise,
        "clip": fed.site_dp_clip if fed.site_dp == "fixed" else f"adaptive from {fed.site_dp_clip}",
        "releases": len(releases),
        "delta": fed.site_dp_delta,
        "epsilon": epsilon_of(history, fed.site_dp_delta),
    }
