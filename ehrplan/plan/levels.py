"""Three levels of peak memory, estimated (no torch): live tensors, allocator, process/device.

`ehrplan.plan.estimator.estimate_memory` predicts level 1, the live tensor bytes of a step.
An out-of-memory happens at level 3 (``shared/docs/memory-truth.md``), so the planner decides fit
on `MemoryLevels.fit_bytes`:

1. ``live_bytes``: the estimator's ``total_bytes``.
2. ``allocator_peak_bytes`` = live + kernel scratch: memory a kernel allocates and frees inside
   itself, which the dispatcher never sees (CPU oneDNN LSTM backward scratchpad; cuDNN workspace)
   = ``lstm_scratch_per_gate_byte x`` the largest LSTM call's fp32 gate bytes, or
   ``transformer_scratch_ratio x`` live for the Transformer.
3. ``process_peak_bytes``: what the operating system or the driver counts.
   - CPU: ``runtime_baseline + allocator_retention x allocator_peak`` (peak RSS growth of a
     process running the step with `ehrplan.runtime.allocator`'s settings, as train and dry-run
     do);
   - CUDA: ``cuda_reserve_ratio x allocator_peak + cuda_context`` (``max_memory_reserved`` plus
     the context);
   - MPS: ``runtime_baseline + allocator_peak`` (the driver's allocation).

The terms are `ehrplan.plan.calibration.DeviceTerms`: a profile written by ``ehrplan calibrate``
when one exists for the device, else the stated assumptions (``uncalibrated: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ehrplan.plan.calibration import (
    Calibration,
    DeviceTerms,
    resolve_calibration,
    uncalibrated_terms,
)
from ehrplan.plan.estimator import MemoryEstimate
from ehrplan.plan.hardware import CUDA_CONTEXT_ALLOWANCE


@dataclass(frozen=True)
class MemoryLevels:
    """The three levels for one estimate, each with the terms it adds."""

    device: str
    live_bytes: int
    kernel_scratch_bytes: int
    allocator_peak_bytes: int
    process_terms: dict[str, int]
    process_peak_bytes: int
    budget_excluded_bytes: int
    """Part of the process level that device budgets already leave out (the CUDA context
    allowance of `ehrplan.plan.hardware`, at most the modelled context)."""
    calibration: str
    """``calibrated on <device>, <date>`` or ``uncalibrated: <assumptions>``."""
    models: dict[str, str] = field(default_factory=dict)

    @property
    def fit_bytes(self) -> int:
        """What has to fit a budget: the process level, less what the budget already excludes."""
        return self.process_peak_bytes - self.budget_excluded_bytes

    def to_json(self) -> dict[str, object]:
        return {
            "live_bytes": self.live_bytes,
            "kernel_scratch_bytes": self.kernel_scratch_bytes,
            "allocator_peak_bytes": self.allocator_peak_bytes,
            "process_terms": dict(self.process_terms),
            "process_peak_bytes": self.process_peak_bytes,
            "fit_bytes": self.fit_bytes,
            "models": dict(self.models),
        }


def memory_levels(
    est: MemoryEstimate, terms: DeviceTerms | None = None, calibration: str = ""
) -> MemoryLevels:
    """Levels 2 and 3 on top of ``est`` (level 1) with ``terms`` (default: uncalibrated)."""
    return levels_for(est.device, est.total_bytes, est.lstm_gate_bytes, terms, calibration)


def levels_for(
    device: str,
    live: int,
    lstm_gate_bytes: int = 0,
    terms: DeviceTerms | None = None,
    calibration: str = "",
) -> MemoryLevels:
    """Levels 2 and 3 for ``live`` bytes on ``device`` (e.g. a per-GPU DDP/FSDP estimate)."""
    t = terms or uncalibrated_terms(device)
    if lstm_gate_bytes:
        scratch = int(t.lstm_scratch_per_gate_byte * lstm_gate_bytes)
        scratch_model = f"{t.lstm_scratch_per_gate_byte:.3g} x the largest LSTM call's fp32 gates"
    else:
        scratch = int(t.transformer_scratch_ratio * live)
        scratch_model = f"{t.transformer_scratch_ratio:.3g} x live (Transformer)"
    allocator = live + scratch
    excluded = 0
    if device == "cuda":
        reserve = int(allocator * (t.cuda_reserve_ratio - 1))
        process_terms = {"allocator_reserve": reserve, "cuda_context": t.cuda_context_bytes}
        process_model = (
            f"allocator peak x {t.cuda_reserve_ratio:.3g} (reserved) + CUDA context "
            f"{t.cuda_context_bytes / 2**20:.0f} MiB"
        )
        # the budget already left out its context allowance (up to the context itself)
        excluded = min(CUDA_CONTEXT_ALLOWANCE, t.cuda_context_bytes)
    elif device == "mps":
        process_terms = {"runtime_baseline": t.runtime_baseline_bytes}
        process_model = "allocator peak + runtime baseline (driver allocation)"
    else:
        retained = int(allocator * (t.allocator_retention - 1))
        process_terms = {
            "allocator_retention": retained,
            "runtime_baseline": t.runtime_baseline_bytes,
        }
        process_model = (
            f"allocator peak x {t.allocator_retention:.3g} (retention) + runtime baseline "
            f"{t.runtime_baseline_bytes / 2**20:.0f} MiB (peak RSS growth)"
        )
    return MemoryLevels(
        device=device,
        live_bytes=live,
        kernel_scratch_bytes=scratch,
        allocator_peak_bytes=allocator,
        process_terms=process_terms,
        process_peak_bytes=allocator + sum(process_terms.values()),
        budget_excluded_bytes=excluded,
        calibration=calibration,
        models={
            "allocator_peak_bytes": f"live + kernel scratch ({scratch_model})",
            "process_peak_bytes": process_model,
        },
    )


def calibrated_levels(
    est: MemoryEstimate, calibration_file: Path | None = None
) -> tuple[MemoryLevels, Calibration]:
    """`memory_levels` with the profile that matches ``est``'s device (or ``calibration_file``)."""
    cal = resolve_calibration(est.device, calibration_file)
    return memory_levels(est, cal.terms, cal.label), cal


def process_fit_bytes(
    device: str,
    live: int,
    lstm_gate_bytes: int = 0,
    calibration_file: str | None = None,
    context_excluded: bool = True,
) -> tuple[int, str, list[str]]:
    """What has to fit a budget on ``device`` (the process level, less the CUDA context
    allowance when the budget already left it out: probed and catalog GPUs, not a declared
    size), the calibration line, and warnings: the planner's one call."""
    cal = resolve_calibration(device, Path(calibration_file) if calibration_file else None)
    lv = levels_for(device, live, lstm_gate_bytes, cal.terms, cal.label)
    need = lv.fit_bytes if context_excluded else lv.process_peak_bytes
    return need, cal.label, cal.warnings
