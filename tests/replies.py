"""Train replies as a site's ClientApp sends them, built by hand for the strategy tests."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app import Metadata as FlwrMetadata


def train_reply(node: int, arrays: ArrayRecord, site: str, metrics: dict) -> Message:
    """The reply of node `node` (site `site`) to a train message: weights and metrics."""
    meta = FlwrMetadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"q{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site-id": site}),
        }
    )
    return Message(content=content, metadata=meta)
