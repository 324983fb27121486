"""The federation's last step, `head-refit`: the final model's heads get the output layers that
the sites' summed Grams fit (`remdr.head_refit`), and `head-blend` is chosen after them.

Two models are refitted: the best round's and, with `average-rounds` N > 1, the mean of the
last N rounds' global models (SWA on the coordinator: with a constant learning rate FedAvg's
rounds jitter around a minimum, and their mean sits nearer its centre; Caldarola et al. 2022
pair it with SAM-style site training as Re-M3Dr's SAGM is). The mean replaces the best round
only where both refitted models are scored on the same sites' eyes and the mean's validation
MSE is lower; both scores are recorded. The best round's own score is no fair rival for the
mean: it was picked as the lowest of many noisy scores, so both are compared after the refit,
on the same sums.

One evaluate message per site and model, after the final evaluation; no training. A site that
fails or whose sums fail screening is left out and named; with no usable sums the best round's
model stays as it is, and a failure with the mean keeps the best round's refit. Resuming a
finished run repeats it from the rounds' own weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord
from remdr.server.global_model import mean_state

from remdr.federation.run_directory import RunDirectory
from remdr.head_refit import HEAD_STATS, TASK_KEY, HeadRefit, refit_heads, refittable, sizes
from remdr.methods import build_model

log = logging.getLogger("flwr")


@dataclass
class Refitted:
    """One candidate model after the refit, and whose sums it was refitted and scored on."""

    name: str
    model: torch.nn.Module
    chosen: HeadRefit
    sites: list[str]
    errors: list[dict]
    val_eyes: dict[str, int]

    @property
    def score(self) -> float:
        """Its validation MSE after the refit; an unscored model (NaN) never wins."""
        return self.chosen.val_mse if math.isfinite(self.chosen.val_mse) else math.inf


def refit_best(
    strategy, run: RunDirectory, cfg, to_sites: ConfigRecord, server_round: int, *,
    average_rounds: int,
) -> dict | None:  # fmt: skip
    """Refit the best round's heads (and the last rounds' mean's) from the sites' sums, keep
    the lower scoring; the refit's record, or None."""
    best = run.best()
    if best is None or not refittable(build_model(cfg)):
        return None
    config = ConfigRecord({**dict(to_sites), TASK_KEY: HEAD_STATS})
    kept = _refit(strategy, cfg, config, server_round, f"round {best['round']}",
                  run.load_weights(best["round"]))  # fmt: skip
    if kept is None:
        log.warning("remdr head refit: no site's sums were usable; the best round stays as is")
        return None
    scores = {kept.name: kept.chosen.val_mse}
    mean = None
    if math.isfinite(kept.chosen.val_mse):  # else nothing to compare the mean with
        try:  # the mean is an option: whatever goes wrong with it, the best round's refit stands
            mean = _mean_of_last_rounds(strategy, run, cfg, config, server_round, average_rounds)
        except Exception:
            log.exception("remdr head refit: the mean of the last rounds failed; best round kept")
    if mean is not None:
        scores[mean.name] = mean.chosen.val_mse
        same_eyes = (mean.sites, mean.val_eyes) == (kept.sites, kept.val_eyes)
        if not same_eyes:
            log.warning("remdr head refit: other sites answered for %s; the best round kept",
                        mean.name)  # fmt: skip
        elif mean.score < kept.score:  # a tie or an unscored mean keeps the best round
            kept = mean
    weights = {k: v.detach().clone() for k, v in kept.model.state_dict().items()}  # no blend
    record = {
        **kept.chosen.to_dict(),
        "round": best["round"],
        "model": kept.name,
        "val-mse": kept.chosen.val_mse,
        "candidates": scores,
        "sites": kept.sites,
        **({"errors": kept.errors} if kept.errors else {}),
    }
    run.save_refit(weights, record, kept.chosen.blend)
    _log(kept, scores)
    return record


def _mean_of_last_rounds(
    strategy, run: RunDirectory, cfg, config: ConfigRecord, server_round: int, n: int
) -> Refitted | None:
    """The mean of the last `n` rounds' global models, refitted; None where it is not tried:
    `n` below 2 or fewer rounds than `n`."""
    rounds = run.completed_rounds()[-n:] if n > 1 else []
    if len(rounds) < max(n, 2):
        if n > 1:
            log.info("remdr head refit: %d round(s), fewer than average-rounds %d: the best "
                     "round alone", len(rounds), n)  # fmt: skip
        return None
    state = mean_state([run.load_weights(r) for r in rounds])
    name = f"mean of rounds {rounds[0]}-{rounds[-1]}"
    return _refit(strategy, cfg, config, server_round, name, state)


def _refit(
    strategy, cfg, config: ConfigRecord, server_round: int, name: str, state: dict
) -> Refitted | None:
    """`state` refitted from the sums the sites send for it; None when no site's were usable."""
    model = build_model(cfg)
    model.load_state_dict(state)
    sums = strategy.head_statistics(ArrayRecord(state), config, server_round, sizes(model))
    if sums is None:
        return None
    train, val, sites, errors = sums
    chosen = refit_heads(model, train, val, blend=cfg.method.head_blend)
    return Refitted(name, model, chosen, sites, errors, {h: s.n for h, s in val.items()})


def _log(kept: Refitted, scores: dict[str, float]) -> None:
    changes = ", ".join(
        f"{head} {r.val_mse_before:.2f} -> {r.val_mse:.2f}" for head, r in kept.chosen.heads.items()
    )
    blend = kept.chosen.blend
    log.info(
        "remdr head refit: %s chosen (validation MSE after the refit: %s) from %d sites' sums; "
        "each head: %s%s",
        kept.name, "; ".join(f"{n} {v:.3f}" for n, v in scores.items()), len(kept.sites),
        changes,
        f"; blend {blend.modality} head at {blend.weight:.2f}" if blend and blend.weight else "",
    )  # fmt: skip
