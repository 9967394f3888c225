"""cloud-init NoCloud seeds: a small ISO 9660 image labelled ``cidata``.

cloud-init's NoCloud datasource looks for a filesystem with the volume label
``cidata`` holding ``meta-data`` and ``user-data`` (and optionally ``network-config``).
We write ``meta-data`` (``instance-id`` = the VM's uuid, so cloud-init runs its
per-instance modules once per VM; ``local-hostname`` = the VM's name) and the user's
``user-data``. SSH keys given separately are added as a second MIME part
(``#cloud-config`` with ``ssh_authorized_keys`` and a ``merge_how`` that *appends*
lists), so cloud-init merges them into the user's own ``ssh_authorized_keys`` whatever
the user-data is (cloud-config, shell script, ...) and we never rewrite the user's YAML.

The content functions are pure; ``write_seed_iso`` runs ``xorriso`` (Debian package
xorriso) into a temp file renamed into place. The service never reads user files: the
CLI sends the contents of the user-data and key files in the request.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

from parvisor.errors import ImageError, InvalidInput

SEED_LABEL = "cidata"
SEED_FILE = "cidata.iso"
MIME_BOUNDARY = "==parvisor-cloud-init=="      # fixed: same inputs, same seed bytes
# type, base64 key, optional comment (OpenSSH authorized_keys format without options)
_SSH_KEY = re.compile(r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp\d+|sk-\S+)"
                      r" [A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$")
MERGE_HOW = "list(append)+dict(recurse_array)+str()"


def check_ssh_key(key: str) -> str:
    """One OpenSSH public key line, stripped; InvalidInput for anything else."""
    key = key.strip()
    if not _SSH_KEY.match(key):
        shown = key if len(key) < 40 else key[:37] + "..."
        raise InvalidInput(f"not an OpenSSH public key: {shown!r} (expected e.g. "
                           "'ssh-ed25519 AAAA... comment')")
    return key


def meta_data(vm_uuid: str, vm_name: str) -> str:
    # JSON is valid YAML and needs no quoting rules of our own.
    return (f"instance-id: {json.dumps(vm_uuid)}\n"
            f"local-hostname: {json.dumps(vm_name)}\n")


def user_data(user_text: str, ssh_keys: list[str]) -> str:
    """The user's user-data, plus a cloud-config part that appends ``ssh_keys``."""
    if not ssh_keys:
        return user_text
    keys_part = "#cloud-config\n" + json.dumps(
        {"ssh_authorized_keys": [check_ssh_key(k) for k in ssh_keys],
         "merge_how": MERGE_HOW}, indent=1) + "\n"
    message = MIMEMultipart(boundary=MIME_BOUNDARY)
    for text, subtype in ((user_text, _mime_subtype(user_text)), (keys_part, "cloud-config")):
        # us-ascii stays readable (7bit) in the seed; anything else is base64 utf-8.
        message.attach(MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8"))
    return message.as_string()


def _mime_subtype(text: str) -> str:
    """cloud-init's part type from the first line (its own "#..." starters)."""
    first = text.lstrip().split("\n", 1)[0]
    if first.startswith("#cloud-config"):
        return "cloud-config"
    if first.startswith("#!"):
        return "x-shellscript"
    if first.startswith("#include"):
        return "x-include-url"
    if first.startswith("#cloud-boothook"):
        return "cloud-boothook"
    return "plain"


def seed_files(vm_uuid: str, vm_name: str, user_text: str,
               ssh_keys: list[str]) -> dict[str, bytes]:
    return {"meta-data": meta_data(vm_uuid, vm_name).encode(),
            "user-data": user_data(user_text, ssh_keys).encode()}


def write_seed_iso(target: Path, files: dict[str, bytes]) -> Path:
    """Write the ``cidata`` ISO (Joliet + Rock Ridge, so names keep their dashes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".seed-") as tmp:
        content = Path(tmp) / "content"
        content.mkdir()
        for name, data in files.items():
            (content / name).write_bytes(data)
        partial = Path(tmp) / SEED_FILE
        argv = ["xorriso", "-as", "mkisofs", "-quiet", "-volid", SEED_LABEL, "-joliet",
                "-rock", "-output", str(partial), str(content)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise ImageError(f"cannot run xorriso (Debian package xorriso): {exc}",
                             command=argv) from exc
        if done.returncode != 0:
            raise ImageError(f"xorriso failed to write the cloud-init seed: "
                             f"{done.stderr.strip()}", command=argv, stderr=done.stderr)
        os.replace(partial, target)
    return target
