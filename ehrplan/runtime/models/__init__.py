"""The model families. Importing this package imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ehrplan.runtime.models.lstm import LSTMProgressionModel, LSTMVisitEncoder
from ehrplan.runtime.models.transformer import TransformerProgressionModel, TransformerVisitEncoder

if TYPE_CHECKING:
    from torch import nn

    from ehrplan.plan.config import EHRModelConfig

__all__ = [
    "LSTMProgressionModel",
    "LSTMVisitEncoder",
    "TransformerProgressionModel",
    "TransformerVisitEncoder",
    "build_model",
]


def build_model(config: EHRModelConfig) -> nn.Module:
    """The model a config describes (on the CPU, in fp32); frozen embeddings need no grad."""
    model: nn.Module
    if config.model_type == "lstm":
        model = LSTMProgressionModel.from_config(config)
    else:
        model = TransformerProgressionModel.from_config(config)
    if config.freeze_embeddings:
        model.encoder.code_embeddings.weight.requires_grad_(False)
    return model
