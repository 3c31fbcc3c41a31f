"""What `ehrplan train` trains: `--auto`'s choice, and the fit check for an explicit config.

``--auto`` probes the machine (`ehrplan.plan.hardware`), plans every preset of the model type
against the budget (`ehrplan.plan.planner.plan`, the logic of ``ehrplan recommend``) and takes its
recommendation, including the change (smaller micro-batch with more accumulation, checkpointing,
mixed precision) that makes it fit. Where the recommendation fits with room to spare, ``--auto``
also spends the room on speed: checkpointing off when the step fits without it, and fewer, larger
micro-batches (the same effective batch) when they fit.

The choice is recommend's, memory and time together: the largest preset that fits the budget
and trains an epoch of `ehrplan.plan.pace.DEFAULT_PATIENTS` patients within
`ehrplan.plan.pace.DEFAULT_MAX_EPOCH_HOURS` at this device's pace (measured by earlier runs, or
assumed; `ehrplan.plan.pace`). On a few CPU cores that rule, not a special case, keeps the
medium and large presets (sized for 24 GB and 40 GB GPUs) out; ``--preset`` still trains
anything that fits. The fit is checked in the precision the run trains in
(`ehrplan.plan.target`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ehrplan.errors import DeviceError, UsageError
from ehrplan.plan.config import EHRModelConfig, get_preset, load_presets
from ehrplan.plan.units import fmt_bytes

SIZE_ORDER = ("tiny", "small", "medium", "large")


@dataclass
class Choice:
    """The config to train and why."""

    config: EHRModelConfig
    source: str
    preset: str | None
    reasons: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None
    hardware: dict[str, Any] | None = None
    estimate_bytes: int | None = None
    precision: str | None = None  # a precision the choice needs (recommend's change), else None


def budget_for(
    device_type: str, headroom: float = 0.1, precision: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """The planner's budget for the device the run trains on (``precision``: ``--precision``,
    None or "auto" for the rule), and the hardware report."""
    from dataclasses import replace

    from ehrplan.plan.hardware import probe
    from ehrplan.plan.planner import budget_from_probe, host_budget
    from ehrplan.plan.target import check_precision
    from ehrplan.runtime.training.device import mps_recommended_max_memory

    report = probe(mps_reader=mps_recommended_max_memory if device_type == "mps" else None)
    hw = report.model_dump()
    asked = check_precision(precision)
    if device_type == "cpu":
        return replace(host_budget(report, headroom, "training on the CPU"), precision=asked), hw
    budget = budget_from_probe(report, headroom=headroom)
    if budget.device != device_type:
        raise DeviceError(f"the hardware probe found no {device_type} device")
    return replace(budget, precision=asked), hw


def estimate_bytes(
    config: EHRModelConfig, precision: str, device_type: str, calibration: str | None = None
) -> int:
    """What one training step needs as this run will train it, on the process level (what
    runs out; `ehrplan.plan.levels`)."""
    from ehrplan.plan.estimator import estimate_memory
    from ehrplan.plan.levels import process_fit_bytes

    est = estimate_memory(config, precision=precision, device=device_type)
    return process_fit_bytes(device_type, est.total_bytes, est.lstm_gate_bytes, calibration)[0]


def auto_choice(
    model_type: str,
    device_type: str,
    precision: str | None = None,
    patients: int | None = None,
) -> Choice:
    """``--auto``: `ehrplan recommend`'s choice for this machine, with its reason (``patients``:
    an epoch for the time rule, `ehrplan recommend --data`'s count of the same data set)."""
    from ehrplan.plan.planner import plan

    budget, hw = budget_for(device_type, precision=precision)
    if patients is not None:
        budget = replace(budget, patients=patients)
    result = plan(budget, [model_type])
    rec = result["recommendation"].get(model_type)
    if rec is None:
        raise UsageError(
            f"no {model_type} preset fits {budget.label} "
            f"(budget {fmt_bytes(budget.budget_bytes)}), even after the usual changes"
        )
    name, changes = rec["preset"], dict(rec["changes"] or {})
    reasons = [
        f"budget: {budget.label}, {fmt_bytes(budget.usable_bytes)} usable, "
        f"{fmt_bytes(budget.budget_bytes)} after {budget.headroom:.0%} headroom",
        f"recommend: {rec['reason']}",
    ]
    if rec["change"]:
        reasons.append(f"with {rec['change']} ({rec['flags']})")
    base = get_preset(name).config
    picked_precision = changes.pop("precision", None)
    config = EHRModelConfig.model_validate({**base.model_dump(), **changes})
    if picked_precision is not None:
        budget = replace(budget, precision=picked_precision)
    config = spend_room_on_speed(config, budget, name, reasons, changes)
    source = f"auto: preset {name}" + (
        " + " + ", ".join(f"{k}={v}" for k, v in changes.items()) if changes else ""
    )
    return Choice(
        config=config,
        source=source,
        preset=name,
        reasons=reasons,
        budget=budget.as_dict(),
        hardware=hw,
        precision=picked_precision,
    )


