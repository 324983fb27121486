"""What every remdr command shares: logging, one-line errors, config flags."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from remdr.config import ExperimentConfig, apply_overrides
from remdr.errors import RemdrError

# Frequent settings get their own flag; every other config key is reachable with --set KEY=VALUE.
COMMON_FLAGS: dict[str, tuple[type, str]] = {
    "method": (str, "method from the registry (see --list-methods)"),
    "epochs": (int, "training epochs"),
    "batch-size": (int, "batch size"),
    "lr": (float, "learning rate"),
    "seed": (int, "seed for splits, init and batches"),
    "device": (str, "auto, cpu or cuda[:N]"),
    "image-size": (int, "image side in pixels after resizing"),
    "oct-view": (
        str,
        "bscans (K B-scans, 2.5D), rnflt (thickness map) or auto (from the data; default)",
    ),
    "n-bscans": (int, "K, B-scans per eye in the bscans view"),
    "oct-encoder": (str, "timm model name of the OCT encoder"),
    "fundus-encoder": (str, "timm model name of the fundus encoder"),
}


def add_config_flags(ap: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for key, (kind, helptext) in COMMON_FLAGS.items():
        if key not in skip:
            ap.add_argument(f"--{key}", type=kind, default=None, help=helptext)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config key, e.g. --set con-mu=0.3 (repeatable)",
    )


def config_from_args(
    args: argparse.Namespace, base: ExperimentConfig | None = None
) -> ExperimentConfig:
    overrides: dict[str, Any] = {}
    for key in COMMON_FLAGS:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            overrides[key] = value
    for item in args.set:
        if "=" not in item:
            raise RemdrError(f"--set {item}", "expected KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    return apply_overrides(base or ExperimentConfig(), overrides)


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """Run a command: a `RemdrError` becomes one line on stderr and exit code 2, Ctrl-C exits 130."""
    logging.basicConfig(level=logging.INFO, format=f"{prog}: %(message)s")
    try:
        return main()
    except RemdrError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
