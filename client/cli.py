"""remdr-client: check a site's data, then connect it to the federation as a SuperNode.

    remdr-client start --data /data/eyes --site-id hospA --superlink coord:8000 \\
        --root-cert ca.crt --key keys/hospA          # TLS + node authentication
    remdr-client start --data DIR --site-id A --superlink 127.0.0.1:8000 --insecure
    remdr-client start --data DIR --check-only         # only the data check

The data check prints the number of eyes, the MD histogram by severity bin and the skipped
records by reason; images never leave the site, only weights and aggregate metrics do.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from remdr.cli.common import run_cli
from remdr.config import DataConfig
from remdr.errors import ConfigError


def check_data(data: str, oct_view: str) -> str:
    """Validate the site's data and describe it; raise DataError if it cannot be used."""
    import numpy as np

    from remdr.data import load_dataset
    from remdr.metrics import BINS, severity_bins

    ds = load_dataset(data, DataConfig(oct_view=oct_view), quiet=True)
    bins = severity_bins(np.array([r.md for r in ds.records]))
    hist = ", ".join(f"{name} {(bins == i).sum()}" for i, name in enumerate(BINS))
    patients = len({r.patient_id for r in ds.records})
    return f"{len(ds.records)} eyes of {patients} patients ({ds.format}); MD bins: {hist}; {ds.report.summary()}"


def node_config(data: str, site_id: str) -> str:
    """`--node-config` value: TOML literals, so strings are quoted."""

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"data-path={q(str(Path(data).resolve()))} site-id={q(site_id)}"


def supernode_command(args: argparse.Namespace) -> list[str]:
    from remdr.processes import executable

    cmd = [
        executable("flower-supernode"),
        "--superlink", args.superlink,
        "--node-config", node_config(args.data, args.site_id),
        "--port", str(args.port),
    ]  # fmt: skip
    if args.insecure:
        return cmd + ["--insecure"]
    problems = []
    if not args.root_cert or not Path(args.root_cert).is_file():
        problems.append(f"CA certificate {args.root_cert or '(--root-cert)'} not found")
    if not args.key or not Path(args.key).is_file():
        problems.append(f"private key {args.key or '(--key)'} not found")
    if problems:
        raise ConfigError(
            "; ".join(problems),
            "a site connects over TLS and authenticates with its key by default",
            "get ca.crt and this site's key from the coordinator's deploy/ kit, or --insecure for a loopback test",
        )
    return cmd + ["--root-certificates", args.root_cert, "--auth-supernode-private-key", args.key]


def cmd_start(args: argparse.Namespace) -> int:
    print(f"remdr-client: {check_data(args.data, args.oct_view)}", flush=True)
    if args.check_only:
        return 0
    if not args.site_id:
        raise ConfigError("no --site-id given", "the coordinator's report names sites by it")
    cmd = supernode_command(args)
    from remdr.processes import flower_env

    print(f"remdr-client: connecting site {args.site_id} to {args.superlink}", flush=True)
    os.execvpe(cmd[0], cmd, flower_env())
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="remdr-client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="check the data, then run the SuperNode (foreground)")
    s.add_argument(
        "--data", required=True, help="the site's data folder (Harvard npz or manifest.csv)"
    )
    s.add_argument("--site-id", default="", help="this site's name in reports")
    s.add_argument(
        "--superlink", default="127.0.0.1:8000", help="coordinator's Fleet API host:port"
    )
    s.add_argument("--root-cert", help="CA certificate of the coordinator")
    s.add_argument("--key", help="this site's private authentication key")
    s.add_argument(
        "--insecure", action="store_true", help="plain HTTP, no authentication (loopback tests)"
    )
    s.add_argument(
        "--port",
        type=int,
        default=9094,
        help="local ClientApp runtime port (distinct per SuperNode)",
    )
    s.add_argument("--oct-view", default="bscans", help="OCT view the data check validates")
    s.add_argument("--check-only", action="store_true", help="only check the data, do not connect")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("remdr-client", lambda: cmd_start(args))


if __name__ == "__main__":
    sys.exit(main())
