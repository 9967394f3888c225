"""cloud-init NoCloud seed content (pure) and the ISO written by xorriso."""

from __future__ import annotations

import email
import shutil
from pathlib import Path

import pytest

from parvisor.errors import InvalidInput
from parvisor.image import cloudinit

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvPvP me@host"


def test_meta_data_names_instance_and_host() -> None:
    assert cloudinit.meta_data("u-1", "web01") == \
        'instance-id: "u-1"\nlocal-hostname: "web01"\n'


def test_user_data_without_keys_is_passed_through() -> None:
    assert cloudinit.user_data("#!/bin/sh\necho hi\n", []) == "#!/bin/sh\necho hi\n"


def test_keys_are_appended_as_a_merging_cloud_config_part() -> None:
    text = cloudinit.user_data("#cloud-config\nssh_authorized_keys: [a]\n", [KEY + "\n"])
    parts = [p for p in email.message_from_string(text).walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config"] * 2
    assert parts[0].get_payload(decode=True).decode().startswith("#cloud-config\nssh_auth")
    extra = parts[1].get_payload(decode=True).decode()
    assert KEY in extra and "list(append)" in extra
    assert text == cloudinit.user_data("#cloud-config\nssh_authorized_keys: [a]\n", [KEY])


def test_script_user_data_keeps_its_type() -> None:
    text = cloudinit.user_data("#!/bin/sh\ntrue\n", [KEY])
    types = [p.get_content_type() for p in email.message_from_string(text).walk()]
    assert "text/x-shellscript" in types


@pytest.mark.parametrize("bad", ["", "hello", "ssh-ed25519", "ssh-rsa AAAA\nssh-rsa BBBB"])
def test_bad_keys_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput, match="OpenSSH public key"):
        cloudinit.check_ssh_key(bad)


@pytest.mark.skipif(not shutil.which("xorriso"), reason="xorriso not installed")
def test_seed_iso_has_the_cidata_label_and_both_files(tmp_path: Path) -> None:
    target = tmp_path / "vm" / cloudinit.SEED_FILE
    cloudinit.write_seed_iso(target, cloudinit.seed_files("u-1", "web01", "#cloud-config\n", []))
    data = target.read_bytes()
    assert data[32808:32808 + 6] == b"cidata"          # primary volume descriptor's id
    assert b"local-hostname" in data and b"#cloud-config" in data
    assert [p.name for p in target.parent.iterdir()] == [cloudinit.SEED_FILE]
