"""Certificates for encrypted migration traffic, in the layout QEMU's tls-creds-x509 reads.

QEMU's ``tls-creds-x509`` object takes a directory holding ``ca-cert.pem``,
``server-cert.pem``/``server-key.pem`` (used when the host receives: the destination)
and ``client-cert.pem``/``client-key.pem`` (used when it sends: the source). One host
needs both, so ``write_tls_dir`` writes all five, signed by the cluster CA
(``parvisor.cluster.certs``; its helpers are reused here). With ``verify-peer`` on, each
side checks the other's certificate against the CA: only hosts of the cluster can send
or receive a VM.

The QEMU may run as an unprivileged user (config ``qemu_user``): ``owner`` hands the
directory and files to it (keys stay 0600, owned by that user).
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

from parvisor.cluster.certs import CertPair, issue

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
QEMU_TLS_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)


def write_tls_dir(directory: Path, ca: CertPair, *, hosts: tuple[str, ...],
                  name: str = "migration", owner: str | None = None) -> Path:
    """Write QEMU's five TLS files for one host into ``directory`` (created 0700).

    ``hosts``: the addresses/names the destination is reached at (the server
    certificate's SANs; the source checks them against ``tls-hostname``). ``name`` goes
    into the certificates' common names. Returns ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    server = issue(ca, directory, f"{name}-server", server=True, hosts=hosts)
    client = issue(ca, directory, f"{name}-client", server=False)
    os.replace(server.cert, directory / SERVER_CERT)
    os.replace(server.key, directory / SERVER_KEY)
    os.replace(client.cert, directory / CLIENT_CERT)
    os.replace(client.key, directory / CLIENT_KEY)
    shutil.copyfile(ca.cert, directory / CA_CERT)
    (directory / CA_CERT).chmod(0o644)
    if owner is not None:
        user = pwd.getpwnam(owner)
        for path in (directory, *(directory / f for f in QEMU_TLS_FILES)):
            os.chown(path, user.pw_uid, user.pw_gid)
    return directory
