"""The hardware probe against recorded fakes (tests/fixtures/hardware/*), and on this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ehrplan.plan.hardware import (
    APPLE_LARGE_MEMORY,
    CUDA_CONTEXT_ALLOWANCE,
    GIB,
    MIB,
    Sources,
    apple_working_set,
    cgroup_memory,
    probe,
)
from ehrplan.plan.planner import budget_from_probe

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
MACHINES = sorted(p.name for p in FIXTURES.iterdir() if (p / "machine.json").is_file())


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """pynvml's functions, answering from a recorded machine.json ``nvml`` section."""

    nvmlMemory_v2 = 0x2000028

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = rec
        self.shut = False

    def nvmlInit(self) -> None:
        if "init_error" in self.rec:
            raise FakeNVMLError(self.rec["init_error"])

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.rec["driver"]

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.rec["cuda"]

    def nvmlDeviceGetCount(self) -> int:
        return len(self.rec["devices"])

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.rec["devices"][i]

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> bytes:
        return h["name"].encode()  # older bindings return bytes

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> str:
        return h["uuid"]

    def nvmlDeviceGetPciInfo(self, h: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(busId=h["bus_id"])

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any], version: int | None = None) -> Any:
        if version is None:
            return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])
        return SimpleNamespace(total=h["total"], reserved=h["reserved"], free=h["free"])

    def nvmlDeviceGetCudaComputeCapability(self, h: dict[str, Any]) -> tuple[int, int]:
        return tuple(h["cc"])  # type: ignore[return-value]

    def nvmlDeviceGetMigMode(self, h: dict[str, Any]) -> tuple[int, int]:
        return h["mig"], h["mig"]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: dict[str, Any]) -> int:
        return h.get("max_mig", 0)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: dict[str, Any], j: int) -> dict[str, Any]:
        slot = h.get("mig_devices", {}).get(str(j))
        if slot is None:
            raise FakeNVMLError("Not Found")
        return slot


def load(name: str, **environ: str) -> tuple[Sources, dict[str, Any]]:
    d = FIXTURES / name
    m = json.loads((d / "machine.json").read_text())
    sysctl = m.get("sysctl") or {}
    env = dict(m["environ"])
    env.update(environ)
    src = Sources(
        root=d / "root",
        nvml=FakeNVML(m["nvml"]) if m["nvml"] is not None else None,
        sysctl=sysctl.get,
        environ=env,
        system=m["system"],
        machine=m["machine"],
    )
    return src, m


@pytest.mark.parametrize("name", MACHINES)
def test_each_fake_gives_the_expected_budget(name: str) -> None:
    src, m = load(name)
    report = probe(src)
    exp = m["expect"]
    budget = budget_from_probe(report, headroom=0.0, gpus=exp.get("gpus"))
    assert budget.device == exp["device"]
    if "budget_usable_mib" in exp:
        assert budget.usable_bytes == exp["budget_usable_mib"] * MIB
    elif exp["device"] == "cpu":
        # the host budget is what the OS can give now; the total (RAM or cgroup limit) beside it
        assert budget.total_bytes == exp["budget_usable_bytes"]
        available = report.host.available_bytes
        assert budget.usable_bytes == (budget.total_bytes if available is None else available)
    else:
        assert budget.usable_bytes == exp["budget_usable_bytes"]
    if "usable_mib" in exp:
        assert [g.usable_bytes for g in report.nvidia] == [u * MIB for u in exp["usable_mib"]]
    if "nvml_indices" in exp:
        assert [g.nvml_index for g in report.nvidia] == exp["nvml_indices"]
        assert [g.cuda_index for g in report.nvidia] == list(range(len(exp["nvml_indices"])))
    if "mig_slice" in exp:
        assert [g.mig_slice for g in report.nvidia] == [exp["mig_slice"]]
        assert not any("FASTEST_FIRST" in n for n in report.notes)  # slices of one GPU
    if "available_bytes" in exp:
        assert report.host.available_bytes == exp["available_bytes"]
    if "cgroup_version" in exp and exp["cgroup_version"] is not None:
        assert report.host.cgroup_version == exp["cgroup_version"]
    if "rosetta" in exp:
        assert report.apple is not None and report.apple.rosetta is exp["rosetta"]
    if "note_contains" in exp:
        assert any(exp["note_contains"] in n for n in report.notes), report.notes
    # the budget with headroom is the usable memory less the margin
    assert budget_from_probe(report, 0.25, exp.get("gpus")).budget_bytes == int(
        budget.usable_bytes * 0.75
    )


def test_cuda_visible_devices_by_uuid_prefix_and_order() -> None:
    src, _ = load("a100x4-visible-2-3", CUDA_VISIBLE_DEVICES="GPU-a1000003,0")
    report = probe(src)
    assert [g.nvml_index for g in report.nvidia] == [3, 0]


def test_cuda_visible_devices_stops_at_first_unknown_entry() -> None:
    src, _ = load("a100x4-visible-2-3", CUDA_VISIBLE_DEVICES="1,7,2")
    report = probe(src)
    assert [g.nvml_index for g in report.nvidia] == [1]
    assert any("'7' names no device" in n for n in report.notes)


def test_cuda_visible_devices_empty_hides_all() -> None:
    src, _ = load("a100x4-visible-2-3", CUDA_VISIBLE_DEVICES="")
    report = probe(src)
    assert report.nvidia == []
    assert any("hides every GPU" in n for n in report.notes)


