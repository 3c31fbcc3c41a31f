"""`ehrplan data stats`: what a MEDS data set looks like before you choose a preset (no torch)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import RenderableType
from rich.table import Table

from ehrplan.cli.options import (
    COUNT_MAX,
    MAX_VALUE_BINS,
    MAX_WINDOW_HOURS,
    JsonOpt,
    LabelsOpt,
    PresetOpt,
    SplitsOpt,
    TaskOpt,
    finite,
)
from ehrplan.cli.output import emit, warn
from ehrplan.plan.config import get_preset, load_presets

data_app = typer.Typer(
    help="Inspect MEDS data sets: size, shape, labels, and what a preset would truncate.",
    no_args_is_help=True,
)

WindowOpt = Annotated[
    float,
    typer.Option(
        "--visit-window",
        parser=finite(gt=0, le=MAX_WINDOW_HOURS),
        metavar="FLOAT",
        help="Hours: events closer than this to the previous one share a visit.",
    ),
]
MinCountOpt = Annotated[
    int,
    typer.Option(
        "--min-count",
        min=0,
        max=COUNT_MAX,
        help="Vocabulary cut-off: train-split occurrences to keep a code.",
    ),
]
BinsOpt = Annotated[
    int,
    typer.Option(
        "--value-bins",
        min=0,
        max=MAX_VALUE_BINS,
        help="Quantile bins for numeric values (0: code only).",
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        max=COUNT_MAX,
        help="Batch size for batch shapes (default: the preset's).",
    ),
]


TrainWorkersOpt = Annotated[
    int,
    typer.Option(
        "--train-workers",
        min=0,
        max=256,
        help="Count the host RAM of this many DataLoader workers, as `train --workers N` runs "
        "them (forked on Linux: about 24 MiB each; spawned elsewhere: an interpreter with torch "
        "plus the split's arrays, each).",
    ),
]


def stats(
    directory: Annotated[Path, typer.Argument(help="Root of a MEDS data set.")],
    preset: PresetOpt = None,
    task: TaskOpt = None,
    labels: LabelsOpt = None,
    splits: SplitsOpt = None,
    visit_window: WindowOpt = 24.0,
    min_count: MinCountOpt = 5,
    value_bins: BinsOpt = 5,
    batch_size: BatchOpt = None,
    train_workers: TrainWorkersOpt = 0,
    json_: JsonOpt = False,
) -> None:
    """Patients, events, visits per patient, codes per visit, vocabulary, tasks, truncation.

    Lists the label tasks under DIR/tasks with their kind and label rows. For the task (--task,
    --labels, or the only one): examples per split (one per label row), label rows skipped, and
    per preset the events before prediction time that truncation drops. With --preset, that
    preset only; without it, every preset. Also the batch shapes of per-batch padding (with and
    without length bucketing) on the train split.
    """
    import numpy as np

    from ehrplan.cli.output import say
    from ehrplan.data.cache import data_memory, prepare
    from ehrplan.data.meds import check_root, data_files
    from ehrplan.data.stats import batch_dims, summary

    root = check_root(directory)
    settings = _settings(root, task, labels, splits, visit_window, min_count, value_bins)
    cache = prepare(root, settings, say=say)  # streams the data; `train` reads the same cache
    vocab = cache.vocab
    unk = cache.unk_share()
    names, counts = np.unique(cache.split, return_counts=True)
    payload: dict[str, Any] = {
        "root": str(directory),
        "files": len(data_files(root)),
        "patients": cache.num_patients,
        "events": cache.num_events,
        "visits": cache.num_visits,
        "visit_window_hours": cache.window_hours,
        "visits_per_patient": summary(cache.visits_per_patient()),
        "codes_per_visit": summary(cache.codes_per_visit()),
        "distinct_codes": unk["distinct_codes"],
        "vocab_size": len(vocab),
        "patients_by_split": {str(s): int(n) for s, n in zip(names, counts, strict=True)},
        "labels": None,
        "reader": cache.report,
        "vocab": {"min_count": min_count, "value_bins": value_bins, "size": len(vocab)},
        "example_cache": str(cache.path),
        "example_cache_bytes": cache.disk_bytes(),
        "unk": unk,
    }
    presets = [get_preset(preset)] if preset else list(load_presets().values())
    payload["tasks"], chosen = _tasks(directory, task, labels)
    payload["task"] = None
    task_info = cache.task
    if task_info is not None:
        payload["task"] = _task_summary(cache)
        if task_info["kind"] == "ckd_progression" and chosen is not None:
            payload["labels"] = _ckd_balance(chosen)
    sizes = {
        "events": cache.num_events,
        "visits": cache.num_visits,
        "patients": cache.num_patients,
        "vocab_size": len(vocab),
        "examples": payload["task"]["examples"] if payload["task"] else 0,
        "kind": task_info["kind"] if task_info is not None else None,
    }
    train = cache.patients_in("train")
    rows = []
    for p in presets:
        cfg = p.config
        bs = batch_size or cfg.batch_size
        mv, mc = cfg.max_visits, cfg.max_codes_per_visit
        row: dict[str, Any] = {
            "preset": p.name,
            "vocab_size": cfg.vocab_size,
            "truncation": _patient_truncation(cache, mv, mc),
            "host_ram_for_data": data_memory(
                **sizes,
                batch_size=bs,
                max_visits=mv,
                max_codes_per_visit=mc,
                workers=train_workers,
            ),
        }
        if task_info is not None:
            row |= _example_shapes(cache, bs, mv, mc)
        else:
            row["batch_shapes"] = {
                "unit": "patients",
                "per_batch": batch_dims(cache, train, bs, mv, mc),
                "per_batch_bucketed": batch_dims(cache, train, bs, mv, mc, bucketing=True),
            }
        rows.append(row)
    payload["presets"] = rows
    payload["warnings"] = _warnings(payload)
    for w in payload["warnings"]:
        warn(w)
    emit("data stats", payload, as_json=json_, render=_render)


UNK_WARN = 0.20
TRUNC_WARN = 0.50


def _warnings(p: dict[str, Any]) -> list[str]:
    out = []
    if p["unk"]["events_fraction"] > UNK_WARN:
        out.append(
            f"{p['unk']['events_fraction']:.0%} of events map to UNK at --min-count "
            f"{p['vocab']['min_count']} (lower --min-count; train takes --min-code-count)"
        )
    for r in p["presets"]:
        tr = r.get("examples_truncation")
        if tr and tr["events_dropped_fraction"] > TRUNC_WARN:
            out.append(
                f"{r['preset']}: truncation drops {tr['events_dropped_fraction']:.0%} of the "
                "events before prediction time (a larger preset, or --set max_visits=N)"
            )
    return out


def _settings(
    root: Path,
    task: str | None,
    labels: Path | None,
    splits: str | None,
    visit_window: float,
    min_count: int,
    value_bins: int,
) -> Any:
    """The example cache's settings from the data commands' options (no task, or several and
    none chosen: a cache without examples)."""
    from ehrplan.data.cache import Settings

    return Settings.for_request(
        root,
        task,
        labels,
        splits,
        optional_task=True,
        window_hours=visit_window,
        min_count=min_count,
        value_bins=value_bins,
    )


def _tasks(directory: Path, task: str | None, labels: Path | None) -> tuple[list[dict], Any]:
    """Every task found (name, kind, label rows) and the chosen one's label rows (None: none
    or several), each task's files read once."""
    from ehrplan.data.tasks import TASKS_DIR, TaskSource, find_tasks, read_task, resolve_task

    found, read = [], {}
    for name in find_tasks(directory):
        src = TaskSource(name, Path(directory) / TASKS_DIR / name)
        read[src] = lab = read_task(src)
        found.append({"name": name, "kind": lab.kind, "label_rows": len(lab)})
    if task is None and labels is None and len(found) != 1:
        return found, None
    chosen = resolve_task(directory, task, labels)
    return found, read[chosen] if chosen in read else read_task(chosen)


