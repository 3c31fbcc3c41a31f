"""How fast a device trains a config: the rate behind the time per step and per epoch.

No torch. The time model (`ehrplan.plan.per_gpu.estimate_time`) divides the FLOPs of an optimizer
step, counted at full padding (`ehrplan.plan.flops`), by a rate in FLOP/s. Where the rate comes
from, in this order:

- **measured on this machine**: ``ehrplan train`` records, at the end of every run of at least
  `MIN_RECORDED_STEPS` optimizer steps, the patients per second it trained, per device, preset
  and precision, in ``$EHRPLAN_CACHE/throughput.json`` (the fastest run is kept: a slower one
  met a machine loaded by other work). The rate is those patients/s times the
  preset's FLOPs per patient at full padding: an *effective* rate that includes what bucketing
  saves on real data, so the time it gives for that preset is the run's own pace. A preset that
  was never trained here gets the assumed rate below.
- **a catalog machine**: its dense peak (fp32, or the 16-bit tensor peak) x an assumed
  utilisation (`ehrplan.plan.per_gpu.DEFAULT_UTILISATION`, 0.3), stated in every answer.
- **this machine's CPU, nothing measured**: `ASSUMED_CPU_FLOPS_PER_CORE` per core.

The time rule of `recommend` and `train --auto`: an epoch of `DEFAULT_PATIENTS` patients (or
``--patients``) must train within `DEFAULT_MAX_EPOCH_HOURS` (or ``--max-epoch-hours``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ehrplan.errors import UsageError

DEFAULT_PATIENTS = 100_000  # an epoch of this many training patients, unless --patients
DEFAULT_MAX_EPOCH_HOURS = 1.0
#: Effective FLOPs (counted at full padding) per second per CPU core when nothing was measured:
#: `ehrplan train --auto` trained small-lstm (2.28e9 FLOPs per patient at full padding) at
#: 248.6 patients/s on this project's 2-core x86 CPU (README, Training), 2.8e11 per core;
#: rounded down. An assumption for any other CPU.
ASSUMED_CPU_FLOPS_PER_CORE = 2.5e11
MIN_RECORDED_STEPS = 20  # shorter runs are dominated by start-up and are not recorded
THROUGHPUT_FILE = "throughput.json"


@dataclass(frozen=True)
class Rate:
    """FLOP/s as `estimate_time` takes them (peak x utilisation), and where they come from."""

    peak_tflops: float
    utilisation: float
    source: str
    measured: bool


def check_time_rule(patients: int | None, max_epoch_hours: float | None) -> None:
    if patients is not None and patients <= 0:
        raise UsageError(f"--patients must be at least 1, not {patients}")
    if max_epoch_hours is not None and not (math.isfinite(max_epoch_hours) and max_epoch_hours > 0):
        raise UsageError(f"--max-epoch-hours must be a positive number, not {max_epoch_hours}")


def cache_dir() -> Path:
    """``$EHRPLAN_CACHE`` or ``~/.cache/ehrplan`` (the trainer's cache too)."""
    return Path(os.environ.get("EHRPLAN_CACHE") or Path.home() / ".cache" / "ehrplan")


def _records() -> dict[str, Any]:
    try:
        doc = json.loads((cache_dir() / THROUGHPUT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _key(device_key: str, preset: str, precision: str) -> str:
    return f"{device_key} | {preset} | {precision}"


def record(
    device_key: str, preset: str, precision: str, patients_per_s: float, run: str, steps: int
) -> bool:
    """Keep a run's measured pace for later plans on this device; False when not recorded."""
    if steps < MIN_RECORDED_STEPS or not patients_per_s > 0:
        return False
    from ehrplan.atomic import write_text

    doc = _records()
    key = _key(device_key, preset, precision)
    old = doc.get(key)
    runs = int(old.get("runs", 1)) + 1 if isinstance(old, dict) else 1
    if isinstance(old, dict) and float(old.get("patients_per_s") or 0) >= patients_per_s:
        # the fastest run is what the device can do; slower ones met a loaded machine
        doc[key] = {**old, "runs": runs}
    else:
        doc[key] = {
            "patients_per_s": patients_per_s,
            "run": run,
            "steps": steps,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "runs": runs,
        }
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_text(cache_dir() / THROUGHPUT_FILE, json.dumps(doc, indent=1) + "\n")
    except OSError:
        return False
    return True


def measured(device_key: str, preset: str, precision: str, flops_per_patient: float) -> Rate | None:
    """This device's recorded pace for ``preset`` in ``precision``, as a rate; None if never."""
    rec = _records().get(_key(device_key, preset, precision))
    if not isinstance(rec, dict) or not rec.get("patients_per_s"):
        return None
    pps = float(rec["patients_per_s"])
    return Rate(
        peak_tflops=pps * flops_per_patient / 1e12,
        utilisation=1.0,
        source=f"measured here: {preset} trained at {pps:,.1f} patients/s ({rec.get('run')}, "
        f"{rec.get('date')}; the fastest of {rec.get('runs', 1)} run(s))",
        measured=True,
    )


def assumed_cpu(cores: int | None) -> Rate:
    n = cores or 1
    return Rate(
        peak_tflops=n * ASSUMED_CPU_FLOPS_PER_CORE / 1e12,
        utilisation=1.0,
        source=f"assumed: {n} core(s) x {ASSUMED_CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s "
        "effective (nothing measured here yet; `ehrplan train` records its pace)",
        measured=False,
    )


def fmt_duration(seconds: float | None) -> str:
    """``3 h 12 min``, ``6 min 40 s``, ``12.3 s``, ``0.042 s``: never scientific notation."""
    if seconds is None:
        return "-"
    if seconds >= 3600:
        h, rest = divmod(round(seconds / 60), 60)
        return f"{h:,} h {rest} min" if rest else f"{h:,} h"
    if seconds >= 60:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s} s" if s else f"{m} min"
    if seconds >= 10:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    return f"{seconds:.2g} s"
