"""`ehrplan recommend`: every preset against a machine's budget, the largest that fits marked."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ehrplan.cli.options import (
    COUNT_MAX,
    CalibrationOpt,
    JsonOpt,
    LabelsOpt,
    SplitsOpt,
    TaskOpt,
    finite,
    with_calibration,
)
from ehrplan.cli.output import emit
from ehrplan.errors import DeviceError, UsageError
from ehrplan.plan.config import EHRModelConfig
from ehrplan.plan.pace import (
    DEFAULT_MAX_EPOCH_HOURS,
    DEFAULT_PATIENTS,
    check_time_rule,
)
from ehrplan.plan.per_gpu import check_strategy_name
from ehrplan.plan.planner import (
    DEFAULT_HEADROOM,
    Budget,
    budget_from_probe,
    budget_from_size,
    budget_from_target,
    check_sizes_known,
    host_budget,
    plan,
)
from ehrplan.plan.target import check_device, check_precision, resolve
from ehrplan.plan.units import fmt_bytes, parse_size

if TYPE_CHECKING:
    from rich.console import RenderableType

TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="A machine from the hardware catalog, e.g. m1-16gb, a10."),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--memory",
        help="Declared usable memory per device: 16GB (10^9 B), 16GiB (2^30 B), 24g (= GiB).",
    ),
]
GpusOpt = Annotated[
    int | None,
    typer.Option(
        "--gpus",
        min=1,
        max=COUNT_MAX,
        help="Data-parallel GPUs; memory is answered per GPU and for the job.",
    ),
]
StrategyOpt = Annotated[
    str,
    typer.Option(
        "--strategy",
        help="With --gpus: ddp (a full replica per GPU) or fsdp (sharded parameters, gradients "
        "and optimizer state).",
    ),
]
ModelTypeOpt = Annotated[
    str | None, typer.Option("--type", "-t", help="Only this model family: lstm or transformer.")
]
HeadroomOpt = Annotated[
    float,
    typer.Option(
        "--headroom",
        parser=finite(ge=0, lt=1),
        metavar="FLOAT",
        help="Fraction of usable memory kept free (0.1 = 10%).",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="cuda, mps or cpu. With --memory/--budget: the declared device's type (default "
        "cuda); alone: this machine's device of that type (cpu: host RAM available now).",
    ),
]
PatientsOpt = Annotated[
    int | None,
    typer.Option(
        "--patients",
        help=f"Training patients per epoch, for the time rule (default {DEFAULT_PATIENTS:,}).",
    ),
]
MaxEpochHoursOpt = Annotated[
    float | None,
    typer.Option(
        "--max-epoch-hours",
        help=f"Recommend the largest preset that fits memory and trains one epoch within this "
        f"many hours (default {DEFAULT_MAX_EPOCH_HOURS:g}); larger presets that fit memory "
        "but not time are listed.",
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (the device's rule, see `ehrplan estimate --help`), or fp32, fp16, bf16 for "
        "every config.",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="A MEDS data set with a label task: each preset is also estimated at the data's "
        "largest length-bucketed micro-batch (as `dry-run --data` picks it); the time rule "
        "counts an epoch as its training patients; the host RAM its example cache takes comes "
        "out of the budget on the CPU and on Apple Silicon. Needs the 'train' extra.",
    ),
]


def with_data(b: Budget, data: Path | None, request: Any = None) -> Budget:
    """The budget less the host RAM a training process needs for ``data`` (CPU and MPS, whose
    GPU working set is the same unified memory); on CUDA a note only (the data is in host RAM,
    not GPU memory). ``request`` (a `DataRequest`): the task and splits, so that the cache
    opened here is the one the data-shaped estimate and `ehrplan train` read."""
    if data is None:
        return b
    from ehrplan.cli.output import say
    from ehrplan.data.cache import data_memory, prepare
    from ehrplan.data.meds import DATA_DIR
    from ehrplan.data.shapes import task_settings

    if not (data / DATA_DIR).is_dir():  # a splits file alone serves the time rule
        note = f"--data {data}: no {DATA_DIR}/ folder, so the data's host RAM is not counted"
        return replace(b, notes=(*b.notes, note))
    cache = prepare(data, task_settings(data, request, optional_task=True), say=say)
    task = cache.task
    need = data_memory(
        events=cache.num_events,
        visits=cache.num_visits,
        patients=cache.num_patients,
        vocab_size=len(cache.vocab),
        examples=int(cache.header["report"].get("labels", {}).get("examples", 0)),
        kind=task["kind"] if task is not None else None,
        batch_size=0,
        max_visits=0,
        max_codes_per_visit=0,
    )["total"]
    size = fmt_bytes(need)
    if b.device == "cpu":
        note = f"--data: {size} of host RAM for the data (example cache and arrays), taken out of "
        note += "the budget"
    elif b.device == "mps":
        note = (
            f"--data: {size} of host RAM for the data, taken out of the budget: Apple Silicon's "
            "unified memory holds the data and the GPU working set alike"
        )
    else:
        note = f"--data: {size} of host RAM for the data (host memory, not GPU memory)"
        return replace(b, notes=(*b.notes, note))
    return replace(b, data_bytes=need, notes=(*b.notes, note))


def resolve_budget(
    target: str | None,
    memory: str | None,
    gpus: int | None,
    headroom: float,
    device: str | None,
    *,
    memory_flag: str = "--memory",
    strategy: str = "ddp",
    precision: str | None = None,
    patients: int | None = None,
    max_epoch_hours: float | None = None,
) -> Budget:
    """The budget from --target, --memory (or --budget), or this machine's probe; the device
    and its precision rule travel with it (`ehrplan.plan.target`)."""
    asked = check_precision(precision)
    check_time_rule(patients, max_epoch_hours)
    b = _budget(target, memory, gpus, headroom, device, memory_flag)
    check_strategy_name(strategy)
    if strategy == "fsdp" and b.gpus < 2:
        raise UsageError("--strategy fsdp shards over several GPUs: give --gpus 2 or more")
    b = replace(
        b,
        strategy=strategy,
        precision=asked,
        patients=patients or DEFAULT_PATIENTS,
        max_epoch_hours=max_epoch_hours or DEFAULT_MAX_EPOCH_HOURS,
    )
    if asked is not None:  # refuse a precision the device cannot run before any estimate
        resolve(EHRModelConfig(), b.target, asked)
    return b


def _budget(
    target: str | None,
    memory: str | None,
    gpus: int | None,
    headroom: float,
    device: str | None,
    memory_flag: str,
) -> Budget:
    if target is not None and memory is not None:
        raise UsageError(f"give either --target or {memory_flag}, not both")
    if device is not None:
        check_device(device)
    if target is not None:
        if device is not None:
            raise UsageError("--device applies with --memory/--budget or alone, not with --target")
        return budget_from_target(target, headroom, gpus or 1)
    if memory is not None:
        return budget_from_size(parse_size(memory), headroom, device or "cuda", gpus or 1)
    from ehrplan.plan.hardware import probe

    report = probe()
    if device == "cpu":
        if gpus not in (None, 1):
            raise UsageError(f"--gpus {gpus} does not apply to --device cpu")
        return host_budget(report, headroom, "--device cpu: planning for this machine's CPU")
    b = budget_from_probe(report, headroom, gpus)
    if device is not None and b.device != device:
        raise DeviceError(f"--device {device}: the hardware probe found no {device} device here")
    return b


def recommend(
    target: TargetOpt = None,
    memory: MemoryOpt = None,
    gpus: GpusOpt = None,
    strategy: StrategyOpt = "ddp",
    model_type: ModelTypeOpt = None,
    headroom: HeadroomOpt = DEFAULT_HEADROOM,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "auto",
    patients: PatientsOpt = None,
    max_epoch_hours: MaxEpochHoursOpt = None,
    data: DataDirOpt = None,
    task: TaskOpt = None,
    labels: LabelsOpt = None,
    splits: SplitsOpt = None,
    calibration: CalibrationOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Which presets fit this machine (or --target / --memory), and what makes the next one fit.

    Every preset's estimated peak training-step memory against the budget; the largest that fits
    (as shipped, or after a named change) is the recommendation. With --data, each preset is
    also estimated at the data's own largest micro-batch, beside the preset-maxima figure, with
    the shape percentiles behind it. Never imports torch.
    """
    types = check_sizes_known(model_type)
    if data is not None:
        if patients is not None:
            raise UsageError("give --patients or --data, not both")
        patients = training_patients(data)
    budget = resolve_budget(
        target,
        memory,
        gpus,
        headroom,
        device,
        strategy=strategy,
        precision=precision,
        patients=patients,
        max_epoch_hours=max_epoch_hours,
    )
    if data is not None:
        budget = with_data(budget, data, _request(task, labels, splits))
    budget = with_calibration(budget, calibration)
    payload = plan(budget, types)
    if data is not None:
        add_data_shapes(payload, data, task, labels, splits)
    emit("recommend", payload, as_json=json_, render=_render)


