"""Reverse-process samplers: from the uniform distribution at t = 1 to the posterior at t ~ 0.

CP (class probabilities) evolves one probability vector per image with the closed-form O(K) reverse-rate
product; CL (class labels) simulates N label chains per image, all B*N as one batch, and counts them.

Both accept any ``model(x, c, sigma) -> log_score [B, K]``: a network, or a closure over precomputed features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError, InputError
from .process import UniformDiffusion

__all__ = ["CPSampler", "CLSampler", "time_grid", "reverse_rate_times", "exponential_reverse_step", "CP_MODES",
           "CP_UPDATES", "GRIDS"]

ScoreModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CP_MODES = ("min", "max", "random")
CP_UPDATES = ("euler", "exponential")
GRIDS = ("consistent", "official")


def time_grid(steps: int, eps: float, grid: str = "consistent") -> tuple[torch.Tensor, torch.Tensor]:
    """The times at which the network is called and the Euler step taken from each, as float64 [S] each.

    'consistent': S+1 points 1 = t_0 > ... > t_S = eps; step i goes from t_i to t_{i+1}.
    'official': S points linspace(1, eps, S), each stepping by (1 - eps) / S (the official code's grid,
    whose last step runs past t = 0; kept for faithful comparisons).
    """
    if grid == "consistent":
        points = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
        return points[:-1], points[:-1] - points[1:]
    if grid == "official":
        times = torch.linspace(1.0, eps, steps, dtype=torch.float64)
        return times, torch.full((steps,), (1.0 - eps) / steps, dtype=torch.float64)
    raise ConfigError(f"unknown time grid {grid!r}; choose one of {GRIDS}")


def _score_weights(log_score: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a = softmax(s) in ``dtype``, with every log-ratio held within half the exponent range of the largest one."""
    log_score = log_score.to(dtype)
    shifted = log_score - log_score.amax(dim=1, keepdim=True)
    # 1 / a_j overflows (then inf * 0 = NaN) once a log-ratio spread passes ~709 in float64 or ~88 in float32.
    # Bounding it at half the exponent range keeps the product finite; only a class whose outflow already
    # exceeds its mass by many orders of magnitude (the clamp in ``run`` zeroes it either way) is affected.
    shifted = shifted.clamp_min(-0.5 * math.log(torch.finfo(dtype).max))
    # One exp and a reciprocal instead of log_softmax and two exps: exp dominates the cost of a CP step.
    unnormalized = torch.exp(shifted)
    return unnormalized / unnormalized.sum(dim=1, keepdim=True)


def reverse_rate_times(probs: torch.Tensor, log_score: torch.Tensor) -> torch.Tensor:
    """(R p) for the uniform graph, in O(K): R_ij = (a_i / a_j) Q_ij off the diagonal, columns summing to 0.

    With a = softmax(s) (so sum a = 1): (R p)_i = (a_i sum_j p_j / a_j - p_i / a_i) / K.

    Args:
        probs: [B, K] float, current state p.
        log_score: [B, K] float, log a up to a per-row constant (log-ratios to any reference label).
    Returns:
        [B, K], the time derivative of p per unit of sigma in the reverse direction.
    """
    a = _score_weights(log_score, probs.dtype)
    p_over_a = probs * a.reciprocal()
    return (a * p_over_a.sum(dim=1, keepdim=True) - p_over_a) / probs.shape[1]


