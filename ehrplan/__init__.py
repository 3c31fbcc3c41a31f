"""ehrplan: which EHR sequence model fits your machine — estimate, prove, train.

Importing ``ehrplan`` does not import torch; the model classes load it on first access.
"""

from __future__ import annotations

from typing import Any

from ehrplan.plan.config import EHRModelConfig, get_model_config

__version__ = "0.1.0"

_MODEL_NAMES = {
    "LSTMVisitEncoder",
    "LSTMProgressionModel",
    "TransformerVisitEncoder",
    "TransformerProgressionModel",
    "build_model",
}

__all__ = ["EHRModelConfig", "__version__", "get_model_config", *sorted(_MODEL_NAMES)]


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        from ehrplan.runtime import models

        return getattr(models, name)
    raise AttributeError(f"module 'ehrplan' has no attribute {name!r}")
