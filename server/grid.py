"""Flower's Grid, with a second chance for a site that is reconnecting and none for one that left.

What Flower 1.42 reports (`flwr/common/constant.py`, `flwr/supercore/heartbeat.py`,
`flwr/server/superlink/linkstate/`): a SuperNode heartbeats every 17.5-22.5 s and is online until
2 x 30 s after its last heartbeat. The SuperLink answers a message whose node is past that with a
NODE_UNAVAILABLE error, and `get_node_ids()` lists online nodes only, so at that moment a dead
site and one still reconnecting look alike. What tells them apart is time: a live SuperNode whose
heartbeat failed retries at least every 20 s (backoff cap; 5 s call timeout), so it is online
again within about 25 s of the SuperLink being reachable - and the SuperLink has been reachable
since it started this ServerApp.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid

from remdr.federation.transport import TransportError, pack_records, unpack_records

log = logging.getLogger("flwr")  # Flower's handlers stream this to `remdr-server run`

NODE_UNAVAILABLE = 5  # flwr ErrorCode.NODE_UNAVAILABLE: no heartbeat from the node lately
UNREADABLE_REPLY = 1005  # a reply whose packed arrays cannot be read back (remdr's own code)
RECONNECT_WINDOW = 30.0  # s after the ServerApp starts in which a missing node may be reconnecting
POLL = 2.0  # s between looks at `get_node_ids()` while a node may still come back
# s between pulls for replies: Flower's own grid sleeps 3 s, which a round pays on average
# 1.5 s for; a pull costs the SuperLink about 3 ms of CPU, so 0.1 s is cheap.
REPLY_POLL = 0.1


class RetryingGrid:
    """Flower's Grid, but a message whose node is unavailable is sent again if the node is back,
    and a model crosses each link as one packed array (`remdr.federation.transport`).

    Within `reconnect_window` seconds of the ServerApp's start (a SuperLink restart: its
    SuperNodes are reconnecting) an unavailable node is waited for until it is listed by
    `get_node_ids()` again, then re-sent its message; after the window, or once the round's
    timeout is spent, a node that is not listed has left and its error reply stands at once.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        reconnect_window: float = RECONNECT_WINDOW,
        poll: float = POLL,
        reply_poll: float = REPLY_POLL,
    ) -> None:
        self._grid = grid
        self._reconnect_until = time.monotonic() + reconnect_window
        self._poll = poll
        self._reply_poll = reply_poll
        self.dst_of_message: dict[str, int] = {}  # SuperLink errors name the request, not a node

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        pending = [_packed(m) for m in messages]
        final: list[Message] = []
        requests: dict[str, Message] = {}
        while pending:
            left = max(1.0, deadline - time.monotonic())
            replies = self._push_and_pull(pending, timeout=left)
            sent = {m.metadata.message_id: m for m in pending}
            requests.update(sent)
            self.dst_of_message.update({mid: m.metadata.dst_node_id for mid, m in sent.items()})
            unavailable: dict[int, tuple[Message, Message]] = {}
            for reply in replies:
                request = sent.get(reply.metadata.reply_to_message_id)
                if (
                    request is not None
                    and reply.has_error()
                    and reply.error.code == NODE_UNAVAILABLE
                ):
                    unavailable[request.metadata.dst_node_id] = (request, reply)
                else:
                    final.append(reply)
            back = self._listed_again(set(unavailable), deadline)
            final += [reply for node, (_, reply) in unavailable.items() if node not in back]
            pending = [
                _resend(request) for node, (request, _) in unavailable.items() if node in back
            ]
            if pending:
                log.info("%d site(s) reconnected, sending their messages again", len(pending))
        return [_unpacked(r, requests.get(r.metadata.reply_to_message_id)) for r in final]

    def _push_and_pull(self, messages: list[Message], *, timeout: float) -> list[Message]:
        """Flower's `send_and_receive` through its public push/pull calls, polling every
        `reply_poll` seconds: the replies that arrived before `timeout`."""
        waiting = set(self._grid.push_messages(messages))
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self._grid.pull_messages(waiting))
            replies += arrived
            waiting -= {m.metadata.reply_to_message_id for m in arrived}
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(self._reply_poll)
        return replies

    def _listed_again(self, nodes: set[int], deadline: float) -> set[int]:
        """The `nodes` Flower lists as online again, waited for only while they may still be
        reconnecting; none if the round has no time left for a second try."""
        listed: set[int] = set()
        wait_until = min(self._reconnect_until, deadline - self._poll)
        while nodes:
            listed = nodes & set(self._grid.get_node_ids())
            if listed == nodes or time.monotonic() >= wait_until:
                break
            time.sleep(self._poll)
        return listed if time.monotonic() + self._poll < deadline else set()


def _packed(request: Message) -> Message:
    """`request` with each of its array records packed into one array."""
    return _resend(request, content=pack_records(request.content))


def _unpacked(reply: Message, request: Message | None) -> Message:
    """`reply` with its packed array records read back; one whose blob is unreadable becomes an
    error reply from its site, so it is refused and named like any other failure."""
    if reply.has_error():
        return reply
    try:
        content = unpack_records(reply.content)
    except TransportError as err:
        log.warning("node %s sent an unreadable reply: %s", reply.metadata.src_node_id, err)
        if request is None:  # not a reply to anything sent: nothing reads it anyway
            return reply
        return Message(Error(code=UNREADABLE_REPLY, reason=f"unreadable reply: {err}"),
                       reply_to=request)  # fmt: skip
    reply.content = content
    return reply


def _resend(request: Message, content=None) -> Message:
    """A fresh copy of `request` (a message id is the hash of its content and metadata)."""
    meta = request.metadata
    return Message(
        content=request.content if content is None else content,
        dst_node_id=meta.dst_node_id,
        message_type=meta.message_type,
        ttl=meta.ttl,
        group_id=meta.group_id,
    )
