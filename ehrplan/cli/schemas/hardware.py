"""`hardware --json`: the probe's own model, and the budget per device."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ehrplan.cli.schemas.base import Doc, Out
from ehrplan.plan.hardware import HardwareReport


class DeviceBudget(Out):
    """Usable memory of one device and the budget at the headroom."""

    device: str
    name: str
    usable_bytes: int
    rule: str = Field(description="How the usable memory was decided.")
    budget_bytes: int


class HardwareOut(Doc):
    """`ehrplan hardware --json`: what this machine has and each device's memory budget."""

    command: Literal["hardware"]
    hardware: HardwareReport
    headroom: float
    budgets: list[DeviceBudget]
    bug_report: str
