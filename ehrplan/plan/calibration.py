"""Calibration profiles: the device terms a measured ladder fits, and how the planner finds them.

No torch here: `estimate`, `recommend` and `validate` read profiles without importing it. The fit
itself is `ehrplan.runtime.calibrate` (torch); the command is ``ehrplan calibrate``.

A profile is one JSON document (format version `FORMAT_VERSION`), written atomically to
``$EHRPLAN_CACHE/calibration/<device>.json`` (default ``~/.cache/ehrplan``) or ``--out``:

- ``format``: ``"ehrplan-calibration"``; ``format_version``: 1
- ``device``: ``cpu`` | ``cuda`` | ``mps``; ``device_name`` (CPU model, GPU name); ``driver``
  (CUDA driver/runtime, or the OS for CPU/MPS); ``torch_version``; ``date`` (UTC, ISO 8601);
  ``host`` (machine architecture and CPU count)
- ``terms``: every `DeviceTerms` field by name; ``fitted``: those the ladder determined (the
  others keep their uncalibrated values)
- ``residuals``: per ladder shape, the process-level and allocator-level relative errors of the
  fitted model (``(model - measured) / measured``)
- ``ladder``: per shape measured, ``name``, ``model_type``, ``batch``, ``visits``, ``codes``,
  ``live_bytes`` (level 1), ``allocator_peak_bytes`` (level 2), ``process_peak_bytes``
  (level 3), ``estimated_bytes`` (the analytic live estimate), ``step_seconds`` (wall time of
  one training step, forward + backward + Adam, measured on the device, no tracker running),
  ``flops_per_step`` (the analytic FLOPs of that step, `ehrplan.plan.flops`), so that
  ``flops_per_step / step_seconds`` is a measured throughput of this device for that shape
- ``skipped``: ladder shapes that ran out of memory (name and message)

Where no profile exists every answer says "uncalibrated: <the assumptions>"; a profile found in
the cache that is malformed, for another device or of an unknown format version is ignored with a
warning; the same passed with ``--calibration FILE`` is a one-line error (exit 2).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from ehrplan.errors import ConfigError

FORMAT = "ehrplan-calibration"
FORMAT_VERSION = 1
#: The torch version the CPU formulas of `ehrplan.plan.estimator` were fitted on.
FITTED_TORCH = "2.13.0"
MIB = 1024**2


@dataclass(frozen=True)
class DeviceTerms:
    """What the estimator cannot know from first principles; the defaults are the uncalibrated
    assumptions on the CPU (`uncalibrated_terms`, `uncalibrated_label`)."""

    lstm_scratch_per_gate_byte: float = 1.1
    """Kernel scratch an LSTM's backward allocates and frees inside itself (CPU: oneDNN's
    scratchpad; CUDA: cuDNN's workspace), per byte of the largest LSTM call's fp32 gates
    (``4 x steps x sequences x hidden x 4``). Default from tiny-lstm and small-lstm on this
    project's CPU (`ehrplan.runtime.measure`, profiler memory events): 0.93 and 1.33."""
    transformer_scratch_ratio: float = 0.0
    """Kernel scratch of a Transformer step, as a fraction of its live peak (CPU: +0.0% on
    tiny-transformer)."""
    runtime_baseline_bytes: int = 97 * MIB
    """CPU/MPS process: what the runtime adds once the model runs (oneDNN primitives, thread
    pools, autograd), beyond the allocator peak: the median over the first 15 random configs of
    ``benchmarks/estimator_accuracy.py --random`` here (94-112 MB; LSTMs and bf16 higher)."""
    allocator_retention: float = 1.0
    """CPU process: resident bytes per allocator-peak byte with ``train``'s allocator settings
    (`ehrplan.runtime.allocator`; glibc's defaults kept up to 3x)."""
    cuda_context_bytes: int = 500 * MIB
    """CUDA: the context (driver, kernels, cuBLAS/cuDNN handles) outside torch's allocator."""
    cuda_reserve_ratio: float = 1.10
    """CUDA: max_memory_reserved / max_memory_allocated (the caching allocator's blocks)."""


def uncalibrated_terms(device: str) -> DeviceTerms:
    """The assumptions for ``device`` without a profile: off the CPU the LSTM's kernel state is
    already modelled like the native kernel's (`ehrplan.plan.estimator`), so no scratch is
    added until a calibration measures it."""
    if device == "cpu":
        return DeviceTerms()
    return DeviceTerms(lstm_scratch_per_gate_byte=0.0)


def uncalibrated_label(device: str) -> str:
    """``uncalibrated: <the assumptions>`` for ``device``."""
    if device == "cuda":
        what = (
            "CUDA context 500 MiB, allocator reserve x1.10, cuDNN LSTM state as the native kernel's"
        )
    elif device == "mps":
        what = "runtime baseline 97 MiB beside the allocation, LSTM state as the native kernel's"
    else:
        what = (
            "kernel scratch 1.1 x the largest LSTM call's fp32 gates, runtime baseline 97 MiB, "
            "RSS = allocator peak (train's malloc settings)"
        )
    return f"uncalibrated: {what} (run `ehrplan calibrate --device {device}`)"


