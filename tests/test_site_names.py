"""A site's name in the report belongs to one node: no node can report under another site's
name, a restarted site takes its name back once its old node has left, and with node
authentication the name its key was registered under is the site's."""

from __future__ import annotations

from test_hostile_sites import _in_a_run, federation, moved, rejected, site_reply  # noqa: F401


def test_a_node_cannot_take_a_name_another_node_holds():
    fed = federation()
    fed.train(lambda g: [site_reply(i, moved(g), s) for i, s in ((1, "A"), (2, "B"), (3, "C"))])
    record = fed.train(
        lambda g: [
            site_reply(1, moved(g), "A"),
            site_reply(2, moved(g), "B"),
            site_reply(3, moved(g), "A"),  # C now claims to be A
        ]
    )
    assert record["aggregated"] == ["A", "B"]
    assert "claims site A" in rejected(record)["C"]


def test_two_nodes_claiming_one_name_in_a_round_are_not_both_that_site():
    fed = federation(nodes=(1, 2))
    record = fed.train(lambda g: [site_reply(1, moved(g), "A"), site_reply(2, moved(g), "A")])
    assert record["aggregated"] == ["A"]
    assert "claims site A" in rejected(record)["node-2"]


def test_a_restarted_site_takes_its_name_back_once_its_old_node_has_left():
    """Without node authentication a restarted SuperNode has a new node id: it may take its
    name back once Flower no longer lists the old node (a live old node keeps it)."""
    fed = federation(nodes=(1, 2))
    fed.train(lambda g: [site_reply(1, moved(g), "A"), site_reply(2, moved(g), "B")])
    fed.nodes.nodes = [2, 7]  # node 1 left; node 7 is A, restarted
    record = fed.train(lambda g: [site_reply(7, moved(g), "A"), site_reply(2, moved(g), "B")])
    assert record["aggregated"] == ["A", "B"] and record["rebound"] == {"A": [1, 7]}


def test_a_registered_name_is_the_sites_name():
    """With node authentication the name a key was registered under (remdr-server register)
    is the site's: a node reporting another is refused."""
    fed = federation(nodes=(1, 2), names={1: "A", 2: "B"})
    record = fed.train(lambda g: [site_reply(1, moved(g), "A"), site_reply(2, moved(g), "A")])
    assert record["aggregated"] == ["A"]
    assert "registered as B" in rejected(record)["B"]


def test_names_and_counts_survive_a_coordinator_restart():
    fed = federation(nodes=(1, 2))
    fed.train(lambda g: [site_reply(1, moved(g), "A", n=10), site_reply(2, moved(g), "B")])
    arrays, scalars = fed.strategy.state_dict()
    again = federation(nodes=(1, 2, 3))
    again.strategy.load_state_dict(arrays, scalars)
    record = again.train(
        lambda g: [
            site_reply(1, moved(g), "A", n=21),
            site_reply(2, moved(g), "B"),
            site_reply(3, moved(g), "B"),
        ]
    )
    assert record["aggregated"] == ["B"]
    assert "grew" in rejected(record)["A"] and "claims site B" in rejected(record)["node-3"]


def test_register_names_the_site_by_its_key():
    from remdr.server.cli import build_parser, register_command

    args = build_parser().parse_args(["register", "keys/hospA.pub", "--insecure"])
    assert register_command(args, "prod")[-2:] == ["--name", "hospA"]
    args = build_parser().parse_args(["register", "k.pub", "--name", "hospB", "--insecure"])
    assert register_command(args, "prod")[-2:] == ["--name", "hospB"]


def test_a_registered_node_takes_its_name_from_an_unregistered_one():
    """A node without a registered key (e.g. added before names were registered) that took a
    name first cannot keep it from the node registered under it."""
    fed = federation(nodes=(1, 2), names={2: "A"})
    fed.train(lambda g: [site_reply(1, moved(g), "A")])  # node 1 first, unregistered
    record = fed.train(lambda g: [site_reply(2, moved(g), "A"), site_reply(1, moved(g), "A")])
    assert record["aggregated"] == ["A"] and record["rebound"] == {"A": [1, 2]}
    assert "claims site A, which node 2 speaks for" in rejected(record)["node-1"]
