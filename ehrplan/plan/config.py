"""The model config, the presets as data, and the one place where layers of settings are merged.

No torch here: this module is on the fast path of every command (litgpt's rule, "torch import is
lazy to make config loading faster").

Precedence, written once in `resolve_config` and tested:
command-line flag > config file > preset > field defaults.
"""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ehrplan.errors import ConfigError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

ModelType = Literal["lstm", "transformer"]
Size = Literal["tiny", "small", "medium", "large"]
SIZES: tuple[str, ...] = ("tiny", "small", "medium", "large")
MODEL_TYPES: tuple[str, ...] = ("lstm", "transformer")

MAX_INT = 2**31 - 1
"""Largest value of an integer field: a width, length or count beyond it is a typo, and would
overflow the estimator's and torch's sizes."""

#: Aliases accepted by preset lookups; `tiny` is the LSTM of the tiny size.
PRESET_ALIASES: dict[str, str] = {"tiny": "tiny-lstm"}


class EHRModelConfig(BaseModel):
    """Shape and training settings of one EHR sequence model (LSTM or Transformer).

    Frozen and strict about keys: an unknown field is an error, not a silent no-op.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )

    # --- architecture -----------------------------------------------------------------------
    code_embed_dim: int = Field(
        128, gt=0, le=MAX_INT, description="Width of each code's embedding vector."
    )
    visit_embed_dim: int = Field(
        256,
        gt=0,
        le=MAX_INT,
        description="Width of a visit vector; the attention width (d_model) of the Transformer.",
    )
    hidden_dim: int = Field(
        512,
        gt=0,
        le=MAX_INT,
        description="Hidden size of the visit-sequence LSTM, or the feed-forward width of the "
        "Transformer.",
    )
    num_layers: int = Field(
        2, ge=1, le=MAX_INT, description="Layers of the model over the visit sequence."
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout probability, in [0, 1).")
    model_type: ModelType = Field("lstm", description="Model family: 'lstm' or 'transformer'.")
    num_heads: int | None = Field(
        None,
        gt=0,
        le=MAX_INT,
        description="Attention heads (Transformer only); must divide visit_embed_dim.",
    )
    use_flash_attention: bool = Field(
        False,
        description="Transformer: use fused scaled-dot-product attention (flash/memory-efficient "
        "kernels where the device has them) instead of materialising the attention matrix.",
    )

    # --- data shape ---------------------------------------------------------------------------
    vocab_size: int = Field(
        10000, ge=2, le=MAX_INT, description="Code vocabulary size, PAD (id 0) included."
    )
    max_visits: int = Field(
        50, gt=0, le=MAX_INT, description="Longest visit sequence kept per patient."
    )
    max_codes_per_visit: int = Field(
        100, gt=0, le=MAX_INT, description="Most codes kept per visit."
    )

    # --- training -----------------------------------------------------------------------------
    batch_size: int = Field(
        32, gt=0, le=MAX_INT, description="Patients per micro-batch (one forward pass)."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=MAX_INT, description="Micro-batches accumulated per optimizer step."
    )
    mixed_precision: bool = Field(
        True, description="Train under autocast (fp16/bf16) with fp32 master weights."
    )
    use_checkpoint: bool = Field(
        False, description="Gradient checkpointing: recompute activations in backward."
    )
    freeze_embeddings: bool = Field(
        False,
        description="Keep the code embeddings fixed (e.g. pre-trained): they get no gradients "
        "and no optimizer state.",
    )

    # --- task ---------------------------------------------------------------------------------
    num_stages: int = Field(
        5,
        ge=1,
        le=MAX_INT,
        description="Outputs of the classifier head at each visit: disease stages (CKD task), "
        "classes (multiclass), 1 for a binary or regression task (set from the task's labels).",
    )

    @model_validator(mode="after")
    def _check_heads(self) -> EHRModelConfig:
        if self.model_type == "transformer":
            if self.num_heads is None:
                raise ValueError("a transformer needs num_heads")
            if self.visit_embed_dim % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} does not divide the attention width "
                    f"visit_embed_dim={self.visit_embed_dim}"
                )
        elif self.num_heads is not None:
            raise ValueError("num_heads is only for model_type='transformer'")
        return self

    # --- the seed's API -------------------------------------------------------------------------
    @property
    def effective_batch_size(self) -> int:
        """Patients per optimizer step: batch_size x gradient_accumulation_steps."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def total_params(self) -> int:
        """Exact parameter count of the built model (analytic, no torch)."""
        from ehrplan.plan.params import count_parameters

        return count_parameters(self).total

    @property
    def total_params_millions(self) -> float:
        """Exact parameter count in millions (not rounded)."""
        return self.total_params / 1e6

    def memory_estimate_gb(self, dtype_bytes: int = 4) -> float:
        """Estimated peak training-step memory in GB (10^9 bytes) on the CPU.

        ``dtype_bytes=4`` means fp32 training, 2 means mixed precision (autocast with fp32 master
        weights). Delegates to `ehrplan.plan.estimator`, whose accuracy and limits are documented
        there.
        """
        from ehrplan.plan.estimator import estimate_memory

        if dtype_bytes not in (2, 4):
            raise ConfigError(f"dtype_bytes must be 2 or 4, not {dtype_bytes}")
        precision = "fp32" if dtype_bytes == 4 else "bf16"
        return estimate_memory(self, precision=precision).total_bytes / 1e9


