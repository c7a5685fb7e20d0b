"""The forward process: a continuous-time Markov chain on K labels with the uniform rate matrix.

Q = (1 1^T - K I) / K, so exp(sigma Q) = e^{-sigma} I + (1 - e^{-sigma}) 1 1^T / K. Every operation here
uses that closed form and costs O(B K); no K x K matrix is ever built.
"""

from __future__ import annotations

import torch

from ..checks import value_checks_enabled
from ..errors import ConfigError, InputError
from .schedules import NoiseSchedule

__all__ = ["UniformDiffusion"]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (or integer) inputs are promoted: ratios reach 1e8 and need float32's range."""
    return x if x.dtype == torch.float64 else x.float()


def _column(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma [B] -> [B, 1] in the dtype of ``like``, for broadcasting over classes."""
    return sigma.to(like.dtype).reshape(-1, 1)


class UniformDiffusion:
    """Uniform-rate label diffusion over ``num_classes`` classes driven by ``schedule``.

    Args:
        num_classes: K, the number of classes (>= 2).
        schedule: maps t to (sigma, dsigma); see ``didicm.diffusion.schedules``.
    """

    def __init__(self, num_classes: int, schedule: NoiseSchedule):
        if int(num_classes) != num_classes or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.schedule = schedule

    def __repr__(self) -> str:
        return f"UniformDiffusion(num_classes={self.num_classes}, schedule={self.schedule!r})"

    # ---- checks shared by the public methods -------------------------------------------------------
    def _check_sigma(self, sigma: torch.Tensor, batch: int, name: str = "sigma") -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise InputError(f"{name} must have shape ({batch},) to match the batch, got {tuple(sigma.shape)}")
        if sigma.is_complex() or sigma.dtype == torch.bool:
            raise InputError(f"{name} must be a real-valued tensor, got {sigma.dtype}")
        # A NaN, infinite or negative noise level has no forward process; let it fail here, not as NaN later.
        if value_checks_enabled() and sigma.numel() and not (torch.isfinite(sigma).all() and (sigma >= 0).all()):
            raise InputError(f"{name} must be finite and >= 0; got values in [{sigma.min()}, {sigma.max()}]: "
                             f"check the time sampling and the noise schedule")
        return sigma

    def _check_labels(self, labels: torch.Tensor, name: str) -> torch.Tensor:
        if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"{name} must be a 1-D integer tensor of class indices, got "
                             f"shape {tuple(labels.shape)} and dtype {labels.dtype}")
        if value_checks_enabled() and labels.numel() and (int(labels.min()) < 0 or
                                                          int(labels.max()) >= self.num_classes):
            raise InputError(f"{name} holds class indices outside [0, {self.num_classes - 1}]")
        return labels.long()

    def _check_probs(self, probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise InputError(f"{name} must have shape (B, {self.num_classes}), got {tuple(probs.shape)}")
        if not torch.is_floating_point(probs):
            raise InputError(f"{name} must be a floating-point tensor, got {probs.dtype}")
        if value_checks_enabled() and probs.numel() and not (torch.isfinite(probs).all() and (probs >= 0).all()):
            raise InputError(f"{name} must hold finite, non-negative probabilities (e.g. softmax outputs or "
                             f"mixup targets); it has NaN, Inf or negative entries")
        return probs

    # ---- the forward process -----------------------------------------------------------------------
    def noise_probs(self, p0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """p_t = exp(sigma Q) p0 = e^{-sigma} p0 + (1 - e^{-sigma}) / K.

        Args:
            p0: [B, K] float, clean label distributions (one-hot or soft, e.g. mixup targets).
            sigma: [B] float, total noise.
        Returns:
            [B, K] float, the noisy label distribution, in p0's dtype.
        """
        p0 = self._check_probs(p0, "p0")
        sigma = _column(self._check_sigma(sigma, p0.shape[0]), p0)
        moved = -torch.expm1(-sigma)  # 1 - e^{-sigma}, exact at small sigma
        return (1.0 - moved) * p0 + moved / self.num_classes

    def sample_labels(self, c0: torch.Tensor, sigma: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw c_t ~ p_t(. | c0): with probability 1 - e^{-sigma}, replace c0 by a uniform class.

        Args:
            c0: [B] int, clean labels.
            sigma: [B] float, total noise.
            generator: optional torch.Generator for reproducible draws (on c0's device).
        Returns:
            [B] long, noisy labels.
        """
        c0 = self._check_labels(c0, "c0")
        sigma = self._check_sigma(sigma, c0.shape[0]).to(c0.device)
        moved = -torch.expm1(-sigma.double())
        u = torch.rand(c0.shape, generator=generator, device=c0.device, dtype=torch.float64)
        uniform = torch.randint(0, self.num_classes, c0.shape, generator=generator, device=c0.device)
        return torch.where(u < moved, uniform, c0)

    def log_target_ratios(self, c_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                          probs: torch.Tensor | None = None) -> torch.Tensor:
        """log r_j = log p_t(j) - log p_t(c_t), computed without cancellation. Same arguments as
        ``target_ratios``; the entry at c_t is exactly 0."""
        c_t = self._check_labels(c_t, "c_t")
        batch = c_t.shape[0]
        sigma = self._check_sigma(sigma, batch).to(c_t.device)
        if value_checks_enabled() and batch and not (sigma > 0).all():
            raise InputError("sigma must be > 0 for target ratios: at sigma = 0 they are 0 or infinite; "
                             "sample t from (0, 1] (e.g. t >= 1e-5)")
        if (labels is None) == (probs is None):
            raise InputError("pass exactly one of labels (hard, [B] int) or probs (soft, [B, K] float)")
        if labels is not None:
            labels = self._check_labels(labels, "labels")
            if labels.shape != c_t.shape:
                raise InputError(f"labels shape {tuple(labels.shape)} does not match c_t {tuple(c_t.shape)}")
            sigma = _at_least_float32(sigma)
            # With m = e^sigma - 1 (expm1: exact for small sigma) and a hard label c0:
            #   c_t == c0: r_j = m / (m + K) for j != c0, r_{c0} = 1
            #   c_t != c0: r_{c0} = 1 + K / m, every other r_j = 1
            m = torch.expm1(sigma).reshape(-1, 1)
            K = self.num_classes
            # log(1 + K / m): as log(m + K) - log(m) where K / m could overflow (tiny sigma), as log1p(K / m)
            # where m itself overflows (large sigma), which made log(m) - log(m + K) = inf - inf = NaN.
            boost = torch.where(m < 1, torch.log(m + K) - torch.log(m), torch.log1p(K / m))
            out = torch.zeros(batch, K, dtype=sigma.dtype, device=c_t.device)
            stayed = (c_t == labels).reshape(-1, 1)
            out = torch.where(stayed, -boost, out)
            onehot_c0 = torch.zeros_like(out, dtype=torch.bool).scatter_(1, labels.reshape(-1, 1), True)
            out = torch.where(~stayed & onehot_c0, boost.expand_as(out), out)
        else:
            probs = self._check_probs(probs)
            if probs.shape[0] != batch:
                raise InputError(f"probs has {probs.shape[0]} rows but c_t has {batch}")
            log_pt = torch.log(self.noise_probs(_at_least_float32(probs), sigma))
            out = log_pt - log_pt.gather(1, c_t.reshape(-1, 1))
        return out.scatter(1, c_t.reshape(-1, 1), 0.0)

    def target_ratios(self, c_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                      probs: torch.Tensor | None = None) -> torch.Tensor:
        """The exact concrete score r_j = p_t(j) / p_t(c_t), for hard ``labels`` or soft ``probs``.

        Args:
            c_t: [B] int, noisy labels.
            sigma: [B] float, total noise.
            labels: [B] int, clean hard labels c0 (then p_t = p_t(. | c0)); or
            probs: [B, K] float, clean soft labels (then p_t = exp(sigma Q) probs).
        Returns:
            [B, K] float, ratios; the entry at c_t is 1.
        """
        return torch.exp(self.log_target_ratios(c_t, sigma, labels=labels, probs=probs))
