"""`ehrplan dry-run`: run two real training steps and put the measured peak beside the estimate.

torch is imported only once the step is about to run (never for ``--help``), and not at all when
the estimate alone says the step cannot fit the CPU's memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType
from rich.table import Table

from ehrplan.cli.options import (
    BatchSizeOpt,
    CalibrationOpt,
    ConfigOpt,
    JsonOpt,
    LabelsOpt,
    PresetOpt,
    SetOpt,
    SizeOpt,
    SplitsOpt,
    TaskOpt,
    TypeOpt,
    config_from_options,
)
from ehrplan.cli.output import emit, say, warn
from ehrplan.data.tasks import DataRequest
from ehrplan.errors import DeviceError, DoesNotFitError, UsageError
from ehrplan.plan.config import EHRModelConfig
from ehrplan.plan.estimator import estimate_memory
from ehrplan.plan.levels import calibrated_levels
from ehrplan.plan.planner import DEFAULT_HEADROOM, Budget, host_budget
from ehrplan.plan.target import Resolved, check_precision, resolve
from ehrplan.plan.units import fmt_bytes

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")

DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (the device's rule, as `ehrplan estimate` and `ehrplan train` use it), or "
        "fp32, fp16, bf16.",
    ),
]
CheckpointOpt = Annotated[
    bool | None,
    typer.Option(
        "--checkpointing/--no-checkpointing",
        help="Gradient checkpointing (default: the config's use_checkpoint).",
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="A MEDS data set with labels: measure the largest real batch of its train split "
        "(data-shaped, as `ehrplan train` trains it) instead of a fully padded one.",
    ),
]
SimulateOpt = Annotated[
    bool,
    typer.Option(
        "--simulate",
        help="Measure without allocating (fake tensors): refused, with the reason.",
    ),
]


def _check_cpu_fits(
    cfg: EHRModelConfig, precision: str | None, ckpt: bool, calibration: Path | None = None
) -> tuple[Resolved, Budget]:
    """The CPU's precision and host budget (`ehrplan.plan.planner.host_budget`, the one
    `recommend` and `validate --device cpu` use); raise DoesNotFitError, without allocating
    anything, when the estimated peak exceeds it: on the CPU the kernel kills an out-of-memory
    process instead of raising, so the step must not be started."""
    from ehrplan.plan.hardware import probe

    budget = host_budget(probe(), DEFAULT_HEADROOM, "dry-run on the CPU")
    resolved = resolve(cfg, budget.target, precision)
    est = estimate_memory(cfg, precision=resolved.precision, device="cpu", checkpointing=ckpt)
    need = calibrated_levels(est, calibration)[0].fit_bytes  # the process level
    if need > budget.budget_bytes:
        raise DoesNotFitError(
            f"does not fit: the estimated process peak {fmt_bytes(need)} "
            f"({resolved.precision}) exceeds the budget {fmt_bytes(budget.budget_bytes)} "
            f"({fmt_bytes(budget.usable_bytes)} available now, less "
            f"{budget.headroom:.0%} headroom); the step was not run"
        )
    return resolved, budget


def dry_run(
    preset: PresetOpt = None,
    size: SizeOpt = None,
    model_type: TypeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    checkpointing: CheckpointOpt = None,
    data: DataOpt = None,
    task: TaskOpt = None,
    labels: LabelsOpt = None,
    splits: SplitsOpt = None,
    simulate: SimulateOpt = False,
    calibration: CalibrationOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Build the model, run two real training steps, and report the measured peak memory of the
    second one beside the analytic estimate.

    The batch is fully padded (batch x max_visits x max_codes_per_visit), or with --data the
    largest real batch of the data set. Exit 1 when it does not fit: a real out-of-memory error,
    or on the CPU an estimate above the available memory (the step is then not started). Exit 2
    for an unknown or absent device, or data that cannot be read.
    """
    asked = check_precision(precision)
    cfg, source = config_from_options(preset, size, model_type, config, set_, batch_size=batch_size)
    if simulate:
        lstm = (
            "; for LSTMs fake tensors also trace nn.LSTM through another kernel and undercount "
            "its saved state several-fold"
            if cfg.model_type == "lstm"
            else ""
        )
        raise UsageError(
            "--simulate is refused: the models gather real visits with a boolean mask, a "
            f"data-dependent shape fake tensors cannot size{lstm}; `ehrplan estimate` gives "
            "the analytic peak (checked within 10% of measured steps)"
        )
    ckpt = cfg.use_checkpoint if checkpointing is None else checkpointing
    if device not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device '{device}' (valid: {', '.join(DEVICE_CHOICES)})")
    host: Budget | None = None
    if device == "cpu":  # decided before torch is even imported
        resolved, host = _check_cpu_fits(cfg, asked, ckpt, calibration)

    from ehrplan.runtime.measure import cpu_lstm_kernel, measure_step, resolve_device

    dev = resolve_device(device)
    if dev == "cpu" and host is None:
        resolved, host = _check_cpu_fits(cfg, asked, ckpt, calibration)
    if dev != "cpu":
        import torch

        from ehrplan.runtime.training.device import device_target

        resolved = resolve(cfg, device_target(torch.device(dev)), asked)
    precision = resolved.precision
    if dev == "cuda":  # UNMEASURED here (no GPU): refuse what cannot fit the free memory
        free, _ = torch.cuda.mem_get_info()
        est = estimate_memory(cfg, precision=precision, device="cuda", checkpointing=ckpt)
        if est.total_bytes > free:
            raise DoesNotFitError(
                f"does not fit: the estimated peak {fmt_bytes(est.total_bytes)} exceeds the "
                f"{fmt_bytes(free)} free on the GPU; the step was not run"
            )
    kernel = cpu_lstm_kernel() if dev == "cpu" else "mkldnn"
    shaped: dict[str, Any] = {}
    batch = None
    if data is not None:
        request = DataRequest(task=task, labels=labels, splits=splits)
        cfg, batch, shaped = _largest_data_batch(data, cfg, dev, precision, ckpt, request)
    est = estimate_memory(
        cfg, precision=precision, device=dev, checkpointing=ckpt, lstm_kernel=kernel,
        **shaped.get("estimate_shape", {}),
    )  # fmt: skip
    levels, cal = calibrated_levels(est, calibration)
    if dev == "cpu" and batch is None:
        # a fresh process: its peak RSS growth is the step's own (level 3)
        from ehrplan.runtime.measure import measure_in_subprocess

        m = measure_in_subprocess(cfg, precision=precision, device=dev, checkpointing=ckpt)
        process_note = "process peak: RSS growth of a fresh process over build and two steps"
    else:
        from ehrplan.runtime.allocator import configure

        configure()
        m = measure_step(cfg, precision=precision, device=dev, checkpointing=ckpt, batch=batch)
        process_note = {
            "cpu": "process peak: RSS growth in this process (data loaded before the model)",
            "cuda": "process peak: max_memory_reserved + CUDA context",
            "mps": "process peak: sampled driver allocation",
        }[dev]
    measured = m.measured_peak_bytes
    for line in cal.warnings:
        warn(line)
    payload: dict[str, Any] = {
        "source": source,
        "data": shaped.get("data"),
        "batch_shape": shaped.get("batch_shape"),
        "visit_groups": shaped.get("estimate_shape", {}).get("visit_groups"),
        "model_type": cfg.model_type,
        "device": dev,
        "precision": precision,
        "precision_reason": resolved.reason,
        "batch_size": cfg.batch_size,
        "micro_batches": m.micro_batches,
        "checkpointing": ckpt,
        "measured_peak_bytes": measured,
        "estimated_peak_bytes": est.total_bytes,
        "error": (est.total_bytes - measured) / measured,
        "peak_reserved_bytes": m.peak_reserved_bytes,
        "process_peak_rss_bytes": m.process_peak_rss_bytes,
        "measured_allocator_peak_bytes": m.allocator_peak_bytes,
        "measured_process_peak_bytes": m.process_peak_bytes,
        "estimated_allocator_peak_bytes": levels.allocator_peak_bytes,
        "estimated_process_peak_bytes": levels.process_peak_bytes,
        "allocator_setting": m.allocator_setting,
        "calibration": cal.summary(),
        "measurement_method": m.method,
        "lstm_kernel": m.lstm_kernel,
        "step_seconds": m.step_seconds,
        "estimated_peak_phase": est.peak_phase,
        "estimate_breakdown": dict(est.breakdown),
        "device_overhead": dict(est.device_overhead),
        "available_bytes": host.usable_bytes if host else None,
        "total_bytes": host.total_bytes if host else None,
        "budget_bytes": host.budget_bytes if host else None,
        "headroom": host.headroom if host else None,
        "notes": [*est.notes, process_note, cal.label],
    }
    emit("dry-run", payload, as_json=json_, render=_render)


