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

log = logging.getLogger("flwr")  # Flower's handlers stream this to `remdr-server run`
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


NODE_UNAVAILABLE = 5  # flwr ErrorCode.NODE_UNAVAILABLE: no heartbeat from the node lately
RETRY_WAIT = 5.0  # seconds between re-sends to a node that is reconnecting


class PatientGrid:
    """Flower's Grid, but a message whose node is briefly unavailable (a SuperNode reconnecting
    after a SuperLink restart) is sent again until the round's timeout is spent. A site that
    stays away still ends up missing from the round, as before."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.dst_of_message: dict[str, int] = {}

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        pending = list(messages)
        final: list[Message] = []
        while pending:
            left = max(1.0, deadline - time.monotonic())
            replies = list(self._grid.send_and_receive(pending, timeout=left))
            sent = {m.metadata.message_id: m for m in pending}
            self.dst_of_message.update({mid: m.metadata.dst_node_id for mid, m in sent.items()})
            retry = []
            for reply in replies:
                request = sent.get(reply.metadata.reply_to_message_id)
                unavailable = reply.has_error() and reply.error.code == NODE_UNAVAILABLE
                if unavailable and request is not None and time.monotonic() + RETRY_WAIT < deadline:
                    retry.append(request)
                else:
                    final.append(reply)
            if not retry:
                break
            log.info("%d site(s) unavailable, retrying in %.0fs", len(retry), RETRY_WAIT)
            time.sleep(RETRY_WAIT)
            pending = [
                Message(
                    content=m.content,
                    dst_node_id=m.metadata.dst_node_id,
                    message_type=m.metadata.message_type,
                )
                for m in retry
            ]
        return final


class RoundRecorder:
    """Mixed into a Flower strategy: remembers per-site replies, errors and missing sites."""

    round_offset = 0
    grid: PatientGrid | None = None

    def _init_recorder(self) -> None:
        self.site_of_node: dict[int, str] = {}
        self.current: dict = {}

    def _node(self, msg: Message) -> int:
        """The site a reply is about; an error made by the SuperLink names the request's node."""
        dst = self.grid.dst_of_message.get(msg.metadata.reply_to_message_id) if self.grid else None
        return dst if dst is not None else msg.metadata.src_node_id

    def _site(self, msg: Message) -> str:
        node = self._node(msg)
        if msg.has_content() and "site" in msg.content:
            self.site_of_node[node] = str(msg.content["site"]["site-id"])
        return self.site_of_node.get(node, f"node-{node}")

    def _note(self, phase: str, sampled: list[int], replies: list[Message]) -> None:
        replied = {self._node(m) for m in replies}
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
            log.warning(
                "round %s %s: no reply from %s",
                self.current.get("round"),
                phase,
                ", ".join(missing),
            )

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
        msgs = list(
            super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)
        )
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
        kwargs.update(
            eta=fed.server_lr,
            beta_1=fed.server_beta_1,
            beta_2=fed.server_beta_2,
            tau=fed.server_tau,
        )
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
    strategy.grid = PatientGrid(grid)
    start = time.time()

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        record = dict(strategy.current)
        record["seconds"] = time.time() - record.pop("started", start)
        record["config"] = dict(context.run_config)
        run.save_round(server_round + done, arrays.to_torch_state_dict(), record)
        per_site = ", ".join(
            f"{site} {m['eval-val-mse']:.2f}"
            for site, m in sorted(record.get("sites", {}).items())
            if "eval-val-mse" in m
        )
        val = record.get("evaluate", {}).get("val-mse", float("nan"))
        missing = record.get("missing")
        log.info(
            "remdr round %d/%d: val MSE %.2f (%s) in %.1fs%s",
            server_round + done, fed.num_server_rounds, val, per_site, record["seconds"],
            f"; missing {missing}" if missing else "",
        )  # fmt: skip
        run.write_report({"status": "running", "config": dict(context.run_config)})
        return None

    remaining = fed.num_server_rounds - done
    if remaining > 0:
        strategy.start(
            grid=strategy.grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=remaining,
            timeout=fed.round_timeout,
            train_config=ConfigRecord({"remdr-version": __version__}),
            evaluate_config=ConfigRecord({"remdr-version": __version__}),
            evaluate_fn=checkpoint,
        )
    report = run.write_report(
        {
            "status": "completed",
            "config": dict(context.run_config),
            "wall_seconds_last_start": time.time() - start,
        }
    )
    log.info(
        "federation finished: %d rounds in %s (best %s)",
        len(report["rounds"]),
        run.dir,
        report["best"],
    )
