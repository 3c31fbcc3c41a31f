"""`ehrplan hardware`: what this machine has, the budget per device, and a bug-report block."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ehrplan.cli.options import JsonOpt
from ehrplan.cli.output import emit
from ehrplan.plan.hardware import CUDA_CONTEXT_ALLOWANCE, HardwareReport, probe
from ehrplan.plan.planner import DEFAULT_HEADROOM
from ehrplan.plan.units import fmt_bytes

if TYPE_CHECKING:
    from rich.console import RenderableType

ProbeMpsOpt = Annotated[
    bool,
    typer.Option(
        "--probe-mps",
        help="On Apple Silicon, ask torch for Metal's recommended working set (imports torch) "
        "instead of estimating it from the unified memory.",
    ),
]


def _version(dist: str) -> str | None:
    """An installed distribution's version, read from its metadata (never imports it)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_budgets(r: HardwareReport, headroom: float = DEFAULT_HEADROOM) -> list[dict[str, Any]]:
    """Usable memory and the budget at ``headroom`` for each device found."""
    rows: list[dict[str, Any]] = []
    for g in r.nvidia:
        rows.append(
            {
                "device": f"cuda:{g.cuda_index}",
                "name": g.name + (" (MIG slice)" if g.mig_slice else ""),
                "usable_bytes": g.usable_bytes,
                "rule": "total - driver reserve - CUDA context "
                f"({fmt_bytes(CUDA_CONTEXT_ALLOWANCE)})",
            }
        )
    if r.apple is not None and r.apple.working_set_bytes is not None:
        rows.append(
            {
                "device": "mps",
                "name": f"{r.apple.chip or 'Apple Silicon'} GPU",
                "usable_bytes": r.apple.working_set_bytes,
                "rule": r.apple.working_set_source,
            }
        )
    if r.host.budget_bytes is not None:
        # the one host budget (`ehrplan.plan.planner.host_budget`): available now, total beside
        limited = r.host.cgroup_limit_bytes is not None
        total = f"{r.host.budget_bytes / 1024**3:.2f} GiB " + (
            "cgroup memory limit" if limited else "physical RAM"
        )
        available = r.host.available_bytes
        rows.append(
            {
                "device": "cpu",
                "name": r.cpu.model or "CPU",
                "usable_bytes": available if available is not None else r.host.budget_bytes,
                "rule": f"available now, of {total}"
                if available is not None
                else f"{total} (available RAM unknown)",
            }
        )
    for row in rows:
        # the usable memory less the safety margin
        row["budget_bytes"] = int(row["usable_bytes"] * (1 - headroom))
    return rows


