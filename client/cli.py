"""remdr-client: check a site's data, then connect it to the federation as a SuperNode.

    remdr-client start --data /data/eyes --site-id hospA --superlink coord:8000 \\
        --root-cert ca.crt --key keys/hospA          # TLS + node authentication
    remdr-client start --data DIR --site-id A --superlink 127.0.0.1:8000 --insecure
    remdr-client start --data DIR --check-only         # only the data and policy check
    remdr-client privacy-report --site-id hospA        # the site's privacy ledger, for the officer

The data check prints the number of eyes, the MD histogram by severity bin and the skipped
records by reason, then the site's privacy policy: its epsilon ceiling (default 10), its delta
(default min(1e-5, 1/(10 x patients))) and the metrics it shares; the coordinator's run config
can lower the ceiling and delta, never raise them (`remdr.client.site_policy`). Images never
leave the site, only weights and the metrics the policy shares do.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from remdr.client.site_policy import METRIC_LEVELS, MIN_BIN_PATIENTS, SITE_EPSILON_MAX, SitePolicy

from remdr.cli.common import Parser, check_address, check_flag, check_input_path, run_cli
from remdr.config import OCT_VIEW_CHOICES, DataConfig
from remdr.errors import ConfigError, Problems
from remdr.settings import POSITIVE, PROBABILITY

DRILL_ENV = "REMDR_ALLOW_FAULT_DRILL"  # "1": the default of --allow-fault-drill (drill harnesses)


def check_data(data: str, oct_view: str) -> tuple[str, int]:
    """Validate the site's data and describe it (eyes, kinds, MD bins, skips by reason, the
    OCT view); raise DataError if it cannot be used. Returns (description, patients)."""
    from remdr.data import load_dataset
    from remdr.data.loading import describe

    ds = load_dataset(data, DataConfig(oct_view=oct_view), quiet=True)
    patients = len({r.patient_id for r in ds.records})
    return f"{describe(ds.records, ds.format, ds.report)}; oct-view {ds.oct_view}", patients


def site_policy(args: argparse.Namespace) -> SitePolicy:
    """The site's policy from its flags; a flag not given keeps the site default."""
    return SitePolicy(
        epsilon_max=SITE_EPSILON_MAX if args.epsilon_max is None else args.epsilon_max,
        delta=args.delta or 0.0,
        require_dp=args.require_dp,
        share_metrics=args.share_metrics or "",
        min_bin_patients=args.min_bin_patients,
        allow_fault_drill=args.allow_fault_drill,
    )


DEFAULT_STATE = "~/.local/state/remdr"
SITE_ID = r"[A-Za-z0-9._-]+"  # it names the site's state folder
TLS_WHY = "a site connects over TLS and authenticates with its key by default"
TLS_FIX = (
    "get ca.crt and this site's key from the coordinator's deploy/ kit, "
    "or --insecure for a loopback test"
)


def ledger_path(args: argparse.Namespace) -> Path:
    """The site's privacy ledger: --ledger, else <state dir>/<site-id>/privacy-ledger.jsonl."""
    if args.ledger:
        return Path(args.ledger).expanduser().resolve()
    site = args.site_id or "site"
    return Path(DEFAULT_STATE).expanduser() / site / "privacy-ledger.jsonl"


def node_config_values(
    data: str, site_id: str, ledger: Path, policy: SitePolicy, worker: Path | None = None
) -> dict[str, str | float | int]:
    """What the SuperNode's node config holds: the site's data, name, ledger and policy."""
    out: dict[str, str | float | int] = {
        "data-path": str(Path(data).resolve()),
        "site-id": site_id,
        "ledger": str(ledger),
        **policy.node_config(),
    }
    if worker is not None:
        from remdr.client.worker_link import WORKER_KEY

        out[WORKER_KEY] = str(worker)
    return out


def node_config(values: dict[str, str | float | int]) -> str:
    """`--node-config` value: TOML literals, so strings are quoted."""

    def literal(v: str | float | int) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    return " ".join(f"{k}={literal(v)}" for k, v in values.items())