def _patient_truncation(cache: Any, max_visits: int, max_codes_per_visit: int) -> dict[str, Any]:
    """Whole patients truncated to the maxima (every patient, labels or not)."""
    from ehrplan.data.stats import truncation

    d = truncation(cache, cache.patients_in(None), max_visits, max_codes_per_visit).to_dict()
    d.pop("labelled_visits_dropped")  # the cache holds examples, not visit labels
    return d


def _example_shapes(
    cache: Any, batch_size: int, max_visits: int, max_codes_per_visit: int
) -> dict[str, Any]:
    """What a preset does to the task's examples: the events before prediction time truncation
    drops (all splits), and the batch shapes of the train split's sequences as training packs
    and pads them."""
    from ehrplan.data.examples import example_shapes, pack, truncation_loss
    from ehrplan.data.stats import shape_dims

    ex = cache.examples(max_visits, max_codes_per_visit)
    seq = pack(cache, ex, ex.in_split(cache, "train"))
    s = example_shapes(cache, ex, seq.host)
    dims = [
        shape_dims(
            s["visits_kept"], s["widest"], s["kept"], batch_size, max_visits,
            max_codes_per_visit, bucketing=b,
        )
        for b in (False, True)
    ]  # fmt: skip
    return {
        "batch_shapes": {"unit": "sequences", "per_batch": dims[0], "per_batch_bucketed": dims[1]},
        "examples_truncation": truncation_loss(cache, ex).to_dict(),
    }


