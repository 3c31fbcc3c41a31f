"""`ehrplan train`: pick what fits (or take what you name) and train it, resumably."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType
from rich.table import Table

from ehrplan.cli.options import (
    COUNT_MAX,
    MAX_THREADS,
    SEED_MAX,
    BatchSizeOpt,
    ConfigOpt,
    JsonOpt,
    LabelsOpt,
    MinCodeCountOpt,
    PresetOpt,
    SetOpt,
    SizeOpt,
    SplitsOpt,
    TaskOpt,
    TypeOpt,
    config_from_options,
    finite,
    training_environ,
)
from ehrplan.cli.output import emit
from ehrplan.errors import EXIT_INTERRUPTED, Interrupted, UsageError
from ehrplan.plan.units import fmt_bytes

AutoOpt = Annotated[
    bool,
    typer.Option(
        "--auto",
        help="Probe the hardware and train what `ehrplan recommend` picks (with its changes); "
        "where the memory allows, checkpointing off and the same effective batch in fewer, "
        "larger micro-batches.",
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="A MEDS data set with labels (tasks/ckd_stage). Default: a synthetic CKD cohort, "
        "made once and cached under $EHRPLAN_CACHE or ~/.cache/ehrplan.",
    ),
]
PatientsOpt = Annotated[
    int,
    typer.Option(
        "--patients", help="Patients in the default synthetic cohort.", min=50, max=COUNT_MAX
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (mixed precision on CUDA/MPS when the config asks, fp32 on CPU), fp32, "
        "fp16 or bf16.",
    ),
]
EpochsOpt = Annotated[
    int | None, typer.Option("--epochs", help="Epochs (default 10).", min=1, max=COUNT_MAX)
]
MaxStepsOpt = Annotated[
    int | None,
    typer.Option("--max-steps", help="Stop after this many optimizer steps.", min=1, max=COUNT_MAX),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Run folder (default runs/<preset>, numbered if taken)."),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed", min=0, max=SEED_MAX, help="Seed of weights, data order, dropout (0 to 2^32-1)."
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Start a new run in an --out that holds one: its run files (config, metrics, "
        "checkpoints, ...) are removed first.",
    ),
]
LrOpt = Annotated[
    float | None,
    typer.Option(
        "--lr", parser=finite(gt=0), metavar="FLOAT", help="Peak learning rate (default 1e-3)."
    ),
]
SaveEveryOpt = Annotated[
    int,
    typer.Option(
        "--save-every", help="Write last.pt every N optimizer steps.", min=1, max=COUNT_MAX
    ),
]
EvalEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--eval-every",
        min=1,
        max=COUNT_MAX,
        help="Evaluate on tuning every N steps (default: each epoch).",
    ),
]

BucketOpt = Annotated[
    int | None,
    typer.Option(
        "--bucket-patients",
        min=0,
        max=COUNT_MAX,
        help="Length bucketing: sort random pools of this many patients by length before "
        "cutting batches (default 200; 0: random batches, no bucketing).",
    ),
]

ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads (default: the idle cores, from the load average; a resumed run keeps "
        "its own).",
        min=1,
        max=MAX_THREADS,
    ),
]

TimeWeightOpt = Annotated[
    float | None,
    typer.Option(
        "--time-weight",
        parser=finite(ge=0),
        metavar="FLOAT",
        help="Weight of the time-to-progression NLL against the stage cross-entropy (default 1).",
    ),
]

EmbeddingsOpt = Annotated[
    Path | None,
    typer.Option(
        "--embeddings",
        help="Start the code embeddings from a file (.safetensors, .pt, word2vec .txt/.vec), "
        "matched to the vocabulary by code; codes it lacks keep their random start.",
    ),
]
FreezeEmbeddingsOpt = Annotated[
    bool, typer.Option("--freeze-embeddings", help="Keep the --embeddings vectors fixed.")
]
ProjectEmbeddingsOpt = Annotated[
    bool,
    typer.Option(
        "--project-embeddings",
        help="Fit --embeddings of another width onto code_embed_dim (top principal directions, "
        "or zero-padding) instead of refusing them.",
    ),
]

WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        max=MAX_THREADS,
        help="Collate batches ahead in N DataLoader worker processes (2 batches each; forked "
        "on Linux, sharing the data's pages). 0: collate in the training process. Default: 0 "
        "on the CPU (the step itself uses the cores), 2 on CUDA and MPS; a resumed run keeps "
        "its own. The batches are the same for any N.",
    ),
]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        help="Train on N processes of this machine: re-runs this command under torchrun "
        "(data parallel; the effective batch is split over the processes).",
        min=1,
        max=MAX_THREADS,
    ),
]
ShardOpt = Annotated[
    bool,
    typer.Option(
        "--shard",
        help="Under torchrun / --nproc: FSDP2 (shard parameters, gradients and optimizer "
        "state) instead of DDP.",
    ),
]


def train(
    auto: AutoOpt = False,
    preset: PresetOpt = None,
    size: SizeOpt = None,
    model_type: TypeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    batch_size: BatchSizeOpt = None,
    data: DataOpt = None,
    task: TaskOpt = None,
    labels: LabelsOpt = None,
    splits: SplitsOpt = None,
    min_code_count: MinCodeCountOpt = None,
    patients: PatientsOpt = 2000,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    epochs: EpochsOpt = None,
    max_steps: MaxStepsOpt = None,
    out: OutOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    lr: LrOpt = None,
    save_every: SaveEveryOpt = 50,
    eval_every: EvalEveryOpt = None,
    threads: ThreadsOpt = None,
    bucket_patients: BucketOpt = None,
    time_weight: TimeWeightOpt = None,
    embeddings: EmbeddingsOpt = None,
    freeze_embeddings: FreezeEmbeddingsOpt = False,
    project_embeddings: ProjectEmbeddingsOpt = False,
    workers: WorkersOpt = None,
    nproc: NprocOpt = None,
    shard: ShardOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Train a model: --auto picks what fits this machine, or name it with --preset/--size/--type.

    Keeps everything in the run folder: resolved config, vocabulary, hardware, estimate, metrics
    per step and per evaluation (JSON lines), best and last checkpoints, summary and a curve PNG.
    Ctrl-C saves a checkpoint and says where the run stands; --resume continues exactly.
    """
    try:
        _train(locals())
    except KeyboardInterrupt:  # before the run took over Ctrl-C (it says where it stands)
        raise Interrupted("interrupted before training started; nothing was trained") from None


