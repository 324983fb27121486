"""remdr-server: run the coordinator's SuperLink, register sites, submit experiments.

    remdr-server start --out runs/coord [--insecure | --certs deploy/certs]
    remdr-server register keys/hospA.pub --federation 127.0.0.1:8000 [--root-cert ca.crt] [--name hospA]
    remdr-server run --federation 127.0.0.1:8000 --config exp.toml [--root-cert ca.crt]
    remdr-server run ... --fault-drill    # sites run remdr.client.fault_drill (deploy/chaos)
    remdr-server certs --out deploy/certs --san coord.example.org --sites hospA,hospB

Thin wrappers over `flower-superlink`, `flwr supernode register` and `flwr run` with safe
defaults: telemetry off, no runtime dependency installation, TLS and SuperNode authentication
unless --insecure is given explicitly, the SuperLink's state database under the output folder.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from remdr.cli.common import (
    Parser,
    add_list_keys,
    check_address,
    check_flag,
    check_input_path,
    check_output_dir,
    key_listing,
    run_cli,
)
from remdr.errors import ConfigError, Problems
from remdr.ops.processes import executable, flower_env, wait_healthy, write_flwr_home
from remdr.settings import NON_NEGATIVE

TLS_FILES = {"ca": "ca.crt", "cert": "server.pem", "key": "server.key"}
SITE_ID = r"[A-Za-z0-9._-]+"


def superlink_command(args: argparse.Namespace) -> list[str]:
    out = Path(args.out).resolve()
    cmd = [
        executable("flower-superlink"),
        "--host", args.host,
        "--port", str(args.port),
        "--database", str(out / "state.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if args.insecure:
        out.mkdir(parents=True, exist_ok=True)
        return cmd + ["--insecure"]
    certs = Path(args.certs) if args.certs else None
    missing = [n for n in TLS_FILES.values() if certs is None or not (certs / n).is_file()]
    if missing:
        raise ConfigError(
            f"TLS files missing in {certs or '(no --certs given)'}: {', '.join(missing)}",
            "the SuperLink serves the Fleet API over HTTPS with node authentication by default",
            "run deploy/make-certs.sh and pass --certs deploy/certs, or --insecure for a loopback test",
        )
    out.mkdir(parents=True, exist_ok=True)
    return cmd + [
        "--ssl-ca-certfile", str(certs / TLS_FILES["ca"]),
        "--ssl-certfile", str(certs / TLS_FILES["cert"]),
        "--ssl-keyfile", str(certs / TLS_FILES["key"]),
        "--enable-supernode-auth",
    ]  # fmt: skip


def cmd_start(args: argparse.Namespace) -> int:
    p = Problems()
    check_flag(p, "--port", args.port, 8000, low=1, high=65535)
    check_output_dir(p, "--out", args.out)
    if not args.host.strip():
        p.add("--host ''", "names no address", "e.g. --host 127.0.0.1 (0.0.0.0 for all)")
    p.raise_if_any()
    cmd = superlink_command(args)
    print(
        f"remdr-server: starting SuperLink on {args.host}:{args.port} ({'INSECURE' if args.insecure else 'TLS + node auth'})",
        flush=True,
    )
    os.execvpe(cmd[0], cmd, flower_env(Path(args.out).resolve() / "flwr-home"))
    return 0  # not reached


def check_connection_flags(p: Problems, args: argparse.Namespace) -> None:
    """The flags of `run` and `register` that say how to reach the SuperLink."""
    check_address(p, "--federation", args.federation)
    check_flag(p, "--wait", args.wait, 20.0, **NON_NEGATIVE)
    if not args.insecure and not args.root_cert:
        p.add(
            "no --root-cert given",
            "the SuperLink uses TLS by default",
            "pass --root-cert ca.crt or --insecure",
        )
    elif not args.insecure:
        check_input_path(p, "--root-cert", args.root_cert)


def _connection(args: argparse.Namespace, home: Path) -> str:
    conn = write_flwr_home(home, args.federation, insecure=args.insecure, root_cert=args.root_cert)
    if not wait_healthy(
        args.federation, ca_cert=None if args.insecure else args.root_cert, timeout=args.wait
    ):
        raise ConfigError(
            f"SuperLink at {args.federation} is unreachable",
            f"no answer from /health within {args.wait:.0f}s",
            "start it with `remdr-server start`, check the address, port and certificate",
        )
    return conn


def _flwr(args: list[str], home: Path, check: bool = True) -> int:
    proc = subprocess.run([executable("flwr"), *args], env=flower_env(home))
    if check and proc.returncode != 0:
        raise ConfigError(f"`flwr {args[0]}` failed", f"exit code {proc.returncode}")
    return proc.returncode


def load_experiment(path: str) -> dict:
    """Read and validate an experiment TOML (flat run-config keys) before anything is submitted."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"experiment file {path} not found", "", "pass an experiment TOML, e.g. deploy/exp.toml"
        ) from None
    except OSError as err:  # a folder, no permission
        raise ConfigError(
            f"experiment file {path} cannot be read", err.strerror or "", "pass a TOML file"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} is not valid TOML", str(err), "flat `key = value` lines, see deploy/exp.toml"
        ) from None
    from remdr.federation.run_config import split_run_config  # torch: only for a readable file

    split_run_config(data)  # unknown keys and bad values fail here, with the valid names
    return data


def cmd_run(args: argparse.Namespace) -> int:
    p = Problems()
    overrides = p.call(load_experiment, args.config) if args.config else {}
    check_connection_flags(p, args)
    p.raise_if_any()
    assert overrides is not None
    from remdr.federation.app_bundle import write_bundle

    with tempfile.TemporaryDirectory(prefix="remdr-run-") as tmp:
        home = Path(tmp) / "flwr-home"
        conn = _connection(args, home)
        bundle = write_bundle(Path(tmp) / "app", overrides, fault_drill=args.fault_drill)
        flags = ["--stream"] if not args.detach else []
        _flwr(["run", str(bundle), conn, *flags], home, check=True)
    if not args.detach:
        check_outcome(overrides)
    return 0


