"""Certificates for etcd TLS with client-certificate authentication.

What for: ``cluster create`` (next session) makes a cluster CA, a server certificate
per etcd member (SAN: its IPs and names) and a client certificate per host agent, so
cluster traffic is authenticated both ways. Uses ``cryptography`` (pinned 50.0.2).
Keys are EC P-256 (small, fast, accepted by Go's TLS in etcd 3.4).

Never: write a private key readable by others (0600), or reuse a key for two roles.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY_DAYS = 3650   # a cluster's CA outlives hosts; rotation is a later command


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "parvisor"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(pair: CertPair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(pair.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    # valid from yesterday: a host whose clock runs a little behind must accept it
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS)))


def make_ca(directory: Path, cluster: str) -> CertPair:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"parvisor cluster {cluster} CA")
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                         False, False), critical=True)
            .sign(key, hashes.SHA256()))
    pair = CertPair(directory / "ca.crt", directory / "ca.key")
    _write(pair, cert, key)
    return pair


def issue(ca: CertPair, directory: Path, name: str, *, server: bool,
          hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> CertPair:
    """A leaf certificate signed by ``ca``: server (with SANs) or client."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:    # etcd members also dial each other as clients
        usage.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (_builder(_name(name), ca_cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(_sans(hosts)),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())     # type: ignore[arg-type]
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    _write(pair, cert, key)
    return pair


def _sans(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names
