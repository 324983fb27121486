"""The Flower ServerApp: strategy wiring, fixed cohort, per-site metrics, checkpoints, resume.

All ML lives in `remdr`; this module maps the run config onto a Flower strategy and records what
each round did in the coordinator's run directory (`out-dir`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from remdr import __version__
from remdr.federated import FedConfig, split_run_config
from remdr.fedrun import FederatedRun
from remdr.methods import create_method
from remdr.runtime import seed_everything

log = logging.getLogger(__name__)
app = ServerApp()


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of every metric, ignoring NaN (a site without severe eyes has no severe MAE)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        metrics = next(iter(rec.metric_records.values()))
        w = float(metrics[weight_key])
        for k, v in metrics.items():
            if k == weight_key or isinstance(v, list) or not math.isfinite(float(v)):
                continue
            totals[k] = totals.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    out = {k: totals[k] / weights[k] for k in totals if weights[k] > 0}
    out[weight_key] = sum(float(next(iter(r.metric_records.values()))[weight_key]) for r in records)
    return MetricRecord(out)


class RoundRecorder:
    """Mixed into a Flower strategy: remembers per-site replies, errors and missing sites."""

    round_offset = 0

    def _init_recorder(self) -> None:
        self.site_of_node: dict[int, str] = {}
        self.current: dict = {}

    def _site(self, msg: Message) -> str:
        if "site" in msg.content:
            self.site_of_node[msg.metadata.src_node_id] = str(msg.content["site"]["site-id"])
        return self.site_of_node.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")

    def _note(self, phase: str, sampled: list[int], replies: list[Message]) -> None:
        replied = {m.metadata.src_node_id for m in replies}
        rec = self.current.setdefault("sites", {})
        errors = self.current.setdefault("errors", [])
        for msg in replies:
            site = self._site(msg)
            if msg.has_error():
                errors.append({"site": site, "phase": phase, "reason": msg.error.reason})
                log.warning("site %s failed in %s: %s", site, phase, msg.error.reason)
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            prefix = "" if phase == "train" else "eval-"
            rec.setdefault(site, {}).update({f"{prefix}{k}": v for k, v in metrics.items()})
        missing = [self.site_of_node.get(n, f"node-{n}") for n in sampled if n not in replied]
        if missing:
            self.current.setdefault("missing", {})[phase] = missing
            log.warning("round %s %s: no reply from %s", self.current.get("round"), phase, ", ".join(missing))

    def configure_train(self, server_round, arrays, config, grid):  # noqa: D102
        self.current = {"round": server_round + self.round_offset, "started": time.time()}
        msgs = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self._sampled_train = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def aggregate_train(self, server_round, replies: Iterable[Message]):  # noqa: D102
        replies = list(replies)
        self._note("train", self._sampled_train, replies)
        arrays, metrics = super().aggregate_train(server_round + self.round_offset, replies)
        self.current["train"] = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: D102
        msgs = list(super().configure_evaluate(server_round + self.round_offset, arrays, config, grid))
        self._sampled_eval = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def aggregate_evaluate(self, server_round, replies: Iterable[Message]):  # noqa: D102
        replies = list(replies)
        self._note("evaluate", self._sampled_eval, replies)
        metrics = super().aggregate_evaluate(server_round + self.round_offset, replies)
        self.current["evaluate"] = dict(metrics) if metrics is not None else {}
        return metrics


BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def build_strategy(fed: FedConfig) -> FedAvg:
    """The configured Flower strategy with a fixed cohort of `min-nodes` sites per round."""
    base = BASES[fed.strategy]
    kwargs = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": fed.min_nodes,
        "min_evaluate_nodes": fed.min_nodes,
        "min_available_nodes": fed.min_nodes,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedadam":
        kwargs.update(eta=fed.server_lr, beta_1=fed.server_beta_1, beta_2=fed.server_beta_2, tau=fed.server_tau)
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trim_beta
    cls = type(f"Remdr{base.__name__}", (RoundRecorder, base), {})
    strategy = cls(**kwargs)
    strategy._init_recorder()
    return strategy


def initial_state(context: Context):
    cfg, _ = split_run_config(dict(context.run_config))
    seed_everything(cfg.train.seed, torch.device("cpu"))
    model = create_method(cfg.train.method, cfg.method).build_model(cfg.model, cfg.data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fed = split_run_config(dict(context.run_config))
    run = FederatedRun(fed.out_dir)
    done = run.last_round()
    if done:
        state = run.load_weights(done)
        log.info("resuming from %s after round %d of %d", run.dir, done, fed.num_server_rounds)
    else:
        state = initial_state(context)
    strategy = build_strategy(fed)
    strategy.round_offset = done
    start = time.time()

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        record = dict(strategy.current)
        record["seconds"] = time.time() - record.pop("started", start)
        record["config"] = dict(context.run_config)
        run.save_round(server_round + done, arrays.to_torch_state_dict(), record)
        run.write_report({"status": "running", "config": dict(context.run_config)})
        return None

    remaining = fed.num_server_rounds - done
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=remaining,
            timeout=fed.round_timeout,
            train_config=ConfigRecord({"remdr-version": __version__}),
            evaluate_config=ConfigRecord({"remdr-version": __version__}),
            evaluate_fn=checkpoint,
        )
    report = run.write_report(
        {"status": "completed", "config": dict(context.run_config), "wall_seconds_last_start": time.time() - start}
    )
    log.info("federation finished: %d rounds in %s (best %s)", len(report["rounds"]), run.dir, report["best"])
