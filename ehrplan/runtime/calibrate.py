"""Fit the device terms of `ehrplan.plan.calibration.DeviceTerms` from measured steps (torch).

A fixed ladder of small shapes, both families, each measured in a fresh process
(`ehrplan.runtime.measure.measure_in_subprocess`: live, allocator and process peaks, and the
step's wall time); then, with least squares:

- ``lstm_scratch_per_gate_byte``: (allocator - live) / the largest LSTM call's fp32 gate bytes,
  over the LSTM shapes (through the origin);
- ``transformer_scratch_ratio``: (allocator - live) / live, over the Transformer shapes;
- CPU and MPS: process = ``runtime_baseline + allocator_retention x allocator`` (a line through
  the measured allocator peaks, so the process terms do not inherit the scratch model's error);
- CUDA: ``cuda_reserve_ratio`` = reserved / allocated (through the origin) and
  ``cuda_context_bytes`` = the median of process - reserved.

Residuals are the fitted model's relative error per shape, at the allocator and process levels,
estimated from the analytic live estimate (what an answer would use). A shape that runs out of
memory is skipped and reported; shapes left when the time budget is spent are skipped too.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ehrplan.errors import DoesNotFitError, UsageError
from ehrplan.plan.calibration import CalibrationProfile, DeviceTerms
from ehrplan.plan.config import EHRModelConfig, get_preset
from ehrplan.plan.estimator import estimate_memory
from ehrplan.plan.flops import training_step_flops
from ehrplan.plan.levels import memory_levels

#: name -> (preset, overrides), the families alternating so that a run cut short by its time
#: budget still has both; small enough that a step takes well under a second on one core,
#: large enough (up to ~100 MB) that the process terms are not all baseline.
LADDER: dict[str, tuple[str, dict[str, Any]]] = {
    "lstm-tiny-b8": ("tiny-lstm", {"batch_size": 8}),
    "transformer-tiny-b8": ("tiny-transformer", {"batch_size": 8}),
    "lstm-e32-b8": (
        "tiny-lstm",
        {"batch_size": 8, "code_embed_dim": 32, "max_codes_per_visit": 24, "max_visits": 24},
    ),
    "transformer-d128-b16": (
        "tiny-transformer",
        {
            "batch_size": 16,
            "visit_embed_dim": 128,
            "hidden_dim": 512,
            "max_visits": 128,
            "num_layers": 2,
            "num_heads": 4,
            "max_codes_per_visit": 16,
        },
    ),
    "lstm-e64-b16": (
        "tiny-lstm",
        {"batch_size": 16, "code_embed_dim": 64, "max_codes_per_visit": 24, "max_visits": 32},
    ),
    "transformer-d256-b16": (
        "tiny-transformer",
        {
            "batch_size": 16,
            "visit_embed_dim": 256,
            "hidden_dim": 1024,
            "max_visits": 128,
            "num_layers": 2,
            "num_heads": 4,
            "max_codes_per_visit": 16,
        },
    ),
}


def ladder_configs() -> dict[str, EHRModelConfig]:
    """The ladder's configs (one micro-batch each, fp32, full padding)."""
    out = {}
    for name, (preset, fields) in LADDER.items():
        update = {"gradient_accumulation_steps": 1, "use_checkpoint": False, **fields}
        out[name] = get_preset(preset).config.model_copy(update=update)
    return out


@dataclass(frozen=True)
class LadderRow:
    """One measured ladder shape."""

    name: str
    model_type: str
    batch: int
    visits: int
    codes: int
    live_bytes: int
    allocator_peak_bytes: int
    process_peak_bytes: int
    reserved_bytes: int | None
    estimated_bytes: int
    lstm_gate_bytes: int
    step_seconds: float
    flops_per_step: int


