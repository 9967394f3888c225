"""The host configuration file: ``<state dir>/config.toml``.

Written with defaults the first time the service starts, then only read; edit it and
restart the service. Keys (all optional):

``host_name``        the name this host reports (default: the machine's hostname)
``storage_roots``    directories VM disks may live in (default ``[<state>/storage]``);
                     any disk path outside them, also through symlinks, is refused
``listen_unix``      API unix socket (default ``<state>/run/api.sock``, mode 0600: root)
``listen_tcp``       list of ``"ADDRESS:PORT"`` for the API over TCP; needs TLS + tokens
``tls_cert``/``tls_key``  PEM files for TCP
``api_tokens``       bearer tokens accepted on TCP (the unix socket trusts its peer: root)
``console_listen``   ``"ADDRESS:PORT"`` of the web console (login required; loopback
                     only unless tls_cert/tls_key are set); ``docs/web-console.md``
``qemu_user``        run QEMU as this unprivileged user when it exists ("" = as root)
``shutdown_timeout_s``  how long a graceful guest shutdown may take before power-off
``[cluster]``        failover cluster membership (``parvisor.cluster.settings``); written
                     by ``parvisor cluster create|join``, removed by ``cluster leave``
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from parvisor.errors import InvalidInput

DEFAULT_STATE_DIR = Path("/var/lib/parvisor")


def state_dir_from_env(explicit: str | Path | None = None) -> Path:
    """--state-dir beats PARVISOR_STATE_DIR beats the default."""
    chosen = explicit or os.environ.get("PARVISOR_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(chosen).absolute()


@dataclass(frozen=True)
class HostConfig:
    state_dir: Path
    host_name: str = field(default_factory=socket.gethostname)
    storage_roots: tuple[Path, ...] = ()
    listen_unix: Path | None = None
    listen_tcp: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    api_tokens: tuple[str, ...] = ()
    qemu_user: str = "parvisor-qemu"
    shutdown_timeout_s: float = 60.0
    cluster: dict | None = None     # raw [cluster] table; parvisor.cluster.settings
    console_listen: str = ""        # web console "ADDRESS:PORT"; parvisor.web

    @property
    def api_socket(self) -> Path:
        return self.listen_unix or self.state_dir / "run" / "api.sock"

    @property
    def database(self) -> Path:
        return self.state_dir / "parvisor.db"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "config.toml"

    def with_defaults(self) -> "HostConfig":
        roots = self.storage_roots or (self.state_dir / "storage",)
        return HostConfig(**{**asdict(self), "storage_roots": tuple(Path(r) for r in roots),
                             "listen_unix": self.api_socket})


_KEYS = {"host_name", "storage_roots", "listen_unix", "listen_tcp", "tls_cert", "tls_key",
         "api_tokens", "qemu_user", "shutdown_timeout_s", "cluster", "console_listen"}


def load_config(state_dir: Path) -> HostConfig:
    path = state_dir / "config.toml"
    if not path.exists():
        return HostConfig(state_dir=state_dir).with_defaults()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: {exc}", path=str(path)) from exc
    unknown = set(data) - _KEYS
    if unknown:
        raise InvalidInput(f"{path}: unknown keys {sorted(unknown)}", path=str(path))
    for key in ("storage_roots", "listen_tcp", "api_tokens"):
        data[key] = tuple(data.get(key, ()))
    for key in ("listen_unix", "tls_cert", "tls_key"):
        if data.get(key):
            data[key] = Path(data[key])
    data["storage_roots"] = tuple(Path(r) for r in data["storage_roots"])
    config = HostConfig(state_dir=state_dir, **data).with_defaults()
    if config.cluster is not None:     # refuse a broken section at load, not mid-run
        from parvisor.cluster.settings import ClusterSettings
        ClusterSettings.from_table(config.cluster, config.host_name, f"{path}: ")
    if config.listen_tcp and not (config.tls_cert and config.tls_key and config.api_tokens):
        raise InvalidInput(f"{path}: listen_tcp needs tls_cert, tls_key and api_tokens:"
                           " the API is never served on TCP without TLS and a token")
    if config.console_listen:
        check_console_listen(config, f"{path}: ")
    return config


def check_console_listen(config: HostConfig, where: str = "") -> tuple[str, int]:
    """The web console always asks for a login; without TLS it may only listen on
    loopback (an SSH tunnel or a local reverse proxy), never on an open network."""
    host, _, port = config.console_listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"{where}console_listen {config.console_listen!r} is not "
                           "ADDRESS:PORT")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if not loopback and not (config.tls_cert and config.tls_key):
        raise InvalidInput(f"{where}console_listen on {host} needs tls_cert and tls_key:"
                           " without TLS the console serves on loopback only")
    return host, int(port)


def write_default_config(config: HostConfig) -> None:
    """Write a commented config file once, so users see what they can set."""
    path = config.config_file
    if path.exists():
        return
    text = (
        "# parvisor host configuration; restart the service after editing.\n"
        f"host_name = {json.dumps(config.host_name)}\n"
        f"storage_roots = {json.dumps([str(r) for r in config.storage_roots])}\n"
        f"listen_unix = {json.dumps(str(config.api_socket))}\n"
        "# listen_tcp = [\"0.0.0.0:8443\"]   # needs tls_cert, tls_key and api_tokens\n"
        "# tls_cert = \"/etc/parvisor/cert.pem\"\n"
        "# tls_key = \"/etc/parvisor/key.pem\"\n"
        "# api_tokens = [\"a-long-random-token\"]\n"
        "# console_listen = \"127.0.0.1:8080\"   # web console; non-loopback needs TLS\n"
        f"qemu_user = {json.dumps(config.qemu_user)}\n"
        f"shutdown_timeout_s = {config.shutdown_timeout_s}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
