"""`ehrplan train` from options to summary: choose, load data, prepare the run folder, train.

The run folder (``--out``, default ``runs/<preset>``, numbered when taken) keeps:

- ``config.json``: the resolved model config, where it came from (and ``--auto``'s reasons), the
  training settings, the data set, device and precision;
- ``vocab.json``, ``hardware.json``, ``estimate.json`` (the analytic peak of the preset shape);
- ``metrics.jsonl``: one JSON line per optimizer step (``kind: step``) and per evaluation
  (``kind: eval``); ``memory.json``: measured peaks beside the estimate for the same batches;
- ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (lowest tuning loss), written atomically;
- ``summary.json`` and ``curves.png`` at the end.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ehrplan.atomic import remove_stale_temps, write_json, write_text
from ehrplan.errors import EhrplanError, Interrupted, UsageError
from ehrplan.plan.config import EHRModelConfig, validate_config
from ehrplan.plan.units import fmt_bytes
from ehrplan.runtime.training.runfiles import read_run_config

RUNS_ROOT = Path("runs")


@dataclass
class Request:
    """What the command line asked for."""

    auto: bool
    model_type: str | None
    config_options: tuple[Any, ...]
    named: bool
    data: Path | None
    patients: int
    device: str
    precision: str
    epochs: int | None
    max_steps: int | None
    out: Path | None
    seed: int | None
    resume: bool
    lr: float | None
    save_every: int
    eval_every: int | None
    json: bool
    threads: int | None = None
    bucket_patients: int | None = None
    time_weight: float | None = None
    embeddings: Path | None = None
    freeze_embeddings: bool = False
    project_embeddings: bool = False
    shard: bool = False
    """FSDP2 over the ranks of a torchrun job (default under torchrun: DDP)."""
    task: str | None = None
    labels: Path | None = None
    splits: str | None = None
    min_code_count: int | None = None
    overwrite: bool = False
    """Start a new run in an ``--out`` that holds one (its files are removed first)."""
    workers: int | None = None
    """DataLoader worker processes that collate ahead (None: a resumed run's own, else by
    device: `ehrplan.runtime.training.loader.default_workers`)."""


RUN_FILES = (
    "config.json", "vocab.json", "hardware.json", "estimate.json", "embeddings.json",
    "metrics.jsonl", "memory.json", "summary.json", "curves.png", "task.json", "splits.parquet",
)  # fmt: skip
"""What a run writes at the top of its folder (``--overwrite`` removes these and checkpoints/)."""


def _has_run(d: Path) -> bool:
    return (d / "checkpoints" / "last.pt").is_file() or (d / "config.json").is_file()


def new_run_dir(out: Path | None, name: str) -> Path:
    """``--out``, or ``runs/<name>``, ``runs/<name>-2``, ... (`_claim` checks that it holds no
    run, under its lock)."""
    if out is not None:
        return out
    d = RUNS_ROOT / name
    i = 2
    while d.exists():
        d = RUNS_ROOT / f"{name}-{i}"
        i += 1
    return d


def resume_run_dir(out: Path | None) -> Path:
    """``--out``, or the newest run under ``runs/``; it must hold the run's ``config.json`` (a
    run stopped before its first checkpoint resumes from step 0)."""
    if out is None:
        runs = [d for d in RUNS_ROOT.glob("*") if (d / "checkpoints" / "last.pt").is_file()]
        if not runs:
            raise UsageError(f"--resume: no run to resume under {RUNS_ROOT}/ (give --out DIR)")
        out = max(runs, key=lambda d: (d / "checkpoints" / "last.pt").stat().st_mtime)
    if not (out / "config.json").is_file():
        hint = " (start a new one there with --overwrite)" if _has_run(out) else ""
        raise UsageError(f"--resume: {out} holds no run to resume (no config.json){hint}")
    return out


def _clear_run(run_dir: Path) -> None:
    """Remove what a run wrote (`RUN_FILES`, ``checkpoints/``), and nothing else."""
    import shutil

    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _claim(req: Request, run_dir: Path, env: Any, stack: ExitStack, new: bool) -> None:
    """Take the run folder's lock (rank 0; every rank learns the outcome); then remove the temp
    files a killed run left, and for a new run check that the folder holds none (or clear it,
    with ``--overwrite``)."""
    from ehrplan.runtime import distributed as dist_
    from ehrplan.runtime.training.lock import RunLock

    failure: EhrplanError | None = None
    if env.is_main:
        try:
            lock = stack.enter_context(RunLock(run_dir))
            if new and _has_run(run_dir):
                if not req.overwrite:
                    raise UsageError(
                        f"{run_dir} already holds a run: continue it with --resume, start it "
                        "over with --overwrite, or choose another --out"
                    )
                _clear_run(run_dir)
            if lock.stale_pid is not None:
                _say(req, f"  took over the lock of process {lock.stale_pid} (no longer running)")
            removed = remove_stale_temps(run_dir)
            if removed:
                _say(req, f"  removed {len(removed)} temporary file(s) left by a killed run")
        except EhrplanError as err:
            failure = err
    failure = dist_.broadcast_object(failure, env)  # type: ignore[assignment]
    if failure is not None:
        raise failure


def _prepare_cache(req: Request, env: Any, root: Path, vocab_file: Path | None, asked: Any) -> None:
    """Rank 0 opens or builds the example cache (one line when it builds); every rank learns
    the outcome, then maps the cache itself."""
    from ehrplan.runtime import distributed as dist_
    from ehrplan.runtime.training.data import prepare_data

    failure: EhrplanError | None = None
    if env.is_main:
        try:
            prepare_data(root, vocab_file, asked, say=lambda m: _say(req, m))
        except EhrplanError as err:
            failure = err
    failure = dist_.broadcast_object(failure, env)  # type: ignore[assignment]
    if failure is not None:
        raise failure


def _say(req: Request, message: str) -> None:
    """A line for people: stdout normally, stderr under --json (stdout is the JSON document);
    only rank 0 of a torchrun job speaks."""
    from rich.console import Console

    from ehrplan.runtime.distributed import DistEnv

    if not DistEnv.from_environ().is_main:
        return
    Console(file=sys.stderr if req.json else sys.stdout, highlight=False, soft_wrap=True).print(
        message
    )


@dataclass
class Standing:
    """Where a run stands, for the line Ctrl-C prints."""

    run_dir: Path | None = None
    trainer: Any = None
    checkpoint_step: int | None = None
    """The step of the checkpoint the folder held when this session started."""

    def describe(self) -> str:
        if self.run_dir is None:
            return "interrupted before the run folder was made; nothing was written"
        again = f"--resume --out {self.run_dir}"
        t = self.trainer
        step = getattr(t, "pos", None)
        saved = getattr(t, "saved_step", None)  # None until the trainer restored or saved
        if saved is None:
            saved = self.checkpoint_step
        if step is None:
            where = "interrupted before training started"
        else:
            where = f"interrupted at step {step.step} of {t.total_steps}"
        if saved is None:
            return (
                f"{where}, before the first checkpoint: `{again}` starts {self.run_dir} again "
                "from step 0 (same seed), --overwrite starts it afresh"
            )
        return (
            f"{where}; last checkpoint: step {saved} ({self.run_dir / 'checkpoints' / 'last.pt'});"
            f" continue with {again}"
        )


def run(req: Request, resolve: Callable[[tuple[Any, ...]], tuple[EHRModelConfig, str]]) -> dict:
    """Do what ``req`` asks; return the summary. Ctrl-C ends in `Interrupted`, whose line says
    where the run stands."""
    from ehrplan.plan.per_gpu import check_strategy
    from ehrplan.runtime import distributed as dist_
    from ehrplan.runtime.distributed import DistEnv
    from ehrplan.runtime.training.device import resolve_device

    env = DistEnv.from_environ()
    strategy = "fsdp" if req.shard else "ddp"
    check_strategy(strategy, env.world_size)
    device = resolve_device(req.device)
    if env.is_distributed:
        import torch

        device = torch.device(dist_.setup(env, device.type))
    standing = Standing()
    try:
        with ExitStack() as stack:  # the run folder's lock, released on the way out
            return _run(req, resolve, env, strategy, device, stack, standing)
    except KeyboardInterrupt:
        raise Interrupted(standing.describe() if env.is_main else "") from None
    finally:
        dist_.teardown(env)


def _run(
    req: Request,
    resolve: Callable[[tuple[Any, ...]], tuple[EHRModelConfig, str]],
    env: Any,
    strategy: str,
    device: Any,
    stack: ExitStack,
    standing: Standing,
) -> dict:
    from ehrplan.runtime import distributed as dist_
    from ehrplan.runtime.training import choose
    from ehrplan.runtime.training.data import DataRequest, load_training_data, synthetic_cohort
    from ehrplan.runtime.training.device import auto_threads, precision_reason, resolve_precision
    from ehrplan.runtime.training.loader import cores, default_workers
    from ehrplan.runtime.training.loop import Trainer, TrainSettings

    saved: dict[str, Any] | None = None
    checkpoint = False  # resuming from a checkpoint (else from step 0)
    if req.resume:
        if req.overwrite:
            raise UsageError("--resume continues a run and --overwrite starts it over: give one")
        run_dir = resume_run_dir(req.out)
        _claim(req, run_dir, env, stack, new=False)
        standing.run_dir = run_dir
        saved = read_run_config(run_dir)
        checkpoint = (run_dir / "checkpoints" / "last.pt").is_file()
        if checkpoint:
            from ehrplan.runtime.training.checkpoint import load_checkpoint

            # refuse a job shape the checkpoint cannot continue on before saying anything
            last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
            dist_.check_resume(last.get("distributed"), strategy, env)
            standing.checkpoint_step = int(last["position"]["step"])
            del last

    # --- what to train
    if req.named or saved is None:
        if req.auto:
            from ehrplan.data.meds import train_patients

            epoch = train_patients(req.data) if req.data is not None else None
            choice = choose.auto_choice(
                req.model_type or "lstm", device.type, req.precision, patients=epoch
            )
            over = _overrides(req)
            if over:  # --set / --batch-size on top of the choice
                choice.config = validate_config({**choice.config.model_dump(), **over})
                choice.source += " + " + ", ".join(f"{k}={v}" for k, v in over.items())
        else:
            config, source = resolve(req.config_options)
            choice = choose.explicit_choice(config, source, device.type, req.precision)
    else:
        choice = choose.explicit_choice(
            validate_config(saved["config_requested"]), saved["source"], device.type
        )
        choice.preset = saved.get("preset")
    requested = choice.config

    # --- data
    if req.data is not None:
        data_root = req.data
    elif saved is not None:
        data_root = Path(saved["data"]["root"])
    else:
        if env.is_main:  # one rank makes the cohort, the others read it
            synthetic_cohort(req.patients)
        dist_.barrier(env)
        data_root = synthetic_cohort(req.patients)
    vocab_file = run_dir / "vocab.json" if saved is not None else None
    if saved is not None and not (req.task or req.labels or req.splits):
        asked = DataRequest(**saved["data"].get("request", {}))
    else:
        asked = DataRequest(
            task=req.task, labels=req.labels, splits=req.splits, min_code_count=req.min_code_count
        )
    _prepare_cache(req, env, data_root, vocab_file, asked)
    data, config = load_training_data(data_root, requested, vocab_file, asked)
    data.info["request"] = {
        "task": asked.task,
        "labels": str(asked.labels) if asked.labels else None,
        "splits": asked.splits,
        "min_code_count": asked.min_code_count,
    }
    if saved is not None:
        was, now = saved["data"].get("fingerprint"), data.info.get("fingerprint")
        if was is not None and was != now:
            raise UsageError(
                f"cannot resume {run_dir}: it was trained on another data set "
                f"({saved['data'].get('root')}, fingerprint {was}; {data_root} has {now})"
            )
    if saved is not None and not checkpoint and (run_dir / "embeddings.json").is_file():
        raise UsageError(
            f"{run_dir} was started from --embeddings and stopped before its first checkpoint: "
            "start it over with --overwrite --embeddings FILE"
        )
    prepared = _embeddings(req, saved, data.vocab, config)
    # frozen embeddings: no gradient, no Adam state, and the estimate counts that; a resumed run
    # keeps the flag its config.json recorded
    frozen = saved["config"].get("freeze_embeddings") if saved is not None else False
    if (prepared is not None and req.freeze_embeddings) or frozen:
        config = config.model_copy(update={"freeze_embeddings": True})
    choice.config = config

    # --- settings (a resumed run keeps its own unless told otherwise)
    base = saved["settings"] if saved is not None else {}
    settings = TrainSettings(
        **{
            **{k: v for k, v in base.items() if k in TrainSettings.__dataclass_fields__},
            **{
                k: v
                for k, v in {
                    "epochs": req.epochs,
                    "max_steps": req.max_steps,
                    "seed": req.seed,
                    "lr": req.lr,
                    "time_weight": req.time_weight,
                    "eval_every": req.eval_every,
                    "bucket_patients": req.bucket_patients,
                }.items()
                if v is not None
            },
            "device": req.device,
            "precision": req.precision if saved is None else base.get("precision", "auto"),
            "save_every": req.save_every,
        }
    )
    if req.workers is not None:
        settings.workers = req.workers
    elif "workers" not in base:
        settings.workers = default_workers(device.type)
    if req.threads is not None:
        settings.threads = req.threads
    elif device.type == "cpu" and settings.threads is None:
        settings.threads = auto_threads()
    if choice.precision is not None and settings.precision == "auto":
        settings.precision = choice.precision  # the change --auto's recommendation named
    precision = resolve_precision(config, device, settings.precision)
    choice.reasons.append(f"precision: {precision_reason(config, device, settings.precision)}")
    if strategy == "fsdp" and env.is_distributed and precision == "fp16":
        # fp16's GradScaler unscales plain tensors; FSDP2's gradients are sharded DTensors
        raise UsageError("--shard trains in fp32 or bf16, not fp16: give --precision bf16")
    est = choose.check_fits(choice, precision, device.type)

    if saved is None:
        picked: Path | None = None
        if env.is_main:  # rank 0 names the run folder; every rank uses its answer
            picked = new_run_dir(req.out, choice.preset or "custom")
        run_dir = dist_.broadcast_object(picked, env)  # type: ignore[assignment]
        _claim(req, run_dir, env, stack, new=True)
        standing.run_dir = run_dir
    if saved is None and env.is_main:
        write_json(
            run_dir / "config.json",
            {
                "config": config.model_dump(),
                "config_requested": requested.model_dump(),
                "source": choice.source,
                "preset": choice.preset,
                "reasons": choice.reasons,
                "settings": asdict(settings),
                "device": str(device),
                "precision": precision,
                "data": data.info,
                "command": sys.argv,
            },
        )
        write_text(run_dir / "vocab.json", json.dumps(data.vocab) + "\n")
        write_json(run_dir / "task.json", dict(data.task) | {"name": data.info["task"]["name"]})
        if data.subject_splits is not None and data.info.get("splits_hashed"):
            from ehrplan.data.meds import splits_table, write_parquet

            write_parquet(splits_table(*data.subject_splits), run_dir / "splits.parquet")
        write_json(
            run_dir / "hardware.json", {"hardware": choice.hardware, "budget": choice.budget}
        )
        if prepared is not None:
            write_json(run_dir / "embeddings.json", prepared.info)
        from ehrplan.plan.estimator import estimate_memory

        e = estimate_memory(config, precision=precision, device=device.type)
        write_json(
            run_dir / "estimate.json",
            {
                "precision": precision,
                "device": device.type,
                "shape": "preset maxima (batch_size x max_visits x max_codes_per_visit)",
                "total_bytes": e.total_bytes,
                "breakdown": dict(e.breakdown),
                "notes": list(e.notes),
            },
        )
    elif saved is not None and saved["config"] != config.model_dump():
        k = next(k for k in saved["config"] if saved["config"][k] != config.model_dump().get(k))
        raise UsageError(
            f"cannot resume {run_dir}: it was trained with a different config "
            f"({k}={saved['config'][k]!r} there, {config.model_dump().get(k)!r} now)"
        )

    dist_.barrier(env)

    # --- say what was chosen and why
    verb = "resuming" if saved is not None else "training"
    if env.is_distributed:
        choice.reasons.append(
            f"torchrun: {env.world_size} processes, {strategy}; rank {env.rank} of them"
        )
    _say(req, f"[bold]{verb}[/] {choice.source} -> {run_dir}")
    if saved is not None and not checkpoint:
        _say(req, "  no checkpoint had been written: training again from step 0, same seed")
    for r in choice.reasons:
        _say(req, f"  {r}")
    for line in data_lines(data.info):
        _say(req, line)
    if settings.workers > cores():
        _say(
            req,
            f"  [yellow]warning:[/] --workers {settings.workers} on {cores()} CPU cores: the "
            "workers and the step take turns on them (fewer workers may be faster)",
        )
    _say(
        req,
        f"  device {device}, {precision}; batch {config.batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation = {config.effective_batch_size} "
        f"patients per step; {settings.threads or 'default'} CPU threads; "
        f"{settings.workers or 'no'} collate worker(s); "
        f"checkpointing {'on' if config.use_checkpoint else 'off'}; "
        f"estimated peak at preset maxima {fmt_bytes(est)}",
    )
    if prepared is not None:
        e = prepared.info
        _say(
            req,
            f"  embeddings: {e['file']} ({e['codes_in_file']} codes x {e['dim']}"
            + (f", projected to {e['code_embed_dim']}" if e["projected"] else "")
            + f"): {e['matched']} vocabulary codes matched, {e['missing']} missing (initialised "
            f"as usual), {e['unused']} in the file unused; "
            + ("frozen (no gradients, no optimizer state)" if e["frozen"] else "trained further"),
        )

    trainer = Trainer(
        config=config,
        settings=settings,
        data=data,
        run_dir=run_dir,
        stream=(sys.stderr if req.json else sys.stdout) if env.is_main else _devnull(),
        rich=None if env.is_main else False,
        estimate_bytes=est,
        init_model=prepared.apply if prepared is not None else None,
        env=env,
        strategy=strategy,
    )
    standing.trainer = trainer
    summary = trainer.run(resume=checkpoint)
    summary["source"] = choice.source
    if prepared is not None:
        summary["embeddings"] = prepared.info
    summary["reasons"] = choice.reasons
    summary["config"] = config.model_dump()
    summary["task"] = dict(data.task) | {"name": data.info["task"]["name"]}
    summary["data"] = {
        k: data.info[k] for k in ("examples", "labels", "truncation", "unk", "splits_hashed")
    }
    if env.is_main and not env.is_distributed:
        _record_pace(choice, config, summary)
    return summary


#: Fields that change the pace of a preset's step without changing the preset.
_PACE_FREE = {"batch_size", "gradient_accumulation_steps", "use_checkpoint", "vocab_size"}


def _record_pace(choice: Any, config: EHRModelConfig, summary: dict[str, Any]) -> None:
    """Keep the run's patients/s for `recommend` and `train --auto` on this device
    (`ehrplan.plan.pace`), when it trained a preset's model as shipped."""
    from ehrplan.plan.config import load_presets
    from ehrplan.plan.pace import record

    preset = load_presets().get(choice.preset or "")
    key = (choice.budget or {}).get("device_key")
    if preset is None or key is None or summary.get("patients_per_s") is None:
        return
    a, b = preset.config.model_dump(), config.model_dump()
    if any(a[k] != b[k] for k in a if k not in _PACE_FREE | {"freeze_embeddings"}):
        return
    record(
        key,
        preset.name,
        summary["precision"],
        float(summary["patients_per_s"]),
        summary["run_dir"],
        int(summary["steps"]),
    )