def _request(task: str | None, labels: Path | None, splits: str | None) -> Any:
    from ehrplan.data.tasks import DataRequest

    return DataRequest(task=task, labels=labels, splits=splits)


def add_data_shapes(
    payload: dict[str, Any],
    root: Path,
    task: str | None,
    labels: Path | None,
    splits: str | None,
) -> None:
    """Read the data set (numpy and pyarrow, never torch) and annotate the plan's rows."""
    from ehrplan.cli.output import say, warn
    from ehrplan.data.shapes import annotate_plan, load_task_data
    from ehrplan.errors import DataError

    try:
        data = load_task_data(root, _request(task, labels, splits), say)
    except DataError as err:  # the time rule still counts its patients
        warn(f"no estimate at the data's own batches: {err}")
        return
    annotate_plan(payload, data, root)


def render_data_shapes(p: dict[str, Any]) -> Iterable[RenderableType]:
    """The data-shaped estimates (recommend and validate --data)."""
    from rich.text import Text

    d = p["data"]
    yield Text(
        f"At the data's own batches ({d['root']}, task {d['task']}, {d['kind']}; the largest "
        "length-bucketed train micro-batch, as `dry-run --data` picks it):"
    )
    rows = p.get("presets") or p.get("results") or []
    for r in rows:
        ds = r["data_shaped"]
        b, v, c = ds["shape"]
        groups = ds.get("visit_groups")
        pc = ds["percentiles"]
        vpe, cpv = pc["visits_per_example"], pc["codes_per_visit"]
        yield Text(
            f"  {r.get('preset') or r.get('name')}: {b} x {v} x {c}"
            + (f" ({len(groups)} length groups)" if groups else "")
            + f": {fmt_bytes(ds['estimate_bytes'])} ({ds['precision']}) "
            + ("fits" if ds["fits"] else "does not fit")
            + f"; at preset maxima {fmt_bytes(r['estimate_bytes'])}; visits per example "
            f"p50/p95/max {vpe['p50']}/{vpe['p95']}/{vpe['max']}, codes per visit "
            f"{cpv['p50']}/{cpv['p95']}/{cpv['max']}"
        )


