"""The federation's last step, `head-refit`: the best round's heads get the output layers that
the sites' summed Grams fit (`remdr.head_refit`), and `head-blend` is chosen after them.

One evaluate message per site, after the final evaluation; no training. A site that fails or
whose sums fail screening is left out and named; with no usable sums the best round's model
stays as it is. Resuming a finished run repeats it from the round's own weights.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord

from remdr.federation.run_directory import RunDirectory
from remdr.head_refit import HEAD_STATS, TASK_KEY, refit_heads, refittable, sizes
from remdr.methods import build_model, create_method

log = logging.getLogger("flwr")


def refit_best(strategy, run: RunDirectory, cfg, to_sites: ConfigRecord, server_round: int):
    """Refit the best round's heads from the sites' sums; the refit's record, or None."""
    best = run.best()
    model = build_model(cfg, create_method(cfg.train.method, cfg.method))
    if best is None or not refittable(model):
        return None
    state = run.load_weights(best["round"])
    model.load_state_dict(state)
    config = ConfigRecord({**dict(to_sites), TASK_KEY: HEAD_STATS})
    sums = strategy.head_statistics(ArrayRecord(state), config, server_round, sizes(model))
    if sums is None:
        log.warning("remdr head refit: no site's sums were usable; the best round stays as is")
        return None
    train, val, sites, errors = sums
    chosen = refit_heads(model, train, val, blend=cfg.method.head_blend)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # no blend set
    record = {
        **chosen.to_dict(),
        "round": best["round"],
        "sites": sites,
        **({"errors": errors} if errors else {}),
    }
    run.save_refit(weights, record, chosen.blend)
    changes = ", ".join(
        f"{head} {r.val_mse_before:.2f} -> {r.val_mse:.2f}" for head, r in chosen.heads.items()
    )
    blend = chosen.blend
    log.info(
        "remdr head refit of round %d from %d sites' sums, validation MSE of each head: %s%s",
        best["round"], len(sites), changes,
        f"; blend {blend.modality} head at {blend.weight:.2f}" if blend and blend.weight else "",
    )  # fmt: skip
    return record
