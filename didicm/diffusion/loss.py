"""Score entropy: the training loss of the concrete score, for hard and soft (mixup/cutmix) labels."""

from __future__ import annotations

import torch

from ..checks import value_checks_enabled
from ..errors import InputError
from .process import UniformDiffusion

__all__ = ["score_entropy"]

# Above this gap between the score and the log target, expm1(u) - u is dominated by exp(u) and the
# product r * exp(u) is better formed as exp(s): it avoids an overflow of exp(u) when r is tiny.
_LARGE_GAP = 20.0


def _bregman(log_score: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """r (e^u - u - 1) with u = s - log r: the per-class score entropy, >= 0 and 0 exactly at s = log r.

    Written as r * (expm1(u) - u) it has no cancellation near the optimum, unlike
    exp(s) - r s + r (log r - 1) evaluated term by term.
    """
    ratio = torch.exp(log_ratio)
    gap = log_score - log_ratio
    large = gap > _LARGE_GAP
    # Each branch sees only inputs where it is used, so the unused branch never produces inf/NaN gradients.
    small_gap = torch.where(large, torch.zeros_like(gap), gap)
    near = ratio * (torch.expm1(small_gap) - small_gap)
    far_score = torch.where(large, log_score, torch.zeros_like(log_score))
    far = torch.exp(far_score) - ratio * (torch.where(large, gap, torch.zeros_like(gap)) + 1.0)
    return torch.where(large, far, near)


def score_entropy(log_score: torch.Tensor, c_t: torch.Tensor, sigma: torch.Tensor, dsigma: torch.Tensor,
                  labels: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising score entropy per example, weighted by dsigma.

    Math: L = dsigma * (1/K) * sum_{j != c_t} [exp(s_j) - r_j s_j + r_j (log r_j - 1)], with r_j the exact
    ratio p_t(j) / p_t(c_t) of the hard label ``labels`` or the soft label ``probs``.

    Args:
        log_score: [B, K] float, the network's log-ratios s_j (the entry at c_t is ignored).
        c_t: [B] int, the noisy labels the network saw.
        sigma: [B] float, total noise; dsigma: [B] float, its rate (the loss weight).
        labels: [B] int clean labels, or probs: [B, K] float soft labels (rows sum to 1).
    Returns:
        [B] float32 (or float64 for float64 input), >= 0, zero where log_score equals the exact log-ratios.
    """
    if log_score.ndim != 2:
        raise InputError(f"log_score must have shape (B, K), got {tuple(log_score.shape)}")
    batch, num_classes = log_score.shape
    if not torch.is_floating_point(log_score):
        raise InputError(f"log_score must be a floating-point tensor, got {log_score.dtype}")
    if value_checks_enabled() and log_score.numel() and not torch.isfinite(log_score).all():
        raise InputError("log_score holds NaN or Inf: the network diverged or saw NaN inputs; check the data, "
                         "lower the learning rate or clip gradients")
    c_t = torch.as_tensor(c_t)
    if c_t.shape != (batch,):
        raise InputError(f"c_t must have shape ({batch},) to match log_score, got {tuple(c_t.shape)}")
    diffusion = UniformDiffusion(num_classes, schedule=None)  # only the closed forms are used
    # Validated before the casts below, which would silently drop an imaginary part.
    sigma = diffusion._check_sigma(sigma, batch)
    dsigma = diffusion._check_sigma(dsigma, batch, name="dsigma")
    # The loss runs in float32 even under autocast: the weight reaches 1/eps and the ratios 1e8.
    device_type = log_score.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        s = log_score if log_score.dtype == torch.float64 else log_score.float()
        log_r = diffusion.log_target_ratios(c_t, sigma.to(s.dtype), labels=labels, probs=probs).to(s.dtype)
        per_class = _bregman(s, log_r)
        per_class = per_class.scatter(1, c_t.reshape(-1, 1).long(), 0.0)  # j = c_t is not a term
        return dsigma.to(s.dtype) * per_class.sum(dim=1) / num_classes
