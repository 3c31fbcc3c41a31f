"""The base of every response model: unknown keys and non-finite numbers are refused."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _finite_or_none(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


Metric = Annotated[float | None, BeforeValidator(_finite_or_none)]
"""A quality metric: ``null`` where it is undefined (no events, one class, a NaN on the way)."""
ByTerm = dict[str, int]
"""Bytes (or counts) by named term, in the order the estimator reports them."""


class Out(BaseModel):
    """A part of a document: unknown keys and NaN/Infinity are refused; built on first use."""

    model_config = ConfigDict(extra="forbid", defer_build=True, allow_inf_nan=False)


class Doc(Out):
    """A whole ``--json`` document."""

    schema_version: Literal[1] = Field(description="Bumped on any incompatible change.")