class PresetMeta(BaseModel):
    """The optional `[preset]` table of a preset file: what it is for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field("", description="One line on what the preset is for.")
    target: str = Field("", description="The hardware the seed sized it for.")


class Preset(BaseModel):
    """A named config shipped in `presets/`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Preset name, e.g. 'small-lstm'.")
    path: Path = Field(description="The TOML file it was loaded from.")
    meta: PresetMeta = Field(description="Description and intended hardware.")
    config: EHRModelConfig = Field(description="The validated config.")


# --------------------------------------------------------------------------------------------
# loading


def presets_dir() -> Path:
    """Where the preset TOML files live: inside an installed wheel, or the repo's `presets/`."""
    here = Path(__file__).resolve().parent.parent  # the ehrplan package
    for candidate in (here / "_presets", here.parent / "presets"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"no presets directory found next to {here}")  # pragma: no cover


def _format_validation_error(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            valid = ", ".join(EHRModelConfig.model_fields)
            parts.append(f"unknown field '{loc}' (valid fields: {valid})")
        elif loc:
            parts.append(f"field '{loc}': {msg} (got {e.get('input')!r})")
        else:
            parts.append(msg)
    return f"invalid config{where}: " + "; ".join(parts)


def validate_config(data: Mapping[str, Any], where: str = "") -> EHRModelConfig:
    """Build a config from a mapping, turning Pydantic's errors into one `ConfigError` line."""
    try:
        return EHRModelConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where)) from None


def check_config_path(path: Path) -> None:
    """A config file must be a regular file: a FIFO, socket or device is refused before it is
    opened (reading a FIFO would wait for a writer forever)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"config file is a directory: {path}")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"config file {path} is not a regular file (a FIFO, socket or device)")


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, with one-line errors for a missing, malformed, non-UTF-8 or special
    (FIFO, device) file."""
    check_config_path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
            f"offset {err.start}); TOML files are UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"malformed TOML in {path}: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None


def _split_meta(doc: dict[str, Any], path: Path) -> tuple[PresetMeta, dict[str, Any]]:
    doc = dict(doc)
    meta_raw = doc.pop("preset", {})
    try:
        meta = PresetMeta.model_validate(meta_raw)
    except ValidationError as err:
        raise ConfigError(f"invalid [preset] table in {path}: {err.errors()[0]['msg']}") from None
    return meta, doc


RUN_CONFIG = "config.json"
"""The file of a run folder that holds its resolved config (`ehrplan train` writes it)."""


def config_file_path(path: str | Path) -> Path:
    """The file a config path names: itself, or a run folder's ``config.json``."""
    path = Path(path)
    if path.is_dir() and (path / RUN_CONFIG).is_file():
        return path / RUN_CONFIG
    return path


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a config accepts")


