"""The Flower App bundle: configuration only, no code.

Each site runs the remdr it installed; the bundle that `flwr run` ships (the FAB) holds just a
pyproject.toml naming the installed components and every run-config key with its default
(`flwr run --run-config` may only override keys listed there). Every SuperNode loads the
ClientApp the bundle names: a fault drill's bundle names the drill's (`remdr.client.fault_drill`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from remdr import __version__
from remdr.federation.run_config import run_config_defaults

COMPONENTS = {"serverapp": "remdr.server.app:app", "clientapp": "remdr.client.app:app"}
FAULT_DRILL_CLIENTAPP = "remdr.client.fault_drill:app"  # deploy/chaos and the fault tests


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def config_table(overrides: dict[str, Any] | None = None) -> str:
    values = {**run_config_defaults(), **(overrides or {})}
    return "\n".join(f"{k} = {_toml_value(v)}" for k, v in values.items())


def bundle_pyproject(overrides: dict[str, Any] | None = None, fault_drill: bool = False) -> str:
    components = {**COMPONENTS, **({"clientapp": FAULT_DRILL_CLIENTAPP} if fault_drill else {})}
    comps = "\n".join(f'{k} = "{v}"' for k, v in components.items())
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "remdr-federation"
version = "{__version__}"
description = "Configuration-only Flower App: every site runs its installed remdr"
license = "Apache-2.0"
dependencies = ["remdr=={__version__}"]

[tool.flwr.app]
publisher = "remdr"
fab-include = ["pyproject.toml"]

[tool.flwr.app.components]
{comps}

[tool.flwr.app.config]
{config_table(overrides)}
"""


def write_bundle(
    directory: str | Path, overrides: dict[str, Any] | None = None, fault_drill: bool = False
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(bundle_pyproject(overrides, fault_drill))
    return directory
