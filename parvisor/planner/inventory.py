"""Inputs of consolidation planning: the server inventory (CSV) and host models.

What for: turn ``SERVERS.csv`` and ``NAME:cores=N,ghz=F,ram_gb=N,disk_gb=N[,cost=F]``
specs into typed, validated records; every error names the file, the line, the column
and the value. What never: no planning here, and nothing read beyond ``MAX_CSV_BYTES``.

CSV header: ``name,cores,ghz,cpu_avg_pct,cpu_peak_pct,ram_gb,ram_used_gb,disk_gb``
(+ optional ``iops``); column order is free, names are case-insensitive, other columns
are ignored.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from parvisor.errors import InvalidInput

MAX_CSV_BYTES = 64 << 20
REQUIRED = ("name", "cores", "ghz", "cpu_avg_pct", "cpu_peak_pct", "ram_gb",
            "ram_used_gb", "disk_gb")
HOST_KEYS = {"cores", "ghz", "ram_gb", "disk_gb", "cost", "iops"}
HOST_REQUIRED = ("cores", "ghz", "ram_gb", "disk_gb")


@dataclass(frozen=True)
class Server:
    name: str
    cores: float
    ghz: float
    cpu_avg_pct: float
    cpu_peak_pct: float
    ram_gb: float
    ram_used_gb: float
    disk_gb: float
    iops: float | None = None


@dataclass(frozen=True)
class HostModel:
    name: str
    cores: int
    ghz: float
    ram_gb: float
    disk_gb: float
    cost: float | None = None
    iops: float | None = None

    @property
    def cpu_ghz(self) -> float:
        return self.cores * self.ghz


def _number(raw: str, where: str, *, positive: bool = False, max_value: float | None = None
            ) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: '{raw}' is not a number", value=raw) from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        rule = "a positive number" if positive else "a number >= 0"
        raise InvalidInput(f"{where}: '{raw}' must be {rule}", value=raw)
    if max_value is not None and value > max_value:
        raise InvalidInput(f"{where}: {raw} is over {max_value:g}", value=raw)
    return value


def _server(row: dict[str, str], where: str) -> Server:
    def num(col: str, **kw) -> float:
        return _number((row.get(col) or "").strip(), f"{where}, column {col}", **kw)
    name = (row.get("name") or "").strip()
    if not name:
        raise InvalidInput(f"{where}, column name: empty server name")
    server = Server(name, num("cores", positive=True), num("ghz", positive=True),
                    num("cpu_avg_pct", max_value=100), num("cpu_peak_pct", max_value=100),
                    num("ram_gb", positive=True), num("ram_used_gb"), num("disk_gb"),
                    num("iops") if (row.get("iops") or "").strip() else None)
    if server.cpu_avg_pct > server.cpu_peak_pct:
        raise InvalidInput(f"{where}: cpu_avg_pct {server.cpu_avg_pct:g} is above "
                           f"cpu_peak_pct {server.cpu_peak_pct:g}")
    if server.ram_used_gb > server.ram_gb:
        raise InvalidInput(f"{where}: ram_used_gb {server.ram_used_gb:g} is above "
                           f"ram_gb {server.ram_gb:g}")
    return server


def parse_inventory_text(text: str, *, source: str = "<inventory>") -> tuple[Server, ...]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [col for col in REQUIRED if col not in header]
    if missing:
        raise InvalidInput(f"inventory {source}: missing column(s) {', '.join(missing)} "
                           f"(header must have {','.join(REQUIRED)}[,iops])",
                           missing=missing)
    reader.fieldnames = header
    servers, seen = [], set()
    for row in reader:
        where = f"inventory {source}, line {reader.line_num}"
        if None in row:
            raise InvalidInput(f"{where}: more fields than the header has")
        if not any((v or "").strip() for v in row.values()):
            continue                              # blank line
        server = _server(row, where)
        if server.name in seen:
            raise InvalidInput(f"{where}: server '{server.name}' is listed twice")
        seen.add(server.name)
        servers.append(server)
    if not servers:
        raise InvalidInput(f"inventory {source}: no servers")
    return tuple(servers)


def parse_inventory(path: str | Path) -> tuple[Server, ...]:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CSV_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"inventory {path}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_CSV_BYTES:
        raise InvalidInput(f"inventory {path}: over the {MAX_CSV_BYTES} byte limit")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"inventory {path}: not UTF-8 text (byte {exc.start})") from exc
    return parse_inventory_text(text, source=str(path))


def parse_host_model(spec: str) -> HostModel:
    """``NAME:cores=N,ghz=F,ram_gb=N,disk_gb=N[,cost=F][,iops=N]``."""
    name, sep, rest = spec.partition(":")
    where = f"host model '{spec}'"
    if not sep or not name.strip():
        raise InvalidInput(f"{where}: expected NAME:cores=N,ghz=F,ram_gb=N,disk_gb=N"
                           "[,cost=F]")
    values: dict[str, float] = {}
    for part in rest.split(","):
        key, eq, raw = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in HOST_KEYS:
            raise InvalidInput(f"{where}: '{part}' is not one of "
                               f"{', '.join(sorted(HOST_KEYS))} = value")
        if key in values:
            raise InvalidInput(f"{where}: {key} given twice")
        values[key] = _number(raw.strip(), f"{where}, {key}", positive=key != "cost")
    missing = [k for k in HOST_REQUIRED if k not in values]
    if missing:
        raise InvalidInput(f"{where}: missing {', '.join(missing)}")
    if values["cores"] != int(values["cores"]):
        raise InvalidInput(f"{where}, cores: {values['cores']:g} is not a whole number")
    return HostModel(name.strip(), int(values["cores"]), values["ghz"], values["ram_gb"],
                     values["disk_gb"], values.get("cost"), values.get("iops"))
