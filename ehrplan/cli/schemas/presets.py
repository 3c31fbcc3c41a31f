"""`presets --json`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ehrplan.cli.schemas.base import Doc, Out
from ehrplan.plan.config import ModelType


class PresetRow(Out):
    """One preset: its shape, batch and exact parameter count."""

    name: str
    aliases: list[str]
    model_type: ModelType
    params: int = Field(description="Exact parameter count of the built model.")
    batch_size: int
    effective_batch_size: int
    max_visits: int
    max_codes_per_visit: int
    target: str
    description: str
    file: str


class PresetsOut(Doc):
    """`ehrplan presets --json`: the shipped presets."""

    command: Literal["presets"]
    presets: list[PresetRow]
