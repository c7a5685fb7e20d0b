"""Training, split as timm splits its trainer: ``train_loop`` (the loop that ties the pieces), ``one_step`` (one
update and the lr schedule), ``validation`` (sharded validation) and ``checkpointing``.

Device choice, model building/loading and the default samplers live in ``didicm.runtime``; they are re-exported
here for the callers that imported them from the training module.
"""

from .. import models as model_zoo  # noqa: F401  (tests patch model_zoo.create through this name)
from ..runtime import (
    GENERATIVE_EVAL_DRAWS,
    GENERATIVE_EVAL_IMAGES,
    build_model,
    default_eval_specs,
    device_name,
    diffusion_from_config,
    load_trained_model,
    resolve_device,
)
from .one_step import TrainingError
from .train_loop import TrainResult, train

__all__ = ["TrainingError", "TrainResult", "train", "build_model", "device_name", "diffusion_from_config",
           "resolve_device", "load_trained_model", "default_eval_specs", "GENERATIVE_EVAL_DRAWS",
           "GENERATIVE_EVAL_IMAGES"]