def _task_summary(cache: Any) -> dict[str, Any]:
    """Examples per split, rows skipped, and the label balance of the kind (from the cache)."""
    import numpy as np

    task = cache.task
    ex = cache.examples(1, 1)  # the maxima change no example's label or split
    split_of = cache.split[ex.patient]
    names, counts = np.unique(split_of, return_counts=True)
    v = np.asarray(ex.value)
    kind = task["kind"]
    if kind == "binary":
        balance: dict[str, Any] = {"positives": int(v.sum()), "prevalence": float(v.mean())}
    elif kind == "regression":
        balance = {
            "mean": float(v.mean()),
            "p50": float(np.median(v)),
            "min": float(v.min()),
            "max": float(v.max()),
        }
    else:
        balance = {"class_counts": {str(i): int(n) for i, n in enumerate(np.bincount(v))}}
    return {
        "name": task["name"],
        "kind": kind,
        "files": list(task["files"]),
        "label_rows": ex.report["label_rows"],
        "examples": len(ex),
        "examples_by_split": {str(s): int(n) for s, n in zip(names, counts, strict=True)},
        "labels_before_first_event": ex.report["labels_before_first_event"],
        "labels_unknown_subject": ex.report["labels_unknown_subject"],
        "balance": balance,
    }


def _ckd_balance(labels: Any) -> dict[str, Any]:
    """The CKD composite's stage counts, seen stage changes and censoring, per label row."""
    import numpy as np

    stages = labels.value
    obs = labels.observed
    return {
        "labelled_visits": len(labels),
        "stage_counts": {str(i): int(n) for i, n in enumerate(np.bincount(stages))},
        "event_observed": int(obs.sum()),
        "censored": int((~obs).sum()),
        "time_to_event_days": {
            "p50": round(float(np.median(labels.days)), 1),
            "max": round(float(labels.days.max()), 1),
        },
    }


data_app.command("stats")(stats)


WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-j",
        min=1,
        max=256,
        help="Processes that read the data files (default: 2, or 1 on a one-core machine). "
        "Each holds one file's events; the cache is the same for any number.",
    ),
]


