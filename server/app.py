"""The Flower ServerApp: initial model, checkpoint every round, resume after a restart.

All ML lives in `remdr`; the strategy (`remdr.server.strategy`) maps the run config onto a Flower
strategy, and this module runs it over a `RetryingGrid`, recording what each round did in the
coordinator's run directory (`out-dir`).

Resume: a restarted coordinator continues after the last complete round with that round's
weights and the strategy's state saved with it (FedAdam moments, the adaptive clipping norm). It
refuses a changed training config (`resume_changes`). Sites key their cross-round state by the
run's `run-key`, sent with every message, so their FedBN layers and EMA scores continue too.
Site-level DP releases are journalled when made, so each counts once, checkpointed or not.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from remdr.server.grid import RetryingGrid
from remdr.server.head_refit import refit_best
from remdr.server.site_dp import site_level_privacy
from remdr.server.strategy import RemdrStrategy, RoundAborted, build_strategy

from remdr import __version__
from remdr.errors import ConfigError
from remdr.federation.run_config import RESUMABLE, FedConfig, resume_changes, split_run_config
from remdr.federation.run_directory import RunDirectory, privacy_summary
from remdr.methods import build_model, create_method
from remdr.runtime import seed_everything

log = logging.getLogger("flwr")  # Flower's handlers stream this to `remdr-server run`
app = ServerApp()


def initial_state(context: Context):
    cfg, _ = split_run_config(dict(context.run_config))
    seed_everything(cfg.train.seed, torch.device("cpu"))
    method = create_method(cfg.train.method, cfg.method)
    model = build_model(cfg, method)
    # the initial model is seeded; the coordinator's later draws (Flower's site-level DP noise
    # and noisy clipped count use NumPy's global generator) must not be replayable from the seed
    np.random.seed()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def in_model_dtypes(state: dict, model: dict) -> dict:
    """Saved weights in the dtypes of the `model`'s state (integer counters rounded): a run
    saved before the coordinator kept them (FedAvg made counters float64) resumes with a
    global model the sites' updates match (screening requires the global's dtypes)."""
    out = {}
    for key, value in state.items():
        want = model[key].dtype if key in model else value.dtype
        if value.dtype != want and not want.is_floating_point and value.is_floating_point():
            value = value.round()
        out[key] = value.to(want)
    return out


def resume_point(run: RunDirectory, run_config: dict) -> int:
    """The last complete round of `run` (0 for a new run), after checking that `run_config`
    may continue it: a changed training key is refused in one line that names it."""
    done = run.last_round()
    if done:
        changes = resume_changes(run.record(done).get("config", {}), run_config, done)
        if changes:
            raise ConfigError(
                f"cannot resume {run.dir} after round {done}: the training config changed "
                f"({'; '.join(changes)})",
                "",
                "restore those values or use a new out-dir; a resume may change only "
                f"num-server-rounds (not below {done}), {', '.join(RESUMABLE)}",
            )
    return done


def trainable_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable parameter of the model `cfg` trains (what SCAFFOLD's
    control variates cover: not buffers such as BatchNorm's running statistics)."""
    model = build_model(cfg, create_method(cfg.train.method, cfg.method))
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def resumed_strategy(
    fed: FedConfig,
    run: RunDirectory,
    done: int,
    parameters: dict[str, tuple[int, ...]] | None = None,
) -> RemdrStrategy:
    """The strategy, continuing after round `done` with the state saved with it, journalling
    every site-level DP release in the run directory. `parameters` (name -> shape) are what
    SCAFFOLD's control variates cover."""
    strategy = build_strategy(fed, parameters)
    strategy.round_offset = done
    if done:
        strategy.load_state_dict(*run.load_strategy_state(done))
    strategy.on_release = run.record_release
    return strategy


