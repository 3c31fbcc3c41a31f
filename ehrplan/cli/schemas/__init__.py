"""The response models of every command's ``--json`` output; `ehrplan schema COMMAND` prints
their JSON Schema.

`ehrplan.cli.output.emit` passes each payload through its command's model (``model_validate``,
then ``model_dump(mode="json")``), so the schema and the output cannot drift: every model
forbids unknown keys, and a test runs every command's ``--json`` against its schema.

**Adding a field to a command's ``--json`` output? Add it to that command's model here** (the
module is named in `MODELS`; give it a description where its name does not say it all). A key the
model lacks makes the command fail (exit 70) and the tests with it. Reuse the nested models where
a shape repeats (`plan.Budget`, `plan.Fit`, `estimate.ParallelEstimate`, `estimate.TimeEstimate`,
`EHRModelConfig`, `HardwareReport`). Floats must be finite (JSON has no NaN); a metric that can be
undefined is `base.Metric` (``null`` then).

No torch. One module per group of commands, imported only when that command prints JSON: class
creation costs about a millisecond a model, and `estimate --json` should pay only for its own.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ehrplan.cli.schemas.base import Doc

MODELS: dict[str, str] = {
    "presets": "presets:PresetsOut",
    "estimate": "estimate:EstimateOut",
    "hardware": "hardware:HardwareOut",
    "recommend": "plan:RecommendOut",
    "validate": "plan:ValidateOut",
    "dry-run": "runs:DryRunOut",
    "synth": "data:SynthOut",
    "data stats": "data:DataStatsOut",
    "data prepare": "data:DataPrepareOut",
    "train": "runs:TrainOut",
    "compare": "runs:CompareOut",
    "export-embeddings": "runs:ExportEmbeddingsOut",
    "calibrate": "estimate:CalibrateOut",
    "predict": "runs:PredictOut",
}
"""Command (as in the document's ``command``) -> ``module:Model`` of its response model."""


def response_model(command: str) -> type[Doc]:
    """The response model of ``command`` (its module imported now)."""
    module, name = MODELS[command].split(":")
    model: type[Doc] = getattr(import_module(f"{__name__}.{module}"), name)
    return model


def json_schema(command: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``command``'s ``--json`` document."""
    schema = response_model(command).model_json_schema(by_alias=True, mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
