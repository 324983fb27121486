"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate, site keys.

- ``ca.crt`` / ``ca.key``: the federation's own certificate authority (keep ca.key offline);
- ``server.pem`` / ``server.key``: the SuperLink's certificate, with the SANs sites dial;
- ``keys/<site>`` / ``keys/<site>.pub``: one ECDSA (P-384) OpenSSH key pair per site for
  SuperNode authentication; the coordinator registers the ``.pub``, the site keeps the private key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest validity common TLS clients accept for leaf certificates


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "remdr federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def make_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("remdr federation CA"))
        .issuer_name(_name("remdr federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_cert(
    out: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, sans: list[str]
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(key), private=True)


def make_site_key(out: Path, site: str) -> tuple[Path, Path]:
    """An ECDSA P-384 OpenSSH key pair: keys/<site> (private) and keys/<site>.pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    priv_path, pub_path = out / "keys" / site, out / "keys" / f"{site}.pub"
    _write(priv_path, private, private=True)
    _write(pub_path, public + f" remdr-site-{site}\n".encode())
    return priv_path, pub_path


def make_deployment(out: str | Path, sans: list[str], sites: list[str]) -> Path:
    """CA, SuperLink certificate for `sans` and a key pair per site, all under `out`."""
    out = Path(out)
    ca, ca_key = make_ca(out)
    make_server_cert(out, ca, ca_key, sans)
    for site in sites:
        make_site_key(out, site)
    return out
