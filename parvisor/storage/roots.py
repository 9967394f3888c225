"""Storage roots: the only directories VM disks may live in.

Every user-given path is resolved (symlinks included) *before* it is compared with the
roots, so ``/var/lib/parvisor/storage/link -> /etc`` is refused like ``/etc`` itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from parvisor.errors import InvalidInput


def resolve_in_roots(path: str | Path, roots: Iterable[Path], *, what: str = "disk") -> Path:
    raw = Path(path)
    if not raw.is_absolute():
        raise InvalidInput(f"{what} path must be absolute: {path}", path=str(path))
    resolved = raw.resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    raise InvalidInput(f"{what} path {path} is outside the storage roots "
                       f"({', '.join(str(r) for r in roots)})", path=str(path),
                       resolved=str(resolved))


def require_file(path: Path, *, what: str) -> Path:
    if not path.is_file():
        raise InvalidInput(f"{what} {path} does not exist or is not a file", path=str(path))
    return path