@dataclass(frozen=True)
class CalibrationProfile:
    """A loaded profile (see the module docstring for the file's fields)."""

    device: str
    device_name: str
    driver: str
    torch_version: str
    date: str
    terms: DeviceTerms
    residuals: dict[str, dict[str, float]] = field(default_factory=dict)
    ladder: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    host: str = ""
    path: str = ""
    fitted: list[str] = field(default_factory=list)
    """The terms the ladder determined; the others keep their uncalibrated values."""

    @property
    def label(self) -> str:
        """``calibrated on <device name>, <date>``."""
        return f"calibrated on {self.device_name} ({self.device}), {self.date[:10]}"

    def to_json(self) -> dict[str, Any]:
        """The file's document."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "device": self.device,
            "device_name": self.device_name,
            "driver": self.driver,
            "torch_version": self.torch_version,
            "date": self.date,
            "host": self.host,
            "terms": asdict(self.terms),
            "fitted": self.fitted,
            "residuals": self.residuals,
            "ladder": self.ladder,
            "skipped": self.skipped,
        }

    def summary(self) -> dict[str, Any]:
        """What ``--json`` outputs carry as ``calibration``."""
        return {
            "device": self.device,
            "device_name": self.device_name,
            "date": self.date,
            "torch_version": self.torch_version,
            "path": self.path,
            "terms": asdict(self.terms),
        }


def parse_profile(doc: Any, path: str, device: str | None = None) -> CalibrationProfile:
    """A profile from its JSON document; ConfigError naming ``path`` when it is not one."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an ehrplan calibration profile")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: unknown calibration format version {doc.get('format_version')!r} "
            f"(this ehrplan reads {FORMAT_VERSION})"
        )
    if device is not None and doc.get("device") != device:
        raise ConfigError(
            f"{path}: a calibration profile for '{doc.get('device')}', not for '{device}'"
        )
    try:
        known = {f.name for f in fields(DeviceTerms)}
        raw = doc["terms"]
        if not isinstance(raw, dict) or set(raw) - known:
            raise ValueError(f"unknown terms {sorted(set(raw) - known)}")
        terms = DeviceTerms(**{k: type(getattr(DeviceTerms(), k))(v) for k, v in raw.items()})
        return CalibrationProfile(
            device=str(doc["device"]),
            device_name=str(doc["device_name"]),
            driver=str(doc.get("driver", "")),
            torch_version=str(doc["torch_version"]),
            date=str(doc["date"]),
            terms=terms,
            residuals=dict(doc.get("residuals") or {}),
            ladder=list(doc.get("ladder") or []),
            skipped=list(doc.get("skipped") or []),
            host=str(doc.get("host", "")),
            path=path,
            fitted=[str(x) for x in doc.get("fitted") or []],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed calibration profile ({e})") from None


def load_profile(path: Path, device: str | None = None) -> CalibrationProfile:
    """Read and check a profile file; ConfigError (exit 2) naming the file on any problem."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: calibration profile not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: malformed calibration profile ({e})") from None
    return parse_profile(doc, str(path), device)


def cache_dir() -> Path:
    """``$EHRPLAN_CACHE/calibration`` (default ``~/.cache/ehrplan/calibration``)."""
    root = os.environ.get("EHRPLAN_CACHE") or str(Path.home() / ".cache" / "ehrplan")
    return Path(root) / "calibration"


def default_path(device: str) -> Path:
    """Where ``ehrplan calibrate --device DEVICE`` writes its profile by default."""
    return cache_dir() / f"{device}.json"


def installed_torch() -> str | None:
    """The installed torch's version, read from its metadata (torch is not imported)."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Calibration:
    """The profile an answer uses (None: uncalibrated), the line that says so, and warnings."""

    profile: CalibrationProfile | None
    label: str
    warnings: list[str] = field(default_factory=list)

    device: str = "cpu"

    @property
    def terms(self) -> DeviceTerms:
        return self.profile.terms if self.profile else uncalibrated_terms(self.device)

    def summary(self) -> dict[str, Any] | None:
        return self.profile.summary() if self.profile else None


def resolve_calibration(device: str, explicit: Path | None = None) -> Calibration:
    """The profile for ``device``: ``explicit`` (errors are exit 2), else the cache's (errors are
    warnings), else none. Warns when the profile's torch differs from the installed one, and when
    there is no profile and the installed torch is not the one the CPU formulas were fitted on."""
    warnings: list[str] = []
    profile: CalibrationProfile | None = None
    if explicit is not None:
        profile = load_profile(explicit, device)
    else:
        path = default_path(device)
        if path.exists():
            try:
                profile = load_profile(path, device)
            except ConfigError as e:
                warnings.append(f"warning: ignoring {e}")
    torch_version = installed_torch()
    if profile is not None:
        if torch_version and profile.torch_version.split("+")[0] != torch_version.split("+")[0]:
            warnings.append(
                f"warning: calibration profile {profile.path} was made with torch "
                f"{profile.torch_version}; installed is {torch_version}"
            )
        return Calibration(profile, profile.label, warnings, device)
    if torch_version and torch_version.split("+")[0] != FITTED_TORCH:
        warnings.append(
            f"warning: the estimator's CPU formulas were fitted on torch {FITTED_TORCH}; "
            f"installed is {torch_version} and no calibration profile exists "
            f"(run `ehrplan calibrate`)"
        )
    return Calibration(None, uncalibrated_label(device), warnings, device)
