"""Network adapters of VMs: from request to ``NicSpec``, and plugging their taps.

A NIC names a switch; its MAC is given (validated: unicast, not duplicated on this host)
or allocated from parvisor's locally administered prefix, and stored in the definition
so it is stable across restarts. At VM start each NIC's tap is created and plugged
into its switch (per-VLAN bridge where needed) before QEMU opens it; after QEMU exits
the taps are removed.
"""

from __future__ import annotations

import asyncio
import pwd
import re
from typing import Iterable

from parvisor.errors import InvalidInput, NotFound
from parvisor.model.vm import NicSpec, VmDefinition
from parvisor.ops.requests import NicRequest
from parvisor.switch import SwitchManager, allocate_mac, validate_mac

MAX_NICS_PER_VM = 8
_NIC_OPTION = re.compile(r"^(vlan|mac|model)=(.+)$")


def parse_nic_option(text: str) -> dict:
    """CLI form ``SWITCH[,vlan=N][,mac=M][,model=virtio|e1000]`` -> request dict."""
    switch, *options = text.split(",")
    result: dict = {"switch": switch}
    for option in options:
        match = _NIC_OPTION.match(option)
        if not match:
            raise InvalidInput(f"--nic {text}: '{option}' is not vlan=N, mac=M or model=M")
        key, value = match.groups()
        if key == "vlan" and not value.isdigit():
            raise InvalidInput(f"--nic {text}: vlan must be a number from 1 to 4094")
        result[key] = int(value) if key == "vlan" else value
    return result


def macs_in_use(definitions: Iterable[VmDefinition]) -> set[str]:
    return {nic.mac for d in definitions for nic in d.nics}


def nic_specs(requests: list[NicRequest], switches: SwitchManager,
              in_use: set[str], *, first_index: int = 0) -> list[NicSpec]:
    if len(requests) + first_index > MAX_NICS_PER_VM:
        raise InvalidInput(f"at most {MAX_NICS_PER_VM} network adapters per VM")
    specs, taken = [], set(in_use)
    for offset, request in enumerate(requests):
        try:
            switches.get(request.switch)
        except NotFound:
            raise InvalidInput(f"no switch named '{request.switch}' (see 'parvisor switch "
                               "list')", switch=request.switch) from None
        mac = validate_mac(request.mac, taken) if request.mac else allocate_mac(taken)
        taken.add(mac)
        specs.append(NicSpec(id=f"nic{first_index + offset}", switch=request.switch,
                             mac=mac, model=request.model, vlan=request.vlan))
    return specs


def _uid(user: str | None) -> int | None:
    if not user:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


async def plug_nics(switches: SwitchManager, definition: VmDefinition,
                    qemu_user: str | None) -> None:
    """Create and plug every tap; on failure unplug what was plugged (nothing half-done)."""
    plugged: list[str] = []
    try:
        for nic in definition.nics:
            await asyncio.to_thread(switches.attach_nic, definition.uuid, nic,
                                    owner_uid=_uid(qemu_user))
            plugged.append(nic.id)
    except BaseException:
        for nic_id in plugged:
            await asyncio.to_thread(switches.detach_nic, definition.uuid, nic_id)
        raise


async def unplug_nics(switches: SwitchManager, definition: VmDefinition) -> None:
    for nic in definition.nics:
        await asyncio.to_thread(switches.detach_nic, definition.uuid, nic.id)
