"""What this machine has to train on: host RAM, CPU, NVIDIA GPUs, Apple Silicon.

No torch on the default path. Every source fails softly: a missing library, driver, file or
permission becomes a line in ``HardwareReport.notes``, never an exception.

Sources are injectable (`Sources`) so recorded fakes drive the probe in tests:

- ``root``: where ``proc/`` and ``sys/`` are read from (``/`` on a real machine);
- ``nvml``: an object with pynvml's functions (default: ``import pynvml`` from nvidia-ml-py);
- ``sysctl``: a function ``name -> str | None`` (default: ``sysctl -n NAME`` on macOS);
- ``environ``, ``system``, ``machine``: the environment and ``platform`` answers.

Budgets ("what a training step may spend", see shared/docs/memory-truth.md):

- NVIDIA: total memory less what the driver reserves (NVML v2 ``reserved``) and less an
  allowance for the CUDA context (`CUDA_CONTEXT_ALLOWANCE`).
- Apple Silicon: the GPU's working set, not the unified memory (see `apple_working_set`).
- Host (CPU): the smaller of physical RAM and the cgroup (container) memory limit.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MIB = 1024**2
GIB = 1024**3

#: Allowance for the CUDA context a training process creates on each GPU (kernels, cuBLAS/cuDNN
#: handles). An assumption, not a measurement: it varies with the CUDA version, lazy module
#: loading and the libraries loaded; the dry run measures the real one.
CUDA_CONTEXT_ALLOWANCE = 512 * MIB

#: cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages); treat >= 2^60 as none.
_CGROUP_UNLIMITED = 1 << 60

# Apple documents no fraction for MTLDevice.recommendedMaxWorkingSetSize ("an approximation of
# how much memory ... this GPU device can allocate without affecting its runtime performance",
# developer.apple.com/documentation/metal/mtldevice/recommendedmaxworkingsetsize). Reported
# values: 16 GiB M4 -> 10.67 GiB, i.e. 2/3 (exo-explore/exo#1672); 8 GB Macs -> ~5.3 GB, 2/3
# (SceneWorks/SceneWorks#1552); "usually 0.75 * the total ram" (ml-explore/mlx#64, an MLX
# maintainer); 128 GiB -> 107.52 GiB, 0.84, on macOS 26 (antirez/ds4#893). We take the low end of
# what was reported for each size: 2/3 below 64 GiB, 3/4 from 64 GiB. Exact value: --probe-mps.
APPLE_WORKING_SET_FRACTION_SMALL = 2 / 3
APPLE_WORKING_SET_FRACTION_LARGE = 3 / 4
APPLE_LARGE_MEMORY = 64 * GIB


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HostMemory(_Frozen):
    """Host RAM, and the container's (cgroup) limit on it."""

    total_bytes: int | None = Field(description="Physical RAM.")
    available_bytes: int | None = Field(
        description="RAM available now (within the cgroup limit, if any)."
    )
    cgroup_version: Literal[1, 2] | None = Field(description="cgroup version read, if any.")
    cgroup_limit_bytes: int | None = Field(description="Memory limit of this cgroup; None: none.")
    cgroup_file: str | None = Field(description="The file the limit came from.")
    budget_bytes: int | None = Field(description="What a CPU run may use: min(RAM, cgroup limit).")


class CPUInfo(_Frozen):
    model: str | None = Field(description="CPU model name.")
    physical_cores: int | None = Field(description="Physical cores (not hyper-threads).")
    logical_cores: int | None = Field(description="Logical CPUs.")
    bf16: str | None = Field(
        None,
        description="The CPU feature that gives native bf16 arithmetic (x86 amx_bf16 or "
        "avx512_bf16, Arm bf16/FEAT_BF16); None: none found.",
    )


class NvidiaGPU(_Frozen):
    """One CUDA device as a training process would see it (a whole GPU or a MIG slice)."""

    cuda_index: int = Field(description="Index CUDA gives it after CUDA_VISIBLE_DEVICES.")
    nvml_index: int = Field(description="NVML's index of the (parent) GPU, PCI bus order.")
    name: str
    uuid: str | None
    pci_bus_id: str | None
    total_bytes: int = Field(description="Memory NVML reports as total.")
    reserved_bytes: int = Field(description="Memory the driver/firmware reserves (NVML v2).")
    free_bytes: int | None = Field(description="Free now (other processes may hold some).")
    compute_capability: str | None = Field(description="e.g. '8.0'.")
    mig_mode: bool | None = Field(description="MIG mode of the GPU (None: not supported/read).")
    mig_slice: bool = Field(False, description="This device is a MIG slice of a GPU.")
    usable_bytes: int = Field(description="total - reserved - CUDA context allowance.")

    @property
    def bf16(self) -> bool:
        """bf16 tensor math: compute capability 8.0 (Ampere) and later."""
        try:
            return float(self.compute_capability or 0) >= 8.0
        except ValueError:
            return False


