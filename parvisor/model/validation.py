"""Turn pydantic's validation errors into one readable ``InvalidInput``.

Every model built from user input goes through ``validate_model`` so that the API and
the CLI say "vcpus: Input should be less than or equal to 64" the same way everywhere,
with the full list in ``details["errors"]``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from parvisor.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)


def validate_model(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_input_from(exc) from None


def invalid_input_from(exc: ValidationError) -> InvalidInput:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return InvalidInput(f"{where}: {message}" if where else message,
                        errors=[{"field": ".".join(map(str, e["loc"])), "message": e["msg"]}
                                for e in errors])
