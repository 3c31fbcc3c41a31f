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
    python benchmarks/estimator_accuracy.py --random 40 --seed 1        # random small configs
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


def run_random(n: int, seed: int) -> None:
    """Estimate and measure ``n`` random small configs (in this process: they are small)."""
    from ehrplan.runtime.measure import measure_step

    rng = random.Random(seed)
    errors = []
    print(
        f"{'#':>3} {'type':<12}{'batch':>6}{'ckpt':>6}{'estimate':>13}{'measured':>13}{'error':>8}"
    )
    for i in range(n):
        cfg = random_config(rng)
        m = measure_step(cfg).measured_peak_bytes
        e = estimate_memory(cfg).total_bytes
        errors.append((e - m) / m)
        ckpt = "on" if cfg.use_checkpoint else "off"
        print(
            f"{i:>3} {cfg.model_type:<12}{cfg.batch_size:>6}{ckpt:>6}{e:>13,}{m:>13,}"
            f"{errors[-1]:>+8.1%}",
            flush=True,
        )
    print(
        f"\n{n} random configs (seed {seed}); error from {min(errors):+.1%} to "
        f"{max(errors):+.1%}, mean |error| {sum(map(abs, errors)) / n:.1%}"
    )


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
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    ap.add_argument(
        "--own-batch", action="store_true", help="each preset at its own batch size only"
    )
    args = ap.parse_args()
    if args.random:
        run_random(args.random, args.seed)
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
