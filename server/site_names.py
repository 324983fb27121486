"""Which node speaks for which site: a site's name in the report belongs to one node.

A reply names its site (`site-id`), but that name is only what the node says. The coordinator
binds a name to the first node that claims it, and refuses another node's claim while that node
is still connected, so no node can report under another site's name or take its place in the
aggregation. With node authentication (`remdr-server register`, which registers each key under
its site's name) the registered name is the site's name and a node claiming another is refused.
Without it a restarted SuperNode comes back with a new node id: it takes its name back once
Flower no longer lists the old node.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

log = logging.getLogger("flwr")  # Flower's handlers stream this to `remdr-server run`


class SiteNames:
    """Name <-> node bindings of one run (kept in the strategy's state across restarts)."""

    def __init__(self) -> None:
        self.of_node: dict[int, str] = {}  # node id -> the site name it speaks for
        self.registered: dict[int, str] = {}  # node id -> the name its key was registered under
        self.connected: Collection[int] | None = None  # the nodes Flower lists (None: unknown)

    def label(self, node: int) -> str:
        """How the round record names `node`: its site (or the name its key was registered
        under), else `node-<id>`."""
        return self.of_node.get(node) or self.registered.get(node) or f"node-{node}"

    def learn(self, grid) -> None:
        """The nodes connected now and, with node authentication, their registered names
        (Flower's `Grid.get_nodes`; a grid without it tells only the node ids)."""
        self.connected = set(grid.get_node_ids())
        get_nodes = getattr(grid, "get_nodes", None)
        if get_nodes is None:
            return
        try:
            infos = list(get_nodes())
        except Exception as err:  # a grid that cannot say; the names stay as they were
            log.warning("no registered site names from the SuperLink: %s", err)
            return
        self.registered.update({int(i.node_id): i.name for i in infos if getattr(i, "name", "")})

    def claim(self, node: int, name: str) -> tuple[str | None, tuple[int, int] | None]:
        """(why `node` may not speak for site `name`, or None; (old, new) node when the name
        moved from a node that left). A granted claim binds the name to the node."""
        registered = self.registered.get(node)
        if registered is not None and registered != name:
            return f"claims site {name} but is registered as {registered}", None
        bound = self.of_node.get(node)
        if bound is not None and bound != name:
            return f"claims site {name} but speaks for {bound}", None
        holder = next((n for n, s in self.of_node.items() if s == name and n != node), None)
        moved = None
        if holder is not None:
            owner = registered == name  # its key was registered under this name
            if not owner and (self.registered.get(holder) == name or self._still_there(holder)):
                return f"claims site {name}, which node {holder} speaks for", None
            del self.of_node[holder]  # the site, restarted (or its registered key)
            moved = (holder, node)
            log.warning("site %s is now node %d (node %d left)", name, node, holder)
        self.of_node[node] = name
        return None, moved

    def _still_there(self, node: int) -> bool:
        return self.connected is None or node in self.connected

    def state_dict(self) -> dict[str, str]:
        return {str(node): name for node, name in self.of_node.items()}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.of_node = {int(node): str(name) for node, name in state.items()}
