"""`ehrplan compare`: the LSTM and the Transformer of one size, trained alike, side by side.

Both presets of a size (``<size>-lstm`` and ``<size>-transformer``) are trained with the trainer
(`ehrplan.runtime.training.run`) on the same data set (so the same train / tuning / held-out split
and the same train-split vocabulary), for the same number of optimizer steps, with the same seed,
the same CPU thread count and the same evaluation schedule. The presets keep their own micro-batch
and accumulation (they are sized for memory); patients per optimizer step are reported so a reader
sees whether the two saw as many patients.

The comparison folder (``--out``, default ``runs/compare-<size>``, numbered when taken) holds
the two run folders, ``comparison.json`` (the payload ``--json`` prints), ``comparison.md`` (the
table) and ``curves.png`` (both learning curves in one figure).

Every number in the table is read from the two runs: parameters are counted analytically from
the config they trained (exact, `ehrplan.plan.params`); the measured step peak is the largest of the
run's measurements (``memory.json``) beside the estimator's figure for that same batch; held-out
metrics are those of each run's best checkpoint (lowest tuning loss).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ehrplan.errors import UsageError
from ehrplan.plan.config import SIZES, EHRModelConfig, get_preset, validate_config
from ehrplan.plan.units import fmt_bytes

SIDES: tuple[str, ...] = ("lstm", "transformer")
LABELS = {"lstm": "LSTM", "transformer": "Transformer"}
COLORS = {"lstm": "tab:blue", "transformer": "tab:orange"}
FILES = {"json": "comparison.json", "markdown": "comparison.md", "png": "curves.png"}


@dataclass
class CompareRequest:
    """What ``ehrplan compare`` was asked for."""

    size: str
    data: Path | None
    patients: int
    max_steps: int
    seed: int
    out: Path | None
    eval_every: int | None
    threads: int | None
    device: str
    json: bool
    task: str | None = None
    labels: Path | None = None
    splits: str | None = None


def comparison_dir(out: Path | None, size: str) -> Path:
    """``--out`` (which must not hold a comparison or a run), or ``runs/compare-<size>``,
    ``runs/compare-<size>-2``, ..."""
    from ehrplan.runtime.training.run import RUNS_ROOT

    if out is not None:
        taken = [out / FILES["json"], *(out / f"{size}-{t}" for t in SIDES)]
        if any(p.exists() for p in taken):
            raise UsageError(f"{out} already holds a comparison: pick another --out")
        return out
    d = RUNS_ROOT / f"compare-{size}"
    i = 2
    while d.exists():
        d = RUNS_ROOT / f"compare-{size}-{i}"
        i += 1
    return d


def _presets(size: str) -> dict[str, EHRModelConfig]:
    if size not in SIZES:
        raise UsageError(f"unknown size '{size}' (valid: {', '.join(SIZES)})")
    return {t: get_preset(f"{size}-{t}").config for t in SIDES}


def _largest_measurement(run_dir: Path) -> dict[str, Any] | None:
    """The run's measured step with the largest peak (``memory.json``), or None."""
    path = run_dir / "memory.json"
    if not path.is_file():
        return None
    records = [m for m in json.loads(path.read_text()) if m.get("measured_peak_bytes")]
    return max(records, key=lambda m: m["measured_peak_bytes"], default=None)


