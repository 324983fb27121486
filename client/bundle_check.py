"""Which app bundle this ClientApp process was loaded from, and whether the site runs it.

Flower 1.42 runs the ClientApp that the coordinator's bundle (FAB) names: its ClientApp process
installs the bundle under `$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>/`, puts that
folder first on `sys.path` and imports the component. The SuperNode's one check of a bundle,
`--trusted-entities`, verifies only bundles the SuperLink fetched signed from Flower Hub, so it
cannot pin the config-only bundle a coordinator builds offline. So remdr's ClientApp checks the
bundle it was loaded from before it hands over any message: remdr's bundle is configuration
only (`remdr.federation.app_bundle`), so it must name `remdr.client.app:app` (or the fault
drill's ClientApp, if this site opted in) and carry nothing but its `pyproject.toml`, since any
other file there shadows an installed module of the same name (`opacus.py`, `torch/`).

What this cannot do: a bundle that names its own module, or ships its own `remdr` package, runs
that code instead of this check, as the SuperNode's user. docs/privacy.md ("The ClientApp a
site runs") says how a site keeps its data and ledger out of that user's reach.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from remdr.client.site_policy import FAULT_DRILL

PRODUCTION = "remdr.client.app:app"
DRILL = "remdr.client.fault_drill:app"  # remdr.federation.app_bundle.FAULT_DRILL_CLIENTAPP
BUNDLE_FILES = {"pyproject.toml"}


def flwr_home() -> Path:
    """Flower's home folder (`FLWR_HOME`, default ~/.flwr), where bundles are installed."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def loaded_bundle(search_path: Iterable[str]) -> Path | None:
    """The installed bundle folder on `search_path` (`sys.path`), or None when this process
    was not started from a bundle (a test, an in-process call)."""
    apps = (flwr_home() / "apps").resolve()
    for entry in search_path:
        folder = Path(entry or ".").resolve()
        if folder.parent == apps and (folder / "pyproject.toml").is_file():
            return folder
    return None


def bundle_problem(node_config: Mapping[str, object], search_path: Iterable[str]) -> str | None:
    """Why this site refuses the bundle this process was loaded from, in one line; None when
    it runs it."""
    folder = loaded_bundle(search_path)
    if folder is None:
        return None
    try:
        config = tomllib.loads((folder / "pyproject.toml").read_text())
        clientapp = str(config["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return f"the app bundle {folder.name} has no readable ClientApp component"
    drill = str(node_config.get("fault-drill", "")) == FAULT_DRILL
    allowed = {PRODUCTION, DRILL} if drill else {PRODUCTION}
    if clientapp not in allowed:
        why = (
            " (start the site with --allow-fault-drill to join drills)"
            if clientapp == DRILL
            else ""
        )
        return (
            f"the app bundle names the ClientApp {clientapp}; this site runs only the installed "
            f"{PRODUCTION}{why}"
        )
    extra = sorted(p.name for p in folder.iterdir() if p.name not in BUNDLE_FILES)
    if extra:
        return (
            f"the app bundle carries {', '.join(extra[:5])} besides its configuration; remdr's "
            "bundle is configuration only and files in it could replace installed code"
        )
    return None