def check_outcome(overrides: dict) -> None:
    """`flwr run` exits 0 even when the ServerApp fails: read the run directory to be sure."""
    import json

    from remdr.federation.run_config import FedConfig

    report = Path(str(overrides.get("out-dir", FedConfig.out_dir))) / "report.json"
    if not report.is_file():
        print(
            f"remdr-server: note: no {report} on this machine (the SuperLink may write it elsewhere)"
        )
        return
    status = json.loads(report.read_text()).get("status")
    if status != "completed":
        raise ConfigError(
            f"the run did not complete (status {status!r})", f"see {report} and the log above"
        )
    print(f"remdr-server: run completed; report: {report}")


def site_name(args: argparse.Namespace) -> str:
    """The site a key is registered for: --name, else the key file's name (keys/hospA.pub)."""
    return args.name or Path(args.public_key).name.removesuffix(".pub")


def register_command(args: argparse.Namespace, conn: str) -> list[str]:
    """`flwr supernode register` with the site's name: the coordinator's report names the
    node by it, and refuses a reply from that node that claims another site."""
    key = str(Path(args.public_key).resolve())
    return ["supernode", "register", key, conn, "--name", site_name(args)]


def cmd_register(args: argparse.Namespace) -> int:
    p = Problems()
    if not Path(args.public_key).is_file():
        p.add(f"public key {args.public_key} not found", "", "make keys with deploy/make-certs.sh")
    if not re.fullmatch(SITE_ID, site_name(args)):
        p.add(
            f"site name '{site_name(args)}'",
            "may hold only letters, digits, '.', '_', '-' (it must equal the site's --site-id)",
            "name the key after the site (keys/hospA.pub) or pass --name hospA",
        )
    check_connection_flags(p, args)
    p.raise_if_any()
    with tempfile.TemporaryDirectory(prefix="remdr-reg-") as tmp:
        home = Path(tmp) / "flwr-home"
        conn = _connection(args, home)
        return _flwr(register_command(args, conn), home)


def cmd_certs(args: argparse.Namespace) -> int:
    from remdr.ops.pki import make_deployment

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    sans = [n.strip() for value in args.san or [] for n in value.split(",") if n.strip()]
    p = Problems()
    check_output_dir(p, "--out", args.out)
    for site in sites:  # a site id names its key files
        if not re.fullmatch(SITE_ID, site):
            p.add(
                f"--sites: site id '{site}'",
                "may hold only letters, digits, '.', '_', '-'",
                "e.g. --sites hospA,hospB",
            )
    p.raise_if_any()
    out = make_deployment(args.out, sans or ["127.0.0.1", "localhost"], sites)
    print(
        f"remdr-server: wrote {out}/ca.crt, server.pem, server.key and keys for {', '.join(sites) or 'no sites'}"
    )
    print(
        "  keep ca.key offline; give each site ca.crt and its own keys/<site>; register keys/<site>.pub"
    )
    return 0


def _run_config_keys() -> list[str]:
    """--list-keys of `run`: the keys an experiment TOML may set, at the federation's defaults."""
    from remdr.federation.run_config import FEDERATED_DEFAULTS

    return key_listing(FEDERATED_DEFAULTS, federation=True)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--federation", default="127.0.0.1:8000", help="SuperLink address host:port")
    p.add_argument("--root-cert", help="CA certificate of the SuperLink (TLS)")
    p.add_argument(
        "--insecure", action="store_true", help="plain HTTP: only for a trusted loopback"
    )
    p.add_argument("--wait", type=float, default=20.0, help="seconds to wait for the SuperLink")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="remdr-server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="run the SuperLink (foreground)")
    s.add_argument("--out", default="runs/coordinator", help="state database and logs go here")
    s.add_argument(
        "--host", default="127.0.0.1", help="bind address (0.0.0.0 behind the reverse proxy)"
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--certs", help="folder with ca.crt, server.pem, server.key")
    s.add_argument("--insecure", action="store_true", help="no TLS and no node authentication")
    r = sub.add_parser("run", help="submit an experiment and stream its progress")
    r.add_argument(
        "--config", help="experiment TOML: flat run-config keys (method, num-server-rounds, ...)"
    )
    r.add_argument("--detach", action="store_true", help="submit and return without streaming logs")
    add_list_keys(r, _run_config_keys)
    r.add_argument(
        "--fault-drill",
        action="store_true",
        help="sites run the fault-drill ClientApp: one started with REMDR_FAULT_UPDATE=nan,norm "
        "sends those bad updates (deploy/chaos); never in a study",
    )
    _add_connection_flags(r)
    g = sub.add_parser("register", help="register a site's public key (node authentication)")
    g.add_argument("public_key")
    g.add_argument(
        "--name",
        default="",
        help="the site's --site-id (default: the key file's name, hospA for keys/hospA.pub); "
        "a node reporting another site is refused",
    )
    _add_connection_flags(g)
    c = sub.add_parser("certs", help="make a CA, the SuperLink certificate and site key pairs")
    c.add_argument("--out", default="deploy/certs")
    c.add_argument(
        "--san",
        action="append",
        help="names or IPs sites dial (repeatable or comma-separated; default 127.0.0.1, localhost)",
    )
    c.add_argument("--sites", default="", help="comma-separated site ids to make key pairs for")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"start": cmd_start, "run": cmd_run, "register": cmd_register, "certs": cmd_certs}
    return run_cli("remdr-server", lambda: handlers[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
