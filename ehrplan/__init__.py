"""ehrplan: which EHR sequence model fits your machine — estimate, prove, train.

Importing ``ehrplan`` imports nothing else: the config loads pydantic on first access, the model
classes torch (the `train` extra). ``__version__`` is the one place the version is written
(pyproject.toml reads it from here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ehrplan.plan.config import EHRModelConfig, get_model_config

__version__ = "0.1.0"

_CONFIG_NAMES = {"EHRModelConfig", "get_model_config"}

_MODEL_NAMES = {
    "LSTMVisitEncoder",
    "LSTMProgressionModel",
    "TransformerVisitEncoder",
    "TransformerProgressionModel",
    "build_model",
}

__all__ = ["EHRModelConfig", "__version__", "get_model_config", *sorted(_MODEL_NAMES)]


def __getattr__(name: str) -> Any:
    if name in _CONFIG_NAMES:
        from ehrplan.plan import config

        return getattr(config, name)
    if name in _MODEL_NAMES:
        from ehrplan.runtime import models

        return getattr(models, name)
    raise AttributeError(f"module 'ehrplan' has no attribute {name!r}")