def supernode_command(args: argparse.Namespace, worker: Path | None = None) -> list[str]:
    from remdr.ops.processes import executable

    values = node_config_values(
        args.data, args.site_id, ledger_path(args), site_policy(args), worker
    )
    cmd = [
        executable("flower-supernode"),
        "--superlink", args.superlink,
        "--node-config", node_config(values),
        "--port", str(args.port),
    ]  # fmt: skip
    if args.insecure:
        return cmd + ["--insecure"]
    problems = tls_problems(args)
    if problems:
        raise ConfigError("; ".join(problems), TLS_WHY, TLS_FIX)
    return cmd + ["--root-certificates", args.root_cert, "--auth-supernode-private-key", args.key]


def tls_problems(args: argparse.Namespace) -> list[str]:
    """The TLS files a secure start needs and lacks."""
    problems = []
    if not args.root_cert or not Path(args.root_cert).is_file():
        problems.append(f"CA certificate {args.root_cert or '(--root-cert)'} not found")
    if not args.key or not Path(args.key).is_file():
        problems.append(f"private key {args.key or '(--key)'} not found")
    return problems


def check_args(args: argparse.Namespace) -> None:
    """Every flag, all problems in one line, before the data is read or anything connects."""
    p = Problems()
    if args.site_id and not re.fullmatch(SITE_ID, args.site_id):
        p.add(
            f"--site-id {args.site_id}",
            "may hold only letters, digits, '.', '_' and '-' (it names a folder)",
            "e.g. --site-id hospA",
        )
    if args.ledger and Path(args.ledger).expanduser().is_dir():
        p.add(f"--ledger {args.ledger}", "is a folder", "name the ledger file, e.g. ledger.jsonl")
    if args.command == "privacy-report":
        check_flag(p, "--delta", args.delta, 1e-5, **PROBABILITY)
        p.raise_if_any()
        return
    check_input_path(p, "--data", args.data)
    check_flag(p, "--oct-view", args.oct_view, "bscans", choices=OCT_VIEW_CHOICES)
    check_flag(p, "--epsilon-max", args.epsilon_max, 8.0, **POSITIVE)
    check_flag(p, "--delta", args.delta, 1e-6, **PROBABILITY)
    check_flag(p, "--min-bin-patients", args.min_bin_patients, MIN_BIN_PATIENTS, low=1)
    check_flag(p, "--threads", args.threads, 1, low=1)
    if not args.check_only:
        check_flag(p, "--port", args.port, 9094, low=1, high=65535)
        check_address(p, "--superlink", args.superlink)
        if not args.site_id:
            p.add(
                "no --site-id given",
                "the coordinator's report names sites by it",
                "e.g. --site-id hospA",
            )
        if not args.insecure and tls_problems(args):
            p.add("; ".join(tls_problems(args)), TLS_WHY, TLS_FIX)
    p.raise_if_any()


def cmd_start(args: argparse.Namespace) -> int:
    check_args(args)  # flags, site id and TLS files before the data is read
    described, patients = check_data(args.data, args.oct_view)
    print(f"remdr-client: {described}", flush=True)
    policy = site_policy(args)
    check_delta(policy, patients)
    explicit = {"--epsilon-max"} if args.epsilon_max is not None else set()
    print(f"remdr-client: {policy.describe(patients, explicit)}", flush=True)
    from remdr.ops.processes import flower_env, thread_env, usable_cores

    threads = args.threads or usable_cores()
    if args.check_only:
        print(f"remdr-client: training would use {threads} CPU thread(s)", flush=True)
        return 0

    # the worker sizes torch's pools itself; the SuperNode's ClientApp processes (and the
    # worker's OpenMP/MKL) read these variables, so every process of the site keeps its share
    env = {**flower_env(), **thread_env(threads)}
    worker = None if args.no_worker else start_worker(args, env, threads)
    cmd = supernode_command(args, worker)
    print(
        f"remdr-client: connecting site {args.site_id} to {args.superlink} "
        f"({threads} CPU thread(s))",
        flush=True,
    )
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def check_delta(policy: SitePolicy, patients: int) -> None:
    """A site's own --delta must be at most 1 / its patients, as DP-SGD's accounting needs."""
    if policy.delta > 1.0 / max(1, patients):
        raise ConfigError(
            f"--delta {policy.delta:g}",
            f"must be at most 1/{patients} (one over this site's patients)",
            "leave it out: the default is min(1e-5, 1/(10 x patients))",
        )


