"""Which device a step runs on and in which precision: decided once, here, for every command.

`estimate`, `recommend`, `validate`, `dry-run` and `train` all ask this module, so the precision a
plan was estimated in is the precision the trainer trains in. No torch: the device's abilities
come from the hardware probe (`ehrplan.plan.hardware`), the catalog (`presets/hardware.toml`) or
a declared device type.

The rule (``--precision`` overrides it, where the device can run what was asked):

- the config trains in fp32 (``mixed_precision = false``): fp32;
- NVIDIA compute capability >= 8.0 (Ampere and later): bf16 autocast (native bf16 tensor math);
- NVIDIA compute capability < 8.0 (T4, V100): fp16 autocast with a gradient scaler. torch's
  ``torch.cuda.is_bf16_supported()`` says True on a T4 (it emulates bf16), but emulated bf16 is
  slow and is not what the planner estimates, so the trainer does not ask torch;
- Apple GPUs (MPS): fp16 autocast (MPS bf16 needs macOS 14, pytorch/pytorch#119641; not planned);
- a CPU with native bf16 instructions (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16`` /
  ``FEAT_BF16``): bf16 autocast; other CPUs: fp32 (without the instructions bf16 is emulated and
  slower than fp32).

Every answer carries the words of its reason, which every command prints unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ehrplan.errors import UsageError

if TYPE_CHECKING:
    from ehrplan.plan.catalog import CatalogDevice
    from ehrplan.plan.config import EHRModelConfig
    from ehrplan.plan.hardware import HardwareReport

DEVICES: tuple[str, ...] = ("cpu", "cuda", "mps")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class DeviceTarget:
    """A device type and what 16-bit arithmetic it runs natively, with the evidence."""

    device: str  # cpu, cuda or mps
    label: str  # "NVIDIA A10 (catalog 'a10')", "this machine's CPU (...)", ...
    native_half: str | None  # "bf16", "fp16" or None (no native 16-bit autocast)
    evidence: str  # why native_half is what it is, in words

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "label": self.label,
            "native_mixed_precision": self.native_half,
            "evidence": self.evidence,
        }


@dataclass(frozen=True)
class Resolved:
    """The precision one config trains in on one device, and why."""

    device: str
    precision: str
    reason: str

    def describe(self) -> str:
        """The words every command prints: ``bf16 on cuda: mixed_precision = true; ...``."""
        return f"{self.precision} on {self.device}: {self.reason}"


def cuda(label: str, capability: str | None) -> DeviceTarget:
    """A CUDA device of compute capability ``capability`` (e.g. "7.5"; None: unknown)."""
    try:
        cc = float(capability) if capability else None
    except ValueError:
        cc = None
    if cc is None:
        return DeviceTarget(
            "cuda", label, "bf16", "compute capability unknown: >= 8.0 (bf16) assumed"
        )
    if cc >= 8.0:
        return DeviceTarget("cuda", label, "bf16", f"compute capability {capability} >= 8.0: bf16")
    return DeviceTarget(
        "cuda", label, "fp16", f"compute capability {capability} < 8.0: no native bf16, fp16"
    )


def _mps(label: str) -> DeviceTarget:
    return DeviceTarget("mps", label, "fp16", "Apple GPU (MPS): fp16 (MPS bf16 is not planned)")


def _cpu(label: str, bf16_feature: str | None) -> DeviceTarget:
    if bf16_feature:
        return DeviceTarget("cpu", label, "bf16", f"CPU with native bf16 ({bf16_feature})")
    return DeviceTarget(
        "cpu", label, None, "CPU without native bf16 instructions: bf16 would be emulated"
    )


def from_catalog(row: CatalogDevice) -> DeviceTarget:
    """A catalog machine: its row says whether it has bf16 (compute capability >= 8.0)."""
    label = f"{row.label} (catalog '{row.name}')"
    if row.kind == "apple":
        return _mps(label)
    if row.bf16:
        return DeviceTarget("cuda", label, "bf16", "catalog: compute capability >= 8.0: bf16")
    return DeviceTarget(
        "cuda", label, "fp16", "catalog: compute capability < 8.0: no native bf16, fp16"
    )


def declared(device: str) -> DeviceTarget:
    """A device named only by its type (``--device`` with ``--memory``/``--budget``, or a device
    this machine lacks): CUDA is taken as compute capability >= 8.0, a CPU as one without bf16."""
    check_device(device)
    label = f"a declared {device} device"
    if device == "cuda":
        return DeviceTarget(
            "cuda", label, "bf16", "declared CUDA device: compute capability >= 8.0 assumed"
        )
    if device == "mps":
        return _mps(label)
    return DeviceTarget(
        "cpu", label, None, "declared CPU: native bf16 not known, fp32 (--precision bf16 for it)"
    )


def from_probe(report: HardwareReport, device: str | None = None) -> DeviceTarget:
    """This machine: its first visible CUDA device, else its Apple GPU, else its CPU (or the
    ``device`` asked for; a device the probe did not find is planned as `declared`)."""
    if device is not None:
        check_device(device)
    a = report.apple
    has_mps = a is not None and bool(a.working_set_bytes) and not a.rosetta
    if device is None:
        device = "cuda" if report.nvidia else "mps" if has_mps else "cpu"
    if device == "cuda":
        if not report.nvidia:
            return declared("cuda")
        used = report.nvidia
        low = min(used, key=lambda g: float(g.compute_capability or 0))
        label = ", ".join(f"cuda:{g.cuda_index} {g.name}" for g in used)
        return cuda(label, low.compute_capability)
    if device == "mps":
        if not has_mps:
            return declared("mps")
        return _mps(f"{(a.chip if a else None) or 'Apple Silicon'} GPU (MPS)")
    return _cpu(f"this machine's CPU ({report.cpu.model or 'unknown model'})", report.cpu.bf16)


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}' (valid: {', '.join(DEVICES)})")


def check_precision(requested: str | None) -> str | None:
    """``None``/``auto``: decide by the rule; else one of `PRECISIONS`."""
    if requested in (None, "auto"):
        return None
    if requested not in PRECISIONS:
        raise UsageError(f"unknown precision '{requested}' (valid: auto, {', '.join(PRECISIONS)})")
    return requested


def resolve(config: EHRModelConfig, target: DeviceTarget, requested: str | None = None) -> Resolved:
    """The precision ``config`` trains in on ``target`` (``requested``: ``--precision``)."""
    asked = check_precision(requested)
    dev = target.device
    if asked is not None:
        if asked == "fp16" and dev == "cpu":
            raise UsageError("--precision fp16: the CPU cannot train in fp16 autocast; use bf16")
        if asked == "bf16" and dev == "mps":
            raise UsageError("--precision bf16: MPS bf16 is not supported here; use fp16 or fp32")
        reason = f"--precision {asked}"
        if asked != "fp32" and asked != target.native_half:
            reason += f" ({target.evidence}; {asked} is emulated or slower here)"
        return Resolved(dev, asked, reason)
    if not config.mixed_precision:
        return Resolved(dev, "fp32", "the config trains in fp32 (mixed_precision = false)")
    if target.native_half is None:
        return Resolved(dev, "fp32", f"mixed_precision = true, but {target.evidence}: fp32")
    return Resolved(dev, target.native_half, f"mixed_precision = true; {target.evidence}")
