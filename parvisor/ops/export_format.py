"""The parvisor export directory format (``vm export`` / ``vm import``), version 1.

::

    DIR/parvisor-export.json     manifest (written last: its presence = complete)
    DIR/disks/<disk id>.qcow2    every disk flattened (no backing file, no snapshots)
    DIR/disks/<name>             the VM's own CD media (e.g. cloud-init seed), as is
    DIR/boot/kernel, boot/initrd for VMs that boot a kernel directly

The manifest holds ``format``, ``format_version``, the VM ``definition`` (its own
``schema_version``; file paths in it are relative to DIR) and ``files``: size and
sha256 of every file, checked before anything is registered, so a damaged or edited
export is refused. Versions newer than this parvisor are refused; older ones are lifted
by ``_UPGRADES``. Pure: parsing and checking of data only, file I/O is the caller's.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parvisor.errors import InvalidInput

MANIFEST = "parvisor-export.json"
FORMAT_NAME = "parvisor-export"
EXPORT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: str
    format_version: int
    exported_at: float
    parvisor_version: str
    definition: dict[str, Any]
    files: dict[str, FileEntry]


_UPGRADES: dict[int, Any] = {}        # version -> function(dict) -> dict of version + 1


def safe_relative(name: str) -> str:
    """A file name from a manifest: relative, normalised, never leaving DIR."""
    path = PurePosixPath(name)
    if (not name or path.is_absolute() or ".." in path.parts or str(path) != name
            or "\\" in name or "\0" in name):
        raise InvalidInput(f"export manifest names an unsafe file path {name!r}", file=name)
    return name


def parse_manifest(text: bytes) -> Manifest:
    """Refuse anything but a well-formed manifest of a version we understand."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise InvalidInput(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise InvalidInput(f"{MANIFEST} is not a parvisor export (format must be "
                           f"{FORMAT_NAME!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise InvalidInput(f"{MANIFEST}: format_version {version!r} is not valid")
    if version > EXPORT_VERSION:
        raise InvalidInput(f"export format version {version} is newer than this parvisor "
                           f"understands ({EXPORT_VERSION}); upgrade parvisor",
                           format_version=version)
    while version < EXPORT_VERSION:
        data = _UPGRADES[version](data)
        version = data["format_version"]
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"{MANIFEST} is malformed: {exc.errors()[0]['msg']} at "
                           f"{'.'.join(map(str, exc.errors()[0]['loc']))}") from exc
    for name in manifest.files:
        safe_relative(name)
    return manifest


def referenced_files(definition: dict[str, Any]) -> list[str]:
    """Every file the exported definition points at (must all be in ``files``)."""
    names = [d["path"] for d in definition.get("disks", []) if d.get("path")]
    boot = definition.get("boot") or {}
    names += [boot[k] for k in ("kernel", "initrd") if boot.get(k)]
    return names
