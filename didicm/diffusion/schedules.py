"""Noise schedules sigma(t) for the label diffusion.

A schedule maps time t in [0, 1] to the total noise sigma(t) and its rate dsigma/dt. At sigma = 0 the label
is clean; as sigma grows the label forgets itself at rate e^{-sigma}.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

__all__ = ["NoiseSchedule", "LogLinearSchedule", "GeometricSchedule", "create_schedule"]


class NoiseSchedule:
    """Base class: ``schedule(t) -> (sigma, dsigma)``, both of the shape and dtype of ``t``."""

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t)
        if not torch.is_floating_point(t):
            t = t.to(torch.get_default_dtype())
        return self.sigma(t), self.dsigma(t)


class LogLinearSchedule(NoiseSchedule):
    """sigma(t) = -log(1 - (1 - eps) t): the probability of keeping the label falls linearly in t.

    Math: e^{-sigma(t)} = 1 - (1 - eps) t, so dsigma/dt = (1 - eps) / (1 - (1 - eps) t), which reaches
    1/eps at t = 1. This is the official DiDiCM (and SEDD) default.
    """

    def __init__(self, eps: float = 1e-3):
        if not 0.0 < eps < 1.0:
            raise ConfigError(f"LogLinearSchedule: eps must lie in (0, 1), got {eps!r}")
        self.eps = float(eps)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        # log1p keeps full precision at small t, where sigma ~ (1 - eps) t.
        return -torch.log1p(-(1.0 - self.eps) * t)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def __repr__(self) -> str:
        return f"LogLinearSchedule(eps={self.eps})"


class GeometricSchedule(NoiseSchedule):
    """sigma(t) = sigma_min^(1-t) sigma_max^t, so dsigma/dt = sigma(t) log(sigma_max / sigma_min)."""

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 1.0):
        if not 0.0 < sigma_min < sigma_max:
            raise ConfigError(
                f"GeometricSchedule needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, "
                f"sigma_max={sigma_max!r}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max) - math.log(self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(math.log(self.sigma_min) + t * self._log_ratio)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t) * self._log_ratio

    def __repr__(self) -> str:
        return f"GeometricSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


def create_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name ('loglinear' or 'geometric'), as configs and checkpoints store it."""
    kinds = {"loglinear": LogLinearSchedule, "geometric": GeometricSchedule}
    if name not in kinds:
        raise ConfigError(f"unknown noise schedule {name!r}; choose one of {sorted(kinds)}")
    return kinds[name](**kwargs)