class AppleGPU(_Frozen):
    chip: str | None = Field(description="sysctl machdep.cpu.brand_string, e.g. 'Apple M1'.")
    unified_memory_bytes: int | None = Field(description="sysctl hw.memsize.")
    working_set_bytes: int | None = Field(description="What the GPU may use: the budget.")
    working_set_source: str = Field(description="Where working_set_bytes came from.")
    rosetta: bool = Field(description="Python runs translated by Rosetta 2 (x86_64).")


class HardwareReport(_Frozen):
    system: str
    machine: str
    python: str
    host: HostMemory
    cpu: CPUInfo
    nvidia_driver: str | None = None
    cuda_driver: str | None = Field(None, description="CUDA version the driver supports.")
    nvidia: list[NvidiaGPU] = Field(default_factory=list)
    apple: AppleGPU | None = None
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------
# sources


def _default_sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


@dataclass
class Sources:
    """Where the probe reads from; replace any of these with a recorded fake."""

    root: Path = Path("/")
    nvml: Any = None  # None: import pynvml lazily
    sysctl: Callable[[str], str | None] | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    system: str = field(default_factory=platform.system)
    machine: str = field(default_factory=platform.machine)

    def read(self, rel: str) -> str | None:
        try:
            return (self.root / rel.lstrip("/")).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def sysctl_value(self, name: str) -> str | None:
        fn = self.sysctl or _default_sysctl
        try:
            return fn(name)
        except Exception:  # a fake or a broken sysctl must not take the probe down
            return None


# --------------------------------------------------------------------------------------------
# host: RAM, cgroup, CPU


def _meminfo(src: Sources) -> dict[str, int]:
    text = src.read("proc/meminfo") or ""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _read_int(src: Sources, rel: str) -> int | None:
    text = src.read(rel)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return _CGROUP_UNLIMITED
    return int(text) if text.isdigit() else None


