"""The measurer: build the model, run real training steps, report the measured peak (imports torch).

What is measured follows ``shared/docs/memory-truth.md``: the peak of live tensor bytes during the
*second* training step (forward, loss on both heads, backward, Adam step), so Adam's state
already exists.

- CPU: `LiveTensorBytes`, a ``TorchDispatchMode`` that sees every tensor an aten op returns and
  counts each storage once until it is freed (weak references on the storages). This is what
  ``torch.distributed._tools.mem_tracker.MemTracker`` does; we do not use MemTracker itself
  because its module hooks fail on ``PackedSequence`` inputs (the sequence LSTM takes one).
  Parameters, optimizer state and the batch exist before the step and are counted up front.
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, with
  ``max_memory_reserved()`` beside it.
- MPS: there is no peak counter; ``current_allocated_memory()`` and
  ``driver_allocated_memory()`` are *sampled* between the phases of the step.

Three levels of peak (``shared/docs/memory-truth.md``), each measured:

1. ``measured_peak_bytes``: live tensor bytes, as above.
2. ``allocator_peak_bytes``: every allocation, including scratch a kernel takes and frees inside
   itself. CPU: the running sum of ``torch.profiler`` memory events (``profile_memory=True``)
   over the step, on top of the bytes alive when it starts; CUDA: ``max_memory_allocated``; MPS:
   the largest sampled ``driver_allocated_memory``.
3. ``process_peak_bytes``: what the operating system or driver counts. CPU: the growth of the
   process's peak RSS from before the model was built to the end of the second step, meaningful
   in a fresh process (`measure_in_subprocess`); CUDA: ``max_memory_reserved`` plus the CUDA
   context (device memory in use before the model, less what torch had reserved); MPS: the
   largest sampled driver allocation.

A step with ``gradient_accumulation_steps = k > 1`` runs ``min(k, 2)`` micro-batches: from the
second micro-batch on, the gradients of the previous ones are live during the forward pass, and
every later micro-batch repeats the second one's memory exactly.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ehrplan.errors import DeviceError, DoesNotFitError, UsageError
from ehrplan.plan.config import EHRModelConfig
from ehrplan.runtime.batch import Batch, synthetic_batch
from ehrplan.runtime.models import build_model

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class LiveTensorBytes(TorchDispatchMode):
    """Live tensor bytes seen at the dispatcher, and their peak.

    Every tensor returned by an aten op is charged once per storage (views share it) and
    released when the storage is freed. ``track`` charges tensors that exist before the mode is
    entered (parameters, optimizer state, inputs). The peak is taken after each op, when its
    inputs and outputs are both alive.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[Any]] = {}  # storage id -> [nbytes, weakref]
        self.current = 0
        self.peak = 0

    def _release(self, key: int, _ref: object) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def _charge(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        nbytes = storage.nbytes()
        entry = self._live.get(key)
        if entry is None:
            ref = weakref.ref(storage, lambda r, k=key: self._release(k, r))
            self._live[key] = [nbytes, ref]
            self.current += nbytes
        elif entry[0] != nbytes:  # resized in place
            self.current += nbytes - entry[0]
            entry[0] = nbytes

    def track(self, *objs: Any) -> None:
        """Charge tensors that already exist (any nesting of lists, tuples and dicts)."""
        for t in tree_flatten(list(objs))[0]:
            if isinstance(t, torch.Tensor):
                self._charge(t)
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._charge(t)
        self.peak = max(self.peak, self.current)
        return out


@dataclass(frozen=True)
class Measurement:
    """What one measured training step used."""

    device: str
    method: str
    precision: str
    batch_size: int
    micro_batches: int
    checkpointing: bool
    measured_peak_bytes: int
    """Peak live tensor bytes of the second step (CUDA: max_memory_allocated)."""
    peak_reserved_bytes: int | None
    """CUDA: max_memory_reserved; MPS: largest sampled driver allocation; CPU: None."""
    process_peak_rss_bytes: int
    """The process's peak resident set size so far (ru_maxrss), libraries included."""
    rss_before_bytes: int
    """ru_maxrss before the model was built: in a fresh process (`measure_in_subprocess`),
    ``process_peak_rss_bytes - rss_before_bytes`` is the step's RSS growth, a cross-check."""
    step_seconds: float
    """Wall time of the second step (CPU: run without the tracker and the profiler)."""
    lstm_kernel: str | None
    """CPU LSTM kernel in use: 'mkldnn' (oneDNN) or 'native'; None off the CPU or for the
    Transformer."""
    allocator_peak_bytes: int | None = None
    """Level 2: every allocation, kernel scratch included (see the module docstring)."""
    process_peak_bytes: int | None = None
    """Level 3: what the OS/driver counts (CPU: peak RSS growth; CUDA: reserved + context)."""
    allocator_setting: str = ""
    """What `ehrplan.runtime.allocator.configure` did for this process."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_devices() -> list[str]:
    """Devices torch can use on this machine."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def resolve_device(name: str) -> str:
    """``auto`` -> cuda, mps or cpu (first present); unknown or absent devices: DeviceError."""
    if name not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device '{name}' (valid: {', '.join(DEVICE_CHOICES)})")
    present = available_devices()
    if name == "auto":
        return "cuda" if "cuda" in present else "mps" if "mps" in present else "cpu"
    if name not in present:
        raise DeviceError(
            f"device '{name}' is not present on this machine (present: {', '.join(present)})"
        )
    return name


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cpu_lstm_kernel() -> str:
    """Which CPU LSTM kernel torch will run: oneDNN ('mkldnn') or the native ATen one."""
    mkldnn = torch.backends.mkldnn
    return "mkldnn" if mkldnn.is_available() and mkldnn.enabled else "native"


def _autocast(device: str, precision: str) -> Any:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device, dtype=_HALF[precision])


