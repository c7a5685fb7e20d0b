"""The training objectives' Monte Carlo estimators: every t-sampling scheme estimates the same integral."""

import math

import pytest
import torch

from didicm import GeometricSchedule, LogLinearSchedule, UniformDiffusion
from didicm.objectives import cross_entropy_loss, draw_noise, draw_times


@pytest.mark.parametrize("schedule", [LogLinearSchedule(1e-3), GeometricSchedule(1e-3, 5.0)])
@pytest.mark.parametrize("sampling", ["uniform", "antithetic", "sigma"])
def test_every_sampling_scheme_estimates_the_integral_over_sigma(schedule, sampling):
    # E_{t ~ U(t_min, 1)} [dsigma(t) f(sigma(t))] = integral_{sigma(t_min)}^{sigma(1)} f(s) ds / (1 - t_min)
    diffusion, t_min = UniformDiffusion(10, schedule), 1e-5
    low, high = schedule.sigma(torch.tensor([t_min, 1.0], dtype=torch.float64)).tolist()
    exact = (math.exp(-2 * low) - math.exp(-2 * high)) / 2 / (1 - t_min)  # f(s) = exp(-2 s)
    g = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(200):
        sigma, weight = draw_noise(diffusion, 512, t_min, sampling, generator=g)
        assert sigma.shape == weight.shape == (512,) and (sigma > 0).all()
        estimates.append((weight.double() * torch.exp(-2 * sigma.double())).mean().item())
    mean = sum(estimates) / len(estimates)
    spread = (sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1)) ** 0.5 / len(estimates) ** 0.5
    assert abs(mean - exact) < 5 * spread + 1e-6


def test_sigma_sampling_has_bounded_weights_and_lower_variance():
    diffusion = UniformDiffusion(10, LogLinearSchedule(1e-3))
    g = torch.Generator().manual_seed(1)
    _, w_uniform = draw_noise(diffusion, 20000, 1e-5, "uniform", generator=g)
    _, w_sigma = draw_noise(diffusion, 20000, 1e-5, "sigma", generator=g)
    assert w_uniform.max() > 100 and torch.allclose(w_sigma, w_sigma[0].expand_as(w_sigma))
    assert w_sigma[0] == pytest.approx(math.log(1000.0), rel=1e-3)  # (sigma(1) - sigma(1e-5)) / (1 - 1e-5)


def test_antithetic_times_cover_every_stratum_once():
    t = draw_times(64, 0.0, "antithetic", generator=torch.Generator().manual_seed(2))
    strata = torch.floor(t * 64).long().sort().values
    assert torch.equal(strata, torch.arange(64))


def test_cross_entropy_soft_targets_match_hard_labels():
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    onehot = torch.nn.functional.one_hot(labels, 5).float()
    torch.testing.assert_close(cross_entropy_loss(logits, onehot), cross_entropy_loss(logits, labels))
    torch.testing.assert_close(cross_entropy_loss(logits, onehot, 0.1), cross_entropy_loss(logits, labels, 0.1))


def test_noisy_label_control_is_cross_entropy_against_the_noised_label():
    from didicm.objectives import noisy_label_cross_entropy

    diffusion = UniformDiffusion(5, LogLinearSchedule(1e-3))
    logits, labels = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 5, (64,))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loss = noisy_label_cross_entropy(logits, labels, diffusion, t_min=1e-5, generator=g1)
    t = draw_times(64, 1e-5, "uniform", g2)
    keep = 1.0 - (1.0 - 1e-3) * t.double()  # e^{-sigma(t)} for the log-linear schedule
    target = keep[:, None] * torch.nn.functional.one_hot(labels, 5) + (1 - keep[:, None]) / 5
    expected = -(target * torch.log_softmax(logits, 1)).sum(1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