def _lsq_origin(xs: Sequence[float], ys: Sequence[float]) -> float:
    den = sum(x * x for x in xs)
    return sum(x * y for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _lsq_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line; one point: slope 1 through it."""
    if len(xs) < 2 or max(xs) == min(xs):
        return (statistics.fmean(ys) - statistics.fmean(xs), 1.0) if xs else (0.0, 1.0)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


def fit_terms(
    device: str, rows: Sequence[LadderRow], base: DeviceTerms | None = None
) -> tuple[DeviceTerms, list[str]]:
    """The terms the rows determine (the others stay as in ``base``), and their names."""
    t = base or DeviceTerms()
    fitted: list[str] = []
    lstm = [r for r in rows if r.model_type == "lstm" and r.lstm_gate_bytes]
    if lstm:
        k = _lsq_origin(
            [r.lstm_gate_bytes for r in lstm],
            [r.allocator_peak_bytes - r.live_bytes for r in lstm],
        )
        t = replace(t, lstm_scratch_per_gate_byte=round(max(k, 0.0), 4))
        fitted.append("lstm_scratch_per_gate_byte")
    tr = [r for r in rows if r.model_type == "transformer"]
    if tr:
        ratio = statistics.median(
            (r.allocator_peak_bytes - r.live_bytes) / r.live_bytes for r in tr
        )
        t = replace(t, transformer_scratch_ratio=round(max(ratio, 0.0), 4))
        fitted.append("transformer_scratch_ratio")
    if not rows:
        return t, fitted
    if device == "cuda":
        with_reserved = [r for r in rows if r.reserved_bytes]
        if with_reserved:
            ratio = _lsq_origin(
                [r.allocator_peak_bytes for r in with_reserved],
                [r.reserved_bytes or 0 for r in with_reserved],
            )
            context = statistics.median(
                r.process_peak_bytes - (r.reserved_bytes or 0) for r in with_reserved
            )
            t = replace(t, cuda_reserve_ratio=round(ratio, 4), cuda_context_bytes=int(context))
            fitted += ["cuda_reserve_ratio", "cuda_context_bytes"]
        return t, fitted
    baseline, retention = _lsq_line(
        [r.allocator_peak_bytes for r in rows], [r.process_peak_bytes for r in rows]
    )
    if device == "mps":
        retention = 1.0  # the driver's allocation is modelled as allocator peak + baseline
        baseline = statistics.median(r.process_peak_bytes - r.allocator_peak_bytes for r in rows)
    t = replace(
        t, runtime_baseline_bytes=int(max(baseline, 0)), allocator_retention=round(retention, 4)
    )
    fitted += ["runtime_baseline_bytes"] + (["allocator_retention"] if device == "cpu" else [])
    return t, fitted


def residuals(
    device: str, rows: Sequence[LadderRow], terms: DeviceTerms
) -> dict[str, dict[str, float]]:
    """Per shape, the relative error of the allocator and process levels the terms predict from
    the analytic live estimate."""
    out = {}
    for r in rows:
        est = _estimate(r, device)
        lv = memory_levels(est, terms)
        out[r.name] = {
            "allocator": round(
                (lv.allocator_peak_bytes - r.allocator_peak_bytes) / r.allocator_peak_bytes, 5
            ),
            "process": round(
                (lv.process_peak_bytes - r.process_peak_bytes) / r.process_peak_bytes, 5
            ),
        }
    return out


def _estimate(r: LadderRow, device: str) -> Any:
    cfg = ladder_configs()[r.name]
    return estimate_memory(cfg, device=device, visits=r.visits, codes=r.codes)


Measure = Callable[..., Any]


def run_ladder(
    device: str,
    *,
    budget_seconds: float = 80.0,
    measure: Measure | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[LadderRow], list[dict[str, str]]]:
    """Measure each ladder shape in a fresh process; (rows, skipped shapes with the reason)."""
    if measure is None:
        from ehrplan.runtime.measure import measure_in_subprocess

        measure = measure_in_subprocess
    rows: list[LadderRow] = []
    skipped: list[dict[str, str]] = []
    start = time.monotonic()
    for name, cfg in ladder_configs().items():
        if time.monotonic() - start > budget_seconds:
            skipped.append({"name": name, "reason": f"time budget of {budget_seconds:.0f} s spent"})
            continue
        left = budget_seconds - (time.monotonic() - start)
        try:
            m = measure(cfg, device=device, timeout=max(left, 0.0) + 120.0)
        except DoesNotFitError as e:
            skipped.append({"name": name, "reason": f"out of memory: {e}"})
            progress(f"{name}: skipped (out of memory)")
            continue
        except subprocess.TimeoutExpired:
            skipped.append({"name": name, "reason": "timed out (time budget spent)"})
            progress(f"{name}: skipped (timed out)")
            continue
        est = estimate_memory(cfg, device=device)
        rows.append(
            LadderRow(
                name=name,
                model_type=cfg.model_type,
                batch=cfg.batch_size,
                visits=cfg.max_visits,
                codes=cfg.max_codes_per_visit,
                live_bytes=int(m.measured_peak_bytes),
                allocator_peak_bytes=int(m.allocator_peak_bytes or m.measured_peak_bytes),
                process_peak_bytes=int(m.process_peak_bytes or 0),
                reserved_bytes=m.peak_reserved_bytes,
                estimated_bytes=est.total_bytes,
                lstm_gate_bytes=est.lstm_gate_bytes,
                step_seconds=round(float(m.step_seconds), 5),
                flops_per_step=training_step_flops(cfg, checkpointing=False).per_optimizer_step,
            )
        )
        progress(f"{name}: measured in {time.monotonic() - start:.0f} s")
    return rows, skipped


def device_identity(device: str) -> tuple[str, str]:
    """(device name, driver) for the profile."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(), f"CUDA {torch.version.cuda}"
    if device == "mps":
        return f"Apple {platform.machine()} GPU (MPS)", f"macOS {platform.mac_ver()[0]}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name, f"{platform.system()} {platform.release()}"


def calibrate(
    device: str,
    *,
    budget_seconds: float = 80.0,
    measure: Measure | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> CalibrationProfile:
    """Run the ladder on ``device`` and fit its terms into a profile (not yet written)."""
    import os

    import torch

    rows, skipped = run_ladder(
        device, budget_seconds=budget_seconds, measure=measure, progress=progress
    )
    if not rows:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
        raise UsageError(f"no ladder shape could be measured on {device} ({reasons})")
    terms, fitted = fit_terms(device, rows)
    name, driver = device_identity(device)
    return CalibrationProfile(
        device=device,
        device_name=name,
        driver=driver,
        torch_version=str(torch.__version__),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        terms=terms,
        residuals=residuals(device, rows, terms),
        ladder=[asdict(r) for r in rows],
        skipped=skipped,
        host=f"{platform.machine()}, {os.cpu_count()} CPUs",
        fitted=fitted,
    )
