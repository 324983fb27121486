"""The production ClientApp as the coordinator's grid talks to it: the message's model packed into
one array on the way in, the reply's read back on the way out (`remdr.federation.transport`)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from remdr.client import app as production

from remdr.federation.transport import pack_records, unpack_records


def over_the_wire(client_app: ClientApp) -> Callable[[Message, Context], Message]:
    def call(msg: Message, context: Context) -> Message:
        msg.content = pack_records(msg.content)
        reply = client_app(msg, context)
        if not reply.has_error():
            reply.content = unpack_records(reply.content)
        return reply

    return call


app = over_the_wire(production.app)
