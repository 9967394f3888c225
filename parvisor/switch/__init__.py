"""Virtual switches (Hyper-V's external / internal / private switch, plus NAT).

A switch is a Linux bridge managed over netlink (pyroute2); VM NICs are persistent
taps plugged into it. Types:

* ``external`` – the bridge enslaves a host interface (``uplink``): VMs share its LAN.
* ``internal`` – VMs and the host; the host gets ``host_address`` on the bridge.
* ``private``  – VMs only; the host has no address on it.
* ``nat``      – internal + masquerading (nftables table ``parvisor_<bridge>``) and a
  dnsmasq DHCP server (state in ``<state>/switches/<name>/``); the host is the
  subnet's first address.

Per-NIC VLANs isolate traffic: bridge VLAN filtering where the kernel has it, one bridge
per VLAN otherwise (see ``manager``). MAC addresses: ``mac.allocate_mac`` /
``mac.validate_mac`` (prefix ``02:70:76``).

How the rest of parvisor uses it (``manager = SwitchManager(store, state_dir,
nic_users=...)``)::

    service start      manager.ensure_all(nics_of_running_vms)   -> {name: error}
    switch create      manager.create(parse_switch_definition(request))
    switch list        manager.list()                            -> [SwitchStatus]
    switch delete      manager.delete(name)       (Busy while a NIC uses it)
    VM start / NIC hot-add   manager.attach_nic(vm_uuid, nic, owner_uid=...)
                             -> NicAttachment(tap=..., bridge=...); then start QEMU
    VM stop / NIC unplug     manager.detach_nic(vm_uuid, nic_id)   (after QEMU exited)
    VM define / NIC add      mac.validate_mac(user_mac, macs_in_use) or
                             mac.allocate_mac(macs_in_use); store it in the NicSpec

Threads: every call does blocking netlink/subprocess I/O; from the asyncio service call
it through ``asyncio.to_thread`` (pyroute2 0.9 refuses a thread running an event loop,
and the real adapter says so with a ``Failed``). Root (CAP_NET_ADMIN) is required for
anything that changes the kernel.

Modules: ``model`` (definition, derived names), ``mac``, ``netlink`` (the only pyroute2
user; also ``RecordingNetlink``, a fake), ``nat`` (nft + dnsmasq; ``FakeNat``),
``manager`` (pure planning + ``SwitchManager``).
"""

from parvisor.switch.mac import MAC_PREFIX, allocate_mac, normalize_mac, validate_mac
from parvisor.switch.manager import (NicAttachment, NicUser, SwitchManager, SwitchStatus,
                                     plan_port, plan_switch)
from parvisor.switch.model import (SwitchDefinition, bridge_name, parse_switch_definition,
                                   validate_switch_name)

__all__ = ["MAC_PREFIX", "NicAttachment", "NicUser", "SwitchDefinition", "SwitchManager",
           "SwitchStatus", "allocate_mac", "bridge_name", "normalize_mac",
           "parse_switch_definition", "plan_port", "plan_switch", "validate_mac",
           "validate_switch_name"]
