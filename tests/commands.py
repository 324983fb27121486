"""Running remdr's commands from a test: as the installed console script (a subprocess) or
through the same entry point in the test's own process, which skips seconds of interpreter and
torch start-up per call and captures what the console would show."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def installed(cmd: list[str], **kwargs) -> subprocess.Popen:
    """The installed console script `cmd[0]` started with `cmd`'s arguments (stdout and stderr
    piped, text)."""
    prog = BIN / cmd[0]
    assert prog.is_file(), f"{prog} is not installed"
    return subprocess.Popen(
        [str(prog), *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def run_in_process(cmd: list[str]) -> Result:
    """The console script's entry point called with `cmd`'s arguments, as the script calls it:
    its exit code, what it printed, and its log lines in the format `run_cli` gives them."""
    module, _, func = SCRIPTS[cmd[0]].partition(":")
    main = getattr(importlib.import_module(module), func)
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(f"{cmd[0]}: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(cmd[1:])
            except SystemExit as done:  # argparse's usage errors and --help
                code = done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return Result(code, out.getvalue(), err.getvalue())