def _train(o: dict[str, Any]) -> None:
    """`train` with its options by name."""
    training_environ()  # before torch is imported
    from ehrplan.runtime.distributed import DistEnv

    env = DistEnv.from_environ()
    if o["nproc"] is not None and o["nproc"] > 1 and not env.is_distributed:
        _relaunch(o["nproc"], o["device"])
    from ehrplan.runtime.training import run as runner

    config_options = tuple(o[k] for k in ("preset", "size", "model_type", "config", "set_"))
    config_options += (o["batch_size"],)
    if o["auto"] and (o["preset"] or o["size"] or o["config"]):
        raise UsageError("--auto picks the preset itself: drop --preset/--size/--config")
    req = runner.Request(
        config_options=config_options,
        named=any(config_options) or o["auto"],
        json=o["json_"],
        **{k: o[k] for k in runner.Request.__dataclass_fields__ if k in o},
    )
    summary = runner.run(req, resolve=_resolve)
    if env.is_main:  # under torchrun only rank 0 prints
        emit("train", summary, as_json=o["json_"], render=_render)


def _relaunch(nproc: int, device: str) -> None:
    """Run this very command again under torchrun on ``nproc`` processes, and exit with its
    status (torchrun sets the ranks; ``--nproc`` is dropped from the arguments)."""
    import os

    import torch

    from ehrplan.runtime.distributed import torchrun_argv

    cores = os.cpu_count() or 1
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        if nproc > cores:
            raise UsageError(
                f"--nproc {nproc}: this machine has {cores} CPU cores; on the CPU every process "
                "needs a core of its own"
            )
    elif device in ("auto", "cuda") and nproc > torch.cuda.device_count():
        # one GPU per process (NCCL refuses two ranks on one GPU)
        raise UsageError(
            f"--nproc {nproc}: {torch.cuda.device_count()} CUDA device(s) visible here"
        )
    args = list(sys.argv[1:])
    i = args.index("--nproc") if "--nproc" in args else -1
    if i >= 0:
        del args[i : i + 2]
    else:
        args = [a for a in args if not a.startswith("--nproc=")]
    raise typer.Exit(_supervise(torchrun_argv(nproc, args)))


