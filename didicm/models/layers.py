"""Building blocks shared by the DiDiCM networks: the (sigma, label) embedding, the per-channel injection of
that embedding, the two ways of turning a network output into log-ratios, and the conditioned MLP head of
``BackboneDiDiCM``.

The protocol every DiDiCM model implements lives here too (``DiffusionClassifier``), so that the evaluation
code can tell a diffusion model from a plain classifier with ``is_diffusion_model``.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from torch import nn

from ..checks import value_checks_enabled
from ..errors import ConfigError, InputError

__all__ = [
    "CONDITIONINGS", "PARAMETRIZATIONS", "ChannelConditioning", "ConditionedMLPHead", "DiffusionClassifier",
    "SigmaLabelEmbedding", "is_diffusion_model", "mask_reference", "mean_log_score", "sinusoidal_embedding",
    "unwrap_model",
]

PARAMETRIZATIONS = ("score", "mean")
CONDITIONINGS = ("add", "film")


def check_options(parametrization: str, conditioning: str, condition_inputs: bool) -> None:
    """Validate the options every DiDiCM model shares; raises ConfigError naming the valid values."""
    if parametrization not in PARAMETRIZATIONS:
        raise ConfigError(f"unknown parametrization {parametrization!r}; choose one of {PARAMETRIZATIONS}")
    if conditioning not in CONDITIONINGS:
        raise ConfigError(f"unknown conditioning {conditioning!r}; choose one of {CONDITIONINGS}")
    if parametrization == "score" and not condition_inputs:
        raise ConfigError("parametrization='score' needs condition_inputs=True: the log-ratios depend on c and "
                          "sigma; use parametrization='mean' for a network that sees the image only")


def sinusoidal_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Fixed sinusoidal features of the noise level, as in transformer position codes.

    Args:
        sigma: [B] float, total noise (fed raw, as the official code does, not the time t).
        dim: number of features; an odd ``dim`` gets one trailing zero column.
        max_period: the longest period; frequencies run geometrically from 1 down to 1 / max_period.
    Returns:
        [B, dim] float32, cosines then sines.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)
    angles = sigma.float().reshape(-1, 1) * frequencies.reshape(1, -1)
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=1)
    return features


class SigmaLabelEmbedding(nn.Module):
    """emb = MLP(sinusoidal(sigma)) + Embedding(c): the conditioning vector of DiDiRN (method.md, DiDiRN).

    Args:
        num_classes: K, the number of labels c can take.
        dim: width of the embedding (128 in the official DiDiRN).
        frequency_dim: number of sinusoidal features of sigma (256 official).
    """

    def __init__(self, num_classes: int, dim: int = 128, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.sigma_mlp = Mlp(frequency_dim, hidden_features=dim, out_features=dim, act_layer=nn.SiLU)
        self.label_embed = nn.Embedding(num_classes, dim)

    def forward(self, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """c: [B] long, sigma: [B] float -> [B, dim] float."""
        return self.sigma_mlp(sinusoidal_embedding(sigma, self.frequency_dim)) + self.label_embed(c)


class ChannelConditioning(nn.Module):
    """Injects the embedding into a feature map, one value (or scale and shift) per channel.

    'add' (official): h + Linear(SiLU(emb)). 'film': h * (1 + scale) + shift with [scale, shift] =
    Linear(SiLU(emb)); its projection starts at zero so a new 'film' network begins as the unconditioned one.
    'add' keeps PyTorch's default Linear init, as the official code does.

    Args:
        embed_dim: width of the embedding.
        channels: C, the channels of the feature map it modulates.
        mode: 'add' or 'film'.
    """

    def __init__(self, embed_dim: int, channels: int, mode: str = "add"):
        super().__init__()
        if mode not in CONDITIONINGS:
            raise ConfigError(f"unknown conditioning {mode!r}; choose one of {CONDITIONINGS}")
        self.mode = mode
        self.act = nn.SiLU()
        self.proj = nn.Linear(embed_dim, channels * (2 if mode == "film" else 1))
        if mode == "film":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h: [B, C, ...] float, emb: [B, E] float -> [B, C, ...] float."""
        out = self.proj(self.act(emb)).to(h.dtype)
        out = out.reshape(out.shape + (1,) * (h.ndim - 2))  # broadcast over the spatial axes, if any
        if self.mode == "add":
            return h + out
        scale, shift = out.chunk(2, dim=1)
        return h * (1.0 + scale) + shift


