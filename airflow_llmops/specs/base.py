"""Common base of the typed specs: strict validation, readable errors, JSON round-trip."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self


class SpecValidationError(ValueError):
    """A spec failed validation; the message names every bad field and the value it got."""

    def __init__(self, spec_name: str, problems: list[str]) -> None:
        self.spec_name = spec_name
        self.problems = problems
        super().__init__(f"invalid {spec_name}: " + "; ".join(problems))


def _describe(error: Mapping[str, Any], spec_name: str) -> str:
    loc = ".".join(str(part) for part in error.get("loc", ()))
    field = f"{spec_name}.{loc}" if loc else spec_name
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    # A model-level check already names the values it compared; repeating the whole input adds noise.
    if loc and "input" in error and error.get("type") != "missing":
        value = error["input"]
        shown = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        return f"{field}: {msg} (got {shown})"
    return f"{field}: {msg}"


class Spec(BaseModel):
    """Immutable, strictly validated description of a unit of work.

    Unknown keys are rejected (a typo must not be ignored silently) and every spec survives
    ``Spec.from_json(spec.to_json()) == spec``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)

    @classmethod
    def parse(cls, value: Self | Mapping[str, Any] | str | None = None, /, **overrides: Any) -> Self:
        """Build a spec from an instance, a mapping, or a JSON string, applying keyword overrides.

        Raises :class:`SpecValidationError` naming each bad field and value.
        """
        if isinstance(value, cls) and not overrides:
            return value
        if isinstance(value, cls):
            data: dict[str, Any] = value.model_dump(mode="json")
        elif isinstance(value, str):
            try:
                loaded = json.loads(value)
            except json.JSONDecodeError as err:
                raise SpecValidationError(cls.__name__, [f"not valid JSON: {err}"]) from None
            if not isinstance(loaded, dict):
                raise SpecValidationError(cls.__name__, [f"expected a JSON object, got {type(loaded).__name__}"])
            data = loaded
        elif value is None:
            data = {}
        elif isinstance(value, Mapping):
            data = dict(value)
        else:
            raise SpecValidationError(
                cls.__name__, [f"expected a {cls.__name__}, a mapping or a JSON string, got {type(value).__name__}"]
            )
        data.update(overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise SpecValidationError(
                cls.__name__, [_describe(e, cls.__name__) for e in err.errors(include_url=False)]
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (what goes to XCom, to a job's spec file, or into MLflow params)."""
        return self.model_dump(mode="json")

    def to_json(self, *, indent: int | None = None) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.parse(text)
