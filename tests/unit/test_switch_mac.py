"""MAC address allocation and validation rules."""

import pytest

from parvisor.errors import AlreadyExists, InvalidInput
from parvisor.switch.mac import MAC_PREFIX, allocate_mac, normalize_mac, validate_mac


def test_prefix_is_locally_administered_unicast():
    first = int(MAC_PREFIX[:2], 16)
    assert first & 0x02, "locally administered bit"
    assert not first & 0x01, "unicast"
    assert MAC_PREFIX != "52:54:00"


def test_allocate_is_unique_and_under_prefix():
    in_use: set[str] = set()
    for _ in range(200):
        mac = allocate_mac(in_use)
        assert mac.startswith(MAC_PREFIX + ":") and mac not in in_use
        validate_mac(mac, in_use)
        in_use.add(mac)


def test_allocate_with_seed_is_stable_and_probes_past_collisions():
    first = allocate_mac(seed="vm/nic0")
    assert allocate_mac(seed="vm/nic0") == first
    second = allocate_mac({first.upper()}, seed="vm/nic0")
    assert second != first and second.startswith(MAC_PREFIX)


@pytest.mark.parametrize("mac, fragment", [
    ("00:00:00:00:00:00", "all zeros"),
    ("ff:ff:ff:ff:ff:ff", "broadcast"),
    ("01:00:5e:00:00:01", "multicast"),
    ("03:70:76:00:00:01", "multicast"),
    ("02:70:76:00:00", "malformed"),
    ("02:70:76:00:00:0g", "malformed"),
    ("02-70:76:00:00:01", "malformed"),
    ("0270.7600.0001", "malformed"),
    ("", "malformed"),
])
def test_invalid_macs_are_refused(mac, fragment):
    with pytest.raises(InvalidInput) as err:
        validate_mac(mac)
    assert fragment in err.value.message


def test_duplicate_is_refused_whatever_the_spelling():
    with pytest.raises(AlreadyExists):
        validate_mac("02-70-76-AA-BB-CC", {"02:70:76:aa:bb:cc"})


def test_valid_mac_is_normalized():
    assert validate_mac("52:54:00:AB:cd:01") == "52:54:00:ab:cd:01"
    assert normalize_mac("02-70-76-00-00-01") == "02:70:76:00:00:01"