def check_condition(c: torch.Tensor, sigma: torch.Tensor | float, batch: int,
                    num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the label and noise inputs of ``score``; a scalar sigma is broadcast to the batch.

    Returns:
        c [B] long and sigma [B] float, on c's device.
    """
    if isinstance(c, torch.fx.Proxy):  # FX symbolic tracing: no values to check; pass [B] tensors when tracing
        return c.long(), sigma
    if not isinstance(c, torch.Tensor) or c.shape != (batch,) or torch.is_floating_point(c):
        shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
        raise InputError(f"c must be a [B] integer tensor of labels with B = {batch}, got {shape}")
    sigma = torch.as_tensor(sigma, device=c.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise InputError(f"sigma must be a scalar or have shape ({batch},), got {tuple(sigma.shape)}")
    if value_checks_enabled() and not torch.jit.is_tracing() and c.numel() and \
            (int(c.min()) < 0 or int(c.max()) >= num_classes):
        raise InputError(f"c holds labels outside [0, {num_classes - 1}]; is num_classes right?")
    return c.long(), sigma


def mask_reference(log_score: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Set the entry at the reference label c to exactly 0 (log p_t(c) / p_t(c)), as the official code masks it.

    Args:
        log_score: [B, K] float. c: [B] long.
    Returns:
        [B, K] float; no gradient flows to the masked entries.
    """
    return log_score.scatter(1, c.reshape(-1, 1), 0.0)


def mean_log_score(clean_logits: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Log-ratios of the noisy label distribution implied by predicted clean logits ('mean' parametrization).

    Math: p0 = softmax(logits), p_t = e^{-sigma} p0 + (1 - e^{-sigma}) / K, s_j = log p_t(j) - log p_t(c).
    In log space: log p_t(j) = logaddexp(-sigma + log p0_j, log(-expm1(-sigma)) - log K); expm1 keeps
    1 - e^{-sigma} exact at small sigma and logaddexp never forms p_t, which underflows for sharp p0.

    Args:
        clean_logits: [B, K] float, the network's logits of p0(. | x).
        c: [B] long, reference labels. sigma: [B] float, total noise (>= 0).
    Returns:
        [B, K] float32 (float64 for float64 logits); the entry at c is exactly 0.
    """
    logits = clean_logits if clean_logits.dtype == torch.float64 else clean_logits.float()
    num_classes = logits.shape[1]
    sigma = sigma.to(device=logits.device, dtype=logits.dtype).reshape(-1, 1)
    log_p0 = torch.log_softmax(logits, dim=1)
    log_spread = torch.log(-torch.expm1(-sigma)) - math.log(num_classes)  # -inf at sigma = 0 is handled
    log_pt = torch.logaddexp(log_p0 - sigma, log_spread)
    return mask_reference(log_pt - log_pt.gather(1, c.reshape(-1, 1)), c)


class DiffusionClassifier:
    """The protocol of every DiDiCM model (a mix-in for ``nn.Module`` subclasses).

    ``encode(x) -> z`` does the work that does not depend on (c, sigma) once per image; ``score(z, c, sigma)
    -> log_score [B, K]`` runs at each diffusion step with the entry at c exactly 0; ``forward(x, c, sigma)``
    is ``score(encode(x), c, sigma)``. Samplers should call ``encode`` once and pass ``score`` as the model.
    Subclasses set ``num_classes`` and ``parametrization`` ('score' or 'mean'); 'mean' models also have
    ``clean_logits(x) -> [B, K]``.
    """

    num_classes: int
    parametrization: str

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, z: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] float, c: [B] long, sigma: [B] float (or a scalar) -> log_score [B, K] float."""
        return self.score(self.encode(x), c, sigma)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and (Distributed)DataParallel wrappers (the model itself if bare)."""
    while True:
        # torch.compile keeps the model in _orig_mod, DDP in module
        inner = next((getattr(model, a) for a in ("_orig_mod", "module")
                      if isinstance(getattr(model, a, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


def is_diffusion_model(model: nn.Module) -> bool:
    """True for DiDiCM models (forward(x, c, sigma) -> log-ratios), False for plain classifiers (forward(x)).

    Looks through ``torch.compile`` and (Distributed)DataParallel wrappers.
    """
    return isinstance(unwrap_model(model), DiffusionClassifier)


class ConditionedMLPHead(nn.Module):
    """Pooled image features + (sigma, label) embedding -> K outputs, the per-step network of BackboneDiDiCM.

    in: LayerNorm -> Linear(F, W); then ``depth`` residual blocks h + Mlp(inject(LayerNorm(h), emb)); out:
    LayerNorm -> dropout -> Linear(W, K), zero-initialised so a fresh model predicts all log-ratios 0 (the
    uniform posterior) for 'score', uniform clean logits for 'mean'.

    Args:
        in_features: F, the width of the pooled backbone features.
        num_classes: K.
        width: W, the head's hidden width. depth: number of residual blocks. mlp_ratio: hidden width of each
            block's MLP as a multiple of W.
        embed_dim: width of the (sigma, label) embedding; conditioning: 'add' or 'film'.
        condition_inputs: False drops the embedding: the head then sees the features only ('mean' only).
        drop_rate: dropout before the output layer and inside the MLPs.
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 256, depth: int = 2, mlp_ratio: float = 2.0,
                 embed_dim: int = 128, conditioning: str = "add", condition_inputs: bool = True,
                 drop_rate: float = 0.0):
        super().__init__()
        if width <= 0 or depth < 0:
            raise ConfigError(f"head width must be > 0 and depth >= 0, got width={width}, depth={depth}")
        self.condition_inputs = condition_inputs
        self.embed = SigmaLabelEmbedding(num_classes, embed_dim) if condition_inputs else None
        self.in_norm = nn.LayerNorm(in_features)
        self.in_proj = nn.Linear(in_features, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.conds = nn.ModuleList(ChannelConditioning(embed_dim, width, conditioning) for _ in range(depth)) \
            if condition_inputs else None
        hidden = int(width * mlp_ratio)
        self.mlps = nn.ModuleList(Mlp(width, hidden, act_layer=nn.SiLU, drop=drop_rate) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(width, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor, c: torch.Tensor | None = None,
                sigma: torch.Tensor | None = None) -> torch.Tensor:
        """features: [B, F] float, c: [B] long, sigma: [B] float -> [B, K] float (raw, unmasked)."""
        h = self.in_proj(self.in_norm(features))
        emb = self.embed(c, sigma) if self.embed is not None else None
        for index, (norm, mlp) in enumerate(zip(self.norms, self.mlps, strict=True)):
            inner = norm(h)
            if emb is not None:
                inner = self.conds[index](inner, emb)
            h = h + mlp(inner)
        return self.fc(self.drop(self.out_norm(h)))
