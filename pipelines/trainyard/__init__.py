"""trainyard: train PyTorch models on a Ray cluster. This folder is the top-level `trainyard`
package (pyproject.toml maps it so); its names are the Python API, trainyard.pipelines.api:

    import trainyard

    result = trainyard.train("configs/digits.yaml", overrides={"train.epochs": 3})
    trainyard.predict(result.model_uri, "data/new.csv", out="predictions/")

The names load on first use: every process that imports any part of trainyard (each Ray
worker among them) passes through this package, and pays for none of the API's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "PredictResult",
    "RunFailed",
    "RunSpec",
    "SpecError",
    "TrackingUnfinished",
    "TrainResult",
    "TrainyardError",
    "TuneResult",
    "load_spec",
    "predict",
    "train",
    "tune",
]

if TYPE_CHECKING:
    from trainyard.pipelines.api import (
        PredictResult,
        RunFailed,
        RunSpec,
        SpecError,
        TrackingUnfinished,
        TrainResult,
        TrainyardError,
        TuneResult,
        load_spec,
        predict,
        train,
        tune,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("trainyard.pipelines.api"), name)
    raise AttributeError(f"module 'trainyard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