def make_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    device: str,
    precision: str,
    loss_fn: torch.nn.Module | None = None,
    scaler: Any = None,
    between: Callable[[], None] = lambda: None,
) -> Callable[[int], None]:
    """A function running one optimizer step of ``n`` micro-batches on ``batch``; ``between`` is
    called after each phase (used to sample memory where there is no peak counter)."""

    if loss_fn is None:  # the loss `ehrplan train` trains with: the measured step is its step
        from ehrplan.runtime.training.loss import LabelLoss, ProgressionLoss

        # one output: a binary (or regression) task's head, read by a one-logit loss
        head = getattr(getattr(model, "heads", None), "stage_classifier", None)
        one = getattr(head, "out_features", None) == 1
        loss_fn = LabelLoss("binary") if one else ProgressionLoss()

    def step(n: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(n):
            with _autocast(device, precision):
                stage_logits, time_pred = model(*batch.model_inputs())
                loss = loss_fn(stage_logits, time_pred, batch).total / n
            between()
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            del loss, stage_logits, time_pred
            between()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        between()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


@contextmanager
def _oom_is_does_not_fit(what: str) -> Iterator[None]:
    """A real out-of-memory error during the step is the answer "does not fit"."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        msg = str(e).splitlines()[0]
        raise DoesNotFitError(f"{what} does not fit: out of memory ({msg})") from None
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            raise DoesNotFitError(f"{what} does not fit: {str(e).splitlines()[0]}") from None
        raise


def measure_step(
    config: EHRModelConfig,
    *,
    batch_size: int | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    checkpointing: bool | None = None,
    visits: int | None = None,
    codes: int | None = None,
    seed: int = 0,
    batch: Batch | None = None,
) -> Measurement:
    """Build ``config``'s model on ``device`` and measure the peak of its second training step.

    The batch is fully padded (``batch_size x max_visits x max_codes_per_visit``) unless
    ``visits``/``codes`` say otherwise, or ``batch`` gives a real (data-shaped) one.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}' (valid: {', '.join(PRECISIONS)})")
    device = resolve_device(device)
    ckpt = config.use_checkpoint if checkpointing is None else checkpointing
    B = batch.num_patients if batch is not None else batch_size or config.batch_size
    cfg = config.model_copy(update={"use_checkpoint": ckpt, "batch_size": B})
    micro = min(cfg.gradient_accumulation_steps, 2)
    what = f"batch {B} of this model on {device}"
    from ehrplan.runtime.allocator import configure

    allocator_setting = configure() if device == "cpu" else ""

    torch.manual_seed(seed)
    gc.collect()
    rss_before = peak_rss_bytes()
    context = 0
    if device == "cuda":  # device memory in use before the model that torch did not reserve
        free, total = torch.cuda.mem_get_info()
        context = max(0, total - free - torch.cuda.memory_reserved())
    with _oom_is_does_not_fit(what):
        model = build_model(cfg).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if batch is None:
            batch = synthetic_batch(cfg, B, visits=visits, codes=codes, seed=seed, device=device)
        else:
            batch = batch.to(device)
        scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
        samples: list[tuple[int, int]] = []

        def sample() -> None:
            if device == "mps":
                _sync(device)
                samples.append(
                    (torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory())
                )

        step = make_step(
            model, optimizer, batch, device=device, precision=precision, scaler=scaler,
            between=sample,
        )  # fmt: skip
        step(1)  # the first step creates Adam's state
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        _sync(device)
        samples.clear()
        t0 = time.perf_counter()
        reserved: int | None = None
        process_growth = 0
        if device == "cpu":
            # the second step runs plain: timed, and the process's peak RSS read after it, before
            # the tracker and the profiler (whose own buffers would count) measure the third
            step(micro)
            seconds = time.perf_counter() - t0
            process_growth = peak_rss_bytes() - rss_before
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            tracker = LiveTensorBytes()
            tracker.track(
                list(model.parameters()),
                list(model.buffers()),
                [list(s.values()) for s in optimizer.state.values()],
                [getattr(batch, f.name) for f in fields(batch)],
            )
            start = tracker.current
            with _allocator_events() as events, tracker:
                step(micro)
            peak = tracker.peak
            allocator = start + _running_peak(events())
        elif device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(micro)
            _sync(device)
            peak = allocator = torch.cuda.max_memory_allocated()
            reserved = torch.cuda.max_memory_reserved()
            seconds = time.perf_counter() - t0
        else:
            sample()
            step(micro)
            peak = max(s[0] for s in samples)
            reserved = allocator = max(s[1] for s in samples)
            seconds = time.perf_counter() - t0
    return Measurement(
        device=device,
        method={
            "cpu": "dispatcher live tensor bytes",
            "cuda": "torch.cuda.max_memory_allocated",
            "mps": "sampled torch.mps.current_allocated_memory",
        }[device],
        precision=precision,
        batch_size=B,
        micro_batches=micro,
        checkpointing=ckpt,
        measured_peak_bytes=int(peak),
        peak_reserved_bytes=None if reserved is None else int(reserved),
        process_peak_rss_bytes=peak_rss_bytes(),
        rss_before_bytes=rss_before,
        step_seconds=seconds,
        lstm_kernel=cpu_lstm_kernel() if device == "cpu" and cfg.model_type == "lstm" else None,
        allocator_peak_bytes=int(max(allocator, peak)),
        process_peak_bytes=process_growth if device == "cpu" else int(reserved or 0) + context,
        allocator_setting=allocator_setting,
    )


