"""What fits: budgets per device, every preset against them, and the cheapest change that helps.

The logic behind `ehrplan recommend` and `ehrplan validate`. No torch: memory comes from
`ehrplan.plan.estimator.estimate_memory` (analytic); its caveats for the device (an unmeasured CUDA
or MPS path) travel with every answer as ``estimate_notes``.

Rules, written once:

- Budget = usable memory x (1 - headroom). Usable: see `ehrplan.plan.hardware` (NVIDIA: total less
  driver reserve and CUDA context; Apple: GPU working set; CPU: the RAM available now, within the
  cgroup limit, with the total beside it: `host_budget`).
- Time (`ehrplan.plan.pace`): the recommendation is the largest preset that fits memory and trains
  an epoch of ``Budget.patients`` within ``Budget.max_epoch_hours``; larger presets that fit
  memory but not time are listed (``excluded_by_time``) with the reason (`_reason`), which
  `ehrplan train --auto` prints unchanged.
- Device and precision: `ehrplan.plan.target` (one rule for every command; the trainer trains
  what was estimated).
- Data parallel over N GPUs (`ehrplan.plan.per_gpu`): DDP (default) holds a full replica, Adam state
  and gradient buckets on every GPU; FSDP (``--strategy fsdp``) shards them and all-gathers one
  unit at a time. Each GPU runs its share of the effective batch (`data_parallel_settings`); the
  peak is per GPU, the budget that of the smallest GPU used, the job total is N x the peak.
- The cheapest change, tried in this order (by how much it changes the training): (1) a smaller
  micro-batch with more accumulation steps, same effective batch (same gradient, less
  throughput); (2) gradient checkpointing (same gradient, one more forward per step); (3) both;
  (4) the device's mixed precision where the config would train in fp32 (different
  arithmetic), alone and then with (1)-(3). The first that fits is reported, re-estimated, with
  the flags that make it (`change_flags`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ehrplan.errors import DeviceError, UsageError
from ehrplan.plan.catalog import CatalogDevice, get_target
from ehrplan.plan.config import EHRModelConfig, load_presets
from ehrplan.plan.estimator import estimate_memory
from ehrplan.plan.flops import training_step_flops
from ehrplan.plan.hardware import GIB, HardwareReport
from ehrplan.plan.levels import process_fit_bytes
from ehrplan.plan.pace import (
    DEFAULT_MAX_EPOCH_HOURS,
    DEFAULT_PATIENTS,
    Rate,
    assumed_cpu,
    fmt_duration,
    measured,
)
from ehrplan.plan.per_gpu import DEFAULT_UTILISATION, estimate_parallel, estimate_time
from ehrplan.plan.target import DeviceTarget, Resolved, declared, from_catalog, from_probe, resolve
from ehrplan.plan.units import Size, fmt_bytes

DEFAULT_HEADROOM = 0.1

#: The seed's hardware tiers (shared/seed/resource-aware-model-configs.md, Overview).
SEED_TIERS: dict[str, str] = {
    "small": "M1 MacBook 16 GB",
    "medium": "24 GB GPUs (A10, RTX 4090)",
    "large": "40 GB+ GPUs (A40, A100)",
}


@dataclass(frozen=True)
class Budget:
    """What one device may spend on a training step, and which device (`ehrplan.plan.target`)."""

    label: str
    source: str  # "catalog", "probe" or "declared"
    usable_bytes: int
    headroom: float
    target: DeviceTarget
    gpus: int = 1
    nominal_bytes: int | None = None  # memory as sold, for the seed's tiers
    notes: tuple[str, ...] = ()
    strategy: str = "ddp"  # with gpus > 1: ddp or fsdp (`ehrplan.plan.per_gpu`)
    fp32_tflops: float | None = None  # catalog: dense peaks, for the time estimate
    half_tflops: float | None = None
    utilisation: float = DEFAULT_UTILISATION
    precision: str | None = None  # --precision: overrides the rule for every config
    total_bytes: int | None = None  # host: what the machine has (usable is what it can give now)
    device_key: str | None = None  # probe: names this machine's device for measured rates
    cores: int | None = None  # probe, CPU: cores for the assumed rate (`ehrplan.plan.pace`)
    patients: int = DEFAULT_PATIENTS  # the time rule: an epoch of this many patients ...
    max_epoch_hours: float = DEFAULT_MAX_EPOCH_HOURS  # ... within this many hours
    data_bytes: int = 0  # --data: host RAM the data takes, out of this budget (CPU, unified MPS)
    calibration: str | None = None  # an explicit profile (--calibration); else the cached one

    @property
    def device(self) -> str:
        return self.target.device

    @property
    def budget_bytes(self) -> int:
        # the usable memory less the safety margin the user asked for, less the data's share
        return int(self.usable_bytes * (1.0 - self.headroom)) - self.data_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "source": self.source,
            "device": self.device,
            "gpus": self.gpus,
            "strategy": self.strategy if self.gpus > 1 else "single",
            "nominal_bytes": self.nominal_bytes,
            "total_bytes": self.total_bytes,
            "usable_bytes": self.usable_bytes,
            "headroom": self.headroom,
            "budget_bytes": self.budget_bytes,
            "data_bytes": self.data_bytes,
            "mixed_precision_dtype": self.target.native_half or "fp32",
            "target": self.target.as_dict(),
            "precision_requested": self.precision,
            "device_key": self.device_key,
            "time_rule": {"patients": self.patients, "max_epoch_hours": self.max_epoch_hours},
            "notes": list(self.notes),
        }


def _check_headroom(headroom: float) -> None:
    if not 0.0 <= headroom < 1.0:
        raise UsageError(f"--headroom must be a fraction in [0, 1), not {headroom}")


def _check_gpus(gpus: int) -> None:
    if gpus < 1:
        raise UsageError(f"--gpus must be at least 1, not {gpus}")


def budget_from_target(
    target: str | CatalogDevice, headroom: float = DEFAULT_HEADROOM, gpus: int = 1
) -> Budget:
    """The budget of a catalog machine (`presets/hardware.toml`)."""
    _check_headroom(headroom)
    _check_gpus(gpus)
    row = get_target(target) if isinstance(target, str) else target
    if row.kind == "apple" and gpus != 1:
        raise UsageError(f"{row.label} has one GPU; --gpus {gpus} does not apply")
    notes = [f"usable: {_usable_rule(row)}"]
    return Budget(
        label=f"{row.label} (catalog '{row.name}')" + (f" x {gpus}" if gpus > 1 else ""),
        source="catalog",
        usable_bytes=row.usable_bytes,
        headroom=headroom,
        target=from_catalog(row),
        gpus=gpus,
        nominal_bytes=row.memory_bytes,
        notes=tuple(notes),
        fp32_tflops=row.fp32_tflops,
        half_tflops=row.half_tflops,
    )


def _usable_rule(row: CatalogDevice) -> str:
    if row.kind == "nvidia":
        return f"{row.reported_total_mib:,} MiB reported total less the CUDA context allowance"
    return "the GPU working set estimated from the unified memory (Apple documents no fraction)"


def budget_from_size(
    size: Size,
    headroom: float = DEFAULT_HEADROOM,
    device: str = "cuda",
    gpus: int = 1,
    target: DeviceTarget | None = None,
) -> Budget:
    """A declared budget (``--memory``/``--budget``): taken as usable as it stands, on a device
    of type ``device`` (`ehrplan.plan.target.declared` unless ``target`` names it)."""
    _check_headroom(headroom)
    _check_gpus(gpus)
    target = target or declared(device)
    return Budget(
        label=f"{size.text} declared" + (f" x {gpus}" if gpus > 1 else ""),
        source="declared",
        usable_bytes=size.bytes,
        headroom=headroom,
        target=target,
        gpus=gpus,
        nominal_bytes=size.bytes,
        notes=(size.reading, f"assumed device: {device}, taken as usable (nothing deducted)"),
    )


def budget_from_probe(
    report: HardwareReport, headroom: float = DEFAULT_HEADROOM, gpus: int | None = None
) -> Budget:
    """The budget of this machine: visible NVIDIA GPUs, else the Apple GPU, else host RAM."""
    _check_headroom(headroom)
    if gpus is not None:
        _check_gpus(gpus)
    if report.nvidia:
        n = gpus or 1
        if n > len(report.nvidia):
            raise DeviceError(f"--gpus {n}: only {len(report.nvidia)} CUDA device(s) visible here")
        used = report.nvidia[:n]
        smallest = min(used, key=lambda g: g.usable_bytes)
        row = catalog_row_named(smallest.name)
        return Budget(
            label=", ".join(f"cuda:{g.cuda_index} {g.name}" for g in used),
            source="probe",
            usable_bytes=smallest.usable_bytes,
            headroom=headroom,
            target=from_probe(report.model_copy(update={"nvidia": used}), "cuda"),
            device_key=f"cuda {smallest.name} x {n}",
            gpus=n,
            nominal_bytes=smallest.total_bytes,
            notes=("usable: total less driver reserve and CUDA context (smallest GPU used)",),
            fp32_tflops=row.fp32_tflops if row else None,
            half_tflops=row.half_tflops if row else None,
        )
    if gpus not in (None, 1):
        raise DeviceError(f"--gpus {gpus}: no CUDA device is visible here")
    a = report.apple
    if a is not None and a.working_set_bytes and not a.rosetta:
        return Budget(
            label=f"{a.chip or 'Apple Silicon'} GPU (MPS)",
            source="probe",
            usable_bytes=a.working_set_bytes,
            headroom=headroom,
            target=from_probe(report, "mps"),
            device_key=f"mps {a.chip or 'Apple Silicon'}",
            nominal_bytes=a.unified_memory_bytes,
            notes=(f"usable: {a.working_set_source}",),
        )
    return host_budget(report, headroom, "no GPU found: planning for the CPU")


def host_budget(report: HardwareReport, headroom: float, why: str) -> Budget:
    """The budget of host RAM for a CPU step: what the OS can give a process now (available
    RAM, within the container's cgroup limit where one applies), less the headroom. The total
    (RAM, or the cgroup limit) is shown beside it; `recommend`, `validate` and `dry-run` all
    decide a CPU fit on this one budget."""
    host = report.host
    usable = host.available_bytes if host.available_bytes is not None else host.budget_bytes
    if usable is None:
        raise DeviceError("host RAM could not be read; give --memory or --target")
    cg = host.cgroup_limit_bytes
    total = f"{_gib(host.budget_bytes)} total" if host.budget_bytes is not None else "total unknown"
    limit = f" (cgroup v{host.cgroup_version} limit)" if cg is not None else ""
    return Budget(
        label=f"host RAM ({report.cpu.model or 'CPU'})",
        source="probe",
        usable_bytes=usable,
        headroom=headroom,
        target=from_probe(report, "cpu"),
        total_bytes=host.budget_bytes,
        device_key=f"cpu {report.cpu.model or 'unknown'}",
        cores=report.cpu.logical_cores,
        notes=(f"usable: {_gib(usable)} available now of {total}{limit}", why),
    )


# --------------------------------------------------------------------------------------------
# one config against one budget


@dataclass(frozen=True)
class Fit:
    """A config's estimated peak against a budget."""

    name: str
    config: EHRModelConfig
    resolved: Resolved
    estimate_bytes: int
    budget_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    gpus: int = 1
    parallel: dict[str, Any] | None = None  # `ParallelEstimate.as_dict()` when gpus > 1
    time: dict[str, Any] | None = None  # `TimeEstimate.as_dict()` where the budget has a peak
    notes: tuple[str, ...] = ()  # the estimator's caveats (e.g. an unmeasured device path)

    @property
    def precision(self) -> str:
        return self.resolved.precision

    @property
    def fits(self) -> bool:
        return self.estimate_bytes <= self.budget_bytes

    @property
    def shortfall_bytes(self) -> int:
        return max(self.estimate_bytes - self.budget_bytes, 0)

    def as_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": self.name,
            "model_type": c.model_type,
            "device": self.resolved.device,
            "precision": self.precision,
            "precision_reason": self.resolved.reason,
            "batch_size": c.batch_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "effective_batch_size": c.effective_batch_size,
            "checkpointing": c.use_checkpoint,
            "estimate_bytes": self.estimate_bytes,
            "estimate_notes": list(self.notes),
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "shortfall_bytes": self.shortfall_bytes,
            "breakdown": dict(self.breakdown),
            "per_gpu_bytes": self.estimate_bytes,
            "job_bytes": self.estimate_bytes * self.gpus,  # every GPU of the job together
            "parallel": self.parallel,
            "time": self.time,
        }