def prepare(
    directory: Annotated[Path, typer.Argument(help="Root of a MEDS data set.")],
    task: TaskOpt = None,
    labels: LabelsOpt = None,
    splits: SplitsOpt = None,
    visit_window: WindowOpt = 24.0,
    min_count: MinCountOpt = 5,
    value_bins: BinsOpt = 5,
    workers: WorkersOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Build (or reuse) the example cache that `train`, `dry-run --data` and `predict` read.

    Reads the data files in --workers processes, one file each at a time, and writes token
    ids, visit offsets, visit time features and the task's examples (one per label row, cut at
    its prediction time) as memory-mapped arrays under $EHRPLAN_CACHE (default
    ~/.cache/ehrplan), keyed by the data's files (names, sizes, mtimes), the task and these
    settings: `train` with the same --task/--labels, --splits and --min-code-count (= --min-count
    here) reuses it. A valid cache is reused; a changed, truncated or other-version one is
    rebuilt. With no task (or several and none chosen) the cache holds no examples.
    """
    import time

    from ehrplan.data.cache import default_workers
    from ehrplan.data.cache import prepare as prepare_cache
    from ehrplan.data.meds import check_root
    from ehrplan.errors import Interrupted

    check_root(directory)
    settings = _settings(directory, task, labels, splits, visit_window, min_count, value_bins)
    n = workers or default_workers()
    start = time.perf_counter()
    try:
        cache = prepare_cache(directory, settings, workers=n)
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted: the example cache was not built (no partial cache is left)"
        ) from None
    seconds = time.perf_counter() - start
    h = cache.header
    labels_report = h["report"].get("labels") or {}
    payload: dict[str, Any] = {
        "root": str(directory),
        "cache": str(cache.path),
        "reused": cache.reused,
        "seconds": round(seconds, 3),
        **h["counts"],
        "vocab_size": h["vocab_size"],
        "token_dtype": h["arrays"]["tokens"]["dtype"],
        "bytes_on_disk": cache.disk_bytes(),
        "arrays": {n: a["bytes"] for n, a in h["arrays"].items()},
        "workers": n,
        "task": (h.get("task") or {}).get("name"),
        "kind": (h.get("task") or {}).get("kind"),
        "examples": int(labels_report.get("examples", 0)),
        "label_rows": int(labels_report.get("label_rows", 0)),
    }
    if not cache.reused:
        payload["events_per_second"] = round(h["counts"]["events"] / max(seconds, 1e-9))
    emit("data prepare", payload, as_json=json_, render=_render_prepare)


data_app.command("prepare")(prepare)


def _render_prepare(p: dict[str, Any]) -> Iterable[RenderableType]:
    how = "reused" if p["reused"] else f"built in {p['seconds']} s"
    t = Table(title=f"Example cache of {p['root']} ({how})")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("cache", p["cache"])
    for key in ("patients", "visits", "events", "vocab_size"):
        t.add_row(key.replace("_", " "), f"{p[key]:,}")
    if p["task"] is not None:
        t.add_row(f"examples ({p['task']}, {p['kind']})", f"{p['examples']:,}")
        t.add_row("label rows", f"{p['label_rows']:,}")
    t.add_row("token ids", p["token_dtype"])
    t.add_row("bytes on disk", f"{p['bytes_on_disk'] / 2**20:,.1f} MiB")
    if "events_per_second" in p:
        t.add_row(f"events/s ({p['workers']} workers)", f"{p['events_per_second']:,}")
    yield t


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    t = Table(title=f"MEDS data set {p['root']}")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("patients", f"{p['patients']:,}")
    for split, n in p["patients_by_split"].items():
        t.add_row(f"  in {split or '(no split)'}", f"{n:,}")
    t.add_row("events", f"{p['events']:,}")
    t.add_row("visits", f"{p['visits']:,} (window {p['visit_window_hours']:g} h)")
    t.add_row("distinct codes", f"{p['distinct_codes']:,}")
    t.add_row("example cache on disk", f"{p['example_cache_bytes'] / 2**20:,.1f} MiB")
    v = p["vocab"]
    t.add_row(
        "vocabulary (train split)",
        f"{v['size']:,} (min count {v['min_count']}, {v['value_bins']} value bins, PAD+UNK)",
    )
    u = p["unk"]
    t.add_row(
        "mapped to UNK",
        f"{u['events_fraction']:.1%} of events, {u['codes_fraction']:.1%} of distinct codes",
    )
    yield t

    if p["tasks"]:
        tt = Table(title="Tasks (tasks/NAME)")
        for col in ("task", "kind", "label rows"):
            tt.add_column(col, justify="right" if col == "label rows" else "left")
        for r in p["tasks"]:
            tt.add_row(r["name"], r["kind"], f"{r['label_rows']:,}")
        yield tt
    task = p.get("task")
    if task:
        by = ", ".join(f"{n:,} {s or '(no split)'}" for s, n in task["examples_by_split"].items())
        yield (
            f"task {task['name']} ({task['kind']}): {task['examples']:,} examples, one per label "
            f"row ({by}); skipped: {task['labels_before_first_event']:,} label rows before the "
            f"subject's first event, {task['labels_unknown_subject']:,} for unknown subjects"
        )
    elif len(p["tasks"]) > 1:
        yield "several tasks: choose one with --task NAME for its examples"

    d = Table(title="Shape")
    d.add_column("")
    for col in ("mean", "p50", "p95", "max"):
        d.add_column(col, justify="right")
    for key in ("visits_per_patient", "codes_per_visit"):
        s = p[key]
        d.add_row(
            key.replace("_", " "), f"{s['mean']:.1f}", *(f"{s[c]:,}" for c in ("p50", "p95", "max"))
        )
    yield d

    if p["labels"]:
        lab = p["labels"]
        lt = Table(title=f"Labels: {lab['labelled_visits']:,} labelled visits")
        lt.add_column("stage")
        lt.add_column("visits", justify="right")
        lt.add_column("share", justify="right")
        total = max(lab["labelled_visits"], 1)
        for s, n in lab["stage_counts"].items():
            lt.add_row(s, f"{n:,}", f"{n / total:.1%}")
        lt.add_row(
            "next change seen", f"{lab['event_observed']:,}", f"{lab['event_observed'] / total:.1%}"
        )
        lt.add_row("censored", f"{lab['censored']:,}", f"{lab['censored'] / total:.1%}")
        yield lt

    pt = Table(
        title="Per preset: events lost to truncation; padded/real positions of train batches",
        caption=(
            "lost: of the task's examples' events before prediction time"
            if p.get("task")
            else "lost: of every patient's events"
        )
        + "; batch: padded to each batch's maxima; bucketed: with length bucketing; "
        "preset: padded to max V x C",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
    )
    pt.add_column("preset", no_wrap=True, min_width=max(len(r["preset"]) for r in p["presets"]))
    for col in ("V x C", "lost", "V p95", "C p95", "batch", "bucketed", "preset", "data RAM"):
        pt.add_column(col, justify="right", no_wrap=True, min_width=max(len(col), 6))
    for r in p["presets"]:
        tr = r["truncation"]
        per = r["batch_shapes"]["per_batch"]
        buck = r["batch_shapes"]["per_batch_bucketed"]
        pt.add_row(
            r["preset"],
            f"{tr['max_visits']}x{tr['max_codes_per_visit']}",
            f"{(r.get('examples_truncation') or tr)['events_dropped_fraction']:.1%}",
            str(per["visits"]["p95"]),
            str(per["codes_per_visit"]["p95"]),
            f"{per['padding_ratio']:.2f}",
            f"{buck['padding_ratio']:.2f}",
            f"{per['padding_ratio_preset_maxima']:.2f}",
            f"{r['host_ram_for_data']['total'] / 2**20:,.0f} MiB",
        )
    yield pt
