"""What a host publishes about itself so that others can decide whether a VM may move there.

* ``MigrationFacts`` is plain data with a JSON round trip. Hosts of different parvisor
  versions share one cluster, so ``from_dict`` accepts documents with keys missing and
  records which ones (``missing``): the checks in ``parvisor.migration.compat`` then say
  "did not publish ..." instead of guessing.
* ``probe_qemu_capabilities`` asks one short QEMU which versioned machine types and
  which named CPU models this host can run (the effect, cached per process);
  ``parse_capabilities`` is the pure reading of its replies.
* ``gather_migration_facts`` puts the local host's facts together.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, NamedTuple

from parvisor.errors import InvalidInput, QmpError, VmError
from parvisor.hypervisor.probe import current_accelerator, probe_host, qemu_version

PROBE_TIMEOUT_S = 30.0      # a probe takes well under a second; a loaded 2-core CI is slow


@dataclass(frozen=True)
class MigrationFacts:
    """One host's migration-relevant facts. Defaults mean "not published"."""

    host: str = ""
    accelerator: str = ""                       # "kvm" | "tcg"
    qemu_version: str = ""
    host_cpu_model: str = ""                    # /proc/cpuinfo "model name"
    machine_types: tuple[str, ...] = ()         # versioned names: pc-q35-7.2, ...
    machine_aliases: tuple[tuple[str, str], ...] = ()   # ("q35", "pc-q35-7.2"), ...
    cpu_models: tuple[str, ...] = ()            # named models runnable here, as is
    switches: tuple[str, ...] = ()
    storage_roots: tuple[str, ...] = ()
    shared_storage: str | None = None
    free_memory_bytes: int = 0                  # available for VMs (host reserve taken off)
    migration_address: str = ""
    # keys the published document lacked (an older parvisor); never published itself
    missing: frozenset[str] = field(default=frozenset(), compare=False)

    def resolve_machine(self, name: str) -> str | None:
        """The versioned machine type ``name`` means on this host (``q35`` ->
        ``pc-q35-7.2``); a versioned name means itself if the host has it."""
        aliases = dict(self.machine_aliases)
        if name in aliases:
            return aliases[name]
        return name if name in self.machine_types else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "host": self.host, "accelerator": self.accelerator,
            "qemu_version": self.qemu_version, "host_cpu_model": self.host_cpu_model,
            "machine_types": list(self.machine_types),
            "machine_aliases": dict(self.machine_aliases),
            "cpu_models": list(self.cpu_models), "switches": list(self.switches),
            "storage_roots": list(self.storage_roots),
            "shared_storage": self.shared_storage,
            "free_memory_bytes": self.free_memory_bytes,
            "migration_address": self.migration_address}
        # keep what an older host did not publish unpublished through a round trip
        return {k: v for k, v in data.items() if k not in self.missing}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MigrationFacts":
        if not isinstance(data, Mapping):
            raise InvalidInput(f"migration facts must be a JSON object, not {type(data).__name__}")
        try:
            values = {name: _READERS[name](data[name]) for name in _READERS if name in data}
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"host {data.get('host', '?')} published unreadable "
                               f"migration facts: {exc}") from exc
        published = {f.name for f in fields(cls)} - {"missing"}
        return cls(**values, missing=frozenset(published - set(data)))


