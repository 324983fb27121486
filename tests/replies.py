"""Replies as a site's ClientApp sends them (or a hostile one might), built by hand for the
strategy tests, and a grid that is just a list of connected nodes."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app import Metadata as FlwrMetadata


def arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of NumPy arrays, each exactly as given (dtype included)."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})


def reply(node: int, content: RecordDict, kind: str = "train") -> Message:
    """The reply of node `node` to a `kind` message, with whatever `content` it chose to send."""
    meta = FlwrMetadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"q{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    return Message(content=content, metadata=meta)


def train_reply(node: int, arrays: ArrayRecord, site: str, metrics: dict) -> Message:
    """The reply of node `node` (site `site`) to a train message: weights and metrics."""
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site-id": site}),
        }
    )
    return reply(node, content)


def evaluate_reply(node: int, site: str, metrics: dict) -> Message:
    """The reply of node `node` (site `site`) to an evaluate message: metrics only."""
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site})}
    )
    return reply(node, content, "evaluate")


class Nodes:
    """A grid as the strategy's cohort check sees it: the connected node ids and, with node
    authentication, the names their keys were registered under."""

    def __init__(self, nodes: list[int], names: dict[int, str] | None = None) -> None:
        self.nodes, self.names = nodes, names or {}

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo  # what Flower's grids return

        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in self.nodes]


class Federation:
    """A coordinator's strategy driven round by round as Flower's `Strategy.start` drives it
    (`configure_train`, then `aggregate_train` on the replies), over connected `Nodes`."""

    def __init__(
        self,
        model: dict[str, np.ndarray],
        nodes: Nodes,
        run_config: dict | None = None,
    ) -> None:
        from remdr.server.strategy import build_strategy

        from remdr.federation.run_config import split_run_config

        config = {"min-nodes": len(nodes.nodes), "drift-control": "off", "node-wait": 0.0}
        _, fed = split_run_config({**config, **(run_config or {})})
        self.strategy = build_strategy(fed, {k: v.shape for k, v in model.items()})
        self.nodes, self.model, self.round = nodes, dict(model), 0

    def train(self, replies: Callable[[dict[str, np.ndarray]], list[Message]]) -> dict:
        """One round: the sites' `replies` to the current model; returns the round record."""
        self.round += 1
        self.strategy.configure_train(self.round, arrays(self.model), ConfigRecord(), self.nodes)
        new, _ = self.strategy.aggregate_train(self.round, replies(dict(self.model)))
        if new is not None:
            self.model = {k: v.numpy() for k, v in new.items()}
        return self.strategy.current