def _log_round(r: int, rounds: int, record: dict, scored: int, scores) -> None:
    """One line per round (the simulator echoes it): its time, and the newest validation.

    In one-message rounds the validation arrives a round late: round r's line scores round
    r-1's model, and a last line scores the final model."""
    aggregate, per_site = scores if scores is not None else (record.get("evaluate", {}), {})
    per_site = per_site or record.get("sites", {})
    sites = ", ".join(
        f"{site} {m['eval-val-mse']:.2f}"
        for site, m in sorted(per_site.items())
        if "eval-val-mse" in m
    )
    val = aggregate.get("val-mse", float("nan"))
    of = "" if scored == r else f" of round {scored}'s model" if scored else " of the initial model"
    missing = record.get("missing")
    if "seconds" not in record:  # the final evaluation: not a round of its own
        log.info("remdr final model (round %d/%d): val MSE %.2f (%s)", r, rounds, val, sites)
        return
    log.info(
        "remdr round %d/%d: val MSE%s %.2f (%s) in %.1fs%s",
        r, rounds, of, val, sites, record["seconds"], f"; missing {missing}" if missing else "",
    )  # fmt: skip


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fed = split_run_config(dict(context.run_config))
    run = RunDirectory(fed.out_dir)
    done = resume_point(run, dict(context.run_config))
    if done:
        state = in_model_dtypes(run.load_weights(done), initial_state(context))
        log.info("resuming from %s after round %d of %d", run.dir, done, fed.num_server_rounds)
    else:
        state = initial_state(context)
    parameters = trainable_shapes(cfg) if fed.drift_control == "scaffold" else None
    strategy = resumed_strategy(fed, run, done, parameters)
    strategy.grid = RetryingGrid(grid)
    to_sites = ConfigRecord({"remdr-version": __version__, "remdr-run": run.run_key()})
    start = time.time()

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        record = dict(strategy.current)
        record["seconds"] = time.time() - record.pop("started", start)
        record["config"] = dict(context.run_config)
        if fed.site_dp != "off":  # the cumulative guarantee of every release made so far
            record["site_dp"] = site_level_privacy(fed, run.releases())
        run.save_round(
            server_round + done, arrays.to_torch_state_dict(), record, strategy.state_dict()
        )
        scored = server_round + done  # the round whose model these validation scores are of
        received = strategy.take_received()
        if received is not None:  # the sites scored the previous round's model as they began
            scored -= 1
            run.add_evaluation(scored, *received)
        _log_round(server_round + done, fed.num_server_rounds, record, scored, received)
        run.write_report(
            {"status": "running", "config": dict(context.run_config)},
            plot=(server_round + done) % 10 == 0,  # a plot costs about a second; the end draws it
        )
        return None

    remaining = fed.num_server_rounds - done
    status, reason = "completed", ""
    try:
        if remaining > 0:
            strategy.start(
                grid=strategy.grid,
                initial_arrays=ArrayRecord(state),
                num_rounds=remaining,
                timeout=fed.round_timeout,
                train_config=to_sites,
                evaluate_config=ConfigRecord(dict(to_sites)),
                evaluate_fn=checkpoint,
            )
        if not fed.separate_evaluate and run.last_round() == fed.num_server_rounds:
            final = run.last_round()
            scores = strategy.final_evaluation(
                ArrayRecord(run.load_weights(final)), ConfigRecord(dict(to_sites)), remaining
            )
            if scores is not None:
                run.add_evaluation(final, *scores)
                _log_round(final, fed.num_server_rounds, {}, final, scores)
        if cfg.method.head_refit and run.last_round() == fed.num_server_rounds:
            try:  # a failure here must not cost the trained federation: the best round stays
                # with fedbn each site scores every model with its own last normalisation
                # layers, which fit the last rounds' mean better than an earlier round: no mean
                average = 0 if fed.fedbn else fed.average_rounds
                refit_best(
                    strategy, run, cfg, ConfigRecord(dict(to_sites)), remaining,
                    average_rounds=average,
                )  # fmt: skip
            except Exception:
                log.exception("remdr head refit failed; the best round's model stays as it is")
    except RoundAborted as err:
        status, reason = "aborted", str(err)
        log.error("federation aborted: %s", err)
    records = run.records()
    site_dp = site_level_privacy(fed, run.releases())
    report = run.write_report(
        {
            "status": status,
            **({"reason": reason} if reason else {}),
            "config": dict(context.run_config),
            "wall_seconds_last_start": time.time() - start,
            "privacy": privacy_summary(records, site_dp),
        }
    )
    log.info(
        "federation finished: %d rounds in %s (best %s)",
        len(report["rounds"]),
        run.dir,
        report["best"],
    )
