"""DiDiCM on any timm backbone: image features once per image, a small conditioned head at each step.

A DiDiRN feeds (c_t, sigma) into every block, so each diffusion step costs a full network pass. Here the
backbone never sees (c_t, sigma): ``encode`` runs it once and each step runs only ``ConditionedMLPHead`` on
the pooled features, so an S-step CP prediction costs about one backbone pass for any S.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from ..errors import ConfigError, InputError
from .layers import (
    ConditionedMLPHead,
    DiffusionClassifier,
    check_condition,
    check_options,
    mask_reference,
    mean_log_score,
)

__all__ = ["BackboneDiDiCM"]


class BackboneDiDiCM(DiffusionClassifier, nn.Module):
    """A timm backbone (created with num_classes=0, so it returns pooled features) plus a conditioned head.

    Args:
        backbone: a timm model name, e.g. 'resnet18', 'convnext_nano', 'vit_tiny_patch16_224'.
        num_classes: K.
        in_chans: image channels.
        parametrization: 'score' (the head outputs log-ratios) or 'mean' (clean logits; see ``mean_log_score``).
        head_width: hidden width W of the head. head_depth: its residual blocks. embed_dim: embedding width.
        conditioning: 'add' or 'film' injection of the (sigma, label) embedding into the head.
        condition_inputs: False drops the (c, sigma) inputs of the head ('mean' only).
        drop_rate: dropout in the head (pass backbone dropout through ``backbone_kwargs``).
        clean_sigma: the noise level at which ``clean_logits`` queries a conditioned 'mean' head.
        **backbone_kwargs: passed to ``timm.create_model`` for the backbone (e.g. img_size, drop_path_rate).
    """

    def __init__(self, backbone: str, num_classes: int, in_chans: int = 3, parametrization: str = "score",
                 head_width: int = 256, head_depth: int = 2, embed_dim: int = 128, conditioning: str = "add",
                 condition_inputs: bool = True, drop_rate: float = 0.0, clean_sigma: float = 1.0,
                 **backbone_kwargs):
        super().__init__()
        check_options(parametrization, conditioning, condition_inputs)
        if int(num_classes) != num_classes or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not timm.is_model(backbone):
            raise ConfigError(f"unknown timm backbone {backbone!r}; see timm.list_models() for the valid names")
        if backbone_kwargs.pop("pretrained", False):
            raise ConfigError("pretrained backbones cannot be downloaded here; use pretrained=False")
        self.backbone_name = backbone
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.parametrization = parametrization
        self.condition_inputs = condition_inputs
        self.clean_sigma = float(clean_sigma)
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans,
                                          **backbone_kwargs)
        # head_hidden_size is the pooled width where a model has a pre-logits layer; num_features otherwise.
        self.num_features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        self.head = ConditionedMLPHead(self.num_features, self.num_classes, width=head_width, depth=head_depth,
                                       embed_dim=embed_dim, conditioning=conditioning,
                                       condition_inputs=condition_inputs, drop_rate=drop_rate)
        # Data settings (input size, mean/std) follow the backbone, so timm.data.resolve_data_config works.
        self.pretrained_cfg = dict(getattr(self.backbone, "pretrained_cfg", {}), num_classes=self.num_classes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_chans, H, W] float -> pooled backbone features [B, F] float (one backbone pass)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InputError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}; "
                             f"set in_chans to the number of image channels")
        return self.backbone(x)

    def score(self, z: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """z: [B, F] features from ``encode``; c: [B] long; sigma: [B] float or scalar -> log_score [B, K]
        float, exactly 0 at c. Costs one head pass."""
        if z.ndim != 2 or z.shape[1] != self.num_features:
            raise InputError(f"score expects the output of encode, shape (B, {self.num_features}), "
                             f"got {tuple(z.shape)}")
        c, sigma = check_condition(c, sigma, z.shape[0], self.num_classes)
        out = self.head(z, c, sigma) if self.condition_inputs else self.head(z)
        if self.parametrization == "mean":
            return mean_log_score(out, c, sigma)
        return mask_reference(out, c)

    def clean_logits(self, x: torch.Tensor, c: torch.Tensor | None = None,
                     sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        """Logits of p0(. | x) [B, K] from one backbone pass ('mean' parametrization only).

        A head with the (c, sigma) inputs is queried at ``c`` (default: label 0) and ``sigma`` (default:
        ``clean_sigma``); for an ideal network every (c, sigma) gives the same posterior.
        """
        if self.parametrization != "mean":
            raise ConfigError("clean_logits needs parametrization='mean'; a 'score' model gives the posterior "
                              "through a sampler (didicm.CPSampler)")
        features = self.encode(x)
        if not self.condition_inputs:
            return self.head(features)
        batch = x.shape[0]
        c = torch.zeros(batch, dtype=torch.long, device=x.device) if c is None else c
        c, sigma = check_condition(c, self.clean_sigma if sigma is None else sigma, batch, self.num_classes)
        return self.head(features, c, sigma)