def _ancestors(path: str) -> list[str]:
    """``/a/b`` -> ``["/a/b", "/a", "/"]``: a cgroup's limit is the smallest on the way up."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_memory(src: Sources) -> tuple[int | None, int | None, int | None, str | None]:
    """(version, limit, usage, file) of this process's memory cgroup; limit None = unlimited.

    v1: the ``memory`` controller's line of /proc/self/cgroup, limit in
    ``memory.limit_in_bytes`` under /sys/fs/cgroup/memory; v2: the ``0::`` line, limit in
    ``memory.max`` under /sys/fs/cgroup. Each level up to the mount root is checked (inside a
    container the mount root is the container's own cgroup) and the smallest limit wins.
    """
    text = src.read("proc/self/cgroup")
    if text is None:
        return None, None, None, None
    v1_path = v2_path = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1_path = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
    candidates: list[tuple[int, str, str, str]] = []
    if v1_path is not None:
        base = "sys/fs/cgroup/memory"
        candidates += [(1, base, p, "memory.limit_in_bytes") for p in _ancestors(v1_path)]
    if v2_path is not None and src.read("sys/fs/cgroup/cgroup.controllers") is not None:
        candidates += [(2, "sys/fs/cgroup", p, "memory.max") for p in _ancestors(v2_path)]
    best: tuple[int, int, int | None, str] | None = None
    version_seen: int | None = None
    for version, base, path, name in candidates:
        rel = f"{base}{path.rstrip('/')}/{name}"
        limit = _read_int(src, rel)
        if limit is None:
            continue
        version_seen = version_seen or version
        if limit >= _CGROUP_UNLIMITED:
            continue
        usage_name = "memory.usage_in_bytes" if version == 1 else "memory.current"
        usage = _read_int(src, f"{base}{path.rstrip('/')}/{usage_name}")
        if best is None or limit < best[1]:
            best = (version, limit, usage, "/" + rel)
    if best is None:
        return version_seen, None, None, None
    return best


def probe_host(src: Sources, notes: list[str]) -> HostMemory:
    total = available = None
    if src.system == "Darwin":
        memsize = src.sysctl_value("hw.memsize")
        total = int(memsize) if memsize and memsize.isdigit() else None
    else:
        info = _meminfo(src)
        total, available = info.get("MemTotal"), info.get("MemAvailable")
    if total is None:
        try:
            import psutil

            vm = psutil.virtual_memory()
            total, available = int(vm.total), int(vm.available)
        except Exception as e:  # psutil missing or unsupported platform
            notes.append(f"host RAM: could not be read ({type(e).__name__})")
    version = limit = usage = cfile = None
    if src.system == "Linux":
        version, limit, usage, cfile = cgroup_memory(src)
    budget = total
    if limit is not None:
        budget = min(total, limit) if total is not None else limit
        if usage is not None:
            room = max(limit - usage, 0)
            available = min(available, room) if available is not None else room
        notes.append(
            f"host RAM: container (cgroup v{version}) memory limit {limit / GIB:.2f} GiB applies"
            f" ({cfile})"
        )
    return HostMemory(
        total_bytes=total,
        available_bytes=available,
        cgroup_version=version,
        cgroup_limit_bytes=limit,
        cgroup_file=cfile,
        budget_bytes=budget,
    )


#: CPU features with native bf16 arithmetic, best first (/proc/cpuinfo ``flags`` on x86,
#: ``Features`` on Arm Linux): oneDNN runs bf16 autocast natively with them.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def probe_cpu(src: Sources) -> CPUInfo:
    model = physical = logical = None
    bf16: str | None = None
    if src.system == "Darwin":
        model = src.sysctl_value("machdep.cpu.brand_string")
        if src.sysctl_value("hw.optional.arm.FEAT_BF16") == "1":
            bf16 = "FEAT_BF16"
        p, lg = src.sysctl_value("hw.physicalcpu"), src.sysctl_value("hw.logicalcpu")
        physical = int(p) if p and p.isdigit() else None
        logical = int(lg) if lg and lg.isdigit() else None
    else:
        text = src.read("proc/cpuinfo") or ""
        cores: set[tuple[str, str]] = set()
        phys = core = ""
        for line in [*text.splitlines(), ""]:
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "model name" and model is None:
                model = value
            elif key == "processor":
                logical = (logical or 0) + 1
            elif key == "physical id":
                phys = value
            elif key == "core id":
                core = value
            elif key in ("flags", "Features") and bf16 is None:
                have = set(value.split())
                bf16 = next((f for f in CPU_BF16_FLAGS if f in have), None)
            elif not key and core:
                cores.add((phys, core))
                phys = core = ""
        physical = len(cores) or None
    if physical is None or logical is None:
        try:
            import psutil

            physical = physical or psutil.cpu_count(logical=False)
            logical = logical or psutil.cpu_count(logical=True)
        except Exception:
            pass
    return CPUInfo(model=model, physical_cores=physical, logical_cores=logical, bf16=bf16)


# --------------------------------------------------------------------------------------------
# NVIDIA


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _cuda_version(v: int) -> str:
    """NVML's ``12040`` -> ``"12.4"`` (major * 1000 + minor * 10)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def _memory(nvml: Any, handle: Any) -> tuple[int, int, int | None]:
    """(total, reserved, free) from NVML; v2 reports the driver's reserve, v1 does not."""
    try:
        m = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        return int(m.total), int(getattr(m, "reserved", 0)), int(m.free)
    except Exception:
        m = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(m.total), 0, int(m.free)


def _soft(fn: Callable[[], Any], default: Any = None) -> Any:
    try:
        return fn()
    except Exception:
        return default


@dataclass
class _RawGPU:
    nvml_index: int
    name: str
    uuid: str | None
    pci_bus_id: str | None
    total: int
    reserved: int
    free: int | None
    cc: str | None
    mig_mode: bool | None
    mig_slice: bool = False


def _nvml_devices(nvml: Any, notes: list[str]) -> list[_RawGPU]:
    devices: list[_RawGPU] = []
    count = int(nvml.nvmlDeviceGetCount())
    for i in range(count):
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = _text(nvml.nvmlDeviceGetName(h))
            uuid = _soft(lambda h=h: _text(nvml.nvmlDeviceGetUUID(h)))
            bus = _soft(lambda h=h: _text(nvml.nvmlDeviceGetPciInfo(h).busId))
            total, reserved, free = _memory(nvml, h)
            cc = _soft(lambda h=h: "{}.{}".format(*nvml.nvmlDeviceGetCudaComputeCapability(h)))
            mig = _soft(lambda h=h: bool(nvml.nvmlDeviceGetMigMode(h)[0]))
        except Exception as e:
            notes.append(f"NVIDIA GPU {i}: could not be read ({type(e).__name__}: {e})")
            continue
        if not mig:
            devices.append(_RawGPU(i, name, uuid, bus, total, reserved, free, cc, mig))
            continue
        slices = 0
        for j in range(int(_soft(lambda h=h: nvml.nvmlDeviceGetMaxMigDeviceCount(h), 0))):
            try:
                mh = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except Exception:
                continue  # an empty MIG slot
            try:
                mname = _text(_soft(lambda mh=mh: nvml.nvmlDeviceGetName(mh), name))
                muuid = _soft(lambda mh=mh: _text(nvml.nvmlDeviceGetUUID(mh)))
                mt, mr, mf = _memory(nvml, mh)
            except Exception as e:
                notes.append(f"NVIDIA GPU {i} MIG slice {j}: could not be read ({e})")
                continue
            devices.append(_RawGPU(i, mname, muuid, bus, mt, mr, mf, cc, True, mig_slice=True))
            slices += 1
        if not slices:
            notes.append(
                f"NVIDIA GPU {i} ({name}) is in MIG mode with no MIG slice: no CUDA device"
            )
    return devices


def _cuda_order(devs: list[_RawGPU], environ: Mapping[str, str], notes: list[str]) -> list[_RawGPU]:
    """CUDA's enumeration order: PCI bus order under CUDA_DEVICE_ORDER=PCI_BUS_ID, else
    FASTEST_FIRST, which NVIDIA does not specify exactly; on identical GPUs the two agree."""
    by_bus = sorted(devs, key=lambda d: (d.pci_bus_id or "", d.nvml_index))
    models = {d.name.split(" MIG ")[0] for d in devs}  # a MIG slice is named "<GPU> MIG 1g.10gb"
    if environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or len(models) <= 1:
        return by_bus
    notes.append(
        "GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA's FASTEST_FIRST order is "
        "approximated by compute capability; set CUDA_DEVICE_ORDER=PCI_BUS_ID to make it certain"
    )
    return sorted(by_bus, key=lambda d: -float(d.cc or 0))


def _visible(devs: list[_RawGPU], environ: Mapping[str, str], notes: list[str]) -> list[_RawGPU]:
    """Apply CUDA_VISIBLE_DEVICES: indices and GPU-/MIG- UUIDs (unique prefixes allowed); like
    CUDA, the list ends at the first entry that names no device."""
    spec = environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return devs
    parents = sorted({d.nvml_index for d in devs}, key=[d.nvml_index for d in devs].index)
    out: list[_RawGPU] = []
    for token in (t.strip() for t in spec.split(",")):
        if token.isdigit():
            k = int(token)
            chosen = [d for d in devs if k < len(parents) and d.nvml_index == parents[k]]
        else:
            chosen = [
                d
                for d in devs
                if d.uuid
                and token
                and (d.uuid.startswith(token) or d.uuid.startswith("GPU-" + token))
            ]
            if len(chosen) > 1 and not all(c.mig_slice for c in chosen):
                chosen = []  # an ambiguous prefix: CUDA rejects it too
        if not chosen:
            if token:
                notes.append(
                    f"CUDA_VISIBLE_DEVICES={spec!r}: '{token}' names no device; "
                    "CUDA ignores it and every entry after it"
                )
            break
        out += [c for c in chosen if c not in out]
    return out


def probe_nvidia(src: Sources, notes: list[str]) -> tuple[list[NvidiaGPU], str | None, str | None]:
    nvml = src.nvml
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py
        except ImportError:
            notes.append("NVIDIA: nvidia-ml-py (pynvml) is not installed; no NVIDIA GPU probed")
            return [], None, None
    try:
        nvml.nvmlInit()
    except Exception as e:
        notes.append(f"NVIDIA: no driver/NVML library ({type(e).__name__}: {e}); no NVIDIA GPU")
        return [], None, None
    try:
        driver = _soft(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        cuda = _soft(lambda: _cuda_version(int(nvml.nvmlSystemGetCudaDriverVersion())))
        raw = _nvml_devices(nvml, notes)
    except Exception as e:
        notes.append(f"NVIDIA: NVML failed ({type(e).__name__}: {e})")
        return [], None, None
    finally:
        _soft(nvml.nvmlShutdown)
    visible = _visible(_cuda_order(raw, src.environ, notes), src.environ, notes)
    if sum(d.mig_slice for d in visible) > 1:
        notes.append(
            "several MIG slices are visible, but one CUDA process uses one MIG slice: "
            "the budget is per slice"
        )
    gpus = [
        NvidiaGPU(
            cuda_index=k,
            nvml_index=d.nvml_index,
            name=d.name,
            uuid=d.uuid,
            pci_bus_id=d.pci_bus_id,
            total_bytes=d.total,
            reserved_bytes=d.reserved,
            free_bytes=d.free,
            compute_capability=d.cc,
            mig_mode=d.mig_mode,
            mig_slice=d.mig_slice,
            # what a step may use: total less the driver's reserve and the CUDA context
            usable_bytes=max(d.total - d.reserved - CUDA_CONTEXT_ALLOWANCE, 0),
        )
        for k, d in enumerate(visible)
    ]
    for g in gpus:
        if g.free_bytes is not None and g.free_bytes < g.usable_bytes:
            notes.append(
                f"cuda:{g.cuda_index} ({g.name}): only {g.free_bytes / GIB:.2f} GiB free now; "
                "other processes hold memory"
            )
    if raw and not gpus:
        notes.append("NVIDIA: CUDA_VISIBLE_DEVICES hides every GPU")
    return gpus, driver, cuda


# --------------------------------------------------------------------------------------------
# Apple Silicon


def apple_working_set(unified_bytes: int) -> int:
    """The documented-fraction estimate of Metal's recommendedMaxWorkingSetSize (see above)."""
    if unified_bytes >= APPLE_LARGE_MEMORY:
        return int(unified_bytes * APPLE_WORKING_SET_FRACTION_LARGE)
    return int(unified_bytes * APPLE_WORKING_SET_FRACTION_SMALL)


def probe_apple(
    src: Sources,
    notes: list[str],
    mps_reader: Callable[[], int | None] | None = None,
) -> AppleGPU | None:
    """Apple Silicon's GPU budget. ``mps_reader`` (``--probe-mps``) asks torch for Metal's
    recommended working set; it lives in the runtime
    (`ehrplan.runtime.training.device.mps_recommended_max_memory`), as this package imports no
    torch."""
    if src.system != "Darwin":
        return None
    rosetta = src.sysctl_value("sysctl.proc_translated") == "1"
    arm64 = src.sysctl_value("hw.optional.arm64") == "1" or src.machine == "arm64"
    if not arm64 and not rosetta:
        notes.append("macOS on Intel: no Apple Silicon GPU (MPS) budget")
        return None
    if rosetta:
        notes.append(
            "Python runs under Rosetta 2 (x86_64 on Apple Silicon): MPS is unavailable and "
            "everything is slower; install an arm64 (native) Python"
        )
    chip = src.sysctl_value("machdep.cpu.brand_string")
    if chip and not chip.startswith("Apple") and rosetta:
        notes.append(f"chip name under Rosetta reads {chip!r}, not the real chip")
    memsize = src.sysctl_value("hw.memsize")
    unified = int(memsize) if memsize and memsize.isdigit() else None
    ws: int | None = None
    source = "unknown"
    wired = src.sysctl_value("iogpu.wired_limit_mb")
    if mps_reader is not None:
        try:
            ws = mps_reader()
            source = "torch.mps.recommended_max_memory()"
            if ws is None:
                notes.append("--probe-mps: torch reports MPS unavailable")
        except Exception as e:
            notes.append(f"--probe-mps: torch could not be asked ({type(e).__name__}: {e})")
    if ws is None and wired and wired.isdigit() and int(wired) > 0:
        ws = int(wired) * MIB
        source = "sysctl iogpu.wired_limit_mb (set by the user)"
    if ws is None and unified is not None:
        ws = apple_working_set(unified)
        frac = "3/4" if unified >= APPLE_LARGE_MEMORY else "2/3"
        source = f"{frac} of unified memory (approximation; exact: --probe-mps)"
    if unified is None:
        notes.append("Apple Silicon: unified memory size (hw.memsize) could not be read")
    return AppleGPU(
        chip=chip,
        unified_memory_bytes=unified,
        working_set_bytes=ws,
        working_set_source=source,
        rosetta=rosetta,
    )


# --------------------------------------------------------------------------------------------


def probe(
    sources: Sources | None = None,
    *,
    mps_reader: Callable[[], int | None] | None = None,
) -> HardwareReport:
    """Describe this machine (or the one the recorded ``sources`` describe). Never raises.

    ``mps_reader``: ask torch for Apple's working set (``--probe-mps``; see `probe_apple`)."""
    src = sources or Sources()
    notes: list[str] = []
    host = probe_host(src, notes)
    cpu = probe_cpu(src)
    gpus: list[NvidiaGPU] = []
    driver = cuda = None
    if src.system != "Darwin":
        gpus, driver, cuda = probe_nvidia(src, notes)
    apple = probe_apple(src, notes, mps_reader=mps_reader)
    return HardwareReport(
        system=src.system,
        machine=src.machine,
        python=sys.version.split()[0],
        host=host,
        cpu=cpu,
        nvidia_driver=driver,
        cuda_driver=cuda,
        nvidia=gpus,
        apple=apple,
        notes=notes,
    )
