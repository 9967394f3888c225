"""The lab's pure parts: naming, addresses, the odd etcd voter count, and the per-host
mount namespaces' plan (what each host hides, what ``down`` unmounts, command order)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from parvisor.errors import InvalidInput
from parvisor.lab import lab as lab_mod
from parvisor.lab import mounts


@pytest.fixture(autouse=True)
def fixed_subnet(monkeypatch):
    monkeypatch.setattr(lab_mod, "_free_octet", lambda: 77)


@pytest.mark.parametrize("hosts, witness, voters", [
    (3, False, {"h1", "h2", "h3"}), (2, True, {"h1", "h2", "w"}),
    (2, False, {"h1"}), (3, True, {"h1", "h2", "w"}), (4, True, {"h1", "h2", "h3", "h4", "w"}),
])
def test_etcd_voters_are_odd_and_include_the_witness(hosts, witness, voters):
    state = lab_mod.plan(hosts, witness, {}, True)
    assert {n.name for n in state.nodes.values() if n.etcd} == voters
    assert len(voters) % 2 == 1


def test_names_fit_linux_interface_limits_and_share_the_prefix():
    state = lab_mod.plan(3, True, {"h1": "a"}, True)
    for node in state.nodes.values():
        assert node.ns.startswith(state.prefix) and len(node.link + "p") <= 15
        assert node.ip.startswith("10.231.77.")
    assert state.nodes["h1"].site == "a" and not state.nodes["w"].runs_vms


def test_site_specs():
    assert lab_mod.parse_sites(["a:h1,h2", "b:h3"]) == {"h1": "a", "h2": "a", "h3": "b"}
    with pytest.raises(InvalidInput):
        lab_mod.parse_sites(["nohosts"])


# --- per-host mount namespaces (parvisor.lab.mounts) ---------------------------------
def test_each_host_hides_every_other_hosts_local_storage_and_the_witness_hides_all():
    dirs = {name: Path(f"/lab/{name}/local") for name in ("h1", "h2", "h3")}
    assert mounts.hidden_from("h2", dirs) == [Path("/lab/h1/local"), Path("/lab/h3/local")]
    assert mounts.hidden_from("w", dirs) == sorted(dirs.values())


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
305 27 254:0 /tmp/pvl-a/.mntns /tmp/pvl-a/.mntns rw,relatime - ext4 /dev/vda rw
339 305 0:4 mnt:[4026533109] /tmp/pvl-a/.mntns/h1 rw - nsfs nsfs rw
340 27 0:5 / /tmp/pvl-ab/h1/local ro - tmpfs other-lab ro
341 27 0:6 / /tmp/pvl-a/my\\040dir/local ro - tmpfs pl1-off ro
342 341 0:7 / /tmp/pvl-a/my\\040dir/local ro - tmpfs pl1-off ro
"""


def test_mounts_under_the_lab_dir_deepest_and_latest_first_and_nothing_else():
    assert mounts.mounts_under(MOUNTINFO, Path("/tmp/pvl-a")) == [
        Path("/tmp/pvl-a/my dir/local"), Path("/tmp/pvl-a/my dir/local"),
        Path("/tmp/pvl-a/.mntns/h1"), Path("/tmp/pvl-a/.mntns")]
    assert mounts.mounts_under(MOUNTINFO, Path("/tmp/nothing")) == []


def test_host_commands_enter_the_mount_namespace_before_the_network_namespace():
    node = lab_mod.Node("h1", "10.231.77.1", "pl1-h1", "pl1-h1", etcd=True,
                        mount_ns="/lab/.mntns/h1")
    assert lab_mod.host_argv(node, ["cat", "f"]) == [
        "nsenter", "--mount=/lab/.mntns/h1", "ip", "netns", "exec", "pl1-h1", "cat", "f"]


def test_a_lab_recorded_before_mount_namespaces_still_loads(tmp_path):
    state = lab_mod.plan(2, False, {}, True)
    doc = json.loads(json.dumps(dataclasses.asdict(state)))
    for node in doc["nodes"].values():
        del node["mount_ns"], node["powered"]
    (tmp_path / "lab.json").write_text(json.dumps(doc))
    loaded = lab_mod.LabState.load(tmp_path)
    assert loaded.nodes["h1"].powered and loaded.nodes["h1"].mount_ns == ""
    assert lab_mod.host_argv(loaded.nodes["h1"], ["true"])[:3] == ["ip", "netns", "exec"]


def test_exec_on_a_host_without_power_is_refused(tmp_path):
    state = lab_mod.plan(2, False, {}, True)
    state.nodes["h1"].powered = False
    state.save(tmp_path)
    lab = lab_mod.Lab(tmp_path)
    with pytest.raises(InvalidInput, match="lost power"):
        lab.exec_argv("h1", ["true"])
    assert lab.exec_argv("h2", ["true"])[0][-1] == "true"


def test_lab_exec_passes_the_commands_own_double_dash_through(monkeypatch):
    """``lab exec h1 -- parvisor vm exec x -- ls -l``: the guest command keeps its ``--``
    (without it ``-l`` would be taken as an option of ``parvisor vm exec``)."""
    from typer.testing import CliRunner

    import parvisor.cli.lab_commands as lab_commands
    from parvisor.cli.main import app

    seen = {}

    class RecordingLab:
        def exec_argv(self, host, argv):
            seen[host] = argv
            return ["true"], None

    monkeypatch.setattr(lab_commands, "_lab", lambda directory: RecordingLab())
    for args in (["--", "parvisor", "vm", "exec", "x", "--", "ls", "-l"],
                 ["--", "--", "parvisor", "vm", "exec", "x", "--", "ls", "-l"]):
        done = CliRunner().invoke(app, ["lab", "exec", "h1", *args])
        assert done.exit_code == 0, done.output
        assert seen["h1"] == ["parvisor", "vm", "exec", "x", "--", "ls", "-l"]
