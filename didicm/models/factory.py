"""One entry point for every model kind the experiments compare, by name."""

from __future__ import annotations

import timm
from torch import nn

from ..errors import ConfigError
from .backbone import BackboneDiDiCM
from .didirn import DIDIRN_NAMES, TWIN_NAMES
from .unet import ConditionalUNet

GENERATIVE_NAMES = ("unet",)

__all__ = ["BACKBONE_PREFIX", "GENERATIVE_NAMES", "create"]

BACKBONE_PREFIX = "didicm:"


def create(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a model by name, always without pretrained weights.

    Args:
        name: 'didirn18' ... 'didirn152' (DiDiCM nets), 'didirn18_twin' ... (their classifier twins),
            'didicm:<timm name>' (``BackboneDiDiCM`` on that backbone, e.g. 'didicm:resnet18'), 'unet' (the
            class-conditional image diffusion model of the generative peers; needs didicm[peers]), or any timm
            classifier name (a plain cross-entropy baseline, e.g. 'resnet18').
        num_classes: K. in_chans: image channels.
        **kwargs: model options (e.g. stem='small', parametrization='mean', head_width=128, drop_rate=0.1).
    Returns:
        The model; ``is_diffusion_model(model)`` tells whether it is called as model(x, c, sigma) or model(x).
    """
    if kwargs.pop("pretrained", False):
        raise ConfigError("pretrained weights cannot be downloaded here; create the model with pretrained=False "
                          "and load a didicm checkpoint")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")
    if name in GENERATIVE_NAMES:
        return ConditionalUNet(num_classes, in_chans=in_chans, **kwargs)
    if name.startswith(BACKBONE_PREFIX):
        return BackboneDiDiCM(name[len(BACKBONE_PREFIX):], num_classes, in_chans=in_chans, **kwargs)
    if name in DIDIRN_NAMES or name in TWIN_NAMES or timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    raise ConfigError(
        f"unknown model {name!r}; valid kinds: DiDiCM nets {list(DIDIRN_NAMES)}, their twins {list(TWIN_NAMES)}, "
        f"'{BACKBONE_PREFIX}<timm name>' for DiDiCM on a timm backbone (e.g. '{BACKBONE_PREFIX}resnet18'), 'unet' "
        f"(the generative peer), or a timm "
        f"classifier name as a baseline (see timm.list_models())"
    )