def _strings(value: Iterable[Any]) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError("expected a list of strings")
    return tuple(str(item) for item in value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


_READERS: dict[str, Any] = {
    "host": str, "accelerator": str, "qemu_version": str, "host_cpu_model": str,
    "machine_types": _strings,
    "machine_aliases": lambda value: tuple(sorted((str(k), str(v)) for k, v in value.items())),
    "cpu_models": _strings, "switches": _strings, "storage_roots": _strings,
    "shared_storage": _optional_str, "free_memory_bytes": int, "migration_address": str}


# --- QEMU capabilities ----------------------------------------------------------------
class QemuCapabilities(NamedTuple):
    machine_types: tuple[str, ...]
    machine_aliases: tuple[tuple[str, str], ...]
    cpu_models: tuple[str, ...]


def parse_capabilities(machines: list[dict[str, Any]],
                       cpu_definitions: list[dict[str, Any]]) -> QemuCapabilities:
    """Replies of ``query-machines`` and ``query-cpu-definitions`` -> capabilities.

    A CPU model counts only with an *empty* ``unavailable-features`` list: QEMU would
    otherwise start it with features silently dropped, and that reduced CPU differs
    from the same model on a host that has them. A missing list means "unknown": left out.
    """
    types = tuple(sorted(str(m["name"]) for m in machines))
    aliases = tuple(sorted((str(m["alias"]), str(m["name"])) for m in machines
                           if m.get("alias")))
    models = tuple(sorted(str(c["name"]) for c in cpu_definitions
                          if c.get("unavailable-features") == []))
    return QemuCapabilities(types, aliases, models)


def probe_argv(binary: str, accelerator: str) -> list[str]:
    # -machine none: no guest, no devices; QMP on stdio so no socket is left behind.
    return [binary, "-machine", "none", "-accel", accelerator, "-nodefaults",
            "-no-user-config", "-display", "none", "-qmp", "stdio"]


def _qmp_script(commands: Iterable[str]) -> str:
    # Replies carry the id, so events interleaved on stdout cannot be mistaken for them.
    lines = [{"execute": "qmp_capabilities", "id": "caps"}]
    lines += [{"execute": name, "id": name} for name in commands]
    lines.append({"execute": "quit", "id": "quit"})
    return "".join(json.dumps(line) + "\n" for line in lines)


def run_qmp_probe(binary: str, accelerator: str, commands: tuple[str, ...],
                  timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Start QEMU with no machine, run QMP ``commands``, quit; replies by command."""
    argv = probe_argv(binary, accelerator)
    try:
        done = subprocess.run(argv, input=_qmp_script(commands), capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:     # run() has killed QEMU already
        raise VmError(f"probing {binary} ({accelerator}) took over {timeout_s:.0f} s",
                      argv=argv) from exc
    except OSError as exc:
        raise VmError(f"cannot run {binary}: {exc}; is qemu-system-x86 installed?",
                      argv=argv) from exc
    return _replies(done, argv, commands)


def _replies(done: subprocess.CompletedProcess[str], argv: list[str],
             commands: tuple[str, ...]) -> dict[str, Any]:
    replies: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue                # QEMU's own text on stdout, if any
        if isinstance(message, dict) and message.get("id") in commands:
            if "error" in message:
                raise QmpError(f"QEMU probe: {message['id']} failed: "
                               f"{message['error'].get('desc', message['error'])}", argv=argv)
            replies[message["id"]] = message.get("return")
    lacking = [name for name in commands if name not in replies]
    if lacking:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VmError(f"QEMU probe ({' '.join(argv[:5])} ...) exited {done.returncode} "
                      f"without answering {', '.join(lacking)}: {tail}", argv=argv)
    return replies


@functools.cache
def _probe_cached(binary: str, accelerator: str, timeout_s: float) -> QemuCapabilities:
    # Exceptions are not cached: a failed probe is retried on the next call.
    replies = run_qmp_probe(binary, accelerator,
                            ("query-machines", "query-cpu-definitions"), timeout_s)
    return parse_capabilities(replies["query-machines"], replies["query-cpu-definitions"])


def probe_qemu_capabilities(binary: str = "qemu-system-x86_64",
                            accelerator: str | None = None,
                            timeout_s: float = PROBE_TIMEOUT_S) -> QemuCapabilities:
    """(machine_types, machine_aliases, cpu_models) of ``binary`` under ``accelerator``
    (default: the one ``probe.py`` chooses). Cached per process: both only change
    with a QEMU upgrade, which needs a service restart anyway."""
    if accelerator not in (None, "kvm", "tcg"):
        raise InvalidInput(f"accelerator must be kvm or tcg, not {accelerator!r}")
    return _probe_cached(binary, accelerator or current_accelerator().accelerator, timeout_s)


def gather_migration_facts(host: str, *, switches: Iterable[str],
                           storage_roots: Iterable[str], shared_storage: str | None,
                           migration_address: str,
                           binary: str = "qemu-system-x86_64") -> MigrationFacts:
    """The local host's facts: probes (``probe_host`` + one cached QEMU run) plus what
    the caller knows (switches, storage, the address peers reach for migration)."""
    info = probe_host(host)
    caps = probe_qemu_capabilities(binary, info.accelerator)
    return MigrationFacts(
        host=info.name, accelerator=info.accelerator, qemu_version=qemu_version(binary),
        host_cpu_model=info.cpu_model, machine_types=caps.machine_types,
        machine_aliases=caps.machine_aliases, cpu_models=caps.cpu_models,
        switches=tuple(sorted(switches)), storage_roots=tuple(storage_roots),
        shared_storage=shared_storage, free_memory_bytes=info.free_memory_for_vms_bytes,
        migration_address=migration_address)
