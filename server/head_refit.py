"""The federation's last step, `head-refit`: the final model's heads get the output layers that
the sites' summed Grams fit (`remdr.head_refit`), and `head-blend` is chosen after them.

Two models are refitted: the best round's and, with `average-rounds` N > 1, the mean of the
last N rounds' global models (SWA on the coordinator: with a constant learning rate FedAvg's
rounds jitter around a minimum, and their mean sits nearer its centre; Caldarola et al. 2022
pair it with SAM-style site training as Re-M3Dr's SAGM is). The one whose refitted model scores
lower on the sites' summed validation Grams becomes best.safetensors; both scores are recorded.
A round's score before the refit is no fair rival here: the best round was picked as the lowest
of many noisy scores, so it is compared after the refit, on the same sums.

One evaluate message per site and candidate, after the final evaluation; no training. A site
that fails or whose sums fail screening is left out and named; with no usable sums the best
round's model stays as it is. Resuming a finished run repeats it from the rounds' own weights.
"""

from __future__ import annotations

import logging
import math

import torch
from flwr.app import ArrayRecord, ConfigRecord

from remdr.federation.run_directory import RunDirectory
from remdr.head_refit import HEAD_STATS, TASK_KEY, HeadRefit, refit_heads, refittable, sizes
from remdr.methods import build_model, create_method

log = logging.getLogger("flwr")


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of models (float64 sums, each tensor back in its dtype); integer
    buffers (counters) are the last model's."""
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            total = sum(s[key].double() for s in states)
            out[key] = (total / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def candidates(run: RunDirectory, best_round: int, average_rounds: int) -> dict[str, dict]:
    """The models to refit, by the name the record gives them."""
    out = {f"round {best_round}": run.load_weights(best_round)}
    last = run.completed_rounds()[-average_rounds:] if average_rounds > 1 else []
    if last and len(last) == average_rounds:
        states = [run.load_weights(r) for r in last]
        out[f"mean of rounds {last[0]}-{last[-1]}"] = mean_state(states)
    return out


def refit_best(
    strategy, run: RunDirectory, cfg, to_sites: ConfigRecord, server_round: int,
    average_rounds: int = 0,
):  # fmt: skip
    """Refit each candidate's heads from the sites' sums and keep the lower scoring; the
    refit's record, or None."""
    best = run.best()
    if best is None or not refittable(_model(cfg)):
        return None
    config = ConfigRecord({**dict(to_sites), TASK_KEY: HEAD_STATS})
    results = {}
    for name, state in candidates(run, best["round"], average_rounds).items():
        model = _model(cfg)
        model.load_state_dict(state)
        sums = strategy.head_statistics(ArrayRecord(state), config, server_round, sizes(model))
        if sums is None:  # the sites did not answer: nothing to score the other on either
            break
        train, val, sites, errors = sums
        chosen = refit_heads(model, train, val, blend=cfg.method.head_blend)
        results[name] = (model, chosen, sites, errors)
    if not results:
        log.warning("remdr head refit: no site's sums were usable; the best round stays as is")
        return None
    name = min(results, key=lambda n: _score(results[n][1]))  # ties: the first, the best round
    model, chosen, sites, errors = results[name]
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # no blend set
    record = {
        **chosen.to_dict(),
        "round": best["round"],
        "model": name,
        "val-mse": chosen.val_mse,
        "candidates": {n: r[1].val_mse for n, r in results.items()},
        "sites": sites,
        **({"errors": errors} if errors else {}),
    }
    run.save_refit(weights, record, chosen.blend)
    changes = ", ".join(
        f"{head} {r.val_mse_before:.2f} -> {r.val_mse:.2f}" for head, r in chosen.heads.items()
    )
    blend = chosen.blend
    scores = "; ".join(f"{n} {r[1].val_mse:.3f}" for n, r in results.items())
    log.info(
        "remdr head refit: %s chosen (validation MSE after the refit: %s) from %d sites' sums; "
        "each head: %s%s",
        name, scores, len(sites), changes,
        f"; blend {blend.modality} head at {blend.weight:.2f}" if blend and blend.weight else "",
    )  # fmt: skip
    return record


def _model(cfg):
    return build_model(cfg, create_method(cfg.train.method, cfg.method))


def _score(chosen: HeadRefit) -> float:
    return chosen.val_mse if math.isfinite(chosen.val_mse) else math.inf