def precision_for(config: EHRModelConfig, budget: Budget) -> Resolved:
    """The precision ``config`` trains in on the budget's device (`ehrplan.plan.target.resolve`)."""
    return resolve(config, budget.target, budget.precision)


def rate_for(config: EHRModelConfig, budget: Budget, precision: str, name: str) -> Rate | None:
    """The rate behind the time estimate (`ehrplan.plan.pace`): this machine's measured pace
    for the preset, else (CPU) the assumed one; a catalog machine's (or a local GPU the catalog
    names) peak x utilisation; None for a declared budget or an unknown, unmeasured GPU."""
    if budget.source == "probe":
        if budget.device_key is not None:
            per_patient = training_step_flops(config, checkpointing=config.use_checkpoint)
            fpp = per_patient.per_optimizer_step / config.effective_batch_size
            r = measured(budget.device_key, name, precision, fpp)
            if r is not None:
                return r
        if budget.device == "cpu":
            return assumed_cpu(budget.cores)
        # a local GPU the catalog names (`catalog_row_named`): its peaks, below
    peak = budget.fp32_tflops if precision == "fp32" else budget.half_tflops or budget.fp32_tflops
    if not peak:
        return None
    kind = "fp32" if precision == "fp32" or not budget.half_tflops else "16-bit"
    return Rate(
        peak_tflops=peak,
        utilisation=budget.utilisation,
        source=f"catalog: dense {kind} peak {peak:g} TFLOPS x {budget.utilisation:.0%} "
        "utilisation (assumed)",
        measured=False,
    )


