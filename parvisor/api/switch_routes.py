"""REST routes for virtual switches (``/v1/switches``); thin over SwitchManager."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

from parvisor.switch import SwitchStatus, parse_switch_definition

PREFIX = "/v1/switches"


def install_switch_routes(app: FastAPI, service: Any) -> None:
    @app.get(PREFIX, response_model=list[SwitchStatus], tags=["switches"])
    async def list_switches() -> list[SwitchStatus]:
        return await asyncio.to_thread(service.switches.list)

    @app.get(f"{PREFIX}/{{name}}", response_model=SwitchStatus, tags=["switches"])
    async def show_switch(name: str) -> SwitchStatus:
        return await asyncio.to_thread(service.switches.status, name)

    @app.post(PREFIX, response_model=SwitchStatus, status_code=201, tags=["switches"])
    async def create_switch(body: dict[str, Any]) -> SwitchStatus:
        definition = parse_switch_definition(body)
        created = await asyncio.to_thread(service.switches.create, definition)
        service.vms.event("switch", f"switch {created.name} ({created.type}) created")
        return await asyncio.to_thread(service.switches.status, created.name)

    @app.delete(f"{PREFIX}/{{name}}", tags=["switches"])
    async def delete_switch(name: str) -> dict[str, str]:
        await asyncio.to_thread(service.switches.delete, name)
        service.vms.event("switch", f"switch {name} deleted")
        return {"deleted": name}
