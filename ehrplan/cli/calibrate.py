"""`ehrplan calibrate`: measure a ladder of small steps on a device and fit its memory terms."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType
from rich.table import Table

from ehrplan.cli.options import JsonOpt
from ehrplan.cli.output import emit, warn
from ehrplan.errors import DeviceError
from ehrplan.plan.units import fmt_bytes

DEVICES = ("cpu", "cuda", "mps")

CalDeviceOpt = Annotated[
    str, typer.Option("--device", help="Device to calibrate: cpu (default), cuda or mps.")
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Write the profile here instead of $EHRPLAN_CACHE/calibration/<device>.json "
        "(default cache ~/.cache/ehrplan).",
    ),
]
BudgetOpt = Annotated[
    float,
    typer.Option(
        "--budget-seconds",
        min=10.0,
        help="Stop starting ladder shapes after this many seconds (the rest are skipped).",
    ),
]


def calibrate(
    device: CalDeviceOpt = "cpu",
    out: OutOpt = None,
    budget_seconds: BudgetOpt = 75.0,
    json_: JsonOpt = False,
) -> None:
    """Fit the memory terms the estimator cannot know from first principles for this device.

    Runs short measured training steps of a fixed ladder of small shapes (both families, each in
    a fresh process) and fits kernel scratch, runtime baseline and allocator retention (CPU,
    MPS) or the CUDA context and allocator reserve ratio. `estimate`, `recommend`, `validate`,
    `dry-run` and `train` then use the profile for this device. Exit 2 when the device is not
    present.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device '{device}' (valid: {', '.join(DEVICES)})")
    from ehrplan.atomic import write_json
    from ehrplan.plan.calibration import default_path
    from ehrplan.runtime.calibrate import calibrate as run
    from ehrplan.runtime.measure import resolve_device

    resolve_device(device)  # DeviceError (exit 2) when it is not here
    start = time.monotonic()
    profile = run(device, budget_seconds=budget_seconds, progress=lambda s: warn(s))
    path = out or default_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, profile.to_json())
    for s in profile.skipped:
        warn(f"skipped {s['name']}: {s['reason']}")
    payload: dict[str, Any] = {
        "path": str(path),
        "seconds": round(time.monotonic() - start, 1),
        "label": profile.label,
        **profile.to_json(),
    }
    emit("calibrate", payload, as_json=json_, render=_render)


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    t = Table(
        title=f"Calibration of {p['device_name']} ({p['device']}), torch {p['torch_version']}"
    )
    t.add_column("shape")
    t.add_column("live", justify="right")
    t.add_column("allocator", justify="right")
    t.add_column("process", justify="right")
    t.add_column("s/step", justify="right")
    t.add_column("allocator error", justify="right")
    t.add_column("process error", justify="right")
    for r in p["ladder"]:
        res = p["residuals"].get(r["name"], {})
        t.add_row(
            r["name"],
            fmt_bytes(r["live_bytes"]),
            fmt_bytes(r["allocator_peak_bytes"]),
            fmt_bytes(r["process_peak_bytes"]),
            f"{r['step_seconds']:.3f}",
            f"{res.get('allocator', 0):+.1%}",
            f"{res.get('process', 0):+.1%}",
        )
    yield t
    terms = ", ".join(f"{k} = {p['terms'][k]}" for k in p["fitted"])
    yield f"fitted: {terms}"
    yield f"profile written to {p['path']} in {p['seconds']} s ({p['label']})"
