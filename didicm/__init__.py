"""didicm: Discrete Diffusion Classification Modeling.

A discrete diffusion over class labels, conditioned on the image, models p(class | image).
"""

from . import models  # noqa: E402,F401  (registers didirn* with timm: timm.create_model("didirn50") works)
from .checkpoint import load_checkpoint
from .data import create_dataset, dataset_info, parse_degradation
from .diffusion import (
    CLSampler,
    CPSampler,
    GeometricSchedule,
    LogLinearSchedule,
    NoiseSchedule,
    UniformDiffusion,
    create_schedule,
    score_entropy,
)
from .errors import CheckpointError, ConfigError, DataError, DidicmError, InputError

__version__ = "0.1.0"

__all__ = [
    "CLSampler", "CPSampler", "CheckpointError", "ConfigError", "DataError", "DidicmError",
    "GeometricSchedule", "InputError", "LogLinearSchedule", "NoiseSchedule", "UniformDiffusion",
    "create_dataset", "create_schedule", "dataset_info", "load_checkpoint", "models", "parse_degradation",
    "score_entropy",
]
