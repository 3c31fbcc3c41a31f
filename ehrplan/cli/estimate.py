"""`ehrplan estimate`: parameters and memory of a config, analytically, without torch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ehrplan.cli.options import (
    BatchSizeOpt,
    CalibrationOpt,
    ConfigOpt,
    JsonOpt,
    PresetOpt,
    SetOpt,
    SizeOpt,
    TypeOpt,
    config_from_options,
)
from ehrplan.cli.output import emit, warn
from ehrplan.cli.per_gpu import (
    GpusOpt,
    PatientsOpt,
    StrategyOpt,
    TargetOpt,
    TflopsOpt,
    UtilisationOpt,
    parallel_payload,
    render_parallel,
    time_payload,
)
from ehrplan.errors import UsageError
from ehrplan.plan.catalog import CatalogDevice, get_target
from ehrplan.plan.config import get_preset
from ehrplan.plan.estimator import estimate_memory, static_memory
from ehrplan.plan.flops import training_step_flops
from ehrplan.plan.levels import calibrated_levels
from ehrplan.plan.params import count_parameters
from ehrplan.plan.per_gpu import DEFAULT_UTILISATION
from ehrplan.plan.target import DeviceTarget, check_device, from_catalog, from_probe, resolve
from ehrplan.plan.units import fmt_bytes, fmt_count

if TYPE_CHECKING:
    from rich.console import RenderableType

PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (the device's rule: bf16 on CUDA >= 8.0 and CPUs with native bf16, fp16 on "
        "older CUDA and MPS, else fp32; fp32 when the config's mixed_precision is false), "
        "fp32, fp16 or bf16.",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="Device to estimate for: cpu, cuda or mps (default: --target's, else this "
        "machine's: its GPU, else its CPU).",
    ),
]
CheckpointOpt = Annotated[
    bool | None,
    typer.Option(
        "--checkpointing/--no-checkpointing",
        help="Gradient checkpointing (default: the config's use_checkpoint).",
    ),
]


def estimate(
    preset: PresetOpt = None,
    size: SizeOpt = None,
    model_type: TypeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    batch_size: BatchSizeOpt = None,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = None,
    checkpointing: CheckpointOpt = None,
    gpus: GpusOpt = 1,
    strategy: StrategyOpt = "ddp",
    target: TargetOpt = None,
    tflops: TflopsOpt = None,
    utilisation: UtilisationOpt = DEFAULT_UTILISATION,
    patients: PatientsOpt = None,
    calibration: CalibrationOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Exact parameter count by component, and the memory of one training step.

    Never imports torch. Pick the config with --preset, or --size with --type, and/or --config
    FILE; override single fields with --set KEY=VALUE or --batch-size.
    """
    row = get_target(target) if target is not None else None
    dev_target = device_target(row, device)
    cfg, source = config_from_options(preset, size, model_type, config, set_, batch_size=batch_size)
    params = count_parameters(cfg)
    resolved = resolve(cfg, dev_target, precision)
    precision, device = resolved.precision, resolved.device
    est = estimate_memory(cfg, precision=precision, device=device, checkpointing=checkpointing)
    levels, cal = calibrated_levels(est, calibration)
    flops = training_step_flops(cfg, checkpointing=est.checkpointing)
    preset_name = None
    if preset or size or model_type:
        preset_name = source.split(" + ")[0].removeprefix("preset ")
        preset_name = get_preset(preset_name).name
    payload = {
        "preset": preset_name,
        "source": source,
        "model_type": cfg.model_type,
        "params": params.total,
        "params_by_component": params.components,
        "params_by_module": params.modules,
        "precision": precision,
        "device": device,
        "precision_reason": resolved.reason,
        "target": dev_target.as_dict(),
        "batch_size": cfg.batch_size,
        "effective_batch_size": cfg.effective_batch_size,
        "checkpointing": est.checkpointing,
        "memory": dict(est.breakdown),
        "total_bytes": est.total_bytes,
        "peak_phase": est.peak_phase,
        "phases": dict(est.phases),
        "saved_for_backward_by_module": dict(est.saved_by_module),
        "device_overhead": dict(est.device_overhead),
        "allocator_peak_bytes": levels.allocator_peak_bytes,
        "process_peak_bytes": levels.process_peak_bytes,
        "fit_bytes": levels.fit_bytes,
        "memory_levels": levels.to_json(),
        "calibration": cal.summary(),
        "flops": {
            "forward": flops.forward,
            "backward": flops.backward,
            "recompute": flops.recompute,
            "per_micro_batch": flops.per_micro_batch,
            "per_optimizer_step": flops.per_optimizer_step,
            "forward_by_module": dict(flops.forward_by_module),
        },
        "static_memory": {
            "fp32": static_memory(cfg, "fp32"),
            "mixed": static_memory(cfg, "bf16"),
        },
        "notes": [*est.notes, cal.label],
        "config": cfg.model_dump(),
        "parallel": parallel_payload(cfg, gpus, strategy, precision, device, est.checkpointing),
        "time": time_payload(
            cfg, row, tflops, precision, gpus, utilisation, patients, est.checkpointing
        ),
    }
    for line in cal.warnings:
        warn(line)
    emit("estimate", payload, as_json=json_, render=_render)
    if not json_:
        for note in est.notes:
            warn(note)


