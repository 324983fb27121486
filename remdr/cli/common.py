"""What every remdr command shares: logging, one-line errors, config flags, flag checks.

Bad input never gives a traceback: argparse's usage errors, the config rules and each command's
own flag checks all end as one line `prog: error: what: why (fix: ...)` and exit code 2, before
any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from remdr.config import ExperimentConfig, apply_overrides, describe_keys, flat_rules
from remdr.errors import Problems, RemdrError
from remdr.presets import PRESETS, apply_preset
from remdr.settings import Rule, show


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (argparse prints the usage block and then the error),
    so a typo reads like every other remdr error. Subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (fix: see {self.prog} --help)\n")


# Frequent settings get their own flag; every other config key is reachable with --set KEY=VALUE.
# The flags take text: the config rules check them with the --set values, every problem at once.
COMMON_FLAGS = (
    "method",
    "epochs",
    "batch-size",
    "lr",
    "seed",
    "device",
    "image-size",
    "oct-view",
    "n-bscans",
    "oct-encoder",
    "fundus-encoder",
    "synthetic-regime",
)


class ListKeys(argparse.Action):
    """--list-keys: print every key with the command's default and meaning, then exit 0 (like
    --help, before any other argument is checked or any work starts)."""

    def __init__(self, *args: Any, listing: Callable[[], list[str]], **kwargs: Any) -> None:
        super().__init__(*args, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.listing = listing

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        try:
            print("\n".join(self.listing()), flush=True)
        except BrokenPipeError:  # `| head` read what it wanted; no traceback at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit(0)


def add_list_keys(ap: argparse.ArgumentParser, listing: Callable[[], list[str]]) -> None:
    ap.add_argument(
        "--list-keys",
        action=ListKeys,
        listing=listing,
        help="print every config key with its default and meaning, and exit",
    )


def key_listing(defaults: dict[str, Any] | None = None, federation: bool = False) -> list[str]:
    """The --list-keys lines: core keys at the command's defaults, then the federation's."""
    lines = [
        "key, default, meaning (accepted values); set with --set KEY=VALUE or in a run-config TOML",
        *describe_keys(apply_overrides(ExperimentConfig(), defaults or {})),
    ]
    if federation:
        from remdr.federation.run_config import describe_fed_keys

        lines += describe_fed_keys()
    return lines


def add_config_flags(
    ap: argparse.ArgumentParser,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    federation: bool = False,
) -> None:
    """COMMON_FLAGS, --set and --list-keys; `defaults` are the command's own (e.g. fewer epochs)."""
    rules = flat_rules()
    shown = {**{k: d for k, (_, d) in rules.items()}, **(defaults or {})}
    for key in COMMON_FLAGS:
        if key not in skip:
            rule, default = rules[key]
            ap.add_argument(
                f"--{key}",
                default=None,
                help=f"{rule.meaning}: {rule.describe(type(default))} (default {show(shown[key])})",
            )
    ap.add_argument(
        "--preset",
        default=None,
        help="a named set of values for the machine, applied before the flags and --set: "
        + "; ".join(f"{name}: {p.summary}" for name, p in PRESETS.items()),
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config key, e.g. --set con-mu=0.3 (repeatable; see --list-keys)",
    )
    add_list_keys(ap, lambda: key_listing(defaults, federation))


def config_from_args(
    args: argparse.Namespace, base: ExperimentConfig | None = None
) -> ExperimentConfig:
    """`base` with COMMON_FLAGS and --set applied; every problem with them raised at once."""
    p = Problems()
    base = base or ExperimentConfig()
    if getattr(args, "preset", None):
        base = p.call(apply_preset, base, args.preset) or base
    overrides: dict[str, Any] = {}
    for key in COMMON_FLAGS:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            overrides[key] = value
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            p.add(f"--set {item!r}", "expected KEY=VALUE", "e.g. --set lr=0.001")
        else:
            overrides[k.strip()] = v.strip()
    cfg = p.call(apply_overrides, base, overrides)
    p.raise_if_any()
    assert cfg is not None
    return cfg


def check_flag(
    p: Problems,
    flag: str,
    value: Any,
    example: Any = None,
    rule: Rule | None = None,
    **bounds: Any,
) -> None:
    """Add a problem when a command's own flag breaks its rule: a config `Rule`, or bounds
    (low=1, ...) as config keys have them. `example` is a good value for the fix."""
    if value is None:
        return
    rule = rule or Rule("", **bounds)
    why = rule.check(value, type(value))
    if why:
        fix = rule.fix or (f"e.g. {flag} {_arg(example)}" if example is not None else "")
        p.add(f"{flag} {_arg(value)}", why, fix)


def _arg(value: Any) -> str:
    """A flag's value as typed on a command line (no quotes)."""
    return value if isinstance(value, str) else show(value)


def check_input_path(p: Problems, flag: str, path: str | None) -> None:
    """An input that must exist: said before any work, together with the other problems."""
    if path is None:
        return
    try:
        missing = not Path(path).expanduser().exists()
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        p.add(f"{flag} {path[:60]}", f"not a usable path ({err.__class__.__name__})")
        return
    if missing:
        p.add(f"{flag} {path}", "does not exist", "check the path")


def check_output_dir(p: Problems, flag: str, path: str | None) -> None:
    """A folder to write: refused when a file is in the way (writing it would fail at the end)."""
    if not path:
        return
    folder = Path(path).expanduser()
    try:
        in_the_way = next((f for f in (folder, *folder.parents) if f.is_file()), None)
    except (OSError, ValueError) as err:
        p.add(f"{flag} {path[:60]}", f"not a usable path ({err.__class__.__name__})")
        return
    if in_the_way is not None:
        p.add(f"{flag} {path}", f"{in_the_way} is a file, not a folder", "pass a folder path")


ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d+)")


def check_output_file(p: Problems, flag: str, path: str | None, example: str) -> None:
    """A file to write: refused when a folder is in the way."""
    try:
        if path and Path(path).expanduser().is_dir():
            p.add(f"{flag} {path}", "is a folder", f"name the file to write, e.g. {example}")
    except (OSError, ValueError) as err:
        p.add(f"{flag} {path[:60]}", f"not a usable path ({err.__class__.__name__})")


def check_address(p: Problems, flag: str, address: str) -> None:
    """host:port (an IPv6 host in brackets), the port in 1..65535."""
    m = ADDRESS.fullmatch(address)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        p.add(
            f"{flag} {address}",
            "expected host:port with a port in 1..65535",
            f"e.g. {flag} 127.0.0.1:8000",
        )


def check_regime(p: Problems, data: str | None, cfg: ExperimentConfig | None) -> None:
    """--synthetic-regime shapes only the embedded synthetic data: refused beside --data."""
    if data and cfg is not None and cfg.data.synthetic_regime != "default":
        p.add(
            f"--synthetic-regime {cfg.data.synthetic_regime} with --data",
            "the regime shapes only the embedded synthetic data",
            "drop --data to use the synthetic set, or the regime",
        )


def check_names(p: Problems, flag: str, names: Sequence[str], valid: Sequence[str]) -> None:
    """Comma-separated names (methods, ...) that must all exist; empty is a problem too."""
    import difflib

    if not names:
        p.add(f"{flag} ''", "names nothing", f"e.g. {flag} {valid[0]}")
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=2)
            hint = f"; did you mean {', '.join(close)}" if close else ""
            p.add(f"{flag} {name}", f"not one of {', '.join(valid)}{hint}")


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