def spend_room_on_speed(
    config: EHRModelConfig, budget: Any, name: str, reasons: list[str], changes: dict[str, Any]
) -> EHRModelConfig:
    """``--auto``'s changes for speed where the budget has room (memory fixes in ``changes``
    stand): checkpointing off, then fewer, larger micro-batches. Appends its reasons and changes.
    """
    from ehrplan.plan.planner import fit

    if config.use_checkpoint and "use_checkpoint" not in changes:
        # checkpointing trades a second forward pass for memory; when the step fits without it,
        # that trade buys nothing
        plain = config.model_copy(update={"use_checkpoint": False})
        f = fit(plain, budget, name)
        if f.fits:
            reasons.append(
                f"checkpointing off: the step fits without it ({fmt_bytes(f.estimate_bytes)} "
                f"<= {fmt_bytes(budget.budget_bytes)}), which saves recomputing the forward pass"
            )
            config = plain
            changes["use_checkpoint"] = False
    if config.gradient_accumulation_steps > 1 and "batch_size" not in changes:
        config = _fold_accumulation(config, budget, name, reasons, changes)
    return config


def _fold_accumulation(
    config: EHRModelConfig, budget: Any, name: str, reasons: list[str], changes: dict[str, Any]
) -> EHRModelConfig:
    """The largest micro-batch with the same effective batch that fits the budget.

    Accumulation exists to fit a device smaller than the effective batch: where more of it fits
    at once, fewer and larger micro-batches do the same arithmetic (the same patients per
    optimizer step) with fewer, larger kernel calls: on one CPU core ``--auto``'s small-lstm at
    32 x 1 (checkpointing off too) trained 283 patients/s against 130 for the preset's 4 x 8
    (``benchmarks/train_throughput.py``, rows in ``benchmarks/data/``).
    """
    from ehrplan.plan.planner import fit, larger_micro_batches

    for b, acc in larger_micro_batches(config):
        update = {"batch_size": b, "gradient_accumulation_steps": acc}
        bigger = EHRModelConfig.model_validate({**config.model_dump(), **update})
        f = fit(bigger, budget, name)
        if f.fits:
            reasons.append(
                f"micro-batch {config.batch_size} x {config.gradient_accumulation_steps} "
                f"accumulation -> {b} x {acc}: the same {config.effective_batch_size} patients "
                f"per optimizer step fit in fewer micro-batches ({fmt_bytes(f.estimate_bytes)} "
                f"<= {fmt_bytes(budget.budget_bytes)}), which trains faster"
            )
            changes.update(update)
            return bigger
    return config


def explicit_choice(
    config: EHRModelConfig, source: str, device_type: str, precision: str | None = None
) -> Choice:
    """A config the user named, with the budget of the device it will train on."""
    budget, hw = budget_for(device_type, precision=precision)
    preset = source.split(" + ")[0].removeprefix("preset ") if source.startswith("preset") else None
    return Choice(config=config, source=source, preset=preset, budget=budget.as_dict(), hardware=hw)


def check_fits(choice: Choice, precision: str, device_type: str) -> int:
    """The run's estimated peak; a config that does not fit its device is a one-line error."""
    est = estimate_bytes(choice.config, precision, device_type)
    choice.estimate_bytes = est
    budget = choice.budget or {}
    limit = budget.get("budget_bytes")
    if limit is not None and est > limit:
        raise UsageError(
            f"{choice.source} does not fit {budget.get('label')}: estimated peak "
            f"{fmt_bytes(est)} ({precision}) > budget {fmt_bytes(limit)} "
            "(see `ehrplan recommend`, or use --auto)"
        )
    return est


def preset_sizes() -> list[str]:
    return sorted({n.split("-")[0] for n in load_presets()}, key=SIZE_ORDER.index)