UNK_WARN = 0.20  # share of events mapped to UNK above which train and data stats warn
TRUNC_WARN = 0.50  # share of events before prediction time that truncation drops


def data_lines(info: dict[str, Any]) -> list[str]:
    """What the data gives and what was lost, in a few lines (train start); warning lines last."""
    t, ex, lab = info["task"], info["examples"], info["labels"]
    tr, unk = info["truncation"]["train"], info["unk"]
    lines = [
        f"  data: {info['root']}, task {t['name']} ({t['kind']}): examples {ex['train']:,} train / "
        f"{ex['tuning']:,} tuning / {ex['held_out']:,} held-out (one per label row; "
        f"{info['patients']['train']:,} / {info['patients']['tuning']:,} / "
        f"{info['patients']['held_out']:,} patients); vocabulary {info['vocab_size']:,}",
        f"  lost: {tr['events_dropped']:,} of {tr['events']:,} train events before prediction "
        f"time truncated ({tr['events_dropped_fraction']:.1%}; {tr['visits_dropped']:,} visits "
        f"dropped, {tr['visits_cut']:,} cut); UNK {unk['events_fraction']:.1%} of events, "
        f"{unk['codes_fraction']:.1%} of distinct codes; label rows skipped: "
        f"{lab['labels_before_first_event']:,} before the subject's first event, "
        f"{lab['labels_unknown_subject']:,} for unknown subjects",
    ]
    if info.get("splits_hashed"):
        lines.append(
            "  note: no metadata/subject_splits.parquet: subjects split 80/10/10 by a hash of "
            "subject_id (saved as splits.parquet in the run folder)"
        )
    if unk["events_fraction"] > UNK_WARN:
        lines.append(
            f"  [yellow]warning:[/] {unk['events_fraction']:.0%} of events map to UNK "
            "(lower --min-code-count, or a preset with a larger vocab_size)"
        )
    if tr["events_dropped_fraction"] > TRUNC_WARN:
        lines.append(
            f"  [yellow]warning:[/] truncation drops {tr['events_dropped_fraction']:.0%} of the "
            "events before prediction time (a larger preset, or --set max_visits=N "
            "--set max_codes_per_visit=N)"
        )
    return lines


