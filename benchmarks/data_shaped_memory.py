"""Estimator accuracy on the batches training actually sees (data-shaped, length-grouped).

    python benchmarks/data_shaped_memory.py [--preset small-lstm] [--precision fp32|bf16]
        [--patients 2000] [--batches 0 7]

The accuracy benchmark (`estimator_accuracy.py`) measures fully padded batches: every visit and code
slot real, one within-visit group. Training sees batches of the synthetic CKD cohort (`ehrplan
train`'s default cohort): patients of different lengths, visits of different code counts, which the
CPU within-visit LSTM runs as length groups (`ehrplan.plan.grouping`). For a few length-bucketed
batches at the preset's micro-batch and at --auto's folded one (32 x 1), with checkpointing off and
on, this measures the second training step (`ehrplan.runtime.measure.measure_step`, live tensor
bytes at the dispatcher) and prints it beside two estimates: the one for the batch's shape and its
length groups (what the trainer logs), and the one for its shape as if every ``B x V`` visit were
real with ``C`` codes (one group, the estimator before length groups).
"""

from __future__ import annotations

import argparse
import sys

from ehrplan.data.sampler import batches as sampler_batches
from ehrplan.plan.config import get_preset
from ehrplan.plan.estimator import estimate_memory
from ehrplan.runtime.measure import measure_step
from ehrplan.runtime.training.data import load_training_data, synthetic_cohort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-lstm")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--batches", type=int, nargs="+", default=[0, 7], help="batch indices")
    args = ap.parse_args()

    config = get_preset(args.preset).config
    data, config = load_training_data(synthetic_cohort(args.patients), config)
    train = data.split("train")
    eff = config.effective_batch_size
    print(f"# python benchmarks/data_shaped_memory.py {' '.join(sys.argv[1:])}")
    print(f"# {args.preset}, {args.precision}, CPU; error = (estimate - measured) / measured")
    print(
        f"{'micro x acc':>11} {'ckpt':>4} {'batch BxVxC':>12} {'groups':>6} {'measured':>13} "
        f"{'estimate':>13} {'error':>7} {'one-group error':>15}  peak phase"
    )
    worst = 0.0
    for B in sorted({config.batch_size, eff}):
        for ckpt in (False, True):
            cfg = config.model_copy(
                update={
                    "batch_size": B,
                    "gradient_accumulation_steps": eff // B,
                    "use_checkpoint": ckpt,
                }
            )
            order = sampler_batches(train.lengths, B, bucketing=True, seed=0, pool_batches=50)
            for i in args.batches:
                batch = data.collate([train.dataset[int(j)] for j in order[i]])
                _, V, C = batch.codes.shape
                groups = batch.visit_groups()
                m = measure_step(cfg, batch=batch, precision=args.precision).measured_peak_bytes
                kw = {"precision": args.precision, "batch_size": B, "visits": V, "codes": C}
                est = estimate_memory(cfg, visit_groups=groups, **kw)
                one = estimate_memory(cfg, **kw).total_bytes
                err = (est.total_bytes - m) / m
                worst = max(worst, abs(err))
                print(
                    f"{f'{B} x {eff // B}':>11} {'on' if ckpt else 'off':>4} "
                    f"{f'{B}x{V}x{C}':>12} {len(groups):>6} {m:>13,} {est.total_bytes:>13,} "
                    f"{err:>+7.1%} {(one - m) / m:>+15.1%}  {est.peak_phase}",
                    flush=True,
                )
    print(f"# largest |error| with length groups: {worst:.1%}")


if __name__ == "__main__":
    main()
