"""The hardware catalog (`presets/hardware.toml`): named machines to plan for without being on them.

Frozen Pydantic models that forbid unknown keys; a failed lookup lists the valid names. No torch.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ehrplan.errors import ConfigError
from ehrplan.plan.config import presets_dir, read_toml
from ehrplan.plan.hardware import CUDA_CONTEXT_ALLOWANCE, GIB, MIB, apple_working_set

CATALOG_FILE = "hardware.toml"


class CatalogDevice(BaseModel):
    """One row of the catalog: a GPU or an Apple Silicon chip with one memory option."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Lookup name, lower case, e.g. 'a100-40gb'.")
    label: str = Field(description="What the maker calls it.")
    kind: Literal["nvidia", "apple"] = Field(description="'nvidia' (CUDA) or 'apple' (MPS).")
    memory_gib: float = Field(gt=0, description="Memory as sold (GPU memory / unified memory).")
    reported_total_mib: int | None = Field(
        None, gt=0, description="NVIDIA: memory.total as nvidia-smi/NVML reports it."
    )
    bandwidth_gbs: float = Field(gt=0, description="Peak memory bandwidth, GB/s.")
    fp32_tflops: float | None = Field(None, gt=0, description="Dense fp32 peak, TFLOPS.")
    half_tflops: float | None = Field(None, gt=0, description="Dense fp16/bf16 peak, TFLOPS.")
    bf16: bool = Field(description="ehrplan plans bf16 autocast on it (else fp16).")
    source: str = Field(min_length=1, description="Where the numbers come from.")

    @model_validator(mode="after")
    def _nvidia_has_reported_total(self) -> CatalogDevice:
        if self.kind == "nvidia" and self.reported_total_mib is None:
            raise ValueError(f"{self.name}: an NVIDIA row needs reported_total_mib")
        return self

    @property
    def device(self) -> str:
        """The torch device type ehrplan estimates for: cuda or mps."""
        return "cuda" if self.kind == "nvidia" else "mps"

    @property
    def memory_bytes(self) -> int:
        """The memory as sold, in bytes (GiB x 1024^3)."""
        return int(self.memory_gib * GIB)

    @property
    def usable_bytes(self) -> int:
        """What one training process may use before headroom.

        NVIDIA: the reported total less the CUDA context allowance (the driver's reserve, which
        NVML v2 reports on a real card, is not known for a catalog row). Apple: the GPU working
        set estimated from the unified memory (`ehrplan.plan.hardware.apple_working_set`).
        """
        if self.kind == "nvidia":
            assert self.reported_total_mib is not None
            return self.reported_total_mib * MIB - CUDA_CONTEXT_ALLOWANCE
        return apple_working_set(self.memory_bytes)


class _CatalogFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: list[CatalogDevice]


@cache
def load_catalog() -> dict[str, CatalogDevice]:
    """Every catalog row, keyed by name, in file order."""
    path = presets_dir() / CATALOG_FILE
    try:
        doc = _CatalogFile.model_validate(read_toml(path))
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        raise ConfigError(f"invalid hardware catalog {path}: {loc}: {e['msg']}") from None
    rows: dict[str, CatalogDevice] = {}
    for row in doc.device:
        if row.name in rows:
            raise ConfigError(f"invalid hardware catalog {path}: duplicate name '{row.name}'")
        rows[row.name] = row
    return rows


def catalog_names() -> list[str]:
    return list(load_catalog())


def get_target(name: str) -> CatalogDevice:
    """Look a machine up by name (case and '_'/' ' vs '-' forgiven); the error lists the names."""
    rows = load_catalog()
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in rows:
        raise ConfigError(f"unknown target '{name}' (valid targets: {', '.join(rows)})")
    return rows[key]
