"""Shared Pydantic base class and constrained types for recipe sections (torch-free).

Cross-field rules are written once, as `cross_field_problems(values)` over a plain mapping, and run both when
the section's own fields validate and when they do not (on the raw values), so one run reports every problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import Self


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """Return messages for rules that involve several fields; each message names every field it involves.

        Args:
            values: the section's values, raw (possibly invalid) or validated.
        """
        del values
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _cross_checks(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        try:
            result = handler(data)
        except ValidationError as exc:
            problems = cls.cross_field_problems(data) if isinstance(data, Mapping) else []
            if not problems:
                raise
            details: list[InitErrorDetails] = []
            for err in exc.errors():
                item: InitErrorDetails
                if err["type"] == "value_error":
                    message = str(err["msg"]).removeprefix("Value error, ")
                    item = {
                        "type": PydanticCustomError("value_error", message),
                        "loc": err["loc"],
                        "input": err["input"],
                    }
                else:
                    item = {"type": err["type"], "loc": err["loc"], "input": err["input"]}
                    if "ctx" in err:
                        item["ctx"] = err["ctx"]
                details.append(item)
            for message in problems:
                details.append(
                    {"type": PydanticCustomError("value_error", message), "loc": (), "input": data}
                )
            raise ValidationError.from_exception_data(cls.__name__, details) from None
        problems = cls.cross_field_problems(
            {name: getattr(result, name) for name in type(result).model_fields}
        )
        if problems:
            raise ValueError("; ".join(problems))
        return result


def as_number(value: Any) -> float | None:
    """Coerce a raw recipe value to a number, or None when it is not one (then field errors speak)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