def catalog_row_named(gpu_name: str) -> CatalogDevice | None:
    """The catalog row of a GPU the probe found, by its exact name as NVML reports it (e.g.
    "NVIDIA A10", "NVIDIA L4"); None for a name the catalog does not spell the same way."""
    from ehrplan.plan.catalog import load_catalog

    want = gpu_name.strip().lower()
    return next((r for r in load_catalog().values() if r.label.lower() == want), None)


def fit(config: EHRModelConfig, budget: Budget, name: str = "config") -> Fit:
    resolved = precision_for(config, budget)
    precision = resolved.precision
    parallel = None
    dp = data_parallel_settings(config, budget.gpus)
    if budget.gpus > 1:
        pe = estimate_parallel(
            config,
            world_size=budget.gpus,
            strategy=budget.strategy,
            precision=precision,
            device=budget.device,
            checkpointing=config.use_checkpoint,
            micro_batch=dp["batch_size"],
            accumulation=dp["gradient_accumulation_steps"],
        )
        total, notes, breakdown = pe.per_device_bytes, pe.notes, dict(pe.breakdown)
        parallel = pe.as_dict()
    est = estimate_memory(
        config,
        precision=precision,
        device=budget.device,
        batch_size=dp["batch_size"] if budget.gpus > 1 else config.batch_size,
        checkpointing=config.use_checkpoint,
    )
    if budget.gpus <= 1:
        total, notes, breakdown = est.total_bytes, est.notes, dict(est.breakdown)
    # fit is decided on the process level, what the OS or the driver runs out of
    # (`ehrplan.plan.levels`): live peak + kernel scratch + allocator/runtime terms
    total, label, _ = process_fit_bytes(
        budget.device,
        total,
        est.lstm_gate_bytes,
        budget.calibration,
    )
    notes = [*notes, f"process level; {label}"]
    rate = rate_for(config, budget, precision, name)
    time = None
    if rate is not None:
        t = estimate_time(
            config,
            peak_tflops=rate.peak_tflops,
            world_size=budget.gpus,
            utilisation=rate.utilisation,
            patients=budget.patients,
            checkpointing=config.use_checkpoint,
            micro_batch=dp["batch_size"],
            accumulation=dp["gradient_accumulation_steps"],
            throughput_source=rate.source,
        )
        time = t.as_dict() | {
            "rate_measured": rate.measured,
            "step": fmt_duration(t.seconds_per_step),
            "epoch": fmt_duration(t.seconds_per_epoch),
            "within_limit": (t.seconds_per_epoch or 0) <= budget.max_epoch_hours * 3600,
        }
    return Fit(
        name=name,
        config=config,
        resolved=resolved,
        estimate_bytes=total,
        notes=tuple(notes),
        budget_bytes=budget.budget_bytes,
        breakdown=breakdown,
        gpus=budget.gpus,
        parallel=parallel,
        time=time,
    )


