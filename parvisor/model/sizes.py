"""Human sizes ("256M", "1G", "1GiB", "512MiB", "1073741824") to bytes and back.

Units are binary (K = 1024) as for memory and disks everywhere in virtualization; "1GB"
is read the same as "1GiB" because users type both and mean the same thing.
"""

from __future__ import annotations

import re

from parvisor.errors import InvalidInput

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
MAX_SIZE = 1 << 50  # 1 PiB: anything larger is a typo, not a VM


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse a size; raises InvalidInput naming the field for anything odd."""
    if isinstance(text, bool):
        raise InvalidInput(f"{what}: expected a size like 256M or 1G, got {text!r}", field=what)
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise InvalidInput(f"{what}: '{text}' is not a size (use e.g. 256M, 1G, 1GiB)",
                               field=what, value=str(text))
        number, unit = match.group(1), match.group(2).upper()
        value = int(float(number) * _UNITS[unit])
    if value <= 0 or value > MAX_SIZE:
        raise InvalidInput(f"{what}: {text} is out of range (1 byte to 1 PiB)",
                           field=what, value=str(text))
    return value


def format_size(num_bytes: int) -> str:
    """Shortest exact binary form: 268435456 -> '256M'."""
    for unit in ("T", "G", "M", "K"):
        factor = _UNITS[unit]
        if num_bytes >= factor and num_bytes % factor == 0:
            return f"{num_bytes // factor}{unit}"
    return f"{num_bytes}B"
