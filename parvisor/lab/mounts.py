"""Per-host mount namespaces for the lab: each host sees its own local storage dir and,
over every other host's, an empty read-only tmpfs.

What for: issue 5 asks that a lab host's local storage be visible to that host only
(and unreachable when the host has lost power), so that replication and "not protected"
placement are tested against storage that really is local. Every process of a host
(etcd member, host service and hence its QEMUs, ``lab exec`` commands) is started with
``nsenter --mount=<ns file> ip netns exec <netns> …``: the mount namespace first, because
``ip netns exec`` itself unshares a private copy of the *current* mount namespace (it
keeps our covers and needs ``/run/netns/<netns>``, copied in when the namespace was made).

How: a namespace is made persistent by bind-mounting it onto a file (``unshare
--mount=FILE``) in ``<lab>/.mntns``, a directory bind-mounted onto itself with private
propagation (the kernel refuses namespace files on shared mounts, and a private mount
keeps them out of every namespace copied later: other hosts cannot ``nsenter`` a host's
namespace). Host namespaces are private too: nothing mounted later in the root
namespace leaks in. The root namespace (the lab CLI, tests) sees every host's local dir
at its real path, except a powered-off host's, which ``lab fail`` covers there too.

Limits: no PID namespace, so a host can still reach another host's files through
``/proc/<pid>/root`` of that host's processes; this is a simulation of separate
machines, not a security boundary.

Never: mount or unmount anything outside the lab dir; ``lab down`` unmounts exactly the
mounts found below it (``/proc/self/mountinfo``), deepest first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from parvisor.errors import Failed

NS_DIR_NAME = ".mntns"
COVER_OPTIONS = "ro,size=4k,mode=755"


# --- pure -----------------------------------------------------------------------------
def hidden_from(own: str, local_dirs: dict[str, Path]) -> list[Path]:
    """The local storage dirs host ``own`` must not see: every other host's."""
    return [path for name, path in sorted(local_dirs.items()) if name != own]


def enter_argv(ns_file: str) -> list[str]:
    """Prefix that runs a command in a host's mount namespace (nsenter execs it: the
    PID stays the command's)."""
    return ["nsenter", f"--mount={ns_file}"] if ns_file else []


def mounts_under(mountinfo: str, directory: Path) -> list[Path]:
    """Mount points at or below ``directory`` in the order to unmount them: the reverse
    of mountinfo's (mount) order, so a mount on top or below another goes first."""
    base = str(directory).rstrip("/") or "/"
    found = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if point == base or point.startswith(base + "/"):
            found.append(Path(point))
    return list(reversed(found))


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as ``\ooo`` octal."""
    out, index = [], 0
    while index < len(field):
        chunk = field[index:index + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


# --- effects --------------------------------------------------------------------------
def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise Failed(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def make_ns_dir(directory: Path) -> None:
    """``directory`` bound onto itself with private propagation: namespace files can be
    bound into it and are not copied into namespaces made later."""
    directory.mkdir(parents=True, exist_ok=True)
    _run(["mount", "--bind", str(directory), str(directory)])
    _run(["mount", "--make-private", str(directory)])


def make_host_ns(ns_file: Path, hidden: list[Path], label: str) -> None:
    """A persistent private mount namespace at ``ns_file`` in which every ``hidden``
    dir is covered by an empty read-only tmpfs."""
    ns_file.touch()
    _run(["unshare", f"--mount={ns_file}", "--propagation", "private", "true"])
    for path in hidden:
        _run([*enter_argv(str(ns_file)), "mount", "-t", "tmpfs", "-o", COVER_OPTIONS,
              label, str(path)])


def cover(path: Path, label: str) -> None:
    """An empty read-only tmpfs over ``path`` in the root namespace."""
    _run(["mount", "-t", "tmpfs", "-o", COVER_OPTIONS, label, str(path)])


def uncover(path: Path) -> None:
    _run(["umount", str(path)])


def is_mount_point(path: Path) -> bool:
    path = path.resolve()       # mountinfo shows resolved paths (/tmp may be a link)
    return path in mounts_under(_mountinfo(), path)


def _mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def unmount_all(directory: Path) -> list[str]:
    """Unmount everything at or below ``directory``; return what is still mounted."""
    directory = directory.resolve()     # mountinfo shows resolved paths
    for point in mounts_under(_mountinfo(), directory):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            # busy (a process still inside it): detach now, freed when it lets go
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True)
    return [str(p) for p in mounts_under(_mountinfo(), directory)]