def training_patients(root: Path) -> int:
    """One epoch for the time rule: the data set's training patients
    (`ehrplan.data.meds.train_patients`; `train --auto --data` counts alike)."""
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise UsageError(f"--data {root}: {what}")
    from ehrplan.data.meds import train_patients

    return train_patients(root)


def render_budget(p: dict[str, Any], per_device: str = "") -> Iterable[RenderableType]:
    """The budget line, its notes, and the estimator's caveats (recommend and validate)."""
    from rich.text import Text

    b = p["budget"]
    total = f" of {fmt_bytes(b['total_bytes'])} total" if b.get("total_bytes") else ""
    yield Text(
        f"Budget: {b['label']} on {b['device']}: usable {fmt_bytes(b['usable_bytes'])}{total}, "
        f"headroom {b['headroom']:.0%} -> {fmt_bytes(b['budget_bytes'])}{per_device}"
    )
    for n in b["notes"]:
        yield Text(f"  {n}")
    for n in p["estimate_notes"]:
        yield Text(f"  estimate: {n}")


def _verdict(r: dict[str, Any]) -> str:
    if r["fits"]:
        return "[green]yes"
    return "[yellow]with change" if r["fits_after_change"] else "[red]no"


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    from rich.table import Table
    from rich.text import Text

    b = p["budget"]
    yield from render_budget(p, " per device")
    per = f" per GPU, {b['strategy'].upper()} over {b['gpus']}" if b["gpus"] > 1 else ""
    table = Table(title=f"Presets: peak training-step memory{per}, time per epoch")
    table.add_column("preset", no_wrap=True)  # names stay whole at 80 columns
    table.add_column("prec.", no_wrap=True)
    table.add_column("batch", no_wrap=True)
    table.add_column("peak", justify="right", no_wrap=True)
    table.add_column("epoch", justify="right", no_wrap=True)
    table.add_column("fits", no_wrap=True)
    recs = {r["preset"] for r in p["recommendation"].values() if r}
    slow = {x["preset"] for xs in p["excluded_by_time"].values() for x in xs}
    for r in p["presets"]:
        t = (r["fits_after_change"] or r).get("time") or {}
        epoch = t.get("epoch", "-")
        dp = r["data_parallel"]
        table.add_row(
            r["preset"] + (" *" if r["preset"] in recs else ""),
            r["precision"],
            f"{dp['batch_size']}x{dp['gradient_accumulation_steps']}",
            fmt_bytes(r["estimate_bytes"]),
            f"[red]{epoch}" if r["preset"] in slow else epoch,
            _verdict(r),
        )
    yield table
    yield Text(
        f"* recommended: the largest preset that fits memory (as shipped or with the named "
        f"change) and trains {p['time_rule']}; red: too slow"
    )
    devs = {(r["precision"], r["device"], r["precision_reason"]) for r in p["presets"]}
    for prec, dev, why in sorted(devs):
        yield Text(f"precision: {prec} on {dev}: {why}")
    rates = {(r.get("time") or {}).get("throughput_source") for r in p["presets"]} - {None}
    for src in sorted(rates):
        yield Text(f"time: {src}; FLOPs at full padding")
    if p.get("data"):
        yield from render_data_shapes(p)
    for t in p["model_types"]:
        yield from _render_type(p, t)


