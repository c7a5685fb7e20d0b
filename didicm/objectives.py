"""Per-batch training objectives: (model, images, targets) -> per-example loss [B].

DiDiCM draws one (t, c_t) per image and scores it with score entropy; the cross-entropy arm (the twin,
or any timm classifier) is the plain classification loss. Both accept hard labels [B] or soft targets
[B, K] (mixup/cutmix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import value_checks_enabled
from .diffusion import UniformDiffusion, score_entropy
from .errors import ConfigError
from .models.layers import unwrap_model

__all__ = ["draw_times", "draw_noise", "diffusion_loss", "cross_entropy_loss", "noisy_label_cross_entropy",
           "epsilon_loss", "heldout_epsilon_loss"]


def draw_times(batch: int, t_min: float, sampling: str, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """t in [t_min, 1], [B] float32. 'antithetic' stratifies U(0, 1) over the batch (one draw per 1/B-wide
    stratum, shuffled), which keeps the batch's t spread even and lowers the loss's variance."""
    u = torch.rand(batch, generator=generator, device=device)
    if sampling == "antithetic":
        strata = torch.randperm(batch, generator=generator, device=device).float()
        u = (strata + u) / batch
    return t_min + (1.0 - t_min) * u


def draw_noise(diffusion: UniformDiffusion, batch: int, t_min: float, sampling: str,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
    """(sigma, loss weight), each [B] float32, for one Monte Carlo draw of the time integral of the loss.

    'uniform'/'antithetic': t ~ U(t_min, 1) and weight dsigma(t) (the paper's estimator; the weight reaches
    1/eps near t = 1, so a few draws dominate the gradient). 'sigma': the same integral after the change of
    variables t -> sigma, i.e. importance sampling t with density proportional to dsigma: sigma ~
    U(sigma(t_min), sigma(1)) and a constant weight (sigma(1) - sigma(t_min)) / (1 - t_min). Same
    expectation, bounded weights.
    """
    if sampling == "sigma":
        ends = torch.tensor([t_min, 1.0], dtype=torch.float64)
        low, high = diffusion.schedule.sigma(ends).tolist()
        u = torch.rand(batch, generator=generator, device=device)
        sigma = low + (high - low) * u
        # divided by the interval's length, like the uniform estimator: both estimate E_{t ~ U(t_min, 1)}
        return sigma, torch.full_like(sigma, (high - low) / (1.0 - t_min))
    t = draw_times(batch, t_min, sampling, generator, device)
    return diffusion.schedule(t)


def diffusion_loss(model, diffusion: UniformDiffusion, images: torch.Tensor, targets: torch.Tensor,
                   t_min: float = 1e-5, t_sampling: str = "uniform", ce_weight: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Score entropy at one random (t, c_t) per image.

    Args:
        model: ``model(x, c, sigma) -> log_score [B, K]``.
        images: [B, ...] input batch. targets: [B] int hard labels or [B, K] float soft labels.
        ce_weight: for 'mean' models, adds ce_weight * cross-entropy of the clean logits (hybrid loss).
    Returns:
        [B] float, per-example loss.
    """
    batch, device = images.shape[0], images.device
    sigma, dsigma = draw_noise(diffusion, batch, t_min, t_sampling, generator, device)
    if targets.ndim == 1:
        c_t = diffusion.sample_labels(targets, sigma, generator=generator)
        labels, probs = targets, None
    else:
        # Drawing c0 from the soft label, then noising it, samples c_t from p_t exactly.
        c0 = torch.multinomial(targets.float(), 1, generator=generator).squeeze(1)
        c_t = diffusion.sample_labels(c0, sigma, generator=generator)
        labels, probs = None, targets
    log_score = model(images, c_t, sigma)
    if value_checks_enabled() and not torch.isfinite(log_score).all():
        # A diverged network is the training loop's to handle (skip and count the step), not an input error.
        return torch.full((batch,), float("nan"), device=device)
    loss = score_entropy(log_score, c_t, sigma, dsigma, labels=labels, probs=probs)
    if ce_weight > 0:
        # Hybrid loss (study arm): anchors the mean readout to cross-entropy; costs one extra forward pass.
        loss = loss + ce_weight * cross_entropy_loss(model.clean_logits(images), targets)
    return loss


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """[B] cross-entropy for hard labels [B] or soft targets [B, K]."""
    logits = logits.float()
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
    if label_smoothing > 0:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[1]
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1)


def noisy_label_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, diffusion: UniformDiffusion,
                              t_min: float = 1e-5, t_sampling: str = "uniform",
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy against the label noised to a random t: the study's control for DiDiCM's label noise.

    Each image's target is p_t = e^{-sigma} y + (1 - e^{-sigma}) / K at its own sigma(t), t ~ U(t_min, 1): label
    smoothing of strength 1 - e^{-sigma(t)}, the label-space noise DiDiCM trains on, without the diffusion.
    Returns [B] float.
    """
    batch = logits.shape[0]
    t = draw_times(batch, t_min, t_sampling, generator, logits.device)
    sigma, _ = diffusion.schedule(t)
    clean = targets.float() if targets.ndim == 2 else F.one_hot(targets, logits.shape[1]).float()
    return cross_entropy_loss(logits, diffusion.noise_probs(clean, sigma))


def epsilon_loss(model, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DDPM's simple loss for the class-conditional image diffusion model (the generative peer), per image [B]:
    ||eps - eps_theta(x_t, t, c)||^2 averaged over pixels, t ~ U{0..T-1}, and the label replaced by the null
    class with probability ``label_dropout`` (so the same network also predicts unconditionally)."""
    inner = unwrap_model(model)  # the UNet's attributes, also under DDP
    if targets.ndim != 1:
        raise ConfigError("the generative model trains on hard labels; turn off mixup/cutmix (optim.mixup=0, "
                          "optim.cutmix=0)")
    batch = images.shape[0]
    t = torch.randint(0, inner.timesteps, (batch,), device=images.device)
    noise = torch.randn_like(images)
    drop = torch.rand(batch, device=images.device) < inner.label_dropout
    labels = torch.where(drop, torch.full_like(targets, inner.null_class), targets)
    predicted = model(inner.add_noise(images, t, noise), t, labels)
    return (predicted.float() - noise.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def heldout_epsilon_loss(model, images: torch.Tensor, targets: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The generative model's denoising loss on held-out images, per image [B]: the quantity its Diffusion
    Classifier compares across classes (||eps - eps_theta(x_t, t, c)||^2), with the true label and no label
    dropout. t is stratified over the chain (one of B equal strata per image, in random order) and (t, eps)
    come from ``generator``, so two validations with the same seed score the same draws and their difference
    reflects the weights only."""
    inner = unwrap_model(model)
    batch = images.shape[0]
    strata = torch.randperm(batch, generator=generator, device=images.device)
    offset = torch.rand(batch, generator=generator, device=images.device)
    t = ((strata + offset) / batch * inner.timesteps).long().clamp(0, inner.timesteps - 1)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    predicted = model(inner.add_noise(images, t, noise), t, targets)
    return (predicted.float() - noise.float()).pow(2).flatten(1).mean(1)
