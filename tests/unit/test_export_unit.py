"""The export manifest format and copy identities (pure)."""

from __future__ import annotations

import json

import pytest

from parvisor.errors import InvalidInput
from parvisor.ops.export import check_export_dir
from parvisor.ops.export_format import parse_manifest, referenced_files, safe_relative
from parvisor.ops.vm_copies import fresh_identity

GOOD = {"format": "parvisor-export", "format_version": 1, "exported_at": 1.0,
        "parvisor_version": "0.1.0",
        "definition": {"name": "a", "boot": {"kind": "disk"},
                       "disks": [{"id": "disk0", "path": "disks/disk0.qcow2"}]},
        "files": {"disks/disk0.qcow2": {"size": 1, "sha256": "0" * 64}}}


def test_good_manifest_parses_and_names_files():
    manifest = parse_manifest(json.dumps(GOOD).encode())
    assert referenced_files(manifest.definition) == ["disks/disk0.qcow2"]


@pytest.mark.parametrize("change, message", [
    ({"format_version": 2}, "newer"), ({"format": "ovf"}, "not a parvisor export"),
    ({"format_version": "1"}, "not valid"), ({"surprise": 1}, "malformed"),
    ({"files": {"../etc/passwd": {"size": 1, "sha256": "0" * 64}}}, "unsafe"),
    ({"files": {"/etc/passwd": {"size": 1, "sha256": "0" * 64}}}, "unsafe"),
])
def test_bad_manifests_are_refused(change, message):
    with pytest.raises(InvalidInput, match=message):
        parse_manifest(json.dumps({**GOOD, **change}).encode())
    with pytest.raises(InvalidInput, match="JSON"):
        parse_manifest(b"{nope")


def test_safe_relative_and_export_dir(tmp_path):
    assert safe_relative("boot/kernel") == "boot/kernel"
    for bad in ("a/../b", "./a", "", "a\\b"):
        with pytest.raises(InvalidInput):
            safe_relative(bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidInput, match="not empty"):
        check_export_dir(str(tmp_path / "full"))
    with pytest.raises(InvalidInput, match="absolute"):
        check_export_dir("relative/dir")
    assert check_export_dir(str(tmp_path / "new")) == tmp_path / "new"


def test_fresh_identity_new_uuid_and_macs():
    data = {"name": "a", "uuid": "u", "template": True,
            "nics": [{"id": "nic0", "switch": "s", "mac": "02:70:76:00:00:01"}]}
    copy = fresh_identity(data, "b", {"02:70:76:00:00:01"})
    assert copy["name"] == "b" and copy["uuid"] != "u" and not copy["template"]
    assert copy["nics"][0]["mac"] != "02:70:76:00:00:01"