def device_target(row: CatalogDevice | None, device: str | None) -> DeviceTarget:
    """--target's machine, else --device on this machine (a device it lacks is planned as
    declared), else this machine's own device."""
    if device is not None:
        check_device(device)
    if row is not None:
        t = from_catalog(row)
        if device is not None and device != t.device:
            raise UsageError(f"--device {device} contradicts --target {row.name} ({t.device})")
        return t
    from ehrplan.plan.hardware import probe

    return from_probe(probe(), device)


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    from rich.table import Table

    title = f"{p['source']} — {p['model_type']}"
    params = Table(title=f"Parameters: {title}")
    params.add_column("component")
    params.add_column("parameters", justify="right")
    for name, n in p["params_by_component"].items():
        params.add_row(name.replace("_", " "), f"{n:,}")
    params.add_row("[bold]total", f"[bold]{fmt_count(p['params'])}")
    yield params

    static = Table(title="Weights, gradients and optimizer state (Adam)")
    static.add_column("")
    static.add_column("fp32", justify="right")
    static.add_column("mixed precision", justify="right")
    fp32, mixed = p["static_memory"]["fp32"], p["static_memory"]["mixed"]
    for key in mixed:
        static.add_row(key.replace("_", " "), fmt_bytes(fp32.get(key)), fmt_bytes(mixed[key]))
    static.add_row("[bold]total", fmt_bytes(sum(fp32.values())), fmt_bytes(sum(mixed.values())))
    yield static

    mem = Table(
        title=f"Training-step memory: {p['precision']} on {p['device']}, "
        f"batch {p['batch_size']} (effective {p['effective_batch_size']})"
        + (", checkpointing" if p["checkpointing"] else "")
    )
    mem.add_column("held by")
    mem.add_column("bytes", justify="right")
    mem.add_column("", justify="right")
    for key, b in p["memory"].items():
        mem.add_row(key.replace("_", " "), f"{b:,}", fmt_bytes(b))
    label = "total (estimated peak)"
    mem.add_row(
        f"[bold]{label}", f"[bold]{p['total_bytes']:,}", f"[bold]{fmt_bytes(p['total_bytes'])}"
    )
    levels = p["memory_levels"]
    mem.add_row("+ kernel scratch", f"{levels['kernel_scratch_bytes']:,}", "")
    mem.add_row(
        "[bold]allocator peak",
        f"[bold]{p['allocator_peak_bytes']:,}",
        f"[bold]{fmt_bytes(p['allocator_peak_bytes'])}",
    )
    for key, b in levels["process_terms"].items():
        mem.add_row(f"+ {key.replace('_', ' ')}", f"{b:,}", fmt_bytes(b))
    mem.add_row(
        "[bold]process peak (what runs out)",
        f"[bold]{p['process_peak_bytes']:,}",
        f"[bold]{fmt_bytes(p['process_peak_bytes'])}",
    )
    yield mem
    yield f"device and precision: {p['precision']} on {p['device']}: {p['precision_reason']}"
    yield next(n for n in p["notes"] if n.startswith(("calibrated on", "uncalibrated")))
    yield (
        f"peak at: {p['peak_phase'].replace('_', ' ')}; "
        f"FLOPs per micro-batch {p['flops']['per_micro_batch']:.3e}, "
        f"per optimizer step {p['flops']['per_optimizer_step']:.3e}"
    )
    yield from render_parallel(p)
    if p["time"] is None and "(catalog " in p["target"]["label"]:
        yield f"time: the catalog lists no throughput for {p['target']['label']}; give --tflops"
