"""Accuracy of the analytic memory estimator against measured training steps (run by hand).

For every preset, at batch sizes whose measured peak stays below about 6 GiB (this machine is
shared), with and without gradient checkpointing: the estimate, the measured peak of the second
training step (`ehrplan.runtime.measure`, each case in a fresh subprocess) and the error
(estimate - measured) / measured. The process's RSS growth is printed beside it as a
cross-check (it also holds allocator slack, oneDNN scratch space and lazily loaded libraries).

    python benchmarks/estimator_accuracy.py                  # every case, fp32 on the CPU
    python benchmarks/estimator_accuracy.py --quick          # the preset batch of each only
    python benchmarks/estimator_accuracy.py --quick --precision bf16  # CPU bf16 autocast
    python benchmarks/estimator_accuracy.py --csv benchmarks/data/estimator_accuracy_cpu.csv
    python benchmarks/estimator_accuracy.py --measured benchmarks/data/estimator_accuracy_cpu.csv
    python benchmarks/estimator_accuracy.py --random 32 --seed 1 --csv FILE  # random configs,
                                                       # three levels, each in a fresh process
    python benchmarks/estimator_accuracy.py --random-measured FILE [--calibration PROFILE]
    python benchmarks/estimator_accuracy.py --device cuda --own-batch   # a GPU: the presets'
                                                       # own batches (benchmarks/gpu_check.sh)

The preset's own micro-batch is reduced where its measured peak would pass ~6 GiB; the first
batch size listed for each preset is its "main" batch (the preset's own, or the reduced one).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from ehrplan.plan.config import EHRModelConfig, get_preset, validate_config
from ehrplan.plan.estimator import estimate_memory
from ehrplan.runtime.measure import measure_in_subprocess

#: preset -> batch sizes; the first is the main batch (the preset's, or reduced to fit ~6 GiB).
CASES: dict[str, tuple[int, ...]] = {
    "tiny-lstm": (8, 2, 4, 16),
    "tiny-transformer": (8, 2, 4, 16),
    "small-lstm": (4, 1, 2, 8),
    "small-transformer": (2, 1, 8, 32),
    "medium-lstm": (32, 2, 4, 8, 16),  # the preset's batch 32 (6.17 GiB) measured last
    "medium-transformer": (16, 4, 8, 32),
    # preset batch 64: estimated 71.7 GiB; batch ~14 would fit 20 GiB, but one case of batch 4
    # already takes ~5 minutes on two cores
    "large-lstm": (2, 1, 3, 4),
    "large-transformer": (32, 2, 8, 16),  # preset batch 32: estimated 3.95 GiB
}
#: Presets whose other batch sizes are measured with the preset's own checkpointing setting only
#: (both settings at the main batch): each of their cases takes many minutes on two shared cores.
MAIN_BATCH_ONLY_BOTH_CHECKPOINTING = {"large-lstm"}
FIELDS = (
    "preset",
    "precision",
    "batch",
    "micro_batches",
    "checkpointing",
    "estimated_bytes",
    "measured_bytes",
    "error",
    "rss_growth_bytes",
    "peak_phase",
    "seconds",
)


def random_config(rng: random.Random) -> tuple[EHRModelConfig, dict[str, object]]:
    """A random valid small config (either family, any dropout, accumulation, checkpointing,
    attention path, frozen table) and the step's settings: precision (fp32 or bf16) and the
    padded batch shape (visits x codes, full padding or smaller than the config's maxima)."""
    kind = rng.choice(["lstm", "transformer"])
    d: dict[str, object] = dict(
        model_type=kind,
        code_embed_dim=rng.choice([8, 16, 24, 32, 40, 64]),
        visit_embed_dim=rng.choice([8, 16, 32, 48, 64]),
        hidden_dim=rng.choice([8, 16, 32, 64, 96]),
        num_layers=rng.randint(1, 3),
        dropout=rng.choice([0.0, 0.1, 0.3]),
        vocab_size=rng.choice([50, 300, 2000]),
        max_visits=rng.randint(2, 24),
        max_codes_per_visit=rng.randint(1, 20),
        batch_size=rng.randint(1, 16),
        gradient_accumulation_steps=rng.choice([1, 2, 4]),
        num_stages=rng.randint(2, 6),
        use_checkpoint=rng.random() < 0.5,
        freeze_embeddings=rng.random() < 0.2,
    )
    if kind == "transformer":
        width = int(d["visit_embed_dim"])  # type: ignore[call-overload]
        d["num_heads"] = rng.choice([h for h in (1, 2, 4, 8) if width % h == 0])
        d["use_flash_attention"] = rng.random() < 0.5
    cfg = validate_config(d)
    full = rng.random() < 0.5
    step: dict[str, object] = {
        "precision": rng.choice(["fp32", "bf16"]),
        "visits": None if full else rng.randint(1, cfg.max_visits),
        "codes": None if full else rng.randint(1, cfg.max_codes_per_visit),
    }
    return cfg, step


RANDOM_FIELDS = (
    "device",
    "seed",
    "index",
    "model_type",
    "precision",
    "batch",
    "visits",
    "codes",
    "checkpointing",
    "estimated_bytes",
    "measured_bytes",
    "error",
    "estimated_allocator_bytes",
    "measured_allocator_bytes",
    "allocator_error",
    "estimated_process_bytes",
    "measured_process_bytes",
    "process_error",
    "peak_phase",
    "step_seconds",
    "config",
)


def random_row(
    seed: int,
    index: int,
    cfg: EHRModelConfig,
    step: dict[str, object],
    m: dict[str, object],
    device: str = "cpu",
) -> dict[str, object]:
    """One row: today's estimate of the three levels beside the stored measurements ``m``."""
    import json

    from ehrplan.plan.levels import calibrated_levels

    est = estimate_memory(cfg, device=device, **step)  # type: ignore[arg-type]
    levels, _ = calibrated_levels(est, CALIBRATION)
    live, alloc, proc = (
        int(m["measured_bytes"]),  # type: ignore[call-overload]
        int(m["measured_allocator_bytes"]),  # type: ignore[call-overload]
        int(m["measured_process_bytes"]),  # type: ignore[call-overload]
    )
    return {
        "device": device,
        "seed": seed,
        "index": index,
        "model_type": cfg.model_type,
        "precision": step["precision"],
        "batch": cfg.batch_size,
        "visits": step["visits"] or cfg.max_visits,
        "codes": step["codes"] or cfg.max_codes_per_visit,
        "checkpointing": cfg.use_checkpoint,
        "estimated_bytes": est.total_bytes,
        "measured_bytes": live,
        "error": round((est.total_bytes - live) / live, 5),
        "estimated_allocator_bytes": levels.allocator_peak_bytes,
        "measured_allocator_bytes": alloc,
        "allocator_error": round((levels.allocator_peak_bytes - alloc) / alloc, 5),
        "estimated_process_bytes": levels.process_peak_bytes,
        "measured_process_bytes": proc,
        "process_error": round((levels.process_peak_bytes - proc) / proc, 5),
        "peak_phase": est.peak_phase,
        "step_seconds": m.get("step_seconds", ""),
        "config": json.dumps(cfg.model_dump(exclude_defaults=True), separators=(",", ":")),
    }


#: A calibration profile the --random/--random-measured estimates use (None: the cached one).
CALIBRATION: Path | None = None


def run_random(
    n: int, seed: int, out: Path | None, measured: Path | None = None, device: str = "cpu"
) -> None:
    """Estimate and measure ``n`` random small configs, each in a fresh subprocess (its RSS
    growth is level 3); with ``measured``, re-estimate the stored rows instead."""
    rows: list[dict[str, object]] = []
    if measured is not None:
        import json

        with measured.open() as f:
            stored = list(csv.DictReader(line for line in f if not line.startswith("#")))
        for r in stored:
            cfg = validate_config(json.loads(r["config"]))
            step = {
                "precision": r["precision"],
                "visits": int(r["visits"]),
                "codes": int(r["codes"]),
            }
            rows.append(
                random_row(int(r["seed"]), int(r["index"]), cfg, step, r, r.get("device") or "cpu")
            )
    else:
        rng = random.Random(seed)
        for i in range(n):
            cfg, step = random_config(rng)
            m = measure_in_subprocess(cfg, device=device, **step)
            rows.append(
                random_row(
                    seed,
                    i,
                    cfg,
                    step,
                    {
                        "measured_bytes": m.measured_peak_bytes,
                        "measured_allocator_bytes": m.allocator_peak_bytes,
                        "measured_process_bytes": m.process_peak_bytes,
                        "step_seconds": round(m.step_seconds, 4),
                    },
                    device,
                )
            )
            r = rows[-1]
            print(
                f"{i:>3} {cfg.model_type:<12}{step['precision']:<6}{r['error']:>+8.1%}"
                f"{r['allocator_error']:>+8.1%}{r['process_error']:>+8.1%}",
                flush=True,
            )
            if out:
                write_rows(rows, out, RANDOM_FIELDS)
    summarize_random(rows)
    if out and measured is not None:
        write_rows(rows, out, RANDOM_FIELDS)


def summarize_random(rows: list[dict[str, object]]) -> None:
    """Median and max |error| per precision, for each of the three levels."""
    import statistics

    for level in ("error", "allocator_error", "process_error"):
        for precision in ("fp32", "bf16"):
            errs = [abs(float(r[level])) for r in rows if r["precision"] == precision]  # type: ignore[arg-type]
            if errs:
                print(
                    f"{level:<16}{precision:<6}{len(errs):>4} configs: median |error| "
                    f"{statistics.median(errs):.2%}, max {max(errs):.2%}"
                )


def write_rows(rows: list[dict[str, object]], path: Path, fieldnames: tuple[str, ...]) -> None:
    """Rows with the command and machine in comment lines; temp file + replace."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        f.write(f"# command: python {' '.join(sys.argv)}\n")
        f.write(
            f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, device cpu, torch "
            f"{torch.__version__}, Python {platform.python_version()}\n"
        )
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _load_measured(path: Path) -> dict[tuple[str, str, int, bool], dict[str, str]]:
    with path.open() as f:
        lines = [line for line in f if not line.startswith("#")]
    return {
        (
            r["preset"],
            r.get("precision") or "fp32",
            int(r["batch"]),
            r["checkpointing"] == "True",
        ): r
        for r in csv.DictReader(lines)
    }


def run(
    quick: bool,
    only: list[str] | None,
    measured: Path | None = None,
    precision: str = "fp32",
    out: Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    own_batch: bool = False,
) -> list[dict[str, object]]:
    """Estimate and measure every case (or take the measurements from a CSV written earlier).

    With ``out`` the CSV is rewritten after every row; with ``resume`` the rows already in
    ``out`` are kept and only the missing cases are measured.
    """
    rows: list[dict[str, object]] = []
    stored = _load_measured(measured) if measured else {}
    done = _load_measured(out) if resume and out and out.exists() else {}
    header_lines: list[str] = []
    if done and out:
        header_lines = [line for line in out.read_text().splitlines() if line.startswith("#")]
    header = (
        f"{'preset':<19}{'batch':>6}{'ckpt':>6}{'estimate':>16}{'measured':>16}{'error':>8}"
        f"{'RSS growth':>16}  peak phase"
    )
    print(header)
    print("-" * len(header))
    for preset, batches in CASES.items():
        if only and preset not in only:
            continue
        cfg = get_preset(preset).config
        if own_batch:  # a GPU has the memory for the preset's own micro-batch
            batches = (cfg.batch_size,)
        for i, b in enumerate(batches[:1] if quick else batches):
            settings = (False, True)
            if i > 0 and preset in MAIN_BATCH_ONLY_BOTH_CHECKPOINTING:
                other = (preset, precision, b, not cfg.use_checkpoint)
                settings = (
                    (False, True) if other in done or other in stored else (cfg.use_checkpoint,)
                )
            for ckpt in settings:
                est = estimate_memory(
                    cfg, batch_size=b, checkpointing=ckpt, precision=precision, device=device
                )  # fmt: skip
                t0 = time.perf_counter()
                key = (preset, precision, b, ckpt)
                if key in done:
                    old = done[key]
                    measured_bytes, micro = int(old["measured_bytes"]), int(old["micro_batches"])
                    rss = int(old["rss_growth_bytes"])
                    seconds = float(old["seconds"]) if old.get("seconds") else float("nan")
                elif stored:
                    if (preset, precision, b, ckpt) not in stored:
                        continue
                    old = stored[(preset, precision, b, ckpt)]
                    measured_bytes, micro = int(old["measured_bytes"]), int(old["micro_batches"])
                    rss, seconds = int(old["rss_growth_bytes"]), float(old["seconds"])
                else:
                    m = measure_in_subprocess(
                        cfg, batch_size=b, checkpointing=ckpt, precision=precision, device=device
                    )
                    measured_bytes, micro = m.measured_peak_bytes, m.micro_batches
                    rss = m.process_peak_rss_bytes - m.rss_before_bytes
                    seconds = round(time.perf_counter() - t0, 1)
                err = (est.total_bytes - measured_bytes) / measured_bytes
                row = {
                    "preset": preset,
                    "precision": precision,
                    "batch": b,
                    "micro_batches": micro,
                    "checkpointing": ckpt,
                    "estimated_bytes": est.total_bytes,
                    "measured_bytes": measured_bytes,
                    "error": round(err, 5),
                    "rss_growth_bytes": rss,
                    "peak_phase": est.peak_phase,
                    "seconds": seconds,
                }
                rows.append(row)
                if out:
                    # rows kept from --resume that this run does not cover (other presets or
                    # precisions) stay in the file
                    fields = ("preset", "precision", "batch", "checkpointing")
                    here = {tuple(r[f] for f in fields) for r in rows}
                    kept = [r for k, r in done.items() if k not in here]
                    command = "python " + " ".join(sys.argv)
                    write_csv(rows + kept, out, command, header_lines, device)
                print(
                    f"{preset:<19}{b:>6}{'on' if ckpt else 'off':>6}{est.total_bytes:>16,}"
                    f"{measured_bytes:>16,}{err:>+8.1%}{row['rss_growth_bytes']:>16,}"
                    f"  {est.peak_phase}",
                    flush=True,
                )
    worst = max(abs(float(r["error"])) for r in rows)  # type: ignore[arg-type]
    print(f"\n{len(rows)} cases; largest |error| {worst:.1%}")
    return rows


def write_csv(
    rows: list[dict[str, object]],
    path: Path,
    command: str,
    earlier: list[str] | None = None,
    device: str = "cpu",
) -> None:
    """Write the rows with the command(s) and machine in comment lines; temp file + replace."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        for line in earlier or []:
            if line.startswith("# command"):
                f.write(line + "\n")
        f.write(f"# command: {command}\n")
        gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
        f.write(
            f"# machine: {platform.machine()}, {os.cpu_count()} CPUs{gpu}, device {device}, "
            f"torch {torch.__version__}, Python {platform.python_version()}\n"
        )
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the main batch of each preset")
    ap.add_argument("--preset", action="append", help="limit to these presets (repeatable)")
    ap.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    ap.add_argument(
        "--measured",
        type=Path,
        help="take the measured peaks from this CSV (written by --csv) instead of measuring",
    )
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument(
        "--resume", action="store_true", help="keep the rows already in --csv, measure the rest"
    )
    ap.add_argument("--random", type=int, metavar="N", help="instead: N random small configs")
    ap.add_argument("--seed", type=int, default=0, help="seed of --random")
    ap.add_argument(
        "--random-measured",
        type=Path,
        help="re-estimate the random rows stored in this CSV (written by --random --csv)",
    )
    ap.add_argument(
        "--calibration", type=Path, help="calibration profile for the level-2/3 estimates"
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    ap.add_argument(
        "--own-batch", action="store_true", help="each preset at its own batch size only"
    )
    args = ap.parse_args()
    if args.random or args.random_measured:
        global CALIBRATION
        CALIBRATION = args.calibration
        run_random(args.random or 0, args.seed, args.csv, args.random_measured, args.device)
        return
    if args.resume and not args.csv:
        ap.error("--resume needs --csv")
    run(
        args.quick,
        args.preset,
        args.measured,
        args.precision,
        args.csv,
        args.resume,
        device=args.device,
        own_batch=args.own_batch,
    )


if __name__ == "__main__":
    main()
