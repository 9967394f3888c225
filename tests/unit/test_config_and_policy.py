import pytest

from parvisor.config import load_config, write_default_config
from parvisor.errors import InvalidInput
from parvisor.model.states import VmState
from parvisor.model.vm import VmDefinition
from parvisor.ops.reconcile import wants_auto_start
from parvisor.store.base import VmRecord


def test_default_config_is_written_once_and_reads_back(tmp_path):
    config = load_config(tmp_path)
    assert config.storage_roots == (tmp_path / "storage",)
    assert config.api_socket == tmp_path / "run" / "api.sock"
    write_default_config(config)
    assert (tmp_path / "config.toml").stat().st_mode & 0o777 == 0o600
    assert load_config(tmp_path) == config


def test_config_refuses_unknown_keys_and_tcp_without_tls(tmp_path):
    (tmp_path / "config.toml").write_text('colour = "red"\n')
    with pytest.raises(InvalidInput, match="unknown keys"):
        load_config(tmp_path)
    (tmp_path / "config.toml").write_text('listen_tcp = ["0.0.0.0:8443"]\n')
    with pytest.raises(InvalidInput, match="TLS"):
        load_config(tmp_path)


def record(state, desired, action):
    definition = VmDefinition(name="a", boot={"kind": "kernel", "kernel": "/k"},
                              auto_start_action=action)
    return VmRecord(definition, state, "", desired, 1)


@pytest.mark.parametrize("state,desired,action,expected", [
    (VmState.OFF, "running", "start-if-running", True),
    (VmState.SAVED, "running", "start-if-running", True),
    (VmState.OFF, "off", "start-if-running", False),
    (VmState.CRASHED, "running", "start-if-running", False),
    (VmState.OFF, "off", "always-start", True),
    (VmState.CRASHED, "off", "always-start", True),
    (VmState.RUNNING, "running", "always-start", False),
    (VmState.OFF, "running", "nothing", False),
])
def test_automatic_start_policy(state, desired, action, expected):
    assert wants_auto_start(record(state, desired, action)) is expected
