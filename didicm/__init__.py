"""didicm: Discrete Diffusion Classification Modeling.

A discrete diffusion over class labels, conditioned on the image, models p(class | image).

Names are imported on first use (PEP 562), so ``didicm --help`` answers without loading torch. The DiDiRN
models register with timm when ``didicm.models`` is imported (``import didicm.models``), and at
``import didicm`` when timm is already loaded.
"""

import importlib
import sys

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "CLSampler": "diffusion", "CPSampler": "diffusion", "GeometricSchedule": "diffusion",
    "LogLinearSchedule": "diffusion", "NoiseSchedule": "diffusion", "UniformDiffusion": "diffusion",
    "create_schedule": "diffusion", "score_entropy": "diffusion",
    "CheckpointError": "errors", "ConfigError": "errors", "DataError": "errors", "DidicmError": "errors",
    "InputError": "errors",
    "create_dataset": "data", "dataset_info": "data", "parse_degradation": "data",
    "load_checkpoint": "checkpoint",
    "load_model": "interop",
}
_SUBMODULES = {"checkpoint", "cli", "config", "data", "demo", "diffusion", "errors", "evaluation", "interop", "loader",
               "metrics", "models", "objectives", "peers", "report", "study", "training"}

__all__ = sorted(_EXPORTS) + ["models"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'didicm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


if "timm" in sys.modules:  # timm is loaded anyway: register didirn* now, as `import torch, timm, didicm` expects
    from . import models  # noqa: E402,F401