def _render_type(p: dict[str, Any], t: str) -> Iterable[RenderableType]:
    from rich.text import Text

    b = p["budget"]
    rec = p["recommendation"][t]
    if rec is None:
        yield Text(f"{t}: no preset fits memory and time, even with the changes ehrplan tries")
    else:
        yield Text(f"{t}: recommended {rec['reason']}")
        if rec["change"]:
            yield Text(f"  with {rec['change']}; paste: {rec['flags']}")
        tm = rec.get("time")
        if tm:
            yield Text(
                f"  time: {tm['step']} per optimizer step, {tm['epoch']} per epoch of "
                f"{tm['patients']:,} patients ({tm['steps_per_epoch']:,} steps)"
            )
    up = p["next_size_up"][t]
    if up is not None and up["preset"] != (rec or {}).get("preset"):
        if up["fits_after_change"]:
            yield Text(
                f"  next size up {up['preset']}: fits memory with {up['change']}; "
                f"paste: {up['flags']}"
            )
        else:
            yield Text(
                f"  next size up {up['preset']}: {fmt_bytes(up['estimate_bytes'])}, short by "
                f"{fmt_bytes(up['shortfall_bytes'])}; no change ehrplan tries makes it fit"
            )
    yield Text(f"  {p['seed_check'][t]['statement']}")
    if p.get("data_recommendation"):
        dr = p["data_recommendation"][t]
        yield Text(
            f"  for this data: {dr['preset']} fits as shipped at the data's largest batch, "
            f"{fmt_bytes(dr['estimate_bytes'])} <= {fmt_bytes(dr['budget_bytes'])}"
            if dr
            else "  for this data: no preset fits as shipped at the data's largest batch"
        )
    if b["gpus"] > 1 and rec is not None:
        row = next(r for r in p["presets"] if r["preset"] == rec["preset"])
        dp = row["data_parallel"]
        keep = (
            f"keeps the effective batch {row['effective_batch_size']}"
            if dp["keeps_effective_batch"]
            else f"the effective batch becomes {dp['effective_batch_size']}, "
            f"not {row['effective_batch_size']}"
        )
        how = "a full replica each" if b["strategy"] == "ddp" else "sharded"
        yield Text(
            f"  {b['strategy'].upper()} over {b['gpus']} GPUs ({how}): micro-batch "
            f"{dp['batch_size']} per GPU x {dp['gradient_accumulation_steps']} accumulation "
            f"step(s) {keep}; {fmt_bytes(rec['estimate_bytes'])} per GPU, "
            f"{fmt_bytes(rec['estimate_bytes'] * b['gpus'])} for the job"
        )