def test_driver_reserve_is_subtracted_and_versions_read() -> None:
    src, m = load("a100x4-visible-2-3")
    report = probe(src)
    g = report.nvidia[0]
    raw = m["nvml"]["devices"][2]
    assert g.total_bytes == raw["total"] and g.reserved_bytes == raw["reserved"]
    assert g.usable_bytes == raw["total"] - raw["reserved"] - CUDA_CONTEXT_ALLOWANCE
    assert g.compute_capability == "8.0" and g.bf16
    assert report.nvidia_driver == "550.54.15" and report.cuda_driver == "12.4"
    assert src.nvml.shut  # NVML is shut down after the probe
    # GPU 2 has 1000 MiB in use by someone else: that is a note, not a smaller budget
    assert any("cuda:0" in n and "free now" in n for n in report.notes)


def test_budget_with_more_gpus_than_visible_is_a_device_error() -> None:
    from ehrplan.errors import DeviceError

    src, _ = load("a100x4-visible-2-3")
    with pytest.raises(DeviceError, match="only 2 CUDA device"):
        budget_from_probe(probe(src), gpus=3)


def test_pynvml_not_installed_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = load("no-gpu")
    src.nvml = None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    report = probe(src)
    assert report.nvidia == []
    assert any("not installed" in n for n in report.notes)


def test_nvml_failing_midway_is_a_note() -> None:
    src, _ = load("a100x4-visible-2-3")

    def broken() -> int:
        raise FakeNVMLError("GPU is lost")

    src.nvml.nvmlDeviceGetCount = broken
    report = probe(src)
    assert report.nvidia == []
    assert any("GPU is lost" in n for n in report.notes)


def test_apple_working_set_fraction_and_overrides() -> None:
    assert apple_working_set(16 * GIB) == int(16 * GIB * 2 / 3)
    assert apple_working_set(APPLE_LARGE_MEMORY) == int(APPLE_LARGE_MEMORY * 3 / 4)
    # a user-set iogpu.wired_limit_mb wins over the fraction
    src, _ = load("m1-16gb")
    answers = {**json.loads((FIXTURES / "m1-16gb" / "machine.json").read_text())["sysctl"]}
    answers["iogpu.wired_limit_mb"] = "12288"
    src.sysctl = answers.get
    a = probe(src).apple
    assert a is not None and a.working_set_bytes == 12288 * MIB
    # --probe-mps asks torch (here a fake reader, so torch is not imported)
    src, _ = load("m1-16gb")
    a = probe(src, mps_reader=lambda: 11 * GIB).apple
    assert a is not None and a.working_set_bytes == 11 * GIB
    assert a.working_set_source == "torch.mps.recommended_max_memory()"


def test_probe_mps_failure_falls_back_to_the_fraction() -> None:
    src, _ = load("m1-16gb")

    def boom() -> int:
        raise RuntimeError("no torch")

    report = probe(src, mps_reader=boom)
    assert report.apple is not None
    assert report.apple.working_set_bytes == int(16 * GIB * 2 / 3)
    assert any("--probe-mps" in n for n in report.notes)


def test_m1_cpu_from_sysctl() -> None:
    src, _ = load("m1-16gb")
    r = probe(src)
    assert r.cpu.model == "Apple M1" and r.cpu.physical_cores == 8
    assert r.host.total_bytes == 16 * GIB and r.nvidia == []


def test_broken_sources_never_raise(tmp_path: Path) -> None:
    def sysctl(name: str) -> str:
        raise PermissionError(name)

    src = Sources(root=tmp_path, nvml=None, sysctl=sysctl, environ={}, system="Darwin")
    report = probe(src)
    assert report.apple is not None or report.notes  # answered, with notes, no exception
    garbage = tmp_path / "proc" / "self"
    garbage.mkdir(parents=True)
    (garbage / "cgroup").write_text("nonsense\n4:memory:/x\n")
    (tmp_path / "sys/fs/cgroup/memory/x").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/memory/x/memory.limit_in_bytes").write_text("not a number\n")
    assert cgroup_memory(Sources(root=tmp_path)) == (None, None, None, None)


def test_this_machine_probe_has_ram_and_no_traceback() -> None:
    report = probe()
    assert report.host.budget_bytes is not None and report.host.budget_bytes > 0
    if report.host.cgroup_limit_bytes is not None:
        assert report.host.budget_bytes <= report.host.cgroup_limit_bytes


def _mixed_box() -> dict[str, Any]:
    t4 = {"name": "Tesla T4", "uuid": "GPU-t4", "bus_id": "00000000:07:00.0", "cc": [7, 5]}
    a100 = {"name": "NVIDIA A100-SXM4-40GB", "uuid": "GPU-a1", "bus_id": "00000000:10:00.0"}
    t4.update(total=15360 * MIB, reserved=0, free=15360 * MIB, mig=0)
    a100.update(total=40960 * MIB, reserved=0, free=40960 * MIB, cc=[8, 0], mig=0)
    return {"driver": "550.54.15", "cuda": 12040, "devices": [t4, a100]}


@pytest.mark.parametrize(
    ("order", "names"),
    [
        (None, ["NVIDIA A100-SXM4-40GB", "Tesla T4"]),
        ("PCI_BUS_ID", ["Tesla T4", "NVIDIA A100-SXM4-40GB"]),
    ],
)
def test_cuda_order_on_mixed_gpus(order: str | None, names: list[str]) -> None:
    env = {"CUDA_DEVICE_ORDER": order} if order else {}
    src = Sources(root=FIXTURES / "no-gpu" / "root", nvml=FakeNVML(_mixed_box()), environ=env)
    report = probe(src)
    assert [g.name for g in report.nvidia] == names
    assert any("FASTEST_FIRST" in n for n in report.notes) == (order is None)
    budget = budget_from_probe(report, headroom=0.0, gpus=2)
    # two GPUs: the smaller one bounds the per-GPU budget, and T4 has no bf16
    assert budget.usable_bytes == 15360 * MIB - CUDA_CONTEXT_ALLOWANCE
    assert budget.target.native_half == "fp16"
