"""The base of every typed config block: unknown keys are errors, and numbers are numbers.

pydantic's lax mode turns `true` into 1 for an int field (`r: true`, `num_target_steps: true`) and accepts
`.inf` / `.nan` for a float (`lr: .inf` passed validate). A count or a rate given as a boolean is a mistake in
the YAML or an override, not a value: refused here, once, for every block that derives from `StrictValues`.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _number_only(annotation: Any) -> bool:
    """Whether a field typed `annotation` holds only numbers (int, float; optionally None): a bool is then a
    mistake. Any other type is left to pydantic, which refuses a bool where it does not fit."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _number_only(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        arms = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return bool(arms) and all(_number_only(arm) for arm in arms)
    return annotation in (int, float)


class StrictValues(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _number_only(field.annotation):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value
