"""The layers of ARCHITECTURE.md and the one-way imports between them, read from the source."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import remdr

ROOT = Path(__file__).resolve().parents[1]
# where each installed package lives in the repository (pyproject's package-dir)
PACKAGE_DIRS = {
    "remdr": "remdr",
    "remdr.server": "server",
    "remdr.client": "client",
    "remdr.sim": "sim",
}
APPS = ("remdr.server", "remdr.client", "remdr.sim")
# layer -> the layers it may import (itself included); anything else is a wrong-way arrow
ALLOWED = {
    "foundation": {"foundation"},
    "privacy": {"foundation", "privacy"},
    "core": {"foundation", "privacy", "core"},
    "federation": {"foundation", "privacy", "core", "federation"},
    "ops": {"foundation", "core", "ops"},
    # the command-line entry points sit above the core and the ops tooling (remdr-bench
    # federation starts a loopback deployment) and list the federation's keys (--list-keys);
    # only the apps build on them
    "cli": {"foundation", "privacy", "core", "federation", "ops", "cli"},
    **{app: {"foundation", "privacy", "core", "federation", "ops", "cli", app} for app in APPS},
}
# version, errors, the setting rules, the method registry (names and specs, no torch) and the
# config dataclasses (the methods' section in its own module), which check method names against
# the registry, and the presets
FOUNDATION = {
    "remdr", "remdr.errors", "remdr.settings", "remdr.registry", "remdr.config",
    "remdr.method_config", "remdr.presets",
}  # fmt: skip


def layer_of(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    for app in APPS:
        if module == app or module.startswith(app + "."):
            return app
    for sub in ("privacy", "federation", "ops", "cli"):
        if module == f"remdr.{sub}" or module.startswith(f"remdr.{sub}."):
            return sub
    return "core"


def source_modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "remdr" and parts and parts[0] in ("server", "client", "sim"):
                continue
            out[name] = path
    return out


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _remdr_module(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import refers to (`from remdr.x import f` names remdr.x)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_imports_point_one_way_between_layers():
    modules = source_modules()
    assert {"remdr.train", "remdr.privacy", "remdr.federation.site_round", "remdr.ops.loopback",
            "remdr.server.app", "remdr.client.app", "remdr.sim.cli",
            "remdr.sim.ray_cluster"} <= modules.keys()  # fmt: skip
    wrong = []
    for name, path in sorted(modules.items()):
        src = layer_of(name)
        for imported in imports_of(path):
            root = imported.split(".")[0]
            if root in ("flwr", "flwr_datasets") and src not in APPS:
                wrong.append(f"{name} ({src}) imports {imported}: only the apps use Flower")
            if root == "ray" and src != "remdr.sim":  # Flower's simulation backend
                wrong.append(f"{name} ({src}) imports {imported}: only the simulator uses Ray")
            if root != "remdr":
                continue
            target = _remdr_module(imported, modules)
            if target and layer_of(target) not in ALLOWED[src]:
                wrong.append(f"{name} ({src}) imports {target} ({layer_of(target)})")
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize(
    "module, layer",
    [("remdr.privacy.ledger", "privacy"), ("remdr.train", "core"),
     ("remdr.federation.site_round", "federation"), ("remdr.ops.pki", "ops"),
     ("remdr.server.app", "remdr.server"), ("remdr.config", "foundation")],
)  # fmt: skip
def test_layer_map(module, layer):
    assert layer_of(module) == layer


def test_core_never_imports_flower_at_run_time():
    """DESIGN §2, also through third-party imports: importing every module outside the apps
    leaves Flower unloaded."""
    outside_apps = [
        m.name
        for m in pkgutil.walk_packages(remdr.__path__, "remdr.")
        if m.name.split(".")[1] not in ("server", "client", "sim")
    ]
    code = (
        "import importlib, sys\n"
        + "".join(f"importlib.import_module({n!r})\n" for n in outside_apps)
        + "print(any(k == 'flwr' or k.startswith('flwr.') for k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_refusing_a_bad_flag_never_imports_torch():
    """Configs are checked by the foundation (rules, the torch-free method registry, the
    encoders remdr knows), so a typo is refused in a moment, before torch is imported."""
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in sorted(FOUNDATION))
        + "assert 'torch' not in sys.modules, 'the foundation imported torch'\n"
        "from remdr.cli import train\n"
        "code = train.main(['--epochs', '0', '--method', 'remdr', '--oct-encoder', 'resnet18'])\n"
        "print(code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr[-2000:]
    assert "epochs=0" in out.stderr