def bug_report(r: HardwareReport, budgets: list[dict[str, Any]]) -> str:
    """Plain text to paste into an issue."""
    h = r.host
    lines = [
        f"ehrplan {_version('ehrplan') or '?'} | Python {r.python} | {r.system} {r.machine}"
        f" | {platform.platform()}",
        f"torch {_version('torch') or 'not installed'} (installed version; not imported)"
        f" | nvidia-ml-py {_version('nvidia-ml-py') or 'not installed'}",
        f"CPU: {r.cpu.model} | {r.cpu.physical_cores} physical / {r.cpu.logical_cores} logical",
        f"RAM: total {h.total_bytes} B | available {h.available_bytes} B | cgroup v"
        f"{h.cgroup_version or '-'} limit {h.cgroup_limit_bytes or 'none'}",
        f"NVIDIA: driver {r.nvidia_driver or '-'} | CUDA {r.cuda_driver or '-'} | "
        f"{len(r.nvidia)} visible device(s)",
    ]
    for g in r.nvidia:
        lines.append(
            f"  cuda:{g.cuda_index} {g.name} cc {g.compute_capability} total {g.total_bytes} B "
            f"reserved {g.reserved_bytes} B free {g.free_bytes} B mig {g.mig_mode} "
            f"uuid {g.uuid} bus {g.pci_bus_id}"
        )
    if r.apple is not None:
        a = r.apple
        lines.append(
            f"Apple: {a.chip} | unified {a.unified_memory_bytes} B | working set "
            f"{a.working_set_bytes} B ({a.working_set_source}) | rosetta {a.rosetta}"
        )
    for b in budgets:
        lines.append(f"budget {b['device']}: usable {b['usable_bytes']} B ({b['rule']})")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def hardware(probe_mps: ProbeMpsOpt = False, json_: JsonOpt = False) -> None:
    """What this machine has to train on, and how much of it a training step may use.

    Honours container (cgroup) memory limits, CUDA_VISIBLE_DEVICES and MIG; counts only Metal's
    working set of Apple's unified memory. Never imports torch unless --probe-mps.
    """
    reader = None
    if probe_mps:
        from ehrplan.runtime.training.device import mps_recommended_max_memory as reader
    report = probe(mps_reader=reader)
    budgets = device_budgets(report)
    payload = {
        "hardware": report.model_dump(),
        "headroom": DEFAULT_HEADROOM,
        "budgets": budgets,
        "bug_report": bug_report(report, budgets),
    }
    emit("hardware", payload, as_json=json_, render=_render)


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    from rich.table import Table
    from rich.text import Text

    hw = p["hardware"]
    h, cpu = hw["host"], hw["cpu"]
    host = Table(title="Host", show_header=False)
    host.add_column("")
    host.add_column("")
    host.add_row("system", f"{hw['system']} {hw['machine']}, Python {hw['python']}")
    host.add_row("CPU", f"{cpu['model']} ({cpu['physical_cores']} physical cores)")
    host.add_row(
        "RAM", f"{fmt_bytes(h['total_bytes'])} (available {fmt_bytes(h['available_bytes'])})"
    )
    limit = h["cgroup_limit_bytes"]
    host.add_row(
        "container limit",
        f"{fmt_bytes(limit)} (cgroup v{h['cgroup_version']}, {h['cgroup_file']})"
        if limit
        else "none",
    )
    yield host
    if hw["nvidia"]:
        gpus = Table(
            title=f"NVIDIA GPUs (driver {hw['nvidia_driver']}, CUDA {hw['cuda_driver']}), "
            "in CUDA's order after CUDA_VISIBLE_DEVICES"
        )
        for col in ("cuda", "name", "cc", "total", "reserved", "free", "MIG", "uuid"):
            gpus.add_column(col)
        for g in hw["nvidia"]:
            gpus.add_row(
                str(g["cuda_index"]),
                g["name"] + (" (slice)" if g["mig_slice"] else ""),
                str(g["compute_capability"]),
                fmt_bytes(g["total_bytes"]),
                fmt_bytes(g["reserved_bytes"]),
                fmt_bytes(g["free_bytes"]),
                {True: "on", False: "off", None: "-"}[g["mig_mode"]],
                str(g["uuid"]),
            )
        yield gpus
    else:
        yield Text("NVIDIA GPUs: none found")
    a = hw["apple"]
    if a:
        yield Text(
            f"Apple Silicon: {a['chip']}, unified memory {fmt_bytes(a['unified_memory_bytes'])}, "
            f"GPU working set {fmt_bytes(a['working_set_bytes'])} ({a['working_set_source']})"
            + (" — running under Rosetta 2" if a["rosetta"] else "")
        )
    budgets = Table(title=f"Budget per device (headroom {p['headroom']:.0%})")
    for col in ("device", "name", "usable", "budget", "usable is"):
        budgets.add_column(col, justify="right" if col in ("usable", "budget") else "left")
    for b in p["budgets"]:
        budgets.add_row(
            b["device"],
            b["name"],
            fmt_bytes(b["usable_bytes"]),
            fmt_bytes(b["budget_bytes"]),
            b["rule"],
        )
    yield budgets
    for n in hw["notes"]:
        yield Text(f"note: {n}")
    yield Text("\nFor a bug report, paste this block:\n")
    yield Text("```\n" + p["bug_report"] + "\n```")
