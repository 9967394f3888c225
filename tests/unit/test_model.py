import pytest
from pydantic import ValidationError

from parvisor.errors import InvalidInput
from parvisor.model.sizes import format_size, parse_size
from parvisor.model.vm import DEFINITION_VERSION, VmDefinition, upgrade_definition
from parvisor.ops.vms import validated_definition

KERNEL = {"kind": "kernel", "kernel": "/k"}


@pytest.mark.parametrize("text,expected", [("256M", 256 << 20), ("1G", 1 << 30),
                                           ("1GiB", 1 << 30), ("512MiB", 512 << 20),
                                           ("1gb", 1 << 30), ("4096", 4096), (1024, 1024)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12XB", "", "-1G", "0", "G", "1.5.5G", "99999T", True])
def test_bad_sizes_are_refused_with_the_value(bad):
    with pytest.raises(InvalidInput) as caught:
        parse_size(bad, what="memory")
    assert "memory" in caught.value.message


def test_format_size_round_trips():
    for value in (256 << 20, 1 << 30, 3 << 40, 1000):
        assert parse_size(format_size(value)) == value


def test_defaults_give_headroom_and_max_memory():
    d = VmDefinition(name="a", boot=KERNEL, vcpus=2, memory_bytes="512M")
    assert d.max_vcpus == 4 and d.max_memory_bytes == 512 << 20
    assert d.schema_version == DEFINITION_VERSION and d.generation == 1


@pytest.mark.parametrize("name", ["../x", "a/b", "x\ny", "", "-lead", "a" * 64, "ü", "a b"])
def test_bad_names(name):
    with pytest.raises(InvalidInput) as caught:
        validated_definition({"name": name, "boot": KERNEL})
    assert caught.value.message.startswith("name:")


def test_vcpus_over_max_refused_with_a_readable_message():
    with pytest.raises(InvalidInput) as caught:
        validated_definition({"name": "a", "boot": KERNEL, "vcpus": 8, "max_vcpus": 4})
    assert "exceeds max_vcpus" in caught.value.message


def test_unknown_fields_refused():
    with pytest.raises(ValidationError):
        VmDefinition(name="a", boot=KERNEL, colour="red")


def test_definition_is_immutable():
    d = VmDefinition(name="a", boot=KERNEL)
    with pytest.raises(ValidationError):
        d.vcpus = 3


def test_json_round_trip_and_newer_versions_refused():
    d = VmDefinition(name="a", boot=KERNEL, notes="hi")
    assert VmDefinition.model_validate_json(d.model_dump_json()) == d
    with pytest.raises(ValueError):
        upgrade_definition({"schema_version": 99})


def test_version_1_definitions_are_upgraded():
    v1 = {"schema_version": 1, "name": "old", "boot": KERNEL}
    upgraded = VmDefinition.model_validate(upgrade_definition(v1))
    assert upgraded.schema_version == DEFINITION_VERSION and upgraded.generation == 1 and not upgraded.tpm


def test_device_rules():
    with pytest.raises(InvalidInput, match="read-only"):
        validated_definition({"name": "a", "boot": KERNEL, "disks": [
            {"id": "d0", "path": "/x", "bus": "ide", "readonly": True}]})
    with pytest.raises(InvalidInput, match="boot_order"):
        validated_definition({"name": "a", "boot": KERNEL, "boot_order": ["nope"]})
    with pytest.raises(InvalidInput, match="secure boot"):
        validated_definition({"name": "a", "boot": KERNEL, "secure_boot": True})
