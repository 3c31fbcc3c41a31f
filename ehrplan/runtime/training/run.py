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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ehrplan.atomic import write_json
from ehrplan.errors import UsageError
from ehrplan.plan.config import EHRModelConfig, validate_config
from ehrplan.plan.units import fmt_bytes

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


def _has_run(d: Path) -> bool:
    return (d / "checkpoints" / "last.pt").is_file() or (d / "config.json").is_file()


def new_run_dir(out: Path | None, name: str) -> Path:
    """``--out`` (which must not hold a run), or ``runs/<name>``, ``runs/<name>-2``, ..."""
    if out is not None:
        if _has_run(out):
            raise UsageError(f"{out} already holds a run: continue it with --resume, or pick --out")
        return out
    d = RUNS_ROOT / name
    i = 2
    while d.exists():
        d = RUNS_ROOT / f"{name}-{i}"
        i += 1
    return d


def resume_run_dir(out: Path | None) -> Path:
    """``--out``, or the newest run under ``runs/``; it must hold a checkpoint."""
    if out is None:
        runs = [d for d in RUNS_ROOT.glob("*") if (d / "checkpoints" / "last.pt").is_file()]
        if not runs:
            raise UsageError(f"--resume: no run to resume under {RUNS_ROOT}/ (give --out DIR)")
        out = max(runs, key=lambda d: (d / "checkpoints" / "last.pt").stat().st_mtime)
    if not (out / "checkpoints" / "last.pt").is_file() or not (out / "config.json").is_file():
        raise UsageError(f"--resume: {out} holds no run to resume (no checkpoints/last.pt)")
    return out


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


def run(req: Request, resolve: Callable[[tuple[Any, ...]], tuple[EHRModelConfig, str]]) -> dict:
    """Do what ``req`` asks; return the summary."""
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
    try:
        return _run(req, resolve, env, strategy, device)
    finally:
        dist_.teardown(env)


def _run(
    req: Request,
    resolve: Callable[[tuple[Any, ...]], tuple[EHRModelConfig, str]],
    env: Any,
    strategy: str,
    device: Any,
) -> dict:
    from ehrplan.runtime import distributed as dist_
    from ehrplan.runtime.training import choose
    from ehrplan.runtime.training.data import load_training_data, synthetic_cohort
    from ehrplan.runtime.training.device import auto_threads, precision_reason, resolve_precision
    from ehrplan.runtime.training.loop import Trainer, TrainSettings

    saved: dict[str, Any] | None = None
    if req.resume:
        run_dir = resume_run_dir(req.out)
        saved = json.loads((run_dir / "config.json").read_text())
        from ehrplan.runtime.training.checkpoint import load_checkpoint

        # refuse a job shape the checkpoint cannot continue on before saying anything
        last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        dist_.check_resume(last.get("distributed"), strategy, env)
        del last

    # --- what to train
    if req.named or saved is None:
        if req.auto:
            from ehrplan.cli.recommend import training_patients

            epoch = training_patients(req.data) if req.data is not None else None
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
    data, config = load_training_data(data_root, requested, vocab_file)
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
        picked: tuple[Path | None, str | None] = (None, None)
        if env.is_main:  # rank 0 names the run folder; every rank uses its answer
            try:
                picked = (new_run_dir(req.out, choice.preset or "custom"), None)
            except UsageError as err:
                picked = (None, str(err))
        run_dir, error = dist_.broadcast_object(picked, env)  # type: ignore[misc]
        if error:
            raise UsageError(error)
    if saved is None and env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
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
        (run_dir / "vocab.json").write_text(json.dumps(data.vocab) + "\n")
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
    for r in choice.reasons:
        _say(req, f"  {r}")
    info = data.info
    _say(
        req,
        f"  data: {info['root']} ({info['patients']['train']} train / "
        f"{info['patients']['tuning']} tuning / {info['patients']['held_out']} held-out "
        f"patients, vocabulary {info['vocab_size']})",
    )
    _say(
        req,
        f"  device {device}, {precision}; batch {config.batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation = {config.effective_batch_size} "
        f"patients per step; {settings.threads or 'default'} CPU threads; "
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
    summary = trainer.run(resume=saved is not None)
    summary["source"] = choice.source
    if prepared is not None:
        summary["embeddings"] = prepared.info
    summary["reasons"] = choice.reasons
    summary["config"] = config.model_dump()
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