def read_json_config(path: Path) -> dict[str, Any]:
    """The config fields of a JSON file: a flat object of fields, or a run folder's
    ``config.json`` (the resolved config under ``"config"``, beside how the run was made)."""
    if path.is_dir():
        raise ConfigError(f"config file is a directory (no {RUN_CONFIG} in it): {path}")
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"config file is not a regular file: {path}")
    try:
        doc = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except ValueError as err:  # json.JSONDecodeError, NaN and Infinity
        raise ConfigError(f"malformed JSON in {path}: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a JSON config is an object of fields, not {type(doc).__name__}")
    if isinstance(doc.get("config"), dict):  # a run folder's config.json
        return dict(doc["config"])
    return doc


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The config fields a user's file sets: TOML (its optional `[preset]` table is ignored), or
    JSON (``*.json``: flat fields, or a run folder's ``config.json``); a run folder reads its
    ``config.json``."""
    path = config_file_path(path)
    if path.suffix.lower() == ".json":
        fields = read_json_config(path)
    else:
        _, fields = _split_meta(read_toml(path), path)
    if not fields:  # far more often a wrong or truncated file than a wish for the defaults
        raise ConfigError(
            f"config file {path} sets no fields (it is empty); write the fields to set, or give "
            "--preset NAME"
        )
    return fields


def _preset_order(path: Path) -> tuple[int, str]:
    size = path.stem.split("-")[0]
    return (SIZES.index(size) if size in SIZES else len(SIZES), path.stem)


@cache
def load_presets() -> dict[str, Preset]:
    """Every preset in `presets_dir()`, validated, keyed by name (the file stem)."""
    presets: dict[str, Preset] = {}
    for path in sorted(presets_dir().glob("*.toml"), key=_preset_order):
        if path.stem == "hardware":
            continue
        meta, fields = _split_meta(read_toml(path), path)
        config = validate_config(fields, where=f" in preset {path.name}")
        presets[path.stem] = Preset(name=path.stem, path=path, meta=meta, config=config)
    return presets


def preset_names() -> list[str]:
    """Valid preset names, aliases included, in a stable order."""
    return [*load_presets(), *PRESET_ALIASES]


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the valid names."""
    presets = load_presets()
    key = PRESET_ALIASES.get(name, name)
    if key not in presets:
        raise ConfigError(f"unknown preset '{name}' (valid presets: {', '.join(preset_names())})")
    return presets[key]


def get_model_config(size: str = "small", model_type: str = "lstm") -> EHRModelConfig:
    """The seed's lookup: a preset config by size and model type.

    >>> get_model_config("small", "lstm").hidden_dim
    256
    """
    if size not in SIZES or model_type not in MODEL_TYPES:
        raise ConfigError(
            f"unknown config: size='{size}', model_type='{model_type}'. "
            f"Valid sizes: {', '.join(SIZES)}. Valid types: {', '.join(MODEL_TYPES)}."
        )
    return get_preset(f"{size}-{model_type}").config


# --------------------------------------------------------------------------------------------
# precedence


def parse_override(item: str) -> tuple[str, str]:
    """Split one `--set KEY=VALUE` item; the value is coerced by the field's type later."""
    key, sep, value = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form KEY=VALUE")
    if key not in EHRModelConfig.model_fields:
        valid = ", ".join(EHRModelConfig.model_fields)
        raise ConfigError(f"unknown field '{key}' in override '{item}' (valid fields: {valid})")
    return key, value.strip()


def resolve_config(
    *,
    preset: str | None = None,
    size: str | None = None,
    model_type: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[EHRModelConfig, str]:
    """Merge the layers of settings into one validated config.

    Precedence: ``overrides`` (command-line flags) > ``config_file`` > preset > field defaults.
    ``size``/``model_type`` name a preset (``{size}-{model_type}``) and cannot be combined with
    ``preset``. With neither a preset nor a file, the seed's default preset ``small-lstm`` is
    the base. Returns the config and a label saying where it came from.
    """
    if preset is not None and (size is not None or model_type is not None):
        raise UsageError("give either --preset or --size/--type, not both")
    if size is not None or model_type is not None:
        s, t = size or "small", model_type or "lstm"
        if s not in SIZES:
            raise ConfigError(f"unknown size '{s}' (valid sizes: {', '.join(SIZES)})")
        if t not in MODEL_TYPES:
            raise ConfigError(f"unknown model type '{t}' (valid types: {', '.join(MODEL_TYPES)})")
        preset = f"{s}-{t}"
    if preset is None and config_file is None:
        preset = "small-lstm"

    layers: dict[str, Any] = {}
    labels: list[str] = []
    if preset is not None:
        p = get_preset(preset)
        layers.update(p.config.model_dump(exclude_unset=False))
        labels.append(f"preset {p.name}")
    if config_file is not None:
        layers.update(load_config_file(config_file))
        labels.append(f"file {config_file}")
    flag_values = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in flag_values:
        if key not in EHRModelConfig.model_fields:
            raise ConfigError(f"unknown field '{key}'")
    layers.update(flag_values)
    if flag_values:
        labels.append("overrides " + ", ".join(f"{k}={v}" for k, v in flag_values.items()))
    where = f" ({'; '.join(labels)})" if labels else ""
    return validate_config(layers, where=where), " + ".join(labels)
