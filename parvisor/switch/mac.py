"""MAC addresses of VM NICs: allocation and validation.

Allocated addresses use the fixed prefix ``02:70:76`` (``MAC_PREFIX``): the first
octet 0x02 has the locally-administered bit (0x02) set and the multicast bit (0x01)
clear, so the addresses are unicast and can never equal a vendor-assigned (OUI)
address; ``70:76`` is ASCII "pv". QEMU's own 52:54:00 is *not* used.

The caller owns uniqueness and stability: it passes the set of MACs already in use on
the host and stores the result in the NIC definition, so a NIC keeps its MAC for life.

This module must never touch the system or keep state: pure functions only.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Iterable

from parvisor.errors import AlreadyExists, Failed, InvalidInput

MAC_PREFIX = "02:70:76"
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")
_SUFFIX_SPACE = 1 << 24


def normalize_mac(mac: str) -> str:
    """Lower-case, colon-separated form; raises InvalidInput when malformed."""
    if not isinstance(mac, str) or not _MAC_RE.match(mac.strip()):
        raise InvalidInput(f"MAC address {mac!r} is malformed: expected six hex pairs"
                           " such as 02:70:76:12:34:56", mac=str(mac))
    return mac.strip().lower().replace("-", ":")


def _normalized_set(in_use: Iterable[str]) -> set[str]:
    # Stored MACs were validated once; tolerate odd spellings without failing here.
    result = set()
    for mac in in_use:
        try:
            result.add(normalize_mac(mac))
        except InvalidInput:
            continue
    return result


def validate_mac(mac: str, in_use: Iterable[str] = ()) -> str:
    """Check a user-given MAC and return its normal form. Refuses malformed, all-zero,
    broadcast, multicast and duplicate (already in ``in_use``) addresses."""
    normal = normalize_mac(mac)
    first_octet = int(normal[:2], 16)
    if normal == "00:00:00:00:00:00":
        raise InvalidInput(f"MAC address {mac} is all zeros", mac=mac)
    if normal == "ff:ff:ff:ff:ff:ff":
        raise InvalidInput(f"MAC address {mac} is the broadcast address", mac=mac)
    if first_octet & 0x01:
        raise InvalidInput(f"MAC address {mac} is a multicast address (the lowest bit"
                           " of the first octet is set); a NIC needs a unicast one", mac=mac)
    if normal in _normalized_set(in_use):
        raise AlreadyExists(f"MAC address {normal} is already used on this host", mac=normal)
    return normal


def _format(suffix: int) -> str:
    octets = [(suffix >> shift) & 0xFF for shift in (16, 8, 0)]
    return MAC_PREFIX + "".join(f":{octet:02x}" for octet in octets)


def allocate_mac(in_use: Iterable[str] = (), *, seed: str | None = None) -> str:
    """A free MAC under ``MAC_PREFIX``. With ``seed`` (e.g. ``f"{vm_uuid}/{nic_id}"``)
    the first candidate is derived from it, which keeps test output reproducible;
    without, it is random. Collisions probe to the next suffix."""
    taken = _normalized_set(in_use)
    if seed is not None:
        start = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:3], "big")
    else:
        start = secrets.randbelow(_SUFFIX_SPACE)
    for step in range(_SUFFIX_SPACE):
        candidate = _format((start + step) % _SUFFIX_SPACE)
        if candidate not in taken:
            return candidate
    raise Failed(f"all {_SUFFIX_SPACE} MAC addresses under {MAC_PREFIX} are in use")
