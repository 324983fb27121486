"""deploy/ stays valid: container, compose, proxy and systemd files, and the key script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

DEPLOY = Path(__file__).parents[1] / "deploy"
BIN = Path(sys.executable).parent


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _docker_compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if (
            shutil.which(cmd[0])
            and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0
        ):
            return cmd
    return None


def test_compose_exposes_only_the_proxy_and_mounts_data_read_only():
    services = _compose()["services"]
    assert {"coordinator", "proxy", "hospital-a", "hospital-b", "register"} <= set(services)
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"proxy"}
    assert _compose()["networks"]["backend"]["internal"] is True
    assert services["coordinator"]["networks"] == ["backend"]
    for name in ("hospital-a", "hospital-b"):
        hospital = services[name]
        assert "backend" not in hospital.get("networks", ["frontend"])
        data = [v for v in hospital["volumes"] if v.split(":")[1] == "/data"]
        assert data and all(v.endswith(":ro") for v in data)
        assert hospital["read_only"] is True
    for name, service in services.items():  # private keys and certificates: read-only mounts
        for v in service.get("volumes", []):
            if "certs" in v:
                assert v.endswith(":ro"), (name, v)


@pytest.mark.skipif(_docker_compose() is None, reason="Docker Compose is not installed")
def test_compose_file_is_valid_for_docker_compose(tmp_path):
    env = {**os.environ, "COMPOSE_PROJECT_NAME": "remdr-test"}
    res = subprocess.run(
        [*_docker_compose(), "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", ["Dockerfile.coordinator", "Dockerfile.hospital"])
def test_dockerfiles_are_non_root_and_have_cpu_and_cuda_variants(name):
    lines = [
        line.strip()
        for line in (DEPLOY / "docker" / name).read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    instructions = [line.split()[0].upper() for line in lines if not line.startswith("&&")]
    assert instructions[0] in ("ARG", "FROM") and "FROM" in instructions
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("ARG TORCH_VARIANT=cpu") for line in lines)
    assert "pip install ." in " ".join(lines)
    assert instructions[-1] in ("ENTRYPOINT", "CMD")


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "info"], capture_output=True).returncode != 0,
    reason="no Docker daemon to build with",
)
@pytest.mark.parametrize("name", ["Dockerfile.coordinator", "Dockerfile.hospital"])
def test_dockerfiles_pass_dockers_own_check(name):
    root = DEPLOY.parent
    res = subprocess.run(
        ["docker", "build", "--check", "-f", str(DEPLOY / "docker" / name), str(root)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_proxy_template_forwards_fleet_and_health_only():
    text = (DEPLOY / "nginx" / "remdr-fleet.conf.template").read_text()
    locations = [line.strip() for line in text.splitlines() if line.strip().startswith("location")]
    assert locations == ["location /v1/fleet/ {", "location = /health {", "location / {"]
    tail = text.split("location / {", 1)[1]
    assert "return 403" in tail and "proxy_pass" not in tail
    assert "proxy_ssl_verify              on" in text


def test_make_certs_names_every_address_sites_dial(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "certs"
    res = subprocess.run(
        [str(DEPLOY / "make-certs"), str(out), "coord.example.org", "hospA", "hospB"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for f in ("ca.crt", "ca.key", "server.pem", "server.key", "keys/hospA", "keys/hospB.pub"):
        assert (out / f).is_file(), f
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    assert {"coord.example.org", "proxy", "coordinator", "localhost"} <= names
    assert oct((out / "keys" / "hospA").stat().st_mode)[-3:] == "600"
    usage = subprocess.run([str(DEPLOY / "make-certs")], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "make-certs OUT_DIR" in usage.stdout


def test_systemd_units_run_remdr_as_an_unprivileged_user():
    for unit in ("remdr-superlink.service", "remdr-client@.service"):
        text = (DEPLOY / "systemd" / unit).read_text()
        assert "User=remdr" in text and "NoNewPrivileges=true" in text
        assert "ExecStart=/opt/remdr/venv/bin/remdr-" in text
    assert "--host 127.0.0.1" in (DEPLOY / "systemd" / "remdr-superlink.service").read_text()


def test_chaos_drill_documents_itself():
    res = subprocess.run(
        [sys.executable, str(DEPLOY / "chaos"), "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "--kills" in res.stdout
