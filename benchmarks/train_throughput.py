"""Training throughput: the seed's reference LSTM loop against ehrplan's, same data, same run.

    python benchmarks/train_throughput.py [--preset small-lstm] [--patients 2000] [--subset 256]
        [--threads N] [--rounds 2] [--seed-at-auto-batch] [--json]

Every loop trains the same preset (default small-lstm: 32 patients per optimizer step, Adam, fp32
on the CPU) on the same ``--subset`` training patients of the same synthetic CKD cohort (the
default cohort of `ehrplan train`, made and cached on first use), on this machine, in this
process. Each gets one untimed warm-up optimizer step; then ``--rounds`` interleaved rounds are
timed, each one pass of every loop over those same patients, data collation included, so a burst
of load from other processes hits every loop alike and every loop is timed on the same patients.
Printed: the median round's patients per second for each loop, and its ratio to the reference.

The reference is the seed document's code (shared/seed/resource-aware-model-configs.md, Part 2)
as written: the preset's micro-batch and accumulation (4 x 8 for small-lstm), every batch padded
to the preset maxima (``max_visits x max_codes_per_visit``), a Python loop over the visit
positions calling the within-visit LSTM once per position, ``hidden[-1]`` taken after the
padding, ReLU time head; its loss is ehrplan's (the seed gives none), so only the model and the
batching differ. The seed ignores ``use_checkpoint``; ehrplan honours it.

Rows for ehrplan (all with ehrplan's model: real visits only, within-visit length groups on the
CPU, `ehrplan.plan.grouping`):

- ``ehrplan, the reference's batches``: the same patients in the same 4 x 8 batches as the
  reference, padded per batch, checkpointing as the preset says;
- ``ehrplan train --preset``: what ``ehrplan train --preset small-lstm`` trains: the preset as
  written (4 x 8, checkpointing on), length-bucketed batches;
- ``ehrplan train --auto``: what ``ehrplan train --auto`` trains on this machine from the same
  preset: checkpointing off and the 32 patients of a step in one micro-batch, where the host
  budget fits them (`ehrplan.runtime.training.choose.spend_room_on_speed`), length-bucketed batches.

``--seed-at-auto-batch`` adds the seed's loop at ``--auto``'s micro-batch, to show how much of
the gain the larger micro-batch alone gives.
"""

from __future__ import annotations

import os

# as `ehrplan train` does (ehrplan.cli.options.training_environ)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

import argparse
import json
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ehrplan.plan.config import get_preset
from ehrplan.runtime.batch import Batch
from ehrplan.runtime.models import build_model
from ehrplan.runtime.training.choose import budget_for, spend_room_on_speed
from ehrplan.runtime.training.data import load_training_data, synthetic_cohort
from ehrplan.runtime.training.loss import ProgressionLoss
from ehrplan.runtime.training.schedule import bucket_pool, epoch_batches

# ------------------------------------------------------------------------------------------------
# the seed's model, as the seed document writes it (docstrings trimmed)


class SeedLSTMVisitEncoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        code_embed_dim: int = 128,
        visit_embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 2,
        dropout: float = 0.1,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.code_embeddings = nn.Embedding(vocab_size, code_embed_dim, padding_idx=0)
        self.visit_lstm = nn.LSTM(
            input_size=code_embed_dim,
            hidden_size=code_embed_dim,
            num_layers=1,
            batch_first=True,
            dropout=0,
            bidirectional=False,
        )
        self.visit_projection = nn.Linear(code_embed_dim, visit_embed_dim)
        self.sequence_lstm = nn.LSTM(
            input_size=visit_embed_dim + 2,
            hidden_size=hidden_dim,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0,
            bidirectional=bidirectional,
        )
        self.dropout = nn.Dropout(dropout)
        self.hidden_dim = hidden_dim * (2 if bidirectional else 1)

    def encode_visit(self, visit_codes: torch.Tensor, visit_mask: torch.Tensor) -> torch.Tensor:
        code_embeds = self.code_embeddings(visit_codes)
        lstm_out, (hidden, _) = self.visit_lstm(code_embeds)  # noqa: RUF059 (the seed as written)
        visit_repr = hidden[-1]
        return self.visit_projection(visit_repr)

    def forward(
        self, patient_visits: torch.Tensor, time_features: torch.Tensor, visit_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, num_visits, max_codes = patient_visits.shape  # noqa: RUF059 (the seed as written)
        visit_embeds = []
        for i in range(num_visits):
            visit_embed = self.encode_visit(patient_visits[:, i, :], visit_mask[:, i, :])
            visit_embeds.append(visit_embed)
        visit_embeds = torch.stack(visit_embeds, dim=1)
        visit_embeds_with_time = torch.cat([visit_embeds, time_features], dim=-1)
        sequence_output, (final_hidden, final_cell) = self.sequence_lstm(visit_embeds_with_time)  # noqa: RUF059 (the seed as written)
        return sequence_output, final_hidden


class SeedLSTMProgressionModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        code_embed_dim: int = 128,
        visit_embed_dim: int = 256,
        hidden_dim: int = 512,
        num_stages: int = 5,
        num_layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = SeedLSTMVisitEncoder(
            vocab_size=vocab_size,
            code_embed_dim=code_embed_dim,
            visit_embed_dim=visit_embed_dim,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            dropout=dropout,
            bidirectional=False,
        )
        self.stage_classifier = nn.Linear(hidden_dim, num_stages)
        self.time_to_progression = nn.Linear(hidden_dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, patient_visits: torch.Tensor, time_features: torch.Tensor, visit_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sequence_output, _ = self.encoder(patient_visits, time_features, visit_mask)
        sequence_output = self.dropout(sequence_output)
        stage_logits = self.stage_classifier(sequence_output)
        time_pred = torch.relu(self.time_to_progression(sequence_output))
        return stage_logits, time_pred


# ------------------------------------------------------------------------------------------------


def pad_to_maxima(batch: Batch, V: int, C: int) -> Batch:
    """The seed's batching: every batch padded to the preset's maxima."""
    _, v, c = batch.codes.shape
    dv, dc = V - v, C - c
    return Batch(
        codes=F.pad(batch.codes, (0, dc, 0, dv)),
        code_mask=F.pad(batch.code_mask, (0, dc, 0, dv)),
        time_features=F.pad(batch.time_features, (0, 0, 0, dv)),
        stage=F.pad(batch.stage, (0, dv), value=-100),
        time_to_event=F.pad(batch.time_to_event, (0, dv)),
        event_observed=F.pad(batch.event_observed, (0, dv)),
    )


class Loop:
    """One model training on its own stream of optimizer steps (micro-batch index lists)."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        batches: list[list[int]],
        accumulation: int,
        collate: Any,
        pad: tuple[int, int] | None,
    ) -> None:
        self.name, self.model, self.collate, self.pad = name, model, collate, pad
        self.groups = [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]
        self.next = 0
        self.loss_fn = ProgressionLoss()
        self.params = [
            p for p in [*model.parameters(), *self.loss_fn.parameters()] if p.requires_grad
        ]
        self.opt = torch.optim.Adam(self.params, lr=1e-3)
        self.rates: list[float] = []
        self.patients = 0
        self.seconds = 0.0
        self.slots = 0
        self.lstm_slots = 0

    def steps(self, n: int, timed: bool = True) -> None:
        """``n`` optimizer steps, data collation included; timed ones are recorded."""
        self.model.train()
        t0, patients, slots = time.perf_counter(), 0, 0
        seen: list[Batch] = []  # counted after the clock stops
        for _ in range(n):
            group = self.groups[self.next % len(self.groups)]
            self.next += 1
            self.opt.zero_grad(set_to_none=True)
            for idx in group:
                batch = self.collate(idx)
                if self.pad is not None:
                    batch = pad_to_maxima(batch, *self.pad)
                stage_logits, time_pred = self.model(*batch.model_inputs())
                (self.loss_fn(stage_logits, time_pred, batch).total / len(group)).backward()
                patients += batch.num_patients
                slots += batch.codes.numel()
                seen.append(batch)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        if timed:
            seconds = time.perf_counter() - t0
            self.rates.append(patients / seconds)
            self.patients += patients
            self.seconds += seconds
            self.slots += slots
            self.lstm_slots += sum(self.lstm_slots_of(b) for b in seen)

    def lstm_slots_of(self, batch: Batch) -> int:
        """Code positions the within-visit LSTM runs for ``batch`` (the seed: every visit slot
        of the padded batch; ehrplan: the real visits' length groups)."""
        if self.pad is not None:
            return batch.codes.shape[0] * self.pad[0] * self.pad[1]
        return sum(n * L for n, L in batch.visit_groups())

    def row(self) -> dict[str, Any]:
        return {
            "loop": self.name,
            "patients": self.patients,
            "seconds": self.seconds,
            "patients_per_s": float(np.median(self.rates)),
            "patients_per_s_by_round": self.rates,
            "padded_code_slots_per_patient": self.slots / max(self.patients, 1),
            "within_visit_lstm_slots_per_patient": self.lstm_slots / max(self.patients, 1),
        }


SEED_ARGS = ("vocab_size", "code_embed_dim", "visit_embed_dim", "hidden_dim", "num_stages")


def seed_model(config: Any) -> nn.Module:
    """The seed's model with the preset's sizes (its constructor's own arguments)."""
    sizes = {k: getattr(config, k) for k in SEED_ARGS}
    return SeedLSTMProgressionModel(**sizes, num_layers=config.num_layers, dropout=config.dropout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-lstm")
    ap.add_argument("--patients", type=int, default=2000, help="synthetic cohort size")
    ap.add_argument("--subset", type=int, default=256, help="training patients per pass")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timed passes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for all")
    ap.add_argument("--seed-at-auto-batch", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = get_preset(args.preset).config
    if config.model_type != "lstm":
        raise SystemExit("the seed's reference loop is an LSTM: pick an lstm preset")
    root = synthetic_cohort(args.patients)
    data, config = load_training_data(root, config)
    train = data.split("train")
    collate = lambda idx: data.collate([train.dataset[i] for i in idx])  # noqa: E731
    B, acc = config.batch_size, config.gradient_accumulation_steps

    rng = np.random.default_rng(args.seed)
    subset = rng.permutation(len(train.dataset))[: args.subset]
    lengths = train.lengths[subset]

    def batches_of(b: int, bucketed: bool) -> list[list[int]]:
        if bucketed:
            local = epoch_batches(lengths, b, args.seed, 0, bucket_pool(b))  # as the trainer
        else:
            local = [list(range(s, min(s + b, len(subset)))) for s in range(0, len(subset), b)]
        return [[int(subset[i]) for i in batch] for batch in local]

    budget, _ = budget_for("cpu")
    auto = spend_room_on_speed(config, budget, args.preset, [], {})
    pad = (config.max_visits, config.max_codes_per_visit)
    runs: list[tuple[str, Any, list[list[int]], int, tuple[int, int] | None]] = [
        (f"seed reference ({B} x {acc}, padded to preset maxima)", None, batches_of(B, False),
         acc, pad),
        (f"ehrplan, the reference's batches ({B} x {acc})", config, batches_of(B, False), acc,
         None),
        (f"ehrplan train --preset ({B} x {acc}, ckpt {'on' if config.use_checkpoint else 'off'})",
         config, batches_of(B, True), acc, None),
        (f"ehrplan train --auto ({auto.batch_size} x {auto.gradient_accumulation_steps}, ckpt "
         f"{'on' if auto.use_checkpoint else 'off'})", auto, batches_of(auto.batch_size, True),
         auto.gradient_accumulation_steps, None),
    ]  # fmt: skip
    if args.seed_at_auto_batch:
        runs.append(
            (f"seed reference at --auto's micro-batch ({auto.batch_size} x "
             f"{auto.gradient_accumulation_steps})", None, batches_of(auto.batch_size, False),
             auto.gradient_accumulation_steps, pad)
        )  # fmt: skip
    loops = []
    for name, cfg, batches, accumulation, padding in runs:
        torch.manual_seed(args.seed)
        model = seed_model(config) if cfg is None else build_model(cfg)
        loops.append(Loop(name, model, batches, accumulation, collate, pad=padding))
    for loop in loops:  # warm-up, untimed
        loop.steps(1, timed=False)
    # interleaved rounds, each a pass over the same patients: a burst of load from other
    # processes hits every loop alike; the median round is reported
    for _ in range(args.rounds):
        for loop in loops:
            loop.next = 0
            loop.steps(len(loop.groups))
    rows = [loop.row() for loop in loops]
    base = rows[0]["patients_per_s"]
    for row in rows:
        row["speedup"] = row["patients_per_s"] / base
    doc = {
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "cohort": str(root),
        "subset_patients": len(subset),
        "batch_size": B,
        "gradient_accumulation_steps": acc,
        "checkpointing": config.use_checkpoint,
        "auto_changes": {
            "batch_size": auto.batch_size,
            "gradient_accumulation_steps": auto.gradient_accumulation_steps,
            "use_checkpoint": auto.use_checkpoint,
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],
        "rows": rows,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(
        f"{args.preset}: {len(subset)} training patients per pass, {args.rounds} rounds, torch "
        f"{torch.__version__}, {doc['threads']} threads, load average "
        f"{doc['load_average_1min']:.2f}; cohort {root}"
    )
    print(f"{'loop':58} {'patients':>8} {'seconds':>8} {'LSTM slots':>10} {'patients/s':>11} "
          f"{'speed-up':>9}")  # fmt: skip
    for row in rows:
        print(
            f"{row['loop']:58} {row['patients']:>8} {row['seconds']:>8.1f} "
            f"{row['within_visit_lstm_slots_per_patient']:>10.0f} "
            f"{row['patients_per_s']:>11.1f} {row['speedup']:>8.1f}x"
        )
    print("LSTM slots: code positions the within-visit LSTM runs, per patient")


if __name__ == "__main__":
    main()
