"""Noise schedules: sigma(t) and dsigma(t) against their definitions and against finite differences."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import didicm
from didicm.diffusion import create_schedule

SCHEDULES = [
    didicm.LogLinearSchedule(),
    didicm.LogLinearSchedule(eps=1e-5),
    didicm.LogLinearSchedule(eps=0.3),
    didicm.GeometricSchedule(),
    didicm.GeometricSchedule(sigma_min=1e-4, sigma_max=20.0),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_dsigma_matches_central_finite_differences(schedule):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h)
    _, dsigma = schedule(t)
    torch.testing.assert_close(dsigma, numeric, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("eps", [1e-3, 1e-5, 0.5])
def test_loglinear_endpoints(eps):
    schedule = didicm.LogLinearSchedule(eps=eps)
    sigma, dsigma = schedule(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert sigma[0].item() == 0.0
    # e^{-sigma(1)} = eps: the label survives to t = 1 with probability eps.
    assert math.isclose(math.exp(-sigma[1].item()), eps, rel_tol=1e-9)  # 1 - (1 - eps) rounds
    assert math.isclose(dsigma[0].item(), 1.0 - eps, rel_tol=1e-12)
    assert math.isclose(dsigma[1].item(), (1.0 - eps) / eps, rel_tol=1e-9)


def test_loglinear_matches_its_definition_in_float32_at_small_t():
    # -log(1 - (1 - eps) t) evaluated naively loses every digit at t = 1e-9 in float32; log1p must not.
    schedule = didicm.LogLinearSchedule(eps=1e-3)
    t = torch.tensor([1e-9, 1e-5, 0.5], dtype=torch.float32)
    expected = -torch.log1p(-(1.0 - 1e-3) * t.double())
    torch.testing.assert_close(schedule.sigma(t).double(), expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("sigma_min,sigma_max", [(1e-3, 1.0), (1e-4, 20.0), (0.5, 2.0)])
def test_geometric_endpoints_and_rate(sigma_min, sigma_max):
    schedule = didicm.GeometricSchedule(sigma_min=sigma_min, sigma_max=sigma_max)
    sigma, dsigma = schedule(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    expected = torch.tensor([sigma_min, math.sqrt(sigma_min * sigma_max), sigma_max], dtype=torch.float64)
    torch.testing.assert_close(sigma, expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(dsigma, expected * math.log(sigma_max / sigma_min), rtol=1e-12, atol=0.0)


def test_schedule_keeps_shape_and_dtype_and_promotes_integer_time():
    schedule = didicm.LogLinearSchedule()
    for dtype in (torch.float32, torch.float64):
        sigma, dsigma = schedule(torch.rand(7, dtype=dtype))
        assert sigma.shape == dsigma.shape == (7,)
        assert sigma.dtype == dsigma.dtype == dtype
    sigma, _ = schedule(torch.tensor([0, 1]))
    assert torch.is_floating_point(sigma)
    assert sigma[0].item() == 0.0


@given(t=st.floats(min_value=0.0, max_value=1.0), eps=st.floats(min_value=1e-6, max_value=0.9))
@settings(max_examples=60, deadline=None)
def test_loglinear_keep_probability_is_linear_in_t(t, eps):
    sigma, dsigma = didicm.LogLinearSchedule(eps=eps)(torch.tensor([t], dtype=torch.float64))
    assert math.isclose(math.exp(-sigma.item()), 1.0 - (1.0 - eps) * t, rel_tol=1e-12, abs_tol=1e-15)
    assert dsigma.item() > 0.0
    assert sigma.item() >= 0.0


@pytest.mark.parametrize("bad", [
    lambda: didicm.LogLinearSchedule(eps=0.0),
    lambda: didicm.LogLinearSchedule(eps=1.0),
    lambda: didicm.LogLinearSchedule(eps=-0.1),
    lambda: didicm.GeometricSchedule(sigma_min=0.0),
    lambda: didicm.GeometricSchedule(sigma_min=2.0, sigma_max=1.0),
    lambda: create_schedule("cosine"),
])
def test_bad_schedule_options_raise_config_error(bad):
    with pytest.raises(didicm.ConfigError):
        bad()


def test_create_schedule_builds_by_name():
    schedule = create_schedule("geometric", sigma_min=0.1, sigma_max=3.0)
    assert isinstance(schedule, didicm.GeometricSchedule)
    assert (schedule.sigma_min, schedule.sigma_max) == (0.1, 3.0)
    assert create_schedule("loglinear", eps=1e-4).eps == 1e-4