@contextmanager
def _allocator_events() -> Iterator[Callable[[], list[tuple[int, int]]]]:
    """Record the CPU allocator's events (time, +/- bytes) with ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result: list[tuple[int, int]] = []
        yield lambda: result
    for e in prof.profiler.kineto_results.events():  # type: ignore[union-attr]
        if e.name() == "[memory]" and e.device_type().name == "CPU":
            result.append((e.start_ns(), e.nbytes()))


def _running_peak(events: list[tuple[int, int]]) -> int:
    """Largest running sum of allocation events in time order (frees are negative)."""
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def measure_in_subprocess(
    config: EHRModelConfig, *, timeout: float | None = None, **kwargs: Any
) -> Measurement:
    """`measure_step` in a fresh Python process: nothing of this process's memory mixes in, and
    the RSS growth (``process_peak_rss_bytes - rss_before_bytes``) is the step's own."""
    request = json.dumps({"config": config.model_dump(), "kwargs": kwargs})
    code = "from ehrplan.runtime.measure import _subprocess_main; _subprocess_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=request,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "does not fit" in last:
            raise DoesNotFitError(last.removeprefix("error: "))
        raise RuntimeError(f"measurement subprocess failed (exit {proc.returncode}): {last}")
    return Measurement(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _subprocess_main() -> None:
    from ehrplan.errors import EhrplanError
    from ehrplan.plan.config import validate_config

    request = json.loads(sys.stdin.read())
    try:
        m = measure_step(validate_config(request["config"]), **request["kwargs"])
    except EhrplanError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps(m.to_dict()))