# --------------------------------------------------------------------------------------------
# the cheapest change


@dataclass(frozen=True)
class Adjustment:
    """A named change to a config, the command-line flags that make it, and its re-estimated fit.

    ``flags`` pasted after the config in `ehrplan validate` or `ehrplan estimate` reproduce
    ``fit`` (a test runs every change the catalog's targets produce).
    """

    description: str
    changes: dict[str, Any]
    flags: str
    fit: Fit

    def as_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "changes": self.changes,
            "flags": self.flags,
            **self.fit.as_dict(),
        }


def _micro_batches(config: EHRModelConfig) -> list[tuple[int, int]]:
    """Smaller micro-batches that keep the effective batch: (batch, accumulation), largest first."""
    eff = config.effective_batch_size
    out = []
    b = config.batch_size // 2
    while b >= 1:
        if eff % b == 0:
            out.append((b, eff // b))
        b //= 2
    return out


def larger_micro_batches(config: EHRModelConfig) -> list[tuple[int, int]]:
    """Larger micro-batches that keep the effective batch with less accumulation:
    (batch, accumulation), largest (no accumulation) first."""
    eff = config.effective_batch_size
    return [(eff // a, a) for a in range(1, config.gradient_accumulation_steps) if eff % a == 0]


def _with(config: EHRModelConfig, changes: dict[str, Any]) -> EHRModelConfig:
    fields = {k: v for k, v in changes.items() if k != "precision"}
    return EHRModelConfig.model_validate({**config.model_dump(), **fields})


def _describe(config: EHRModelConfig, changes: dict[str, Any]) -> str:
    parts = []
    if "batch_size" in changes:
        parts.append(
            f"micro-batch {config.batch_size} -> {changes['batch_size']} with "
            f"{changes['gradient_accumulation_steps']} accumulation steps "
            f"(effective batch {config.effective_batch_size} kept)"
        )
    if changes.get("use_checkpoint"):
        parts.append("gradient checkpointing on")
    if "precision" in changes:
        parts.append(f"mixed precision ({changes['precision']})")
    return "; ".join(parts)


def change_flags(changes: dict[str, Any]) -> str:
    """The flags of `validate`/`estimate` that make ``changes``, ready to paste."""
    flags = []
    if "batch_size" in changes:
        flags.append(
            f"--batch-size {changes['batch_size']} "
            f"--set gradient_accumulation_steps={changes['gradient_accumulation_steps']}"
        )
    if changes.get("use_checkpoint"):
        flags.append("--checkpointing")
    if "precision" in changes:
        flags.append(f"--precision {changes['precision']}")
    return " ".join(flags)


def _candidates(config: EHRModelConfig, budget: Budget) -> Iterable[dict[str, Any]]:
    """Changes in the order documented at the top of this module."""
    batches = [
        {"batch_size": b, "gradient_accumulation_steps": a} for b, a in _micro_batches(config)
    ]
    same_arithmetic: list[dict[str, Any]] = list(batches)  # (1)
    if not config.use_checkpoint:
        same_arithmetic.append({"use_checkpoint": True})  # (2)
        same_arithmetic += [{"use_checkpoint": True, **b} for b in batches]  # (3)
    yield from same_arithmetic
    half = budget.target.native_half
    if half is not None and precision_for(config, budget).precision == "fp32":
        yield {"precision": half}  # (4)
        yield from ({"precision": half, **c} for c in same_arithmetic)


def cheapest_fix(config: EHRModelConfig, budget: Budget, name: str) -> Adjustment | None:
    """The first change (in the documented order) whose re-estimated peak fits, or None."""
    for changes in _candidates(config, budget):
        b = replace(budget, precision=changes["precision"]) if "precision" in changes else budget
        f = fit(_with(config, changes), b, name)
        if f.fits:
            return Adjustment(_describe(config, changes), changes, change_flags(changes), f)
    return None


# --------------------------------------------------------------------------------------------
# every preset against a budget


def _size_of(name: str) -> str:
    return name.split("-")[0]


def _seed_tier(budget: Budget) -> str | None:
    """Which of the seed's tiers this machine belongs to, by memory as sold."""
    n = budget.nominal_bytes
    if n is None:
        return None
    if budget.device == "mps":
        return "small" if n >= 16 * GIB else None
    if budget.device == "cuda":
        if n >= 38 * GIB:  # 40 GB cards (A100 40GB: 40,960 MiB)
            return "large"
        if n >= 22 * GIB:  # 24 GB cards (A10: 23,028 MiB)
            return "medium"
    return None


def plan(budget: Budget, model_types: Iterable[str] = ("lstm", "transformer")) -> dict[str, Any]:
    """Every preset of ``model_types`` against ``budget``: fits, changes, recommendation."""
    types = list(model_types)
    rows: list[dict[str, Any]] = []
    recommendation: dict[str, Any] = {}
    next_up: dict[str, Any] = {}
    excluded: dict[str, list[dict[str, Any]]] = {}
    seed: dict[str, Any] = {}
    notes: list[str] = []
    tier = _seed_tier(budget)
    for t in types:
        presets = [(n, p) for n, p in load_presets().items() if p.config.model_type == t]
        fits: dict[str, Fit] = {}
        fixes: dict[str, Adjustment | None] = {}
        for name, p in presets:
            f = fit(p.config, budget, name)
            fits[name] = f
            fixes[name] = None if f.fits else cheapest_fix(p.config, budget, name)
            notes += [n for n in f.notes if n not in notes]
            row = {"preset": name, "size": _size_of(name), "seed_target": p.meta.target}
            row.update(f.as_dict())
            fix = fixes[name]
            row["fits_after_change"] = fix.as_dict() if fix else None
            row["data_parallel_accumulation"] = _dp_accumulation(p.config, budget.gpus)
            row["data_parallel"] = data_parallel_settings(p.config, budget.gpus)
            rows.append(row)
        as_shipped = [n for n, _ in presets if fits[n].fits]
        possible = [n for n, _ in presets if fits[n].fits or fixes[n] is not None]
        chosen = {n: (fixes[n].fit if fixes[n] else fits[n]) for n in possible}  # type: ignore[union-attr]
        in_time = [n for n in possible if _in_time(chosen[n])]
        rec = in_time[-1] if in_time else None
        too_slow = [n for n in possible if not _in_time(chosen[n])]
        if rec is not None:
            too_slow = [n for n in too_slow if possible.index(n) > possible.index(rec)]
        excluded[t] = [
            {"preset": n, "epoch": (chosen[n].time or {}).get("epoch"),
             "seconds_per_epoch": (chosen[n].time or {}).get("seconds_per_epoch")}
            for n in too_slow
        ]  # fmt: skip
        if rec is not None:
            fix = fixes[rec]
            recommendation[t] = {
                "preset": rec,
                "change": fix.description if fix else None,
                "changes": fix.changes if fix else {},
                "flags": fix.flags if fix else "",
                "device": (fix.fit if fix else fits[rec]).resolved.device,
                "precision_reason": (fix.fit if fix else fits[rec]).resolved.reason,
                "precision": (fix.fit if fix else fits[rec]).precision,
                "estimate_bytes": (fix.fit if fix else fits[rec]).estimate_bytes,
                "job_bytes": (fix.fit if fix else fits[rec]).estimate_bytes * budget.gpus,
                "budget_bytes": budget.budget_bytes,
                "time": (fix.fit if fix else fits[rec]).time,
                "reason": _reason(rec, chosen[rec], budget, excluded[t]),
            }
        else:
            recommendation[t] = None
        largest = as_shipped[-1] if as_shipped else None
        names = [n for n, _ in presets]
        up_index = names.index(largest) + 1 if largest else 0
        if up_index < len(names):
            up = names[up_index]
            fix = fixes[up]
            next_up[t] = {
                "preset": up,
                "estimate_bytes": fits[up].estimate_bytes,
                "shortfall_bytes": fits[up].shortfall_bytes,
                "change": fix.description if fix else None,
                "changes": fix.changes if fix else None,
                "flags": fix.flags if fix else None,
                "estimate_after_change_bytes": fix.fit.estimate_bytes if fix else None,
                "fits_after_change": fix is not None,
            }
        else:
            next_up[t] = None
        seed[t] = _seed_check(tier, t, fits, fixes, as_shipped, budget)
    return {
        "budget": budget.as_dict(),
        "model_types": types,
        "presets": rows,
        "recommendation": recommendation,
        "next_size_up": next_up,
        "excluded_by_time": excluded,
        "time_rule": _time_rule(budget),
        "seed_check": seed,
        "estimate_notes": notes,
    }


def _in_time(f: Fit) -> bool:
    """Within the time rule, or no rate to tell (declared budgets, unmeasured local GPUs)."""
    return f.time is None or bool(f.time["within_limit"])


def _hours(h: float) -> str:
    return f"{h:g} h"


def _time_rule(budget: Budget) -> str:
    return (
        f"an epoch of {budget.patients:,} patients within {_hours(budget.max_epoch_hours)} "
        "(--patients, --max-epoch-hours)"
    )


def _reason(name: str, f: Fit, budget: Budget, too_slow: list[dict[str, Any]]) -> str:
    """Why ``name`` is the recommendation, in the words `recommend` and `train --auto` print."""
    memory = f"fits memory ({fmt_bytes(f.estimate_bytes)} <= {fmt_bytes(budget.budget_bytes)})"
    if f.time is None:
        time = "time not checked (no throughput known for this device)"
    else:
        time = (
            f"trains an epoch of {budget.patients:,} patients in {f.time['epoch']} <= "
            f"{_hours(budget.max_epoch_hours)}"
        )
    slow = ""
    if too_slow:
        slow = "; larger presets that fit memory but not time: " + ", ".join(
            f"{x['preset']} ({x['epoch']} per epoch)" for x in too_slow
        )
    return f"{name}: the largest preset that {memory} and {time}{slow}"


def _dp_accumulation(config: EHRModelConfig, gpus: int) -> int | None:
    """Accumulation steps that keep the effective batch over ``gpus`` data-parallel replicas."""
    if gpus == 1:
        return config.gradient_accumulation_steps
    per_step = config.batch_size * gpus  # patients per optimizer micro-step across all replicas
    eff = config.effective_batch_size
    return eff // per_step if eff % per_step == 0 else None


def data_parallel_settings(config: EHRModelConfig, gpus: int) -> dict[str, Any]:
    """Per-GPU micro-batch and accumulation over ``gpus`` replicas that keep the effective batch.

    Keeps the micro-batch if it can (only the accumulation shrinks), else shrinks the per-GPU
    micro-batch (which only lowers the per-GPU peak); if neither divides, the effective batch
    grows to micro-batch x GPUs and the result says so.
    """
    eff, b = config.effective_batch_size, config.batch_size
    acc = _dp_accumulation(config, gpus)
    if acc:
        per_gpu, steps = b, acc
    elif eff % gpus == 0 and eff // gpus <= b:
        per_gpu, steps = eff // gpus, 1
    else:
        per_gpu, steps = b, 1
    # patients per optimizer step: per-GPU micro-batch x GPUs x accumulation steps
    new_eff = per_gpu * gpus * steps
    return {
        "batch_size": per_gpu,
        "gradient_accumulation_steps": steps,
        "effective_batch_size": new_eff,
        "keeps_effective_batch": new_eff == eff,
    }


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _seed_check(
    tier: str | None,
    model_type: str,
    fits: dict[str, Fit],
    fixes: dict[str, Adjustment | None],
    as_shipped: list[str],
    budget: Budget,
) -> dict[str, Any]:
    if tier is None:
        return {
            "seed_tier": None,
            "agrees": None,
            "statement": "the seed names no preset for a machine of this size "
            f"(its tiers: {'; '.join(f'{k}: {v}' for k, v in SEED_TIERS.items())})",
        }
    seed_preset = f"{tier}-{model_type}"
    f = fits.get(seed_preset)
    if f is None:
        return {"seed_tier": tier, "agrees": None, "statement": f"no preset {seed_preset}"}
    largest = as_shipped[-1] if as_shipped else None
    last = list(fits)[-1]
    claim = f"seed: {seed_preset} for {SEED_TIERS[tier]}"
    if not f.fits:
        fix = fixes[seed_preset]
        then = f"; it fits with {fix.description}" if fix else "; no single change makes it fit"
        statement = (
            f"{claim}; estimator disagrees: {_gib(f.estimate_bytes)} > budget "
            f"{_gib(budget.budget_bytes)}{then}"
        )
        agrees = False
    elif largest == seed_preset:
        names = list(fits)
        if seed_preset == last:
            above = "it is the largest preset"
        else:
            up = names[names.index(seed_preset) + 1]
            up_fix = fixes[up]
            above = f"the next size up, {up}, does not as shipped" + (
                f" (it fits with {up_fix.description})" if up_fix else ""
            )
        statement = (
            f"{claim}; estimator agrees: it fits ({_gib(f.estimate_bytes)} <= "
            f"{_gib(budget.budget_bytes)}) and {above}"
        )
        agrees = True
    else:
        statement = (
            f"{claim}; estimator agrees it fits ({_gib(f.estimate_bytes)}) but says "
            f"{largest} fits too ({_gib(fits[largest].estimate_bytes)} <= "
            f"{_gib(budget.budget_bytes)}): the seed is conservative here"
        )
        agrees = False
    return {"seed_tier": tier, "seed_preset": seed_preset, "agrees": agrees, "statement": statement}


def check_sizes_known(model_type: str | None) -> list[str]:
    """The model types to plan for (``--type``), validated."""
    if model_type is None:
        return ["lstm", "transformer"]
    if model_type not in ("lstm", "transformer"):
        raise UsageError(f"unknown model type '{model_type}' (valid types: lstm, transformer)")
    return [model_type]