def start_worker(args: argparse.Namespace, env: dict[str, str], threads: int = 0) -> Path:
    """Start the site worker (`remdr.client.worker`) in a fresh private folder (0700) with a
    random key (0600) and the site's node config (0600), which the worker applies to every
    message whatever the ClientApp sends; it exits when this process, about to become the
    SuperNode, is gone."""
    import json
    import secrets
    import subprocess
    import tempfile

    from remdr.client.worker_link import AUTHKEY, NODE_CONFIG

    folder = Path(tempfile.mkdtemp(prefix="remdr-site-worker-"))
    key = folder / AUTHKEY
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    values = node_config_values(args.data, args.site_id, ledger_path(args), site_policy(args))
    (folder / NODE_CONFIG).touch(mode=0o600)
    (folder / NODE_CONFIG).write_text(json.dumps(values))
    label = f"site {args.site_id} 127.0.0.1:{args.port}"  # names it in process lists
    cmd = [sys.executable, "-m", "remdr.client.worker", "--folder", str(folder)]
    cmd += ["--threads", str(threads)] if threads else []
    subprocess.Popen([*cmd, "--parent", str(os.getpid()), "--label", label], env=env)
    return folder


def cmd_privacy_report(args: argparse.Namespace) -> int:
    check_args(args)
    from remdr.privacy import privacy_report

    print(privacy_report(ledger_path(args), args.delta))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
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
    s.add_argument(
        "--oct-view",
        default="auto",
        help="OCT view the data check validates (auto: the view of the data; the federation's "
        "run config decides what training uses)",
    )
    s.add_argument("--check-only", action="store_true", help="only check the data, do not connect")
    _add_privacy_flags(s)
    s.add_argument(
        "--epsilon-max",
        type=float,
        default=None,
        help=f"this site's epsilon ceiling (default {SITE_EPSILON_MAX:g}); the coordinator's run "
        "config can only lower it",
    )
    s.add_argument(
        "--delta",
        type=float,
        default=None,
        help="this site's delta (default min(1e-5, 1/(10 x patients))); the run config can only "
        "lower it",
    )
    s.add_argument(
        "--require-dp", action="store_true", help="refuse methods that do not train under DP-SGD"
    )
    s.add_argument(
        "--share-metrics",
        choices=METRIC_LEVELS,
        default=None,
        help="the metrics this site sends: minimal (counts, validation MSE, its privacy spend), "
        "standard (+ losses and MAE), full (+ per-severity-bin errors); default minimal with "
        "--require-dp, else full",
    )
    s.add_argument(
        "--min-bin-patients",
        type=int,
        default=MIN_BIN_PATIENTS,
        help="a severity bin's error is sent only over at least this many patients",
    )
    s.add_argument(
        "--allow-fault-drill",
        action="store_true",
        default=os.environ.get(DRILL_ENV, "") == "1",
        help=f"run the fault-drill ClientApp when a run's bundle names it (default: {DRILL_ENV}=1)",
    )
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads this site's training may use (default: the cores this process may "
        "run on); give each site its share when several share a machine",
    )
    s.add_argument(
        "--no-worker",
        action="store_true",
        help="no long-lived site worker: every message imports torch and loads the site afresh",
    )
    r = sub.add_parser("privacy-report", help="print the site's privacy ledger and its total")
    r.add_argument("--site-id", default="", help="the site (locates the default ledger)")
    _add_privacy_flags(r)
    r.add_argument("--delta", type=float, default=None, help="report epsilon at this delta")
    return ap


def _add_privacy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger",
        default="",
        help=f"append-only privacy ledger (default {DEFAULT_STATE}/<site-id>/privacy-ledger.jsonl)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = cmd_privacy_report if args.command == "privacy-report" else cmd_start
    return run_cli("remdr-client", lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
