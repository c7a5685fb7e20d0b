"""The networks: DiDiRN-18..152 and their classifier twins (registered with timm on import), DiDiCM on any timm
backbone, and a factory that builds any of them, or a plain timm baseline, by name."""

from .backbone import BackboneDiDiCM
from .didirn import DIDIRN_NAMES, STEMS, TWIN_NAMES, DiDiRN, DiDiRNTwin
from .factory import BACKBONE_PREFIX, GENERATIVE_NAMES, create
from .layers import (
    CONDITIONINGS,
    PARAMETRIZATIONS,
    ConditionedMLPHead,
    DiffusionClassifier,
    SigmaLabelEmbedding,
    is_diffusion_model,
    mean_log_score,
)
from .unet import ConditionalUNet, is_generative_model

__all__ = [
    "BACKBONE_PREFIX", "CONDITIONINGS", "ConditionalUNet", "GENERATIVE_NAMES", "is_generative_model",
    "DIDIRN_NAMES", "PARAMETRIZATIONS", "STEMS", "TWIN_NAMES", "BackboneDiDiCM",
    "ConditionedMLPHead", "DiDiRN", "DiDiRNTwin", "DiffusionClassifier", "SigmaLabelEmbedding", "create",
    "is_diffusion_model", "mean_log_score",
]