def _devnull() -> Any:
    import os

    return open(os.devnull, "w")  # lives as long as the process


def _embeddings(
    req: Request, saved: dict[str, Any] | None, vocab: dict[str, Any], config: EHRModelConfig
) -> Any:
    """Pre-trained code embeddings for a new run, checked against its vocabulary and width
    before anything is written (`ehrplan.runtime.embeddings.prepare_embeddings`)."""
    if req.embeddings is None:
        if req.freeze_embeddings or req.project_embeddings:
            flag = "--freeze-embeddings" if req.freeze_embeddings else "--project-embeddings"
            raise UsageError(f"{flag} needs --embeddings")
        return None
    if saved is not None:
        raise UsageError("--embeddings starts a new run; a resumed run keeps its own weights")
    from ehrplan.runtime.embeddings import prepare_embeddings

    return prepare_embeddings(
        req.embeddings,
        list(vocab["tokens"]),
        config.code_embed_dim,
        project=req.project_embeddings,
        freeze=req.freeze_embeddings,
    )


def _overrides(req: Request) -> dict[str, Any]:
    """``--set KEY=VALUE`` items and ``--batch-size``, as given (coerced by validation)."""
    from ehrplan.plan.config import parse_override

    out: dict[str, Any] = dict(parse_override(item) for item in req.config_options[4] or [])
    if req.config_options[5] is not None:
        out["batch_size"] = req.config_options[5]
    return out
