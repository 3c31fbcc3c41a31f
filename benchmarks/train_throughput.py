"""Training throughput: the seed's reference LSTM loop against ehrplan's, same data, same run.

    python benchmarks/train_throughput.py [--preset small-lstm] [--patients 2000] [--threads N]
        [--rounds 3] [--ref-steps 1] [--steps 5] [--json]

Both train the same preset (default small-lstm: micro-batch 4 x 8 accumulation steps = 32 patients
per optimizer step, Adam, fp32 on the CPU) on the same synthetic CKD cohort (the default cohort of
`ehrplan train`, made and cached on first use), on this machine, in this process, one after the
other. Each gets one untimed warm-up optimizer step; then ``--rounds`` interleaved rounds of
``--ref-steps`` (reference) / ``--steps`` (ehrplan) optimizer steps are timed, data collation
included, so a burst of load from other processes hits every loop alike. Printed: the median
round's patients per second for each, and the ratio to the reference.

The reference is the seed document's code (shared/seed/resource-aware-model-configs.md, Part 2)
as written: every batch padded to the preset maxima (``max_visits x max_codes_per_visit``), a Python
loop over the visit positions calling the within-visit LSTM once per position, ``hidden[-1]``
taken after the padding, ReLU time head; its loss is ehrplan's (the seed gives none), so only the
model and the batching differ. The seed ignores ``use_checkpoint``; ehrplan honours it.

Rows for ehrplan:

- ``ehrplan, random batches``: the same patients in the same batches as the reference, padded per
  batch (longest patient, largest visit), one within-visit LSTM call over all real visits;
- ``ehrplan, bucketed``: what ``ehrplan train --preset`` does (length-bucketed batches);
- ``ehrplan, bucketed, no checkpointing``: what ``ehrplan train --auto`` trains where the step fits
  in memory without gradient checkpointing (it then turns it off: no second forward pass).
"""

from __future__ import annotations

import os

# as `ehrplan train` does: idle OpenMP threads sleep instead of spinning on shared cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ehrplan.batch import Batch
from ehrplan.config import get_preset
from ehrplan.models import build_model
from ehrplan.training.data import load_training_data, synthetic_cohort
from ehrplan.training.loop import epoch_batches
from ehrplan.training.loss import ProgressionLoss

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

    def steps(self, n: int, timed: bool = True) -> None:
        """``n`` optimizer steps, data collation included; timed ones are recorded."""
        self.model.train()
        t0, patients, slots = time.perf_counter(), 0, 0
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
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        if timed:
            seconds = time.perf_counter() - t0
            self.rates.append(patients / seconds)
            self.patients += patients
            self.seconds += seconds
            self.slots += slots

    def row(self) -> dict[str, Any]:
        return {
            "loop": self.name,
            "patients": self.patients,
            "seconds": self.seconds,
            "patients_per_s": float(np.median(self.rates)),
            "patients_per_s_by_round": self.rates,
            "padded_code_slots_per_patient": self.slots / max(self.patients, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-lstm")
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    ap.add_argument("--ref-steps", type=int, default=1, help="reference steps per round")
    ap.add_argument("--steps", type=int, default=5, help="ehrplan steps per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both")
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
    order = rng.permutation(len(train.dataset)).tolist()
    random_batches = [order[i : i + B] for i in range(0, len(order), B)]
    bucketed = epoch_batches(train.lengths, B, args.seed, 0, 50)

    torch.manual_seed(args.seed)
    ref = SeedLSTMProgressionModel(
        vocab_size=config.vocab_size,
        code_embed_dim=config.code_embed_dim,
        visit_embed_dim=config.visit_embed_dim,
        hidden_dim=config.hidden_dim,
        num_stages=config.num_stages,
        num_layers=config.num_layers,
        dropout=config.dropout,
    )
    loops = [
        Loop(
            "seed reference (padded to preset maxima)",
            ref,
            random_batches,
            acc,
            collate,
            pad=(config.max_visits, config.max_codes_per_visit),
        )
    ]
    plain = config.model_copy(update={"use_checkpoint": False})
    for name, batches, cfg in (
        ("ehrplan, random batches", random_batches, config),
        ("ehrplan, bucketed", bucketed, config),
        ("ehrplan, bucketed, no checkpointing (--auto)", bucketed, plain),
    ):
        if name.endswith("(--auto)") and not config.use_checkpoint:
            continue
        torch.manual_seed(args.seed)
        loops.append(Loop(name, build_model(cfg), batches, acc, collate, pad=None))
    for loop in loops:  # warm-up, untimed
        loop.steps(1, timed=False)
    # interleaved rounds: a burst of load from other processes hits every loop alike; the
    # median round is reported
    for _ in range(args.rounds):
        for loop in loops:
            loop.steps(args.ref_steps if loop.pad is not None else args.steps)
    rows = [loop.row() for loop in loops]
    base = rows[0]["patients_per_s"]
    for row in rows:
        row["speedup"] = row["patients_per_s"] / base
    doc = {
        "preset": args.preset,
        "cohort": str(root),
        "batch_size": B,
        "gradient_accumulation_steps": acc,
        "checkpointing": config.use_checkpoint,
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
        f"{args.preset}: micro-batch {B} x {acc} accumulation, checkpointing "
        f"{config.use_checkpoint}, torch {torch.__version__}, {doc['threads']} threads, "
        f"load average {doc['load_average_1min']:.2f}; cohort {root}"
    )
    print(f"{'loop':44} {'patients':>8} {'seconds':>8} {'patients/s':>11} {'speed-up':>9}")
    for row in rows:
        print(
            f"{row['loop']:44} {row['patients']:>8} {row['seconds']:>8.1f} "
            f"{row['patients_per_s']:>11.1f} {row['speedup']:>8.1f}x"
        )


if __name__ == "__main__":
    main()