def _side(name: str, summary: dict[str, Any], wall: float) -> dict[str, Any]:
    """One column of the table, from a finished run's summary and folder."""
    from ehrplan.plan.params import count_parameters

    run_dir = Path(summary["run_dir"])
    config = validate_config(summary["config"])
    params = count_parameters(config)
    m = _largest_measurement(run_dir)
    held = summary["best"]["held_out"]
    return {
        "preset": name,
        "run_dir": str(run_dir),
        "parameters": params.total,
        "trainable_parameters": params.trainable,
        "vocab_size": config.vocab_size,
        "batch": [config.batch_size, config.max_visits, config.max_codes_per_visit],
        "patients_per_step": config.effective_batch_size,
        "estimated_peak_bytes": summary.get("estimate_bytes"),
        "measured_peak_bytes": m["measured_peak_bytes"] if m else None,
        "measured_step": m["step"] if m else None,
        "measured_batch": m["batch_shape"] if m else None,
        "measured_method": m["method"] if m else None,
        "estimate_for_measured_batch_bytes": m["estimated_peak_bytes"] if m else None,
        "estimate_error": m["error"] if m else None,
        "memory_measurements": summary.get("memory_measurements"),
        "steps": summary["steps"],
        "patients_trained": summary["patients_trained"],
        "patients_per_s": summary["patients_per_s"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": wall,
        "best_step": summary["best_step"],
        "final_train_loss": summary["final_train_loss"],
        "held_out": {
            k: held.get(k)
            for k in (
                "loss",
                "stage_accuracy",
                "stage_macro_f1",
                "baseline_stage_macro_f1",
                "stage_macro_auroc",
                "c_index",
            )
        },
    }


def _warm_imports() -> None:
    """Import what a run imports on first use (metrics, plotting) before either run is timed,
    so the first run's wall time does not carry those imports."""
    import importlib

    import matplotlib

    matplotlib.use("Agg")
    for name in ("matplotlib.pyplot", "sklearn.metrics", "lifelines.utils"):
        importlib.import_module(name)


def run_compare(req: CompareRequest) -> dict[str, Any]:
    """Train both models of ``req.size``; write the table and the curves; return the payload."""
    from ehrplan.runtime.training import run as runner
    from ehrplan.runtime.training.data import synthetic_cohort
    from ehrplan.runtime.training.device import auto_threads, resolve_device

    configs = _presets(req.size)
    device = resolve_device(req.device)
    root = req.data if req.data is not None else synthetic_cohort(req.patients)
    # one thread count for both runs: the automatic choice reads the load average, which moves
    threads = req.threads or (auto_threads() if device.type == "cpu" else None)
    eval_every = req.eval_every or max(1, req.max_steps // 10)
    out = comparison_dir(req.out, req.size)
    from ehrplan.atomic import ensure_dir

    ensure_dir(out)

    _warm_imports()
    sides: dict[str, dict[str, Any]] = {}
    for t in SIDES:
        name = f"{req.size}-{t}"
        config = configs[t]

        def resolve(_: tuple[Any, ...], c: EHRModelConfig = config, n: str = name) -> Any:
            return c, f"preset {n}"

        request = runner.Request(
            auto=False,
            model_type=t,
            config_options=(name, None, None, None, None, None),
            named=True,
            data=root,
            patients=req.patients,
            device=req.device,
            precision="auto",
            epochs=req.max_steps,  # every epoch has a step: the step budget is what stops it
            max_steps=req.max_steps,
            out=out / name,
            seed=req.seed,
            resume=False,
            lr=None,
            save_every=max(eval_every, 50),
            eval_every=eval_every,
            json=req.json,
            threads=threads,
            task=req.task,
            labels=req.labels,
            splits=req.splits,
        )
        t0 = time.perf_counter()
        summary = runner.run(request, resolve=resolve)
        sides[t] = _side(name, summary, time.perf_counter() - t0)

    payload: dict[str, Any] = {
        "size": req.size,
        "data": str(root),
        "max_steps": req.max_steps,
        "seed": req.seed,
        "eval_every": eval_every,
        "threads": threads,
        "device": str(device),
        "comparison_dir": str(out),
        "files": {k: str(out / v) for k, v in FILES.items()},
        "held_out_metrics_of": "each run's best checkpoint (lowest tuning loss)",
        "models": sides,
    }
    from ehrplan.atomic import write_bytes, write_json, write_text

    write_json(out / FILES["json"], payload)
    write_text(out / FILES["markdown"], markdown(payload))
    write_bytes(out / FILES["png"], plot_comparison(payload))
    return payload


# ------------------------------------------------------------------------------------ the table


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _measured_batch(s: dict[str, Any]) -> str:
    if s["measured_batch"] is None:
        return "-"
    return "x".join(str(v) for v in s["measured_batch"]) + f" (step {s['measured_step']})"


def _for_batch(s: dict[str, Any]) -> str:
    if s["estimate_for_measured_batch_bytes"] is None:
        return "-"
    err = s["estimate_error"]
    pct = "" if err is None else f" ({err:+.1%})"
    return fmt_bytes(s["estimate_for_measured_batch_bytes"]) + pct


def _ratio(key: str) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    """Transformer / LSTM for a size, time or memory figure."""

    def f(a: dict[str, Any], b: dict[str, Any]) -> str:
        x, y = a.get(key), b.get(key)
        return "-" if not x or y is None else f"x{y / x:.2f}"

    return f


def _diff(key: str) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    """Transformer - LSTM for a held-out metric."""

    def f(a: dict[str, Any], b: dict[str, Any]) -> str:
        x, y = a["held_out"].get(key), b["held_out"].get(key)
        return "-" if x is None or y is None else f"{y - x:+.3f}"

    return f


def _none(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ""


Row = tuple[str, Callable[[dict[str, Any]], str], Callable[[dict[str, Any], dict[str, Any]], str]]


def _held(key: str, digits: int = 3) -> Callable[[dict[str, Any]], str]:
    return lambda s: _f(s["held_out"][key], digits)


def _bytes(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda s: fmt_bytes(s[key])


def _num(key: str, digits: int = 1) -> Callable[[dict[str, Any]], str]:
    return lambda s: _f(s[key], digits)


#: (label, one model's cell, the Transformer-vs-LSTM cell)
ROWS: list[Row] = [
    ("preset", lambda s: s["preset"], _none),
    ("parameters", lambda s: f"{s['parameters']:,}", _ratio("parameters")),
    ("patients per step", lambda s: str(s["patients_per_step"]), _none),
    ("peak, est. (preset max.)", _bytes("estimated_peak_bytes"), _ratio("estimated_peak_bytes")),
    ("peak, measured (largest)", _bytes("measured_peak_bytes"), _ratio("measured_peak_bytes")),
    ("  its batch (step)", _measured_batch, _none),
    ("  estimate for it", _for_batch, _ratio("estimate_for_measured_batch_bytes")),
    ("patients / s (training)", _num("patients_per_s"), _ratio("patients_per_s")),
    ("wall time, s", _num("wall_seconds"), _ratio("wall_seconds")),
    ("held-out macro-F1 (stage)", _held("stage_macro_f1"), _diff("stage_macro_f1")),
    ("  majority-stage baseline", _held("baseline_stage_macro_f1"), _none),
    ("held-out AUROC (stage)", _held("stage_macro_auroc"), _diff("stage_macro_auroc")),
    ("held-out C-index (time)", _held("c_index"), _diff("c_index")),
    ("held-out loss", _held("loss", 4), _diff("loss")),
    ("best checkpoint, step", lambda s: str(s["best_step"]), _none),
]  # fmt: skip

HEADER = ("", "LSTM", "Transformer", "vs LSTM")
NOTES = (
    "vs LSTM: Transformer / LSTM for sizes, memory and time; Transformer - LSTM for metrics.",
    "peak: one training step (forward, backward, Adam); measured on the batch named, estimated "
    "by ehrplan's estimator for the same batch and at the preset maxima.",
    "wall time: loading data, training, evaluating, writing checkpoints.",
)


def notes(payload: dict[str, Any]) -> list[str]:
    """How to read the table, and where the two runs were not alike."""
    out = list(NOTES)
    a, b = payload["models"]["lstm"], payload["models"]["transformer"]
    if a["batch"][1:] != b["batch"][1:]:
        out.append(
            f"the presets keep different maxima (visits x codes: LSTM {a['batch'][1]}x"
            f"{a['batch'][2]}, Transformer {b['batch'][1]}x{b['batch'][2]}), so their held-out "
            "metrics cover the visits each keeps"
        )
    if a["patients_per_step"] != b["patients_per_step"]:
        out.append("the presets train on different numbers of patients per step")
    return out


def table_rows(payload: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The table as strings: label, LSTM, Transformer, ratio or difference."""
    a, b = payload["models"]["lstm"], payload["models"]["transformer"]
    return [(label, cell(a), cell(b), vs(a, b)) for label, cell, vs in ROWS]


def title(payload: dict[str, Any]) -> str:
    return (
        f"{payload['size']}: LSTM vs Transformer, {payload['max_steps']} steps, seed "
        f"{payload['seed']}, {payload['device']}"
        + (f", {payload['threads']} CPU thread(s)" if payload.get("threads") else "")
    )


def markdown(payload: dict[str, Any]) -> str:
    """The table as Markdown, with the settings both runs shared."""
    lines = [
        f"# {title(payload)}",
        "",
        f"Data: `{payload['data']}` (same split and vocabulary for both); evaluation on the "
        f"tuning split every {payload['eval_every']} steps; held-out metrics of "
        f"{payload['held_out_metrics_of']}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
    ]
    for label, *cells in table_rows(payload):
        indent = "&nbsp;&nbsp;" if label.startswith("  ") else ""  # Markdown drops the spaces
        row = [indent + label.strip(), *cells]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines += [""] + [f"- {n}" for n in notes(payload)]
    lines += ["", "Runs: " + ", ".join(f"`{s['run_dir']}`" for s in payload["models"].values())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ the figure


def _records(run_dir: str) -> list[dict[str, Any]]:
    out = []
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _smooth(y: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` steps."""
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc += v
        if i >= window:
            acc -= y[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_comparison(payload: dict[str, Any]) -> bytes:
    """Both learning curves in one PNG: training loss per step and tuning loss per evaluation
    (left), tuning macro-F1 and C-index per evaluation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    base = None
    for t, side in payload["models"].items():
        records = _records(side["run_dir"])
        steps = [r for r in records if r.get("kind") == "step"]
        evals = [r for r in records if r.get("kind") == "eval" and r.get("split") == "tuning"]
        c, label = COLORS[t], LABELS[t]
        if steps:
            x = [r["step"] for r in steps]
            y = [r["loss"] for r in steps]
            window = max(1, len(y) // 20)
            ax_loss.plot(x, y, c=c, lw=0.6, alpha=0.3)
            ax_loss.plot(x, _smooth(y, window), c=c, lw=1.5, label=f"{label} train (avg {window})")
        if evals:
            base = evals[-1].get("baseline_stage_macro_f1", base)
            ex = [r["step"] for r in evals]
            ax_loss.plot(ex, [r["loss"] for r in evals], "o--", c=c, ms=4, label=f"{label} tuning")
            for key, style in (("stage_macro_f1", "o-"), ("c_index", "s:")):
                pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
                if pts:
                    name = "macro-F1" if key == "stage_macro_f1" else "C-index"
                    ax_metric.plot(
                        *zip(*pts, strict=True), style, c=c, ms=4, label=f"{label} {name}"
                    )
    if base is not None:  # the tuning split's, like the curves
        ax_metric.axhline(base, ls="--", c="gray", lw=1, label="majority-stage macro-F1")
    ax_metric.axhline(0.5, ls=":", c="lightgray", lw=1, label="C-index of chance")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_metric.set(xlabel="optimizer step", ylim=(0, 1), title="tuning split")
    ax_loss.legend(fontsize=8)
    ax_metric.legend(fontsize=8)
    fig.suptitle(title(payload))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
