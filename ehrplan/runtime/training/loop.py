"""The trainer: seeded, mixed-precision, accumulating, checkpointing, resumable.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``batch_size`` patients
(the preset's effective batch). The data order is a pure function of (seed, epoch)
(`ehrplan.runtime.training.schedule`), and a checkpoint holds the position (epoch, next
micro-batch, step), the model, the loss's own parameter, AdamW, the LR schedule, the grad scaler
and every RNG state, so ``--resume`` replays exactly what an uninterrupted run would have done.

Checkpoints are written at optimizer-step boundaries only: every ``save_every`` steps, after each
evaluation, on Ctrl-C, and at the end. ``last.pt`` is the newest, ``best.pt`` the one with the
lowest tuning loss. A non-finite loss or gradient stops the run before anything is written, so
``last.pt`` stays the last good state.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ehrplan.atomic import write_json, write_text
from ehrplan.errors import DivergedError, UsageError
from ehrplan.plan.config import EHRModelConfig
from ehrplan.plan.per_gpu import split_batch
from ehrplan.plan.units import fmt_bytes
from ehrplan.runtime import allocator
from ehrplan.runtime import distributed as dist_
from ehrplan.runtime.distributed import DistEnv
from ehrplan.runtime.models import build_model
from ehrplan.runtime.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ehrplan.runtime.training.data import Split, TrainData
from ehrplan.runtime.training.device import autocast_dtype, resolve_device, resolve_precision
from ehrplan.runtime.training.loader import feed
from ehrplan.runtime.training.loss import LabelLoss, ProgressionLoss, population_median_years
from ehrplan.runtime.training.memory import MEMORY_METHOD, estimate_for_batch, memory_in_use
from ehrplan.runtime.training.metrics import Predictions, evaluate_task, headline
from ehrplan.runtime.training.progress import TrainProgress
from ehrplan.runtime.training.runfiles import RunFiles, read_json_list, read_records
from ehrplan.runtime.training.schedule import (
    BUCKET_POOL_PATIENTS,
    bucket_pool,
    epoch_batches,
    lr_lambda,
    steps_per_epoch,
)

STEP_DELAY_ENV = "EHRPLAN_TRAIN_STEP_DELAY"  # tests only: seconds to sleep after each step


@dataclass
class TrainSettings:
    """How to train (the model's shape and batch come from `EHRModelConfig`)."""

    epochs: int = 10
    max_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    grad_clip: float = 1.0
    time_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    save_every: int = 50
    eval_every: int | None = None
    log_every: int = 10
    bucket_patients: int = BUCKET_POOL_PATIENTS  # length-bucketing pool (< 2 batches: none)
    measure_every: int | None = 50
    threads: int | None = None
    workers: int = 0
    """DataLoader worker processes that collate ahead (0: collate in this process); the batches
    are the same either way, so a resumed run may change it."""

    def replay_keys(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        d = asdict(self)
        for k in ("device", "log_every", "save_every", "measure_every", "workers"):
            d.pop(k)
        return d


@contextmanager
def sigint_flag(distributed: bool = False) -> Iterator[dict[str, bool]]:
    """While active, the first Ctrl-C sets ``flag['stop']`` (the loop saves, then stops); a
    second one interrupts at once. Under torchrun a second one changes nothing: torchrun
    forwards the terminal's Ctrl-C to every worker, which therefore sees it twice, and a rank
    that left mid-step would leave the others waiting in a collective (torchrun kills the
    workers itself when they do not stop in time)."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag["stop"] and not distributed:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


@dataclass
class Position:
    epoch: int = 0
    next_batch: int = 0  # index of the next micro-batch in the epoch's batch list
    step: int = 0  # optimizer steps done


@dataclass
class StepShare:
    """This rank's part of one optimizer step."""

    group: list[list[int]]
    """The step's micro-batches in the single-process order."""
    pieces: list[list[int]]
    """This rank's micro-batches (`dist_.rank_share`); an empty one runs zero-weighted."""
    n: int
    """Non-empty micro-batches the whole job runs for the step."""

    @property
    def collated(self) -> list[list[int]]:
        """What each piece collates: itself, or for an empty piece a one-patient stand-in."""
        return [idx or self.group[0][:1] for idx in self.pieces]


@dataclass
class Trainer:
    """Trains ``config`` on ``data`` into the run folder ``run_dir``."""

    config: EHRModelConfig
    settings: TrainSettings
    data: TrainData
    run_dir: Path
    stream: IO[str] | None = None
    rich: bool | None = None
    estimate_bytes: int | None = None
    on_step: Callable[[Trainer, dict[str, Any]], None] | None = None
    init_model: Callable[[torch.nn.Module], Any] | None = None
    env: DistEnv = field(default_factory=DistEnv)
    """Where this process stands in a torchrun job (one process: rank 0 of 1)."""
    strategy: str = "ddp"
    """Applied to the freshly built, seeded model before the optimizer sees it (e.g. writing
    pre-trained code embeddings into it); a resumed run takes its weights from the checkpoint."""
    files: RunFiles = field(init=False)

    def __post_init__(self) -> None:
        self.files = RunFiles(self.run_dir)
        self.device = resolve_device(self.settings.device)
        if self.device.type == "cpu" and self.settings.threads:
            # CPU kernels may split reductions by thread: same threads, same bits on resume
            torch.set_num_threads(self.settings.threads)
        self.precision = resolve_precision(self.config, self.device, self.settings.precision)
        self.train_split = self.data.split("train")
        self.steps_per_epoch = steps_per_epoch(
            len(self.train_split.dataset),
            self.config.batch_size,
            self.config.gradient_accumulation_steps,
        )
        by_epochs = self.settings.epochs * self.steps_per_epoch
        s = self.settings
        self.total_steps = min(by_epochs, s.max_steps) if s.max_steps else by_epochs
        self.warmup = (
            s.warmup_steps
            if s.warmup_steps is not None
            else max(1, min(100, self.total_steps // 20))
        )
        # per rank: micro-batch x accumulation x world size = the config's effective batch
        self.micro, self.accumulation = (
            split_batch(
                self.config.effective_batch_size, self.config.batch_size, self.env.world_size
            )
            if self.env.is_distributed
            else (self.config.batch_size, self.config.gradient_accumulation_steps)
        )

    # ----------------------------------------------------------------------------- set-up

    def _build(self) -> None:
        if self.device.type == "cpu":  # resident memory follows live memory (allocator.py)
            allocator.configure()
        torch.manual_seed(self.settings.seed)
        self.model = build_model(self.config)
        if self.init_model is not None:
            self.init_model(self.model)
        self.model = self.model.to(self.device)
        self.model = dist_.wrap_model(self.model, self.strategy, self.env, self.device.type)
        self.raw_model = dist_.unwrap(self.model)
        self.loss_fn = make_loss(self.data, self.settings.time_weight).to(self.device)
        decay, no_decay = [], []
        for p in [*self.model.parameters(), *self.loss_fn.parameters()]:
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.settings.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.warmup, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.pos = Position()
        self.saved_step: int | None = None  # the step of the newest last.pt
        self.session = int(time.time() * 1000)
        self.memory_records: list[dict[str, Any]] = read_json_list(self.files.root / "memory.json")
        self.best_loss: float | None = None
        self.best_step: int | None = None

    def _state(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(),
            "settings": self.settings.replay_keys(),
            "model": dist_.model_state(self.model, self.strategy, self.env),
            "loss_fn": self.loss_fn.state_dict(),
            "optimizer": dist_.optimizer_state(self.optimizer, self.strategy, self.env),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            # every rank's generators (dropout draws differ by rank): a collective
            "rng_by_rank": dist_.gather_object(rng_state(), self.env),
            "position": asdict(self.pos),
            "best": {"loss": self.best_loss, "step": self.best_step},
            "precision": self.precision,
            "distributed": self._dist_info(),
        }

    def _dist_info(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy if self.env.is_distributed else "single",
            "world_size": self.env.world_size,
        }

    def _check_same_run(self, state: dict[str, Any]) -> None:
        mine, theirs = self.config.model_dump(), state["config"]
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            k = diff[0]
            raise UsageError(
                f"cannot resume {self.run_dir}: it was trained with a different config "
                f"({k}={theirs.get(k)!r} there, {mine[k]!r} now)"
            )
        mine_s, theirs_s = self.settings.replay_keys(), state["settings"]
        diff = [k for k in mine_s if mine_s[k] != theirs_s.get(k)]
        if diff:
            k = diff[0]
            raise UsageError(
                f"cannot resume {self.run_dir}: it was trained with {k}={theirs_s.get(k)!r}, "
                f"not {mine_s[k]!r}"
            )

    def _restore(self, state: dict[str, Any], progress_log: Callable[[str], None]) -> None:
        self._check_same_run(state)
        warning = dist_.check_resume(state.get("distributed"), self.strategy, self.env)
        if warning and self.env.is_main:
            progress_log(f"warning: {warning}")
        dist_.load_model_state(self.model, state["model"], self.strategy, self.env)
        self.loss_fn.load_state_dict(state["loss_fn"])
        dist_.load_optimizer_state(self.optimizer, state["optimizer"], self.strategy, self.env)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        by_rank = state.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == self.env.world_size:
            set_rng_state(by_rank[self.env.rank])  # this rank's own streams
        else:
            set_rng_state(state["rng"])  # another world size: not bit-identical (warned)
        self.pos = Position(**state["position"])
        self.saved_step = self.pos.step
        self.best_loss = state["best"]["loss"]
        self.best_step = state["best"]["step"]
        # forget what was logged after the checkpoint: those steps are about to be replayed
        if self.env.is_main:
            kept = [
                r for r in read_records(self.files.metrics) if r.get("step", 0) <= self.pos.step
            ]
            write_text(self.files.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # ----------------------------------------------------------------------------- logging

    def _record(self, rec: dict[str, Any]) -> None:
        if not self.env.is_main:  # only rank 0 writes
            return
        with self.files.metrics.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def _save_last(self) -> None:
        state = self._state()  # a collective: every rank takes part
        if self.env.is_main:
            save_checkpoint(self.files.last, state)
        dist_.barrier(self.env)
        self.saved_step = self.pos.step

    # ----------------------------------------------------------------------------- steps

    def _autocast(self) -> Any:
        dtype = autocast_dtype(self.precision)  # type: ignore[arg-type]
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _epoch_plan(self, batches: list[list[int]]) -> list[StepShare]:
        """The steps left of this epoch (from ``pos.next_batch``, up to ``total_steps``), each
        with this rank's share of its micro-batches."""
        acc = self.config.gradient_accumulation_steps
        plan, nxt = [], self.pos.next_batch
        while nxt < len(batches) and self.pos.step + len(plan) < self.total_steps:
            group = batches[nxt : nxt + acc]
            mine, n = dist_.rank_share(group, self.micro, self.accumulation, self.env)
            plan.append(StepShare(group, mine, n))
            nxt += len(group)
        return plan

    def _train_step(
        self, step: StepShare, stream: Iterator[Any], measure: bool = False
    ) -> dict[str, Any]:
        """One optimizer step over ``step``'s micro-batches, taken from ``stream`` (collated in
        its order by `ehrplan.runtime.training.loader.feed`); ``measure``: track its peak memory
        the way the dry run does (CPU: live tensor bytes at the dispatcher)."""
        tracker = None
        if measure and self.device.type == "cpu":
            from ehrplan.runtime.measure import LiveTensorBytes

            tracker = dist_.live_bytes_tracker() if self.env.is_distributed else LiveTensorBytes()
            tracker.track(
                list(self.model.parameters()),
                list(self.model.buffers()),
                list(self.loss_fn.parameters()),
                [list(st.values()) for st in self.optimizer.state.values()],
            )
        elif self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with tracker if tracker is not None else nullcontext():
            rec = self._train_step_body(step, stream, tracker, measure)
        if self.device.type == "cpu" and self.pos.step % allocator.TRIM_EVERY_STEPS == 0:
            allocator.trim()
        if tracker is not None:
            rec["measured_peak_bytes"] = int(tracker.peak)
        elif self.device.type == "cuda":
            rec["measured_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            rec["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
        return rec

    def _train_step_body(
        self, step: StepShare, stream: Iterator[Any], tracker: Any, measure: bool = False
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "stage_loss": 0.0, "time_loss": 0.0}
        patients, shape = 0, (0, 0, 0)
        # a measured step: (estimate, shape, groups) of the micro-batch with the largest estimate
        largest: tuple[int, list[int], list[tuple[int, int]] | None] | None = None
        # each micro-batch's share of the step's mean; DDP/FSDP average over the ranks on top
        weight = self.env.world_size / step.n
        for idx in step.pieces:
            scale = weight if idx else 0.0  # an empty piece: a zero-weighted stand-in
            batch = next(stream)
            if tracker is not None:  # made by numpy, outside the dispatcher's view
                tracker.track([getattr(batch, f.name) for f in fields(batch)])
            shape = max(shape, tuple(batch.codes.shape), key=lambda s: s[0] * s[1] * s[2])
            if measure:
                b, v, c = batch.codes.shape
                groups = (  # as the model runs it: `wrap_model` turns grouping off under FSDP
                    batch.encoder_groups(self.config.model_type, self.device.type)
                    if getattr(self.raw_model.encoder, "length_groups", True)
                    else None
                )
                est = self._estimate(b, v, c, groups)
                if largest is None or est > largest[0]:
                    largest = (est, [b, v, c], groups)
            with self._autocast():
                stage_logits, time_pred = self.model(*batch.model_inputs())
            parts = self.loss_fn(stage_logits, time_pred, batch)
            if not torch.isfinite(parts.total) and not self.env.is_distributed:
                raise DivergedError(self._diverged_message(f"loss is {parts.total.item()}"))
            self.scaler.scale(parts.total * scale).backward()
            totals["loss"] += parts.total.item() * scale / self.env.world_size
            totals["stage_loss"] += parts.stage.item() * scale / self.env.world_size
            totals["time_loss"] += parts.time.item() * scale / self.env.world_size
            patients += batch.num_patients if idx else 0
        if self.env.is_distributed:
            reduced = dist_.all_reduce_sum([*totals.values(), patients], self.env)
            totals = dict(zip(totals, reduced[:3], strict=True))
            patients = int(reduced[3])
            if not math.isfinite(totals["loss"]):
                raise DivergedError(self._diverged_message(f"loss is {totals['loss']}"))
            dist_.average_gradients(list(self.loss_fn.parameters()), self.env)
        self.scaler.unscale_(self.optimizer)
        if self.env.is_distributed and self.strategy == "fsdp":
            grad_norm = dist_.clip_grad_norm(
                [p for p in self.model.parameters() if p.requires_grad],
                list(self.loss_fn.parameters()),
                self.settings.grad_clip,
            )
        else:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise DivergedError(self._diverged_message(f"gradient norm is {grad_norm.item()}"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        return {
            **totals,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "patients": patients,
            "seconds": seconds,
            "max_batch_shape": list(shape),  # the largest micro-batch by code slots
            **(
                {
                    "estimated_batch": {
                        "estimated_peak_bytes": largest[0],
                        "shape": largest[1],
                        "visit_groups": largest[2],
                    }
                }
                if largest
                else {}
            ),
        }

    def _estimate(self, B: int, V: int, C: int, groups: list[tuple[int, int]] | None) -> int:
        """This rank's estimated peak for a micro-batch of that shape and those groups."""
        if self.env.is_distributed:  # this rank's peak: the strategy's per-device terms
            from ehrplan.plan.per_gpu import estimate_parallel

            pe = estimate_parallel(
                self.config, world_size=self.env.world_size, strategy=self.strategy,
                precision=self.precision, device=self.device.type, micro_batch=B,
                accumulation=self.accumulation, visits=V, codes=C, visit_groups=groups,
            )  # fmt: skip
            return pe.per_device_bytes
        return estimate_for_batch(self.config, self.precision, self.device.type, B, V, C, groups)

    def _measure_due(self) -> bool:
        """Measure the first step of a session that has Adam's state (a fresh run's second step,
        as the dry run does), then every ``measure_every`` steps."""
        if not self.optimizer.state:
            return False
        nxt = self.pos.step + 1
        first = not self.memory_records or self.memory_records[-1].get("session") != self.session
        every = self.settings.measure_every
        return first or (every is not None and every > 0 and nxt % every == 0)

    def _last_peak(self) -> tuple[int, int] | None:
        if not self.memory_records:
            return None
        m = self.memory_records[-1]
        return m["measured_peak_bytes"], m["estimated_peak_bytes"]

    def _memory_record(self, rec: dict[str, Any], progress: TrainProgress) -> None:
        """Measured peak of this step beside the estimate for its largest micro-batch."""
        estimated = rec["estimated_batch"]
        (B, V, C), groups = estimated["shape"], estimated["visit_groups"]
        est = estimated["estimated_peak_bytes"]
        measured = rec["measured_peak_bytes"]
        m = {
            "session": self.session,
            "step": self.pos.step + 1,
            "method": MEMORY_METHOD.get(self.device.type, "sampled"),
            "batch_shape": [B, V, C],
            "visit_groups": groups,
            "micro_batches": len(rec.get("micro_shapes", [])) or None,
            "measured_peak_bytes": measured,
            "peak_reserved_bytes": rec.get("peak_reserved_bytes"),
            "estimated_peak_bytes": est,
            "error": (est - measured) / measured if measured else None,
        }
        self.memory_records.append(m)
        if self.env.is_main:
            write_json(self.files.root / "memory.json", self.memory_records)
        progress.log(
            f"memory step {m['step']}: measured peak {fmt_bytes(measured)} ({m['method']}), "
            f"estimate for batch {B}x{V}x{C} {fmt_bytes(est)}"
            + (f", error {m['error']:+.1%}" if m["error"] is not None else "")
        )

    def _diverged_message(self, what: str) -> str:
        where = (
            f"last good checkpoint kept: {self.files.last}"
            if self.files.last.exists()
            else "no checkpoint had been written yet"
        )
        return (
            f"training diverged at step {self.pos.step + 1} (epoch {self.pos.epoch}): {what}; "
            f"{where} (try a lower --lr)"
        )

    # ----------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def predict(self, split: Split) -> tuple[Predictions, float]:
        """Predictions at every labelled position (one per example) of ``split`` and the mean
        loss per example. Under torchrun each rank predicts its share of the split and every
        rank gets the whole (`predict_split`); under FSDP with the model gathered first
        (`dist_.gathered`): its forward pass would all-gather each unit per call, and on the
        CPU the within-visit LSTM makes a data-dependent number of calls."""
        fsdp = self.strategy == "fsdp" and self.env.is_distributed
        with dist_.gathered(self.model, self.strategy, self.env):
            return predict_split(
                self.model if fsdp else self.raw_model,
                self.loss_fn,
                split,
                self.data.collate_for(split),
                self.config.batch_size * 4,
                self.device,
                self._autocast,
                workers=self.settings.workers,
                env=self.env,
            )

    def evaluate(self, split_name: str) -> dict[str, Any]:
        preds, loss = self.predict(self.data.split(split_name))
        return {"loss": loss, **evaluate_task(preds, self.data.task)}

    # ----------------------------------------------------------------------------- the run

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``total_steps`` (resuming from ``last.pt`` when ``resume``); return the
        summary (also written to ``summary.json``)."""
        self._build()
        if resume:
            from ehrplan.cli.output import warn

            self._restore(load_checkpoint(self.files.last), warn)
        elif self.env.is_main:
            self.files.metrics.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.files.metrics, "")
        dist_.barrier(self.env)
        t_start = time.perf_counter()
        delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
        progress = TrainProgress(
            self.total_steps,
            stream=self.stream,
            rich=self.rich,
            every=self.settings.log_every,
            estimate_bytes=self.estimate_bytes,
        )
        window: dict[str, Any] = {"patients": 0, "seconds": 0.0}
        with sigint_flag(self.env.is_distributed) as flag, progress:
            while self.pos.step < self.total_steps:
                batches = epoch_batches(
                    self.train_split.lengths,
                    self.config.batch_size,
                    self.settings.seed,
                    self.pos.epoch,
                    bucket_pool(self.config.batch_size, self.settings.bucket_patients),
                )
                plan = self._epoch_plan(batches)
                with self._feed(self.train_split, [i for s in plan for i in s.collated]) as stream:
                    for step in plan:
                        self._run_step(step, stream, len(batches), flag, progress, window)
                        if delay:
                            time.sleep(delay)
        return self._finish(time.perf_counter() - t_start)

    def _feed(self, split: Split, index_lists: list[list[int]]) -> Any:
        """``split``'s batches for ``index_lists``, in order (`loader.feed`: collated here, or
        ahead by ``settings.workers`` worker processes)."""
        return feed(
            split.dataset,
            self.data.collate_for(split),
            index_lists,
            self.device,
            workers=self.settings.workers,
        )

    def _run_step(
        self,
        step: StepShare,
        stream: Iterator[Any],
        n_batches: int,
        flag: dict[str, bool],
        progress: TrainProgress,
        window: dict[str, Any],
    ) -> None:
        """One optimizer step and what follows it: the metrics line, progress, the end of an
        epoch, evaluation and checkpoints, and a requested stop."""
        measure = self._measure_due()
        rec = self._train_step(step, stream, measure=measure)
        if "measured_peak_bytes" in rec and measure:
            self._memory_record(rec, progress)
        self.pos.step += 1
        self.pos.next_batch += len(step.group)
        epoch_done = self.pos.next_batch >= n_batches
        rec = {"kind": "step", "step": self.pos.step, "epoch": self.pos.epoch, **rec}
        rec["memory_bytes"] = memory_in_use(self.device)
        self._record(rec)
        window["patients"] += rec["patients"]
        window["seconds"] += rec["seconds"]
        progress.update(
            self.pos.step,
            loss=rec["loss"],
            patients_per_s=window["patients"] / max(window["seconds"], 1e-9),
            lr=rec["lr"],
            memory_bytes=rec["memory_bytes"],
            epoch=self.pos.epoch,
            peak=self._last_peak(),
        )
        if self.pos.step % self.settings.log_every == 0:
            window.update(patients=0, seconds=0.0)
        if self.on_step is not None:
            self.on_step(self, rec)
        if epoch_done:
            self._epoch_record(self.pos.epoch)
            self.pos.epoch += 1
            self.pos.next_batch = 0
        if self.env.is_distributed:  # every rank stops at the same step
            flag["stop"] = dist_.all_reduce_sum([float(flag["stop"])], self.env)[0] > 0
        every = self.settings.eval_every
        final = self.pos.step >= self.total_steps
        if epoch_done or final or (every and self.pos.step % every == 0):
            self._eval_and_keep_best(progress)
        elif self.pos.step % self.settings.save_every == 0 or flag["stop"]:
            self._save_last()
        if flag["stop"]:  # the caller says where the run stands
            raise KeyboardInterrupt

    def _epoch_record(self, epoch: int) -> None:
        """One JSON line per finished epoch: its steps' mean loss and throughput (from the step
        lines, so a resumed epoch counts every step once)."""
        steps = [
            r
            for r in read_records(self.files.metrics)
            if r.get("kind") == "step" and r.get("epoch") == epoch
        ]
        seconds = sum(r["seconds"] for r in steps)
        patients = sum(r["patients"] for r in steps)
        self._record(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": self.pos.step,
                "steps": len(steps),
                "loss": sum(r["loss"] for r in steps) / max(1, len(steps)),
                "stage_loss": sum(r["stage_loss"] for r in steps) / max(1, len(steps)),
                "time_loss": sum(r["time_loss"] for r in steps) / max(1, len(steps)),
                "patients": patients,
                "seconds": seconds,
                "patients_per_s": patients / seconds if seconds else None,
            }
        )

    def _eval_and_keep_best(self, progress: TrainProgress) -> None:
        res = self.evaluate("tuning")
        self._record({"kind": "eval", "split": "tuning", "step": self.pos.step, **res})
        progress.log(
            f"eval step {self.pos.step}: tuning loss {res['loss']:.4f}  "
            + headline(res, self.data.task.get("kind", "ckd_progression"))
        )
        if self.best_loss is None or res["loss"] < self.best_loss:
            self.best_loss, self.best_step = res["loss"], self.pos.step
            best = {
                "config": self.config.model_dump(),
                "model": dist_.model_state(self.model, self.strategy, self.env),
                "loss_fn": self.loss_fn.state_dict(),
                "task": dict(self.data.task),
                "step": self.pos.step,
                "tuning_loss": res["loss"],
            }
            if self.env.is_main:
                save_checkpoint(self.files.best, best)
        self._save_last()

    def _finish(self, seconds: float) -> dict[str, Any]:
        records = read_records(self.files.metrics)
        steps = [r for r in records if r.get("kind") == "step"]
        final = {s: self.evaluate(s) for s in ("tuning", "held_out")}
        best_state = load_checkpoint(self.files.best)
        dist_.load_model_state(self.model, best_state["model"], self.strategy, self.env)
        self.loss_fn.load_state_dict(best_state["loss_fn"])
        best = {s: self.evaluate(s) for s in ("tuning", "held_out")}
        trained = sum(r["patients"] for r in steps)
        train_seconds = sum(r["seconds"] for r in steps)
        summary = {
            "run_dir": str(self.run_dir),
            "steps": self.pos.step,
            "epochs_completed": self.pos.epoch,
            "device": str(self.device),
            "precision": self.precision,
            "patients_trained": trained,
            "train_seconds": train_seconds,
            "patients_per_s": trained / train_seconds if train_seconds else None,
            "workers": self.settings.workers,
            "wall_seconds_this_session": seconds,
            "final_train_loss": steps[-1]["loss"] if steps else None,
            "peak_memory_bytes": max((r["memory_bytes"] for r in steps), default=None),
            "memory": max(
                (m for m in self.memory_records if m.get("error") is not None),
                key=lambda m: abs(m["error"]),
                default=self.memory_records[-1] if self.memory_records else None,
            ),
            "memory_measurements": len(self.memory_records),
            "estimate_bytes": self.estimate_bytes,
            "best_step": self.best_step,
            "last": final,
            "best": best,
        }
        if self.env.is_distributed:
            summary["distributed"] = {
                "strategy": self.strategy,
                "world_size": self.env.world_size,
                "micro_batch_per_rank": self.micro,
                "accumulation_per_rank": self.accumulation,
            }
        if self.env.is_main:
            write_json(self.files.summary, summary)
            from ehrplan.runtime.training.plot import plot_curves

            plot_curves(
                records,
                self.files.curves,
                title=f"{self.run_dir.name}",
                kind=self.data.task.get("kind", "ckd_progression"),
            )
        return summary


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def make_loss(data: TrainData, time_weight: float) -> torch.nn.Module:
    """The task kind's loss: the CKD composite's `ProgressionLoss` (its time unit fitted on the
    train split), or `LabelLoss` for a binary, multiclass or regression task."""
    task = data.task
    kind = task.get("kind", "ckd_progression")
    if kind != "ckd_progression":
        return LabelLoss(kind, task.get("train_mean", 0.0), task.get("train_std", 1.0))
    unit = 1.0
    if data.train_times is not None:
        days, seen = data.train_times
        unit = population_median_years(torch.from_numpy(days), torch.from_numpy(seen))
    return ProgressionLoss(time_weight=time_weight, time_unit_years=unit)


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    split: Split,
    collate: Callable[[list[Any]], Any],
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any] = nullcontext,
    *,
    workers: int = 0,
    env: DistEnv | None = None,
) -> tuple[Predictions, float]:
    """Run ``model`` over a split in length order, in chunks of ``batch_size`` sequences; the
    labels, the predictions and the example index of every labelled position, and the mean loss
    per example.

    ``workers``: chunks collated ahead by worker processes (`loader.feed`). Under torchrun
    (``env``) rank r predicts chunks r, r + world_size, ... and every rank gets all chunks'
    results back in the single-process order, so the metrics are one process's (the model's
    forward pass must make no collective: a plain or DDP-unwrapped model)."""
    env = env or DistEnv()
    model.eval()
    order = np.argsort(split.lengths, kind="stable")  # similar sizes together: less padding
    chunks = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    mine = chunks[env.rank :: env.world_size]
    label_examples = getattr(split.dataset, "label_examples", None)
    parts: list[dict[str, Any]] = []
    with feed(split.dataset, collate, mine, device, workers=workers) as stream:
        for idx, batch in zip(mine, stream, strict=True):
            with autocast():
                stage_logits, time_pred = model(*batch.model_inputs())
            part = _chunk_predictions(loss_fn, stage_logits, time_pred, batch)
            if label_examples is not None:
                part["examples"] = label_examples([split.dataset[j] for j in idx])
            parts.append(part)
    if env.is_distributed:
        by_rank = dist_.all_gather_object(parts, env)
        parts = [by_rank[k % env.world_size][k // env.world_size] for k in range(len(chunks))]  # type: ignore[index]
    loss_sum, n_seen = 0.0, 0
    for part in parts:  # summed in the single-process order: the same float on any world size
        loss_sum += part["loss_sum"]
        n_seen += part["visits"]

    def cat(key: str) -> np.ndarray:
        return np.concatenate([part[key] for part in parts])

    preds = Predictions(
        stage=cat("stage"),
        stage_prob=cat("stage_prob"),
        time_days=cat("time_days").astype(np.float64),
        observed=cat("observed"),
        predicted_days=cat("predicted_days").astype(np.float64),
        examples=cat("examples") if label_examples is not None else None,
    )
    return preds, loss_sum / max(1, n_seen)


def _chunk_predictions(
    loss_fn: torch.nn.Module, stage_logits: torch.Tensor, time_pred: torch.Tensor, batch: Any
) -> dict[str, Any]:
    """One chunk's labels, predictions (numpy, at its labelled positions) and loss sum."""
    parts = loss_fn(stage_logits, time_pred, batch)
    real = batch.visit_mask & (batch.stage >= 0)
    if isinstance(loss_fn, LabelLoss):
        point = loss_fn.point(stage_logits)[real].cpu()
        if loss_fn.kind == "multiclass":
            prob = point
        else:
            prob = point[:, None] if loss_fn.kind == "binary" else point[:, None] * 0
        days = point if loss_fn.kind == "regression" else point.new_zeros(len(point))
    else:
        prob = stage_logits[real].float().softmax(-1).cpu()
        days = loss_fn.predicted_days(time_pred)[real].cpu()
    return {
        "stage": batch.stage[real].cpu().numpy(),
        "stage_prob": prob.numpy(),
        "time_days": batch.time_to_event[real].cpu().numpy(),
        "observed": batch.event_observed[real].cpu().numpy(),
        "predicted_days": days.numpy(),
        "loss_sum": parts.total.item() * parts.visits,
        "visits": parts.visits,
    }
