"""The unlearning engine: pure ML (torch, timm, peft, safetensors, Pillow), no web or queue imports.

    from worker.engine import ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn
    result = unlearn(UnlearnInputs(model="pkg/", forget=(ForgetSpec("cat", "forget/cat/"),)), UnlearnConfig())
    result.save("out/")
"""

from worker.engine.config import ForgetSpec, UnlearnConfig, UnlearnInputs
from worker.engine.errors import (
    ConfigError,
    EngineError,
    ImageSourceError,
    ModelPackageError,
    NumericalError,
    UnlearningCancelled,
    UnsupportedModelError,
)
from worker.engine.loop import Progress
from worker.engine.methods import METHODS
from worker.engine.unlearn import EvaluationReport, UnlearnReport, UnlearnResult, forget_set_accuracies, unlearn

__all__ = [
    "METHODS",
    "ConfigError",
    "EngineError",
    "EvaluationReport",
    "ForgetSpec",
    "ImageSourceError",
    "ModelPackageError",
    "NumericalError",
    "Progress",
    "UnlearnConfig",
    "UnlearnInputs",
    "UnlearnReport",
    "UnlearnResult",
    "UnlearningCancelled",
    "UnsupportedModelError",
    "forget_set_accuracies",
    "unlearn",
]