def _largest_data_batch(
    root: Path,
    cfg: EHRModelConfig,
    device: str,
    precision: str,
    ckpt: bool,
    request: Any = None,
) -> tuple[EHRModelConfig, Any, dict[str, Any]]:
    """The train split's batch with the largest estimate, among the first epoch's length-bucketed
    batches (what `ehrplan train` trains) and the batch of its longest patients; the config with
    its vocabulary fitted to the data."""
    from ehrplan.data.shapes import TrainShapes, largest_batch
    from ehrplan.plan.grouping import grouping_enabled
    from ehrplan.runtime.training.data import load_training_data

    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise UsageError(f"--data {root}: {what}")
    data, cfg = load_training_data(root, cfg, request=request, say=say)
    train = data.split("train")
    ds = train.dataset
    shapes = TrainShapes(examples=ds.examples, idx=ds.idx, sequences=ds.seq, lengths=train.lengths)

    def estimate(b: int, v: int, c: int, groups: list[tuple[int, int]] | None) -> int:
        return estimate_memory(
            cfg, precision=precision, device=device, checkpointing=ckpt, batch_size=b,
            visits=v, codes=c, visit_groups=groups,
        ).total_bytes  # fmt: skip

    grouped = cfg.model_type == "lstm" and grouping_enabled(device)
    best = largest_batch(ds.cohort, shapes, cfg.batch_size, estimate, grouped)
    batch = data.collate_for(train)(best["items"])
    b, v, c = best["shape"]
    shape: dict[str, Any] = {"batch_size": b, "visits": v, "codes": c}
    shape["visit_groups"] = batch.encoder_groups(cfg.model_type, device)
    assert shape["visit_groups"] == best["visit_groups"]
    cfg = cfg.model_copy(update={"batch_size": shape["batch_size"]})
    info = {
        "data": str(root),
        "batch_shape": [shape["batch_size"], shape["visits"], shape["codes"]],
        "estimate_shape": shape,
    }
    return cfg, batch, info


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    t = Table(
        title=f"Dry run: {p['source']} — {p['model_type']} on {p['device']}, {p['precision']}, "
        f"batch {p['batch_size']} x {p['micro_batches']} micro-batch(es)"
        + (", checkpointing" if p["checkpointing"] else "")
    )
    t.add_column("")
    t.add_column("bytes", justify="right")
    t.add_column("", justify="right")
    rows = [
        ("measured peak (second step)", p["measured_peak_bytes"]),
        ("estimated peak", p["estimated_peak_bytes"]),
        ("peak reserved", p["peak_reserved_bytes"]),
        ("measured allocator peak", p["measured_allocator_peak_bytes"]),
        ("estimated allocator peak", p["estimated_allocator_peak_bytes"]),
        ("measured process peak", p["measured_process_peak_bytes"]),
        ("estimated process peak", p["estimated_process_peak_bytes"]),
        ("process peak RSS", p["process_peak_rss_bytes"]),
        ("available now (CPU)", p["available_bytes"]),
        ("total (CPU)", p["total_bytes"]),
        ("budget (CPU, less headroom)", p["budget_bytes"]),
    ]
    for label, value in rows:
        if value is not None:
            t.add_row(label, f"{value:,}", fmt_bytes(value))
    t.add_row("[bold]error of the estimate", "", f"[bold]{p['error']:+.1%}")
    yield t
    yield f"device and precision: {p['precision']} on {p['device']}: {p['precision_reason']}"
    yield f"measured by: {p['measurement_method']}; estimated peak at: {p['estimated_peak_phase']}"
    yield from p["notes"][-2:]
    if p.get("batch_shape"):
        b, v, c = p["batch_shape"]
        groups = p.get("visit_groups")
        yield (
            f"the largest real batch of {p['data']}: {b} patients x {v} visits x {c} codes"
            + (f", {len(groups)} within-visit length groups" if groups else "")
        )