def exponential_reverse_step(probs: torch.Tensor, log_score: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One CP step of length ``h`` (in sigma) that cannot leave the simplex, in O(K) (exponential Euler).

    R p splits into an outflow r_i p_i, r_i = (1 / a_i - 1) / K, and an inflow g_i = (a_i / K) sum_{j != i}
    p_j / a_j >= 0. The outflow is integrated exactly over the step and the inflow held at its start value:
    p_i <- p_i e^{-h r_i} + g_i (1 - e^{-h r_i}) / r_i. Every term is non-negative, so no clamp is needed: where
    h r_i is large (the Euler step overshoots and its clamp sets the class to exactly 0) the class ends near its
    quasi-steady value g_i / r_i instead, positive unless it underflows (in float64 state, or below float16's
    6e-8 once saved as float16). First order in h; with exact scores its error is larger than the Euler step's at
    the same S (tests/test_samplers.py). The mass is restored by the caller's renormalisation.

    Args:
        probs: [B, K] float, current state p; log_score: [B, K] float; h: [B, 1] float, dt * dsigma.
    Returns:
        [B, K], unnormalised.
    """
    a = _score_weights(log_score, probs.dtype)
    inv_a = a.reciprocal()
    p_over_a = probs * inv_a
    inflow = a * (p_over_a.sum(dim=1, keepdim=True) - p_over_a) / probs.shape[1]
    rate = (inv_a - 1.0).clamp_min(0.0) / probs.shape[1]
    decay = torch.exp(-h * rate)
    # (1 - e^{-h r}) / r, which tends to h as r -> 0 (a class holding all the weight has no outflow)
    gain = torch.where(h * rate > 1e-12, -torch.expm1(-h * rate) / rate.clamp_min(torch.finfo(probs.dtype).tiny),
                       h.expand_as(rate))
    return probs * decay + inflow * gain


def _check_common(steps: int, eps: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 < eps < 1.0:
        raise ConfigError(f"eps must lie in (0, 1), got {eps!r}")


def _call_model(model: ScoreModel, x: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor,
                num_classes: int) -> torch.Tensor:
    log_score = model(x, c, sigma)
    if not isinstance(log_score, torch.Tensor) or log_score.shape != (c.shape[0], num_classes):
        shape = tuple(log_score.shape) if isinstance(log_score, torch.Tensor) else type(log_score).__name__
        raise InputError(f"model(x, c, sigma) must return log-ratios of shape ({c.shape[0]}, {num_classes}), "
                         f"got {shape}: does the model's num_classes match the diffusion's?")
    if not torch.is_floating_point(log_score):
        raise InputError(f"model(x, c, sigma) must return floating-point log-ratios, got {log_score.dtype}")
    if not torch.isfinite(log_score).all():
        raise InputError("model returned NaN or Inf log-ratios; check the input images and the checkpoint")
    # The entry at c is log(p_t(c)/p_t(c)) = 0 by definition, whatever the network wrote there.
    return log_score.scatter(1, c.reshape(-1, 1), 0.0)


def _check_x(x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 0:
        raise InputError("x must be a tensor whose first dimension is a non-empty batch")
    if torch.is_floating_point(x) and not torch.isfinite(x).all():
        raise InputError("x contains NaN or Inf values")
    return x.shape[0]


@dataclass
class CPSampler:
    """Class-probability sampler: S network calls per image, state = one probability vector.

    Args:
        diffusion: the label diffusion (gives K and the schedule).
        steps: S, network evaluations per image.
        eps: the final time t_S.
        mode: which label the network is conditioned on each step: 'min' (argmin p, official default),
            'max' (argmax p) or 'random' (a uniform draw).
        grid: 'consistent' (default) or 'official'; see ``time_grid``.
        update: 'euler' (the paper's: p + h R p, clamped to [0, 1] and renormalised; an overshooting step sets a
            class to exactly 0) or 'exponential' (``exponential_reverse_step``: no clamp, so no class is zeroed
            by the step itself).
    """

    diffusion: UniformDiffusion
    steps: int = 8
    eps: float = 1e-5
    mode: str = "min"
    grid: str = "consistent"
    update: str = "euler"

    def __post_init__(self):
        _check_common(self.steps, self.eps)
        if self.mode not in CP_MODES:
            raise ConfigError(f"unknown CP label mode {self.mode!r}; choose one of {CP_MODES}")
        if self.update not in CP_UPDATES:
            raise ConfigError(f"unknown CP update {self.update!r}; choose one of {CP_UPDATES}")
        time_grid(1, self.eps, self.grid)  # validates the grid name

    @property
    def evaluations_per_image(self) -> int:
        return self.steps

    def _labels(self, probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.mode == "min":
            return probs.argmin(dim=1)
        if self.mode == "max":
            return probs.argmax(dim=1)
        return torch.randint(0, probs.shape[1], (probs.shape[0],), generator=generator, device=probs.device)

    @torch.no_grad()
    def run(self, model: ScoreModel, x: torch.Tensor, generator: torch.Generator | None = None,
            return_trajectory: bool = False):
        """Returns probs [B, K] float32, and with ``return_trajectory`` also [B, S+1, K] (uniform first)."""
        batch = _check_x(x)
        K = self.diffusion.num_classes
        # float64 state where the device has it: 1/a_j spans many decades when the posterior is sharp.
        state_dtype = torch.float32 if x.device.type == "mps" else torch.float64
        probs = torch.full((batch, K), 1.0 / K, dtype=state_dtype, device=x.device)
        trajectory = [probs] if return_trajectory else None
        times, dts = time_grid(self.steps, self.eps, self.grid)
        for t, dt in zip(times.tolist(), dts.tolist(), strict=True):
            t_batch = torch.full((batch,), t, dtype=torch.float64, device=x.device)
            sigma, dsigma = self.diffusion.schedule(t_batch)
            c = self._labels(probs, generator)
            log_score = _call_model(model, x, c, sigma.float(), K)
            h = (dt * dsigma).reshape(-1, 1)
            if self.update == "euler":
                probs = probs + h * reverse_rate_times(probs, log_score)
                # Euler steps can overshoot the simplex when h is large; project back as the paper does.
                probs = probs.clamp(0.0, 1.0)
            else:
                probs = exponential_reverse_step(probs, log_score, h)
            probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(state_dtype).tiny)
            if return_trajectory:
                trajectory.append(probs)
        out = probs.float()
        if return_trajectory:
            return out, torch.stack(trajectory, dim=1).float()
        return out


@dataclass
class CLSampler:
    """Class-label sampler: N label chains per image, S steps each, all B*N chains as one batch.

    Args:
        diffusion: the label diffusion.
        steps: S; chains: N. The network is evaluated S*N times per image.
        eps: the final time; grid: 'consistent' or 'official'.
    """

    diffusion: UniformDiffusion
    steps: int = 8
    eps: float = 1e-5
    chains: int = 10
    grid: str = "consistent"

    def __post_init__(self):
        _check_common(self.steps, self.eps)
        if not isinstance(self.chains, int) or isinstance(self.chains, bool) or self.chains <= 0:
            raise ConfigError(f"chains must be a positive integer, got {self.chains!r}")
        time_grid(1, self.eps, self.grid)

    @property
    def evaluations_per_image(self) -> int:
        return self.steps * self.chains

    @torch.no_grad()
    def run(self, model: ScoreModel, x: torch.Tensor, generator: torch.Generator | None = None,
            return_trajectory: bool = False):
        """Returns the histogram of final labels [B, K] float32, and with ``return_trajectory`` also the
        chains [B, N, S+1] long (the uniform draw first)."""
        batch = _check_x(x)
        K, N = self.diffusion.num_classes, self.chains
        x_chains = x.repeat_interleave(N, dim=0)  # chain n of image b sits at row b * N + n
        labels = torch.randint(0, K, (batch * N,), generator=generator, device=x.device)
        history = [labels] if return_trajectory else None
        times, dts = time_grid(self.steps, self.eps, self.grid)
        for t, dt in zip(times.tolist(), dts.tolist(), strict=True):
            t_batch = torch.full((batch * N,), t, dtype=torch.float64, device=x.device)
            sigma, dsigma = self.diffusion.schedule(t_batch)
            log_score = _call_model(model, x_chains, labels, sigma.float(), K).double()
            # Euler transition: leave for j with probability dt * dsigma * exp(s_j) / K, stay otherwise.
            leave = (dt * dsigma).reshape(-1, 1) * torch.exp(log_score) / K
            leave = leave.scatter(1, labels.reshape(-1, 1), 0.0)
            stay = (1.0 - leave.sum(dim=1, keepdim=True)).clamp_min(0.0)
            weights = leave.scatter(1, labels.reshape(-1, 1), stay)
            labels = _gumbel_argmax(weights, generator)
            if return_trajectory:
                history.append(labels)
        counts = torch.zeros(batch * N, K, device=x.device).scatter_(1, labels.reshape(-1, 1), 1.0)
        probs = counts.reshape(batch, N, K).mean(dim=1)
        if return_trajectory:
            return probs, torch.stack(history, dim=1).reshape(batch, N, self.steps + 1)
        return probs


def _gumbel_argmax(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from the unnormalized non-negative ``weights`` [R, K] (Gumbel-max trick)."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=weights.dtype)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(weights.dtype).tiny)))
    return (torch.log(weights) + gumbel).argmax(dim=1)
