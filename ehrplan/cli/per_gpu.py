"""Options and payload pieces for plans over several GPUs and the time estimate (no torch).

Used by `ehrplan estimate`; `recommend`/`validate` take ``--gpus``/``--strategy`` through the
planner's budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ehrplan.cli.options import COUNT_MAX, finite
from ehrplan.errors import UsageError
from ehrplan.plan.catalog import CatalogDevice
from ehrplan.plan.config import EHRModelConfig
from ehrplan.plan.pace import DEFAULT_PATIENTS, check_time_rule, fmt_duration
from ehrplan.plan.per_gpu import (
    DEFAULT_UTILISATION,
    catalog_tflops,
    check_strategy_name,
    estimate_parallel,
    estimate_time,
)
from ehrplan.plan.units import fmt_bytes

if TYPE_CHECKING:
    from rich.console import RenderableType

GpusOpt = Annotated[
    int,
    typer.Option(
        "--gpus", min=1, max=COUNT_MAX, help="Data-parallel devices: the memory is answered per "
        "device and for the job; each runs its share of the effective batch.",
    ),
]  # fmt: skip
StrategyOpt = Annotated[
    str,
    typer.Option(
        "--strategy",
        help="With --gpus: ddp (a full replica per device) or fsdp (sharded parameters, "
        "gradients and optimizer state).",
    ),
]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="A machine from the hardware catalog: estimate for its device and give the time "
        "per step from its dense peak throughput.",
    ),
]
TflopsOpt = Annotated[
    float | None,
    typer.Option(
        "--tflops",
        parser=finite(gt=0),
        metavar="FLOAT",
        help="Dense peak TFLOPS of a device not in the catalog (time).",
    ),
]
UtilisationOpt = Annotated[
    float,
    typer.Option(
        "--utilisation",
        parser=finite(gt=0, le=1),
        metavar="FLOAT",
        help=f"Fraction of the dense peak a step reaches, for the time estimate (default "
        f"{DEFAULT_UTILISATION}: an assumption, not a measurement; small LSTMs reach far less).",
    ),
]
PatientsOpt = Annotated[
    int | None,
    typer.Option(
        "--patients",
        min=1,
        max=COUNT_MAX,
        help=f"Training patients per epoch, for the time per epoch (default {DEFAULT_PATIENTS:,}).",
    ),
]


def parallel_payload(
    config: EHRModelConfig,
    gpus: int,
    strategy: str,
    precision: str,
    device: str,
    checkpointing: bool,
) -> dict[str, Any] | None:
    """Per-device and job memory over ``gpus`` devices (None on one device with DDP)."""
    check_strategy_name(strategy)
    if strategy == "fsdp" and gpus < 2:
        raise UsageError("--strategy fsdp shards over several devices: give --gpus 2 or more")
    if gpus < 2:
        return None
    pe = estimate_parallel(
        config,
        world_size=gpus,
        strategy=strategy,
        precision=precision,
        device=device,
        checkpointing=checkpointing,
    )
    return pe.as_dict()


def time_payload(
    config: EHRModelConfig,
    row: CatalogDevice | None,
    tflops: float | None,
    precision: str,
    gpus: int,
    utilisation: float,
    patients: int | None,
    checkpointing: bool,
) -> dict[str, Any] | None:
    """Seconds per step (and per epoch) from --target's catalog peak or --tflops; else None."""
    check_time_rule(patients, None)
    patients = patients or DEFAULT_PATIENTS
    if tflops is not None:
        if not (math.isfinite(tflops) and tflops > 0):
            raise UsageError(f"--tflops must be a positive number, not {tflops}")
        peak, source = tflops, f"--tflops {tflops:g} x {utilisation:.0%} utilisation (assumed)"
    elif row is not None:
        if row.fp32_tflops is None and row.half_tflops is None:
            return None  # the catalog lists no throughput for it (give --tflops)
        peak, _ = catalog_tflops(row, precision)
        kind = "fp32" if precision == "fp32" or not row.half_tflops else "16-bit"
        source = (
            f"catalog: dense {kind} peak {peak:g} TFLOPS x {utilisation:.0%} utilisation (assumed)"
        )
    else:
        return None
    t = estimate_time(
        config,
        peak_tflops=peak,
        world_size=gpus,
        utilisation=utilisation,
        patients=patients,
        checkpointing=checkpointing,
        throughput_source=source,
    )
    return t.as_dict() | {
        "step": fmt_duration(t.seconds_per_step),
        "epoch": fmt_duration(t.seconds_per_epoch),
    }


def render_parallel(p: dict[str, Any]) -> Iterable[RenderableType]:
    """Lines for the people's view of `estimate`."""
    from rich.text import Text

    pe = p.get("parallel")
    if pe:
        terms = ", ".join(
            f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in pe["breakdown"].items() if v
        )
        moment = pe["peak_moment"].replace("_", " ")
        yield Text(
            f"{pe['strategy'].upper()} over {pe['world_size']} devices: micro-batch "
            f"{pe['micro_batch']} x {pe['accumulation']} accumulation per device; peak "
            f"{fmt_bytes(pe['per_device_bytes'])} per device at {moment}, "
            f"{fmt_bytes(pe['job_bytes'])} for the job ({terms})"
        )
    t = p.get("time")
    if t:
        yield Text(
            f"time: {t['step']} per optimizer step, {t['epoch']} per epoch of "
            f"{t['patients']:,} patients ({t['steps_per_epoch']:,} steps); "
            f"{t['throughput_source']}; FLOPs at full padding"
        )