def _supervise(argv: list[str]) -> int:
    """Run torchrun and wait for it; Ctrl-C (or SIGTERM) is passed on to it once.

    torchrun runs in a session of its own, so a terminal's Ctrl-C reaches this process only and
    torchrun gets it from here exactly once; it forwards it to each worker, which saves a
    checkpoint, says where the run stands and exits (torchrun kills workers that do not stop
    within its timeout). Killing torchrun instead would orphan the workers, still training."""
    import signal
    import subprocess

    proc = subprocess.Popen(argv, start_new_session=True)
    got: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if not got:
            proc.send_signal(signum)
        got.append(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return EXIT_INTERRUPTED if got else code


def _resolve(options: tuple[Any, ...]) -> tuple[Any, str]:
    preset, size, model_type, config, set_, batch_size = options
    return config_from_options(preset, size, model_type, config, set_, batch_size=batch_size)


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


METRIC_ROWS: dict[str, list[tuple[str, str, int]]] = {
    "binary": [
        ("loss", "loss", 4),
        ("AUROC", "auroc", 3),
        ("  constant-score baseline", "baseline_auroc", 3),
        ("AUPRC", "auprc", 3),
        ("  prevalence baseline", "baseline_auprc", 3),
        ("Brier score", "brier", 4),
        ("  train-prevalence baseline", "baseline_brier", 4),
        ("examples", "examples", 0),
    ],
    "multiclass": [
        ("loss", "loss", 4),
        ("accuracy", "stage_accuracy", 3),
        ("  majority-class baseline", "baseline_stage_accuracy", 3),
        ("macro-F1", "stage_macro_f1", 3),
        ("  majority-class baseline", "baseline_stage_macro_f1", 3),
        ("AUROC (macro OvR)", "stage_macro_auroc", 3),
        ("examples", "examples", 0),
    ],
    "regression": [
        ("loss", "loss", 4),
        ("MSE", "mse", 4),
        ("  train-mean baseline", "baseline_mse", 4),
        ("MAE", "mae", 4),
        ("  train-mean baseline", "baseline_mae", 4),
        ("examples", "examples", 0),
    ],
    "ckd_progression": [
        ("loss", "loss", 4),
        ("stage accuracy", "stage_accuracy", 3),
        ("  majority-stage baseline", "baseline_stage_accuracy", 3),
        ("stage macro-F1", "stage_macro_f1", 3),
        ("  majority-stage baseline", "baseline_stage_macro_f1", 3),
        ("stage AUROC (macro OvR)", "stage_macro_auroc", 3),
        ("stage kappa (quadratic)", "stage_qw_kappa", 3),
        ("C-index, time to progression", "c_index", 3),
        ("MAE days (observed events)", "mae_days_observed", 1),
        ("examples", "examples", 0),
    ],
}


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    t = Table(title=f"{p['source']}: best checkpoint (step {p['best_step']}) and last (step "
              f"{p['steps']})")  # fmt: skip
    t.add_column("metric")
    t.add_column("tuning", justify="right")
    t.add_column("held-out", justify="right")
    t.add_column("held-out, last", justify="right")
    rows = METRIC_ROWS.get(p.get("task", {}).get("kind", ""), METRIC_ROWS["ckd_progression"])
    for label, key, d in rows:
        t.add_row(
            label,
            _f(p["best"]["tuning"].get(key), d),
            _f(p["best"]["held_out"].get(key), d),
            _f(p["last"]["held_out"].get(key), d),
        )
    yield t
    mem = p.get("memory") or {}
    run = Table(title=f"run {p['run_dir']}", show_header=False)
    run.add_column("")
    run.add_column("", justify="right")
    run.add_row("steps (epochs completed)", f"{p['steps']} ({p['epochs_completed']})")
    run.add_row("device, precision", f"{p['device']}, {p['precision']}")
    run.add_row("patients trained", f"{p['patients_trained']:,}")
    run.add_row("patients / s", _f(p["patients_per_s"], 1))
    if mem.get("measured_peak_bytes") is not None:
        shape = "x".join(str(x) for x in mem.get("batch_shape") or [])
        run.add_row(
            f"step peak, measured (step {mem.get('step')})",
            f"{fmt_bytes(mem['measured_peak_bytes'])} (batch {shape})",
        )
        run.add_row(
            "step peak, estimated",
            f"{fmt_bytes(mem.get('estimated_peak_bytes'))} ({_pct(mem.get('error'))})",
        )
        run.add_row("memory measurements", str(p.get("memory_measurements")))
    run.add_row("process RSS, largest", fmt_bytes(p.get("peak_memory_bytes")))
    run.add_row("curves", str(Path(p["run_dir"]) / "curves.png"))
    yield run


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(typer.run(train))
