"""Training progress for people: a Rich live bar on a terminal, plain log lines otherwise.

Shows steps, loss, patients per second, and memory in use beside the estimate. With ``--json`` the
progress goes to stderr so stdout carries only the JSON document.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ehrplan.plan.units import fmt_bytes


class TrainProgress:
    """Live progress (``rich=True``) or one line every ``every`` steps (``rich=False``)."""

    def __init__(
        self,
        total_steps: int,
        *,
        stream: IO[str] | None = None,
        rich: bool | None = None,
        every: int = 10,
        estimate_bytes: int | None = None,
    ) -> None:
        self.stream = stream or sys.stdout
        self.rich = self.stream.isatty() if rich is None else rich
        self.total = total_steps
        self.every = max(1, every)
        self.estimate_bytes = estimate_bytes
        self.console = Console(file=self.stream, soft_wrap=True, highlight=False)
        self._progress: Progress | None = None
        self._task: int | None = None
        self._t0 = time.monotonic()

    def __enter__(self) -> TrainProgress:
        if self.rich:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, stats="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _memory(self, in_use: int | None, peak: tuple[int, int] | None) -> str:
        out = f"mem {fmt_bytes(in_use)}"
        if peak is not None:
            out += f" | step peak {fmt_bytes(peak[0])} vs est. {fmt_bytes(peak[1])}"
        elif self.estimate_bytes:
            out += f" | est. peak {fmt_bytes(self.estimate_bytes)}"
        return out

    def update(
        self,
        step: int,
        *,
        loss: float,
        patients_per_s: float,
        lr: float,
        memory_bytes: int | None,
        epoch: int,
        peak: tuple[int, int] | None = None,
    ) -> None:
        """``memory_bytes``: in use now (CPU: process RSS; GPU: allocated); ``peak``: the last
        measured step peak and the estimate for the same batch."""
        stats = (
            f"epoch {epoch}  loss {loss:.4f}  {patients_per_s:,.0f} patients/s  lr {lr:.2e}  "
            + self._memory(memory_bytes, peak)
        )
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif step % self.every == 0 or step == self.total:
            self.console.print(f"step {step}/{self.total}  {stats}")

    def log(self, message: str) -> None:
        """A line above the live bar (or a plain line)."""
        self.console.print(message)
