"""Write the API's OpenAPI document: ``python -m parvisor.api.openapi > docs/openapi.json``.

The committed document is the API contract; tests/unit/test_api_contract.py fails when
the code drifts from it (rewrite with PARVISOR_REWRITE_GOLDEN=1 after a deliberate change).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from parvisor.api.app import create_app


def openapi_document() -> dict:
    # Routes only capture the service object; building the schema never calls it.
    placeholder = SimpleNamespace(vms=None)
    return create_app(placeholder).openapi()


def render() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
