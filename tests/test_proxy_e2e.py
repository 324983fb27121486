"""deploy/'s reverse proxy in front of a real SuperLink: Fleet API and /health only."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from remdr.ops.loopback import Loopback, make_sites, write_experiment
from remdr.ops.pki import make_deployment
from remdr.ops.processes import free_port, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TEMPLATE = Path(__file__).parents[1] / "deploy" / "nginx" / "remdr-fleet.conf.template"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def render_template(values: dict[str, str]) -> str:
    """What the nginx image's envsubst does with the template: only REMDR_* variables."""
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    assert "${REMDR_" not in text
    return text


def start_nginx(fed: Loopback, root: Path, certs: Path, public_port: int):
    server = render_template(
        {
            "REMDR_PUBLIC_PORT": f"127.0.0.1:{public_port}",
            "REMDR_SUPERLINK": fed.address,
            "REMDR_SUPERLINK_NAME": "localhost",
            "REMDR_CERTS": str(certs),
        }
    )
    conf = root / "nginx.conf"
    temp = root / "nginx-tmp"
    temp.mkdir()
    conf.write_text(
        f"worker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/nginx-error.log info;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n  access_log {root}/nginx-access.log;\n"
        + "".join(
            f"  {kind}_temp_path {temp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + server
        + "\n}\n"
    )
    check = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(root)], capture_output=True)
    assert check.returncode == 0, check.stderr.decode()
    proc = fed.group.start(
        [NGINX, "-c", str(conf), "-p", str(root), "-g", "daemon off;"], root / "nginx.log"
    )
    fed.group.markers.append(str(conf))
    return proc


def _get(url: str, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_sites_train_through_the_proxy_and_nothing_else_gets_through(tmp_path):
    certs = make_deployment(tmp_path / "certs", ["127.0.0.1", "localhost"], ["A", "X"])
    sites = make_sites(tmp_path / "data", ["A", "X"])
    fed = Loopback(tmp_path, certs=certs)
    public = free_port()
    proxy = f"https://127.0.0.1:{public}"
    out = tmp_path / "coord-run"
    experiment = write_experiment(
        tmp_path / "exp.toml", **{"out-dir": str(out), "num-server-rounds": 1, "min-nodes": 1}
    )
    try:
        fed.start_superlink()
        start_nginx(fed, tmp_path, certs, public)
        assert wait_healthy(f"127.0.0.1:{public}", ca_cert=str(certs / "ca.crt"), timeout=30)
        ca = certs / "ca.crt"
        # the network sees Fleet and /health only; Control and runtime APIs are refused
        assert _get(f"{proxy}/health", ca) == 200
        for path in ("/v1/control/list-runs", "/v1/runtime/pull-app-inputs", "/"):
            assert _get(proxy + path, ca) == 403, path
        ip = _non_loopback_ip()
        if ip:  # the SuperLink itself is not reachable from a non-local address
            with pytest.raises(OSError), socket.create_connection((ip, fed.port), timeout=3):
                pass
        fed.register("A")  # X's key is never registered
        fed.address, direct = f"127.0.0.1:{public}", fed.address  # sites dial the proxy
        fed.start_site("A", sites["A"])
        intruder, _ = fed.start_site("X", sites["X"])
        fed.address = direct  # the coordinator submits from localhost, not through the proxy
        deadline = time.monotonic() + 120
        while intruder.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert intruder.poll() not in (None, 0), fed.log("site-X.log")  # refused, and said so
        assert fed.run(experiment, timeout=600) == 0, fed.log("run.log")
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "completed" and set(report["sites"]) == {"A"}
        assert "/v1/fleet/" in (tmp_path / "nginx-access.log").read_text()
    finally:
        fed.stop()
    assert fed.leftovers() == []
